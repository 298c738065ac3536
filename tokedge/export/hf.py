"""transformers housekeeping shared by the export side."""

from __future__ import annotations


def quiet_transformers() -> None:
    """No progress bars or advisory warnings from transformers: tokedge prints its own stages."""
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


PROBE_SECONDS = 3.0  # how long to wait for the hub before calling it unreachable


def hub_reachable(timeout: float = PROBE_SECONDS) -> bool:
    """One TCP connection to the hub's endpoint (HF_ENDPOINT or huggingface.co), seconds at most,
    instead of transformers' retries (~30 s) when the machine is offline."""
    import os
    import socket
    from urllib.parse import urlparse

    url = urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((url.hostname or "huggingface.co", port), timeout=timeout):
            return True
    except OSError:
        return False


def offline_checkpoint(repo_id: str):
    """For a hub id on a machine that cannot reach the hub (or with HF_HUB_OFFLINE=1): the cached
    snapshot directory, or an InputError saying how to get the checkpoint. None when online."""
    import os

    from tokedge.errors import InputError

    offline_env = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")
    if not offline_env and hub_reachable():
        return None
    from pathlib import Path

    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id, local_files_only=True))
    except Exception:  # not in the cache (LocalEntryNotFoundError and friends)
        why = "HF_HUB_OFFLINE=1 is set" if offline_env else "the Hugging Face Hub cannot be reached from here"
        raise InputError(
            f"'{repo_id}' is not in the local Hugging Face cache and {why}: download it on a connected machine "
            f"(`hf download {repo_id}`) and pass its local directory, or set HF_HUB_OFFLINE=1 after caching it"
        ) from None


def pil_backend() -> dict:
    """Keyword arguments that make `AutoProcessor` / `AutoImageProcessor` build the PIL image processor,
    the one tokedge's torch-free runtime reproduces: transformers 5 otherwise picks its torchvision
    backend whenever torchvision is installed, and export validation would then compare the graphs
    against other pixels (docs/runtime.md, "Which image-processor backend")."""
    import transformers

    # transformers 4.x has no `backend` and would pass `use_fast=False` to the tokenizer too (a slow one,
    # which tokedge cannot read): its image processors default to the slow (PIL/numpy) ones anyway
    return {"backend": "pil"} if int(transformers.__version__.split(".")[0]) >= 5 else {}
