"""The runner protocol every backend implements (see docs/runtime.md)."""

from __future__ import annotations

from typing import Protocol

import numpy as np


class Runner(Protocol):
    """One graph, ready to run. A context manager; `infer` maps input names to arrays and returns
    every output by name; `last_inference_time` is the wall time of the last `infer` in seconds."""

    name: str
    last_inference_time: float

    def __enter__(self) -> "Runner": ...

    def __exit__(self, *exc) -> None: ...

    def infer(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]: ...
