"""A lock file that serialises work on one output (an export or an engine build).

`fcntl.flock` locks belong to the open file: the kernel releases them when the holder exits or is
killed, so a dead holder never wedges the next run (its lock file may stay; the next holder
locks and removes it).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import time
from pathlib import Path
from typing import Iterator

from tokedge.errors import TokedgeError


class LockTimeout(TokedgeError):
    exit_code = 1


@contextlib.contextmanager
def exclusive(lock_path: Path, timeout: float | None = None, poll: float = 0.1) -> Iterator[None]:
    """Hold an exclusive lock on `lock_path`; wait for it (forever, or `timeout` seconds).

    The holder removes the lock file before releasing it; a waiter that locked a file which was
    removed meanwhile (its inode no longer at the path) starts over on the new one.
    """
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            if deadline is not None and time.monotonic() >= deadline:
                raise LockTimeout(
                    f"another tokedge process is writing '{lock_path.name[1:-5]}' (lock {lock_path}); "
                    "wait for it to finish"
                ) from None
            time.sleep(poll)
            continue
        try:
            same = os.fstat(fd).st_ino == os.stat(lock_path).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    try:
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        yield
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(lock_path)
        os.close(fd)  # releases the lock
