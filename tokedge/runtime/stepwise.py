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
from tokedge.runtime.generate import DecodeRows, SamplingConfig, context_limit, per_row
from tokedge.runtime.graphs import ArtifactGraphs, DecodeState, splice_image_embeds
from tokedge.runtime.layout import prompt_positions


class BatchDecoder:
    """Rows of left-padded prompts (one image or several each) decoded together.

    `prefill()` runs vision + prefill and samples each row's first token; `step()` runs one decode
    step. Both return the new token of each row (None for a row that has finished). A row finishes
    on EOS ("eos"), at its `max_new_tokens` ("length"), or when the caller calls `finish`.
    """

    def __init__(self, graphs: ArtifactGraphs, pixel_values: np.ndarray | list, input_ids: np.ndarray,
                 attention_mask: np.ndarray, configs: list[SamplingConfig], *, budget: int | None = None,
                 images_per_row: list[int] | None = None):
        """`pixel_values` holds every image of the batch in row order ([n, 3, H, W] single views, or
        one tiled image's `runtime.layout.AnyresInputs` each, as `generate` takes them);
        `images_per_row` how many each row's prompt has (default one each)."""
        counts = images_per_row or [1] * input_ids.shape[0]
        if len(configs) != input_ids.shape[0] or len(counts) != input_ids.shape[0] or \
                sum(counts) != len(pixel_values):
            raise InputError(f"{input_ids.shape[0]} prompts, {len(pixel_values)} images (grouped {counts}) and "
                             f"{len(configs)} sampling configs; pass one prompt and config per row")
        self.decode = DecodeRows(configs, eos=frozenset(graphs.manifest.model.eos_token_ids),
                                 pad=graphs.manifest.model.pad_token_id or 0)
        self.room = max(cfg.max_new_tokens for cfg in configs)
        if input_ids.shape[1] + self.room > context_limit(graphs):
            raise InputError(f"prompt ({input_ids.shape[1]} tokens incl. image) + max new tokens ({self.room}) "
                             f"exceeds the model's limit of {context_limit(graphs)} tokens")
        self.graphs, self.budget = graphs, budget
        self.pixel_values, self.input_ids, self.attention_mask = pixel_values, input_ids, attention_mask
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
        kept = None
        if isinstance(self.pixel_values, np.ndarray):
            image_embeds = self.graphs.vision(self.pixel_values, self.budget)
        else:
            image_embeds, kept = self.graphs.vision_indexed(self.pixel_values)
        image_embeds = per_row(image_embeds, self.images_per_row)
        self.vision_ms = (time.perf_counter() - t0) * 1e3
        t0 = time.perf_counter()
        embeds = splice_image_embeds(self.graphs.embed(self.input_ids), self.input_ids,
                                     self.graphs.manifest.model.image_token_id, image_embeds)
        positions = None if isinstance(self.pixel_values, np.ndarray) else \
            prompt_positions(self.graphs.manifest, self.input_ids, self.attention_mask, self.pixel_values, kept)
        logits, state = self.graphs.prefill(embeds, self.attention_mask, self.input_ids, room=self.room,
                                            images_per_row=self.images_per_row, position_ids=positions)
        self.state = state
        # as generate does: each row's image tokens less what an in-LLM method pruned
        tokens = [int(np.prod(e.shape[:-1])) for e in image_embeds]
        pruned = state.pruned if state.pruned is not None else np.zeros(len(tokens), dtype=np.int64)
        self.visual_tokens_per_row = [t - int(p) for t, p in zip(tokens, pruned)]
        self.visual_tokens = self.visual_tokens_per_row[0]
        self.prefill_ms = (time.perf_counter() - t0) * 1e3
        return self.decode.take(logits)

    def step(self) -> list[int | None]:
        if self.state is None:
            raise RuntimeError("BatchDecoder.step() before prefill()")
        if not self.active:
            return [None] * len(self.rows)
        logits = self.graphs.step(self.graphs.embed(self.decode.feed()[:, None]), self.state)
        return self.decode.take(logits)
