"""Exclusive lock on an output directory, so that two runs never write into the same folder.

Usage::

    from dfkd_fast._lock import OutputLock

    with OutputLock(out_dir, "synthesize"):
        ...  # write into out_dir

The lock is an ``fcntl.flock(LOCK_EX | LOCK_NB)`` on ``<out_dir>/.lock`` (the directory is created if
missing). While held, the file holds one JSON line ``{"pid", "host", "command", "since"}`` describing the
holder. A second ``OutputLock`` on the same directory -- from this or any other process -- raises
:class:`OutputLockedError` at once, with one line naming the directory and the holder's pid, host and
command. The kernel drops a ``flock`` when its process dies (SIGKILL included), so the lock of a dead run
is recovered automatically: the next run simply takes it and overwrites the holder line. The file itself is
left in place on release (removing it would race with a run that has just opened it).
"""
from __future__ import annotations

import fcntl
import json
import os
import socket
import sys
import time
from pathlib import Path
from typing import Any

__all__ = ["OutputLock", "OutputLockedError", "LOCK_NAME"]

LOCK_NAME = ".lock"


class OutputLockedError(RuntimeError):
    """Another live process holds the output directory's lock (message names the directory and the holder)."""


def _holder_text(path: Path) -> str:
    try:
        info = json.loads(path.read_text() or "{}")
    except (OSError, ValueError):
        info = {}
    if not isinstance(info, dict) or "pid" not in info:
        return "another process"
    return f"pid {info.get('pid')} on {info.get('host', '?')} ({info.get('command', '?')})"


class OutputLock:
    """Context manager holding an exclusive ``flock`` on ``<path>/.lock``.

    Args:
        path: the output directory (created if missing).
        what: a short name of the operation taking the lock, e.g. ``"synthesize"`` or ``"distill"``; used in
            the holder line and in the error message.

    Raises:
        OutputLockedError: on ``__enter__`` / :meth:`acquire` when another process (or another ``OutputLock``
            object in this process) holds the lock.
    """

    def __init__(self, path: str | os.PathLike[str], what: str) -> None:
        self.dir = Path(path)
        self.what = str(what)
        self.file = self.dir / LOCK_NAME
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> OutputLock:
        if self._fd is not None:
            return self
        self.dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.file, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise OutputLockedError(
                f"{self.dir} is in use by {_holder_text(self.file)}; wait for it to finish or choose another "
                f"output directory for {self.what}") from None
        except BaseException:
            os.close(fd)
            raise
        info: dict[str, Any] = {"pid": os.getpid(), "host": socket.gethostname(),
                                "command": f"{self.what}: " + " ".join(sys.argv), "since": time.time()}
        data = (json.dumps(info) + "\n").encode()
        os.ftruncate(fd, 0)
        os.pwrite(fd, data, 0)
        self._fd = fd
        return self

    def release(self) -> None:
        fd, self._fd = self._fd, None
        if fd is None:
            return
        try:
            os.ftruncate(fd, 0)
        except OSError:
            pass
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)

    def __enter__(self) -> OutputLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()
