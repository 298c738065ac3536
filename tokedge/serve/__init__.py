"""`tokedge serve`: an OpenAI-compatible Chat Completions server for one artifact, on the
torch-free runtime (Starlette and uvicorn, in the base install)."""

from tokedge.serve.config import ServeConfig

__all__ = ["ServeConfig", "serve"]


def serve(cfg: ServeConfig) -> None:
    from tokedge.errors import require

    require("starlette", "serve")  # base dependencies; an older or partial install says what to add
    require("uvicorn", "serve")
    from tokedge.serve.app import serve as _serve

    _serve(cfg)
