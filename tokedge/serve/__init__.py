"""`tokedge serve`: an OpenAI-compatible Chat Completions server for one artifact, on the
torch-free runtime (needs the `[serve]` extra: Starlette and uvicorn)."""

from tokedge.serve.config import ServeConfig

__all__ = ["ServeConfig", "serve"]


def serve(cfg: ServeConfig) -> None:
    from tokedge.serve.app import serve as _serve

    _serve(cfg)
