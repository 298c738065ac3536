"""A lock file that serialises work on one output (an export or an engine build).

`fcntl.flock` locks belong to the open file: the kernel releases them when the holder exits or is
killed, so a dead holder never wedges the next run (its lock file may stay; the next holder
locks and removes it).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import stat
import time
from pathlib import Path
from typing import Iterator

from tokedge.errors import TokedgeError


class LockTimeout(TokedgeError):
    exit_code = 1


class LockError(TokedgeError):
    """The lock path holds something tokedge did not create (a symlink, a FIFO, a hard link)."""

    exit_code = 1


def _open_lock(lock_path: Path) -> int:
    """Open (creating) the lock file without following a symlink, and refuse anything that is not
    a plain regular file of ours: a planted link or FIFO must never be truncated or written."""
    try:
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, 0o644)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise LockError(f"the lock file {lock_path} is a symbolic link; remove it (tokedge creates its own)") from None
        raise LockError(f"cannot open the lock file {lock_path}: {exc.strerror}") from None
    st = os.fstat(fd)
    problem = None
    if not stat.S_ISREG(st.st_mode):
        problem = "is not a regular file"
    elif st.st_nlink != 1:
        problem = "is a hard link"
    elif hasattr(os, "geteuid") and st.st_uid != os.geteuid():
        problem = "belongs to another user"
    if problem:
        os.close(fd)
        raise LockError(f"the lock file {lock_path} {problem}; remove it (tokedge creates its own)")
    os.set_blocking(fd, True)
    return fd


@contextlib.contextmanager
def exclusive(lock_path: Path, timeout: float | None = None, poll: float = 0.1) -> Iterator[None]:
    """Hold an exclusive lock on `lock_path`; wait for it (forever, or `timeout` seconds).

    The holder removes the lock file before releasing it; a waiter that locked a file which was
    removed meanwhile (its inode no longer at the path) starts over on the new one.
    """
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        fd = _open_lock(lock_path)
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
            same = os.fstat(fd).st_ino == os.stat(lock_path, follow_symlinks=False).st_ino
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
