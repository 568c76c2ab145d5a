"""Writing files: what to tell a user when the disk is full, read-only or not theirs."""
from __future__ import annotations

import contextlib
import errno
import functools
import os
import shutil
import tempfile
from typing import Optional

from .errors import UserError

# Prefix of the temporary files `write_atomic` writes beside their targets.
TMP_PREFIX = ".tmp-"


class WriteError(UserError, RuntimeError):
    """A file of the run could not be written; the message names the cause and the fix."""


def _size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GB"


def _free_bytes(path: str) -> Optional[int]:
    folder = path if os.path.isdir(path) else os.path.dirname(os.path.abspath(path))
    try:
        return shutil.disk_usage(folder).free
    except OSError:
        return None


def explain_write_error(e: BaseException, path: str, needed: Optional[int] = None,
                        elsewhere: str = "train.py --run-dir DIR",
                        kept: Optional[str] = "the existing file, if any, is kept"
                        ) -> Optional[str]:
    """Why writing `path` failed, in words with the fix, for a full disk, an exceeded quota, a
    read-only file system or missing permission; None for any other error. torch.save reports
    a full disk as a RuntimeError without errno, so for those the free space decides.
    `elsewhere` says how the command writes to another folder; `kept`, what is left of the
    earlier file (None: nothing to say)."""
    code = getattr(e, "errno", None)
    fix = f"; {kept}" if kept else ""
    if code in (errno.ENOSPC, errno.EDQUOT) or (code is None and isinstance(e, RuntimeError)
                                                 and _looks_full(path, needed)):
        free = _free_bytes(path)
        what = "disk quota is exceeded" if code == errno.EDQUOT else "disk is full"
        details = ([f"{_size(free)} free"] if free is not None else []) + (
            [f"about {_size(needed)} needed"] if needed else [])
        room = f" ({', '.join(details)})" if details else ""
        return (f"cannot write {path}: the {what}{room}. Free some space, or write elsewhere "
                f"({elsewhere}){fix}")
    if code == errno.EROFS:
        return (f"cannot write {path}: the file system is read-only. Choose a writable folder "
                f"({elsewhere}){fix}")
    if code in (errno.EACCES, errno.EPERM):
        return (f"cannot write {path}: permission denied. Choose a folder you can write "
                f"({elsewhere}) or fix its permissions{fix}")
    return None


def write_error(e: OSError, path: str, elsewhere: str) -> WriteError:
    """The WriteError of a failed write of `path`: explained where `explain_write_error` can,
    else the OS's words; `elsewhere` names the flag that writes elsewhere."""
    return WriteError(explain_write_error(e, path, elsewhere=elsewhere)
                      or f"cannot write {path}: {e.strerror or e}; {elsewhere} writes elsewhere")


def _looks_full(path: str, needed: Optional[int]) -> bool:
    free = _free_bytes(path)
    return free is not None and free < max(needed or 0, 1 << 20)


def remove_files(folder: str, matches) -> tuple:
    """Deletes the files in `folder` whose names `matches(name)` accepts (the temporaries of
    writes a killed process left; call it only while holding the folder's lock, so no write is
    under way). Returns (files removed, bytes freed)."""
    count = freed = 0
    for name in os.listdir(folder) if os.path.isdir(folder) else ():
        if matches(name):
            path = os.path.join(folder, name)
            try:
                size = os.path.getsize(path)
                os.remove(path)
            except OSError:
                continue
            count, freed = count + 1, freed + size
    return count, freed


def remove_stale_temporaries(folder: str) -> int:
    """Deletes the temporary files that checkpoint saves killed mid-write left in `folder` (call
    it only while holding the folder's lock, so no save is under way); returns the bytes freed."""
    return remove_files(folder, lambda name: name.startswith(TMP_PREFIX) and name.endswith(".pt"))[1]


@functools.lru_cache(maxsize=None)
def file_mode() -> int:
    """Permissions of a new file under this process's umask. mkstemp creates 0600 files, but the
    files we write should be as readable as any other. (The umask can only be read by setting
    it, so it is read once.)"""
    mask = os.umask(0o022)
    os.umask(mask)
    return 0o666 & ~mask


def write_atomic(path: str, write) -> None:
    """Calls write(f) on a new temporary file beside `path`, then renames it to `path`, so an
    existing file is always a complete one. The temporary name, "<TMP_PREFIX><name>.<random>",
    is unique (mkstemp), so concurrent writers never share one."""
    folder, name = os.path.split(path)
    fd, tmp = tempfile.mkstemp(prefix=f"{TMP_PREFIX}{name}.", dir=folder or ".")
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), file_mode())
            write(f)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise
