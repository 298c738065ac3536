"""The runner protocol every backend implements (see docs/runtime.md)."""

from __future__ import annotations

from typing import Any, Protocol


class Runner(Protocol):
    """One graph, ready to run. A context manager; `infer` maps input names to values and returns
    every output by name; `last_inference_time` is the wall time of the last `infer` in seconds.

    Outputs named in `keep` may stay on the runner's device (an OrtValue, a TensorRT device
    tensor) instead of coming back as numpy arrays; such values may be fed to the next `infer` of
    the same runner as they are (the KV cache between decode steps). A runner that keeps nothing
    on a device simply returns numpy arrays for them too: callers never ask which kind it is."""

    name: str
    last_inference_time: float
    deadline: Any  # a tokedge.runtime.deadline.Deadline while a time-limited run is active, else None

    def __enter__(self) -> Runner: ...

    def __exit__(self, *exc) -> None: ...

    def infer(self, feed: dict[str, Any], keep: frozenset[str] = frozenset()) -> dict[str, Any]: ...
