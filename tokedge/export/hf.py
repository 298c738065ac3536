"""transformers housekeeping shared by the export side."""

from __future__ import annotations


def quiet_transformers() -> None:
    """No progress bars or advisory warnings from transformers: tokedge prints its own stages."""
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
