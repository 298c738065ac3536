"""Benchmark evaluation of an artifact on the device runtime (`tokedge eval`): task files on disk
(`tasks`), pure metrics (`metrics`), and `evaluate` (`runner`), the API `tokedge sweep` builds on."""

from tokedge.eval.runner import EvalResult, evaluate, write_result
from tokedge.eval.tasks import FORMATS, Example, Task, load_task

__all__ = ["FORMATS", "EvalResult", "Example", "Task", "evaluate", "load_task", "write_result"]
