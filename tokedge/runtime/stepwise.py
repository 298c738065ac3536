"""Step-wise batched decoding for a scheduler (`tokedge serve`).

The same vision -> splice -> prefill -> decode calls as `generate.generate`, driven one step at a
time by the caller, with what a server needs per row: its own sampling settings and seed (a row
samples exactly as it would alone, whatever else shares the batch), its own token limit, and a way
to finish a row at any step (a stop string matched, a client gone). Finished rows are fed the pad
token until the batch ends, as `generate` does.
"""

from __future__ import annotations

import time

import numpy as np

from tokedge.errors import InputError
from tokedge.layouts import ImageBatch
from tokedge.runtime import driver
from tokedge.runtime.generate import DecodeRows, SamplingConfig, context_limit
from tokedge.runtime.graphs import ArtifactGraphs, DecodeState


class BatchDecoder:
    """Rows of left-padded prompts (one image or several each) decoded together.

    `prefill()` runs vision + prefill and samples each row's first token; `step()` runs one decode
    step. Both return the new token of each row (None for a row that has finished). A row finishes
    on EOS ("eos"), at its `max_new_tokens` ("length"), or when the caller calls `finish`.
    """

    def __init__(self, graphs: ArtifactGraphs, pixel_values: ImageBatch | np.ndarray | list, input_ids: np.ndarray,
                 attention_mask: np.ndarray, configs: list[SamplingConfig], *, budget: int | None = None,
                 images_per_row: list[int] | None = None):
        """`pixel_values` holds every image of the batch in row order ([n, 3, H, W] single views, or
        one tiled image's `runtime.layout.AnyresInputs` each, as `generate` takes them);
        `images_per_row` how many each row's prompt has (default one each)."""
        batch = ImageBatch.of(pixel_values, images_per_row or [1] * input_ids.shape[0], budget)
        counts = batch.images_per_row
        if len(configs) != input_ids.shape[0] or len(counts) != input_ids.shape[0] or \
                sum(counts) != len(batch.inputs):
            raise InputError(f"{input_ids.shape[0]} prompts, {len(batch.inputs)} images (grouped {counts}) and "
                             f"{len(configs)} sampling configs; pass one prompt and config per row")
        self.decode = DecodeRows(configs, eos=frozenset(graphs.manifest.model.eos_token_ids),
                                 pad=graphs.manifest.model.pad_token_id or 0)
        self.room = max(cfg.max_new_tokens for cfg in configs)
        if input_ids.shape[1] + self.room > context_limit(graphs):
            raise InputError(f"prompt ({input_ids.shape[1]} tokens incl. image) + max new tokens ({self.room}) "
                             f"exceeds the model's limit of {context_limit(graphs)} tokens")
        self.graphs, self.budget = graphs, budget
        self.batch, self.input_ids, self.attention_mask = batch, input_ids, attention_mask
        self.rows = self.decode.rows
        self.images_per_row = counts
        self.state: DecodeState | None = None
        self.visual_tokens = 0  # row 0's
        self.visual_tokens_per_row: list[int] = []
        self.vision_ms = self.prefill_ms = 0.0

    @property
    def active(self) -> bool:
        return self.decode.active

    def finish(self, row: int, reason: str) -> None:
        self.decode.finish(row, reason)

    def prefill(self) -> list[int | None]:
        t0 = time.perf_counter()
        prompt = driver.prepare_images(self.graphs, self.batch, self.input_ids, self.attention_mask)
        self.vision_ms = prompt.vision_ms
        logits, state = driver.prefill(self.graphs, prompt, room=self.room)
        self.state = state
        # as generate does: each row's image tokens less what an in-LLM method pruned
        pruned = state.pruned if state.pruned is not None else np.zeros(len(prompt.visual), dtype=np.int64)
        self.visual_tokens_per_row = [t - int(p) for t, p in zip(prompt.visual, pruned)]
        self.visual_tokens = self.visual_tokens_per_row[0]
        self.prefill_ms = (time.perf_counter() - t0) * 1e3 - prompt.vision_ms
        return self.decode.take(logits)

    def step(self) -> list[int | None]:
        if self.state is None:
            raise RuntimeError("BatchDecoder.step() before prefill()")
        if not self.active:
            return [None] * len(self.rows)
        logits = driver.stepper(self.graphs, self.state)(self.decode.feed())
        return self.decode.take(logits)
