"""A wall-clock limit for one generation (`tokedge run --timeout`): checked between steps, and
while a graph runs, a timer asks the backend to stop (ONNX Runtime's `RunOptions.terminate`)."""

from __future__ import annotations

import threading
import time
from typing import Callable

from tokedge.errors import TokedgeError


class RunTimeout(TokedgeError):
    exit_code = 1


class Deadline:
    def __init__(self, seconds: float):
        if not seconds > 0:
            raise ValueError("a deadline needs a positive number of seconds")
        self.seconds = seconds
        self.end = time.monotonic() + seconds
        self._lock = threading.Lock()
        self._cancels: dict[int, Callable[[], None]] = {}
        self._next = 0
        self._timer = threading.Timer(seconds, self._fire)
        self._timer.daemon = True
        self._timer.start()

    def expired(self) -> bool:
        return time.monotonic() >= self.end

    def check(self) -> None:
        if self.expired():
            raise self.error()

    def error(self) -> RunTimeout:
        return RunTimeout(f"the run took longer than --timeout {self.seconds:g} s and was stopped; "
                          "raise --timeout or lower --max-new-tokens")

    def register(self, cancel: Callable[[], None]) -> int:
        """Call `cancel` when the deadline passes (at once if it has). Returns a key for `unregister`."""
        with self._lock:
            key = self._next
            self._next += 1
            self._cancels[key] = cancel
        if self.expired():
            cancel()
        return key

    def unregister(self, key: int) -> None:
        with self._lock:
            self._cancels.pop(key, None)

    def _fire(self) -> None:
        with self._lock:
            cancels = list(self._cancels.values())
        for cancel in cancels:
            cancel()

    def close(self) -> None:
        self._timer.cancel()
