"""Bad-input handling shared by the loaders: the error type, and counted skipping of corrupt data."""
from __future__ import annotations

import itertools
import os
import warnings


class DataError(ValueError):
    """A dataset folder or setting is unusable; the message names the problem and the fix."""


class CorruptFile(Exception):
    """One record or image could not be decoded; the loader skips it (see SkipCounter)."""


class DataWarning(UserWarning):
    pass


class SkipCounter:
    """Counts records skipped as corrupt in this process (each DataLoader worker has its own),
    and warns for each one with the running count, so a skip is never silent."""

    def __init__(self, what: str):
        self.what, self.count = what, 0

    def note(self, reason: str) -> None:
        self.count += 1
        warnings.warn(f"skipping a corrupt {self.what} ({reason}); {self.count} skipped so far in "
                      f"process {os.getpid()}", DataWarning, stacklevel=3)

    def first_readable(self, read, scenes, limit: int, error: str):
        """(scene, read(scene)) for the first of `scenes` whose data decodes, noting each corrupt
        one; DataError(error) once `limit` scenes in a row have failed."""
        for scene in itertools.islice(scenes, limit):
            try:
                return scene, read(scene)
            except CorruptFile as e:
                self.note(str(e))
        raise DataError(error)

    def __getstate__(self):
        return {"what": self.what, "count": 0}
