"""One owner per folder: an exclusive lock on `<folder>/.lock`, held while a run or a study works.

A training run, an evaluation that writes a calibration into a checkpoint, and a batch run of
a study each hold the lock of their folder; a second process refuses at once with one line
naming the holder (pid, host, command, since when). The operating system releases the lock
when its process dies, even by SIGKILL, so a killed run never leaves its folder locked: the
file's contents only name the last holder, and a stale file is simply taken over.
"""
from __future__ import annotations

import contextlib
import json
import os
import sys
import time
from pathlib import Path
from typing import Iterator

from recontrast.runtime import process_identity

LOCK_FILE = ".lock"


class FolderBusy(RuntimeError):
    """Another process holds the folder's lock; the message names it and the way out."""


def holder(folder: str | Path) -> dict[str, str]:
    """Returns what <folder>/.lock says about its last holder ({} when unreadable)."""
    try:
        return json.loads((Path(folder) / LOCK_FILE).read_text() or "{}")
    except (OSError, ValueError):
        return {}


def _describe(info: dict[str, str]) -> str:
    if not info.get("pid"):
        return "another process"
    since = f", since {info['since']}" if info.get("since") else ""
    command = f" ({info['command'][:120]})" if info.get("command") else ""
    return f"process {info['pid']} on {info.get('hostname', '?')}{command}{since}"


@contextlib.contextmanager
def folder_lock(folder: str | Path, what: str = "the run folder", fix: str = "use another folder") -> Iterator[Path]:
    """Yields `folder` (created if needed) while this process holds its lock; raises FolderBusy
    naming the holder when another process has it, OSError naming the folder when it cannot
    be a folder. When the work failed before writing anything (the folder holds nothing but
    the lock file on exit), the lock file and a folder this call created are removed again."""
    folder = Path(folder)
    created = not folder.exists()
    fresh = created or not (folder / LOCK_FILE).exists()
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd = _acquire(folder, what, fix)
    except OSError as err:
        raise OSError(f"cannot lock {what} {folder} ({type(err).__name__}: {err.strerror or err}); "
                      f"it must be a writable folder, not a file") from None
    try:
        info = {**process_identity(), "command": " ".join(sys.argv)[:300],
                "since": time.strftime("%Y-%m-%d %H:%M:%S")}
        os.ftruncate(fd, 0)
        os.lseek(fd, 0, os.SEEK_SET)
        os.write(fd, (json.dumps(info) + "\n").encode())
        yield folder
    finally:
        if fresh and _only_the_lock(folder):
            with contextlib.suppress(OSError):
                (folder / LOCK_FILE).unlink()
                if created:
                    folder.rmdir()
        _release(fd)


def _only_the_lock(folder: Path) -> bool:
    try:
        return os.listdir(folder) == [LOCK_FILE]
    except OSError:
        return False


def _acquire(folder: Path, what: str, fix: str) -> int:
    """Returns an open descriptor of <folder>/.lock holding its exclusive lock."""
    try:
        import fcntl
    except ImportError:  # Windows: no advisory locks here; one owner is then up to the user
        return os.open(folder / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    path = folder / LOCK_FILE
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise FolderBusy(f"{what} {folder} is in use by {_describe(holder(folder))}; "
                             f"wait for it to finish, or {fix}") from None
        # The previous holder may have removed the file between our open and our lock (its
        # folder was empty): then we hold a lock nobody else can see, so try again.
        try:
            if os.stat(path).st_ino == os.fstat(fd).st_ino:
                return fd
        except FileNotFoundError:
            pass
        os.close(fd)
        folder.mkdir(parents=True, exist_ok=True)


def _release(fd: int) -> None:
    with contextlib.suppress(ImportError, OSError):
        import fcntl

        fcntl.flock(fd, fcntl.LOCK_UN)
    with contextlib.suppress(OSError):
        os.close(fd)
