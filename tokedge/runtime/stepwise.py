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
from tokedge.runtime.generate import DecodeRows, SamplingConfig, context_limit
from tokedge.runtime.graphs import ArtifactGraphs, DecodeState, splice_image_embeds


class BatchDecoder:
    """Rows of left-padded prompts (one image each) decoded together.

    `prefill()` runs vision + prefill and samples each row's first token; `step()` runs one decode
    step. Both return the new token of each row (None for a row that has finished). A row finishes
    on EOS ("eos"), at its `max_new_tokens` ("length"), or when the caller calls `finish`.
    """

    def __init__(self, graphs: ArtifactGraphs, pixel_values: np.ndarray | list, input_ids: np.ndarray,
                 attention_mask: np.ndarray, configs: list[SamplingConfig], *, budget: int | None = None):
        """`pixel_values`: [b, 3, H, W] for single views, or one tiled image's inputs per row
        (`runtime.layout.AnyresInputs`), as `generate` takes them."""
        if len(configs) != input_ids.shape[0] or len(pixel_values) != input_ids.shape[0]:
            raise InputError(f"{input_ids.shape[0]} prompts, {len(pixel_values)} images and {len(configs)} "
                             "sampling configs; pass one of each per row")
        self.decode = DecodeRows(configs, eos=frozenset(graphs.manifest.model.eos_token_ids),
                                 pad=graphs.manifest.model.pad_token_id or 0)
        self.room = max(cfg.max_new_tokens for cfg in configs)
        if input_ids.shape[1] + self.room > context_limit(graphs):
            raise InputError(f"prompt ({input_ids.shape[1]} tokens incl. image) + max new tokens ({self.room}) "
                             f"exceeds the model's limit of {context_limit(graphs)} tokens")
        self.graphs, self.budget = graphs, budget
        self.pixel_values, self.input_ids, self.attention_mask = pixel_values, input_ids, attention_mask
        self.rows = self.decode.rows
        self.state: DecodeState | None = None
        self.visual_tokens = 0  # row 0's count (every row's, for single views)
        self.row_visual_tokens: list[int] = []  # per row: tiled images each have their own count
        self.vision_ms = self.prefill_ms = 0.0

    @property
    def active(self) -> bool:
        return self.decode.active

    def finish(self, row: int, reason: str) -> None:
        self.decode.finish(row, reason)

    def prefill(self) -> list[int | None]:
        t0 = time.perf_counter()
        image_embeds = self.graphs.vision(self.pixel_values, self.budget) if isinstance(self.pixel_values, np.ndarray) \
            else self.graphs.vision_packed(self.pixel_values)
        self.vision_ms = (time.perf_counter() - t0) * 1e3
        t0 = time.perf_counter()
        embeds = splice_image_embeds(self.graphs.embed(self.input_ids), self.input_ids,
                                     self.graphs.manifest.model.image_token_id, image_embeds)
        logits, self.state = self.graphs.prefill(embeds, self.attention_mask, self.input_ids, room=self.room)
        # as generate does: the vision graph's count less what an in-LLM method pruned (cache lengths)
        counts = [int(e.shape[0]) for e in image_embeds] if isinstance(image_embeds, list) else \
            [int(image_embeds.shape[1])] * len(self.rows)
        self.row_visual_tokens = [self.state.visual_tokens(c) for c in counts]
        self.visual_tokens = self.row_visual_tokens[0]
        self.prefill_ms = (time.perf_counter() - t0) * 1e3
        return self.decode.take(logits)

    def step(self) -> list[int | None]:
        if self.state is None:
            raise RuntimeError("BatchDecoder.step() before prefill()")
        if not self.active:
            return [None] * len(self.rows)
        logits = self.graphs.step(self.graphs.embed(self.decode.feed()[:, None]), self.state)
        return self.decode.take(logits)
