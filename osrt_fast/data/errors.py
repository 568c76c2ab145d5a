"""Bad-input handling shared by the loaders: the error type, and counted skipping of corrupt data."""
from __future__ import annotations

import itertools
import os
import warnings

from ..errors import DataError  # noqa: F401  (data's own name for it)


class CorruptFile(Exception):
    """One record or file is missing, damaged or does not fit the dataset (wrong size, ids out of
    range); the message names the file and the reason. The loader skips it (see SkipCounter)."""


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
        """(scene, read(scene)) for the first of `scenes` whose data reads, noting each corrupt
        one; DataError(error, with the last reason and how to list every problem) once `limit`
        scenes in a row have failed.

        `scenes` is a fixed function of the item (its scene, then the following ones), so the
        substitute, and with it a resumed run, does not depend on what failed before."""
        last = "no scenes to try"
        for scene in itertools.islice(scenes, limit):
            try:
                return scene, read(scene)
            except CorruptFile as e:
                last = str(e)
                self.note(last)
        raise DataError(f"{error} (last: {last}). List every damaged file with "
                        f"`python -m osrt_fast.data.check CONFIG`.")

    def __getstate__(self):
        return {"what": self.what, "count": 0}
