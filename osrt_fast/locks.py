"""Exclusive folder locks: one training run per run directory, one generator per output folder.

A lock is an advisory `flock` on `<folder>/.lock`, held for the life of the process that took
it (the kernel releases it when the process dies, kill -9 included, so no stale lock survives a
crash). The file records who holds it (pid, host, command, start time) so that a refused second
process can name the first. flock works on local disks and on NFS (Linux emulates it there with
byte-range locks).
"""
from __future__ import annotations

import json
import os
import socket
import sys
import time

from .errors import UserError

LOCK_FILE = ".lock"


class LockedError(UserError, RuntimeError):
    """Another process holds the folder's lock; the message names it and what to do."""


class FolderLock:
    """`with FolderLock(folder, what="run directory"):` -- or `acquire()` / `release()`."""

    def __init__(self, folder: str, what: str = "folder", hint: str = ""):
        self.folder, self.what, self.hint = folder, what, hint
        self.path = os.path.join(folder, LOCK_FILE)
        self._fd = None

    def acquire(self) -> "FolderLock":
        import fcntl
        os.makedirs(self.folder, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_holder(fd)
            os.close(fd)
            raise LockedError(
                f"the {self.what} '{self.folder}' is in use by another process ({holder}). Two "
                f"processes writing one {self.what} would interleave their files. Wait for it to "
                f"finish or stop it{self.hint}.") from None
        except OSError as e:
            os.close(fd)
            raise LockedError(f"cannot lock the {self.what} '{self.folder}' ({e.strerror}); "
                              "it must be on a file system that supports flock") from None
        info = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S"),
                "command": " ".join([os.path.basename(sys.executable)] + sys.argv)[:300]}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(info) + "\n").encode(), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)        # closing the descriptor drops the flock
            self._fd = None

    def __enter__(self) -> "FolderLock":
        return self.acquire()

    def __exit__(self, *exc) -> bool:
        self.release()
        return False


def _read_holder(fd: int) -> str:
    try:
        info = json.loads(os.pread(fd, 4096, 0).decode() or "{}")
    except (OSError, ValueError):
        info = {}
    if not info:
        return "holder unknown"
    return (f"pid {info.get('pid')} on {info.get('host')}, started {info.get('started')}: "
            f"{info.get('command')}")
