"""One error hierarchy. The library raises these with messages a user can act on; the CLI maps
them to one-line messages and exit codes in one place (`tokedge.cli`)."""

from __future__ import annotations


class TokedgeError(Exception):
    """Base class. `exit_code` 1 means the work failed; 2 means the input was wrong."""

    exit_code = 1


class UsageError(TokedgeError):
    """A flag or argument is wrong (unknown method, budget out of range...)."""

    exit_code = 2


class InputError(TokedgeError):
    """A file or value the user gave cannot be used (image, prompt, model directory...)."""

    exit_code = 2


class UnsupportedModelError(InputError):
    """The checkpoint's architecture is not one tokedge can export."""


class ArtifactError(TokedgeError):
    """An artifact is malformed, of a newer format, or fails integrity checks (exit 1: the
    artifact is damaged); `ArtifactPathError` when the path given is not an artifact at all."""

    exit_code = 1


class ArtifactPathError(ArtifactError):
    """The path given as an artifact is not one: missing, a file, unreadable, or a directory
    without a manifest. A wrong input (exit 2), unlike a damaged artifact (exit 1)."""

    exit_code = 2


class IntegrityError(ArtifactError):
    """A file's hash or location does not match the manifest."""


class ParityError(TokedgeError):
    """Exported graphs disagree with the PyTorch reference beyond tolerance."""

    exit_code = 1


class PassRefused(TokedgeError):
    """A graph pass found a graph without the shape it rewrites; the message says why."""

    exit_code = 1


class MissingDependencyError(TokedgeError):
    """An optional extra is needed for this command."""

    exit_code = 2


def require(module: str, extra: str):
    """Import an optional dependency or raise a MissingDependencyError naming the extra."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as exc:  # pragma: no cover - depends on the install
        raise MissingDependencyError(
            f"this command needs '{module}', which is not installed: pip install 'tokedge[{extra}]'"
        ) from exc


# top-level module -> the extra that installs it (pyproject.toml): what a command missing one needs
EXTRAS = {
    "torch": "export", "transformers": "export", "safetensors": "export", "onnx": "export", "onnxscript": "export",
    "onnx_ir": "export", "av": "video", "matplotlib": "report", "starlette": "serve", "uvicorn": "serve",
    "tensorrt": "tensorrt", "ray": "sweep",
}


def missing_extra(exc: BaseException, command: str) -> MissingDependencyError | None:
    """A ModuleNotFoundError for a module an extra provides, as the one-line error naming the extra."""
    if not isinstance(exc, ModuleNotFoundError) or not exc.name:
        return None
    top = exc.name.split(".")[0]
    extra = EXTRAS.get(top)
    if extra is None:
        return None
    if extra == "tensorrt":
        how = "install TensorRT's Python bindings (on Jetson: JetPack's python3-libnvinfer; see docs/device.md)"
    else:
        how = f"pip install 'tokedge[{extra}]'"
    what = f"tokedge {command}" if command else "this command"
    return MissingDependencyError(f"{what} needs '{top}', which is not installed: {how}")
