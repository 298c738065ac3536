"""tokedge: visual-token reduction for VLMs, exported to ONNX and TensorRT for edge GPUs.

The public Python API is the device runtime:

    from tokedge import Pipeline

    with Pipeline.load("./tiny-llava-cls-attn-64") as pipe:
        print(pipe.generate("photo.jpg", "What is shown in this image?").text)

Importing the package imports neither torch, transformers, onnxruntime nor tensorrt; each lives
behind the module that needs it (`Pipeline`, `Result` and `Backend` load theirs on first use).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"
__all__ = ["Backend", "Pipeline", "Result", "__version__"]

if TYPE_CHECKING:
    from tokedge.runtime.backends import Backend
    from tokedge.runtime.pipeline import Pipeline, Result

_PUBLIC = {"Pipeline": "tokedge.runtime.pipeline", "Result": "tokedge.runtime.pipeline",
           "Backend": "tokedge.runtime.backends"}


def __getattr__(name: str) -> Any:
    """`from tokedge import Pipeline` without importing the runtime at `import tokedge` (PEP 562)."""
    if name in _PUBLIC:
        import importlib

        value = getattr(importlib.import_module(_PUBLIC[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'tokedge' has no attribute '{name}'")


def __dir__() -> list[str]:
    return sorted([*globals(), *_PUBLIC])
