"""The data error, below the data readers (data/) and the scene generator (scenes.py), which both
raise it: a dataset folder or setting is unusable."""
from __future__ import annotations


class DataError(ValueError):
    """A dataset folder or setting is unusable; the message names the problem and the fix."""
