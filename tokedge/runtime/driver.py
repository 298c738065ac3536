"""THE prompt path on the device side: a prepared prompt (embeddings with the visual tokens
spliced in, mask, positions, pruning inputs), made from images by the artifact's layout or from a
video by its video layout, then one prefill and the decode steps. `generate` (run, profile,
verify, export validation), the server's `BatchDecoder` and `generate_video` all come through
here; no other module runs a prefill graph (tests/test_structure.py)."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from tokedge.layouts import ImageBatch, layout_of, video_layout_of
from tokedge.runtime.graphs import ArtifactGraphs, DecodeState, splice_image_embeds


@dataclass
class PreparedPrompt:
    """Everything a prefill needs, whatever the layout."""

    input_ids: np.ndarray  # [b, s] int64, visual placeholders expanded
    attention_mask: np.ndarray  # [b, s]
    embeds: np.ndarray  # [b, s, hidden] with the visual tokens spliced in
    positions: np.ndarray | None  # the layout's position_ids ([3, b, s] M-RoPE); None: 1-D from the mask
    prune: tuple[np.ndarray, np.ndarray] | None  # (image_positions, image_keep) given by a video layout
    images_per_row: list[int] | None  # images per prompt (None: one each, or a video)
    visual: list[int]  # visual tokens spliced into each row (before in-LLM pruning)
    image_embeds: object  # what the vision graph gave ([n, k, D] or one [T_i, D] per image / row)
    vision_ms: float = 0.0


def per_row(image_embeds, images_per_row: list[int] | None):
    """Vision outputs of every image ([n, k, D], or one [T_i, D] per image) -> what each row
    splices: as they are with one image per row, else one [sum of its images' tokens, D] per row."""
    if images_per_row is None or all(n == 1 for n in images_per_row):
        return image_embeds
    rows, start = [], 0
    for n in images_per_row:
        rows.append(np.concatenate([image_embeds[i].reshape(-1, image_embeds[i].shape[-1])
                                    for i in range(start, start + n)]))
        start += n
    return rows


def prompt_instruction(text: np.ndarray, input_ids: np.ndarray, attention_mask: np.ndarray, model,
                       images_per_row: list[int]) -> np.ndarray:
    """The vision graph's `instruction` input (docs/artifact.md): per prompt row, the mean of the embed
    graph's output `text` (its first `model.hidden_size` columns: packed rows carry DeepStack planes
    after the embedding) over its text tokens (attention mask 1, not `model.image_token_id`),
    repeated for each of the row's images -> [images, hidden] float32."""
    keep = (attention_mask == 1) & (input_ids != model.image_token_id)
    rows = text[..., :model.hidden_size].astype(np.float32)
    means = (rows * keep[..., None]).sum(axis=1) / np.maximum(keep.sum(axis=1), 1)[:, None]
    return np.repeat(means, images_per_row, axis=0)


def prepare_images(graphs: ArtifactGraphs, batch: ImageBatch, input_ids: np.ndarray,
                   attention_mask: np.ndarray) -> PreparedPrompt:
    """Vision graph (the layout's feed) -> splice at the image placeholders -> the layout's positions."""
    layout = layout_of(graphs.manifest)
    if not any(batch.images_per_row):  # text-only prompts: no vision graph, nothing to splice
        return PreparedPrompt(input_ids, attention_mask, graphs.embed(input_ids),
                              layout.positions(input_ids, attention_mask, batch, None), None, batch.images_per_row,
                              [0] * input_ids.shape[0], [], 0.0)
    text = graphs.embed(input_ids)
    t0 = time.perf_counter()
    instruction = None
    if graphs.manifest.graphs["vision"].input("instruction") is not None:
        instruction = prompt_instruction(text, input_ids, attention_mask, graphs.manifest.model,
                                         batch.images_per_row)
    image_embeds, kept = layout.run_vision(graphs, batch, instruction)
    rows = per_row(image_embeds, batch.images_per_row)
    vision_ms = (time.perf_counter() - t0) * 1e3
    embeds = splice_image_embeds(text, input_ids, graphs.manifest.model.image_token_id, rows)
    positions = layout.positions(input_ids, attention_mask, batch, kept)
    visual = [int(np.prod(np.asarray(e).shape[:-1])) for e in rows]
    return PreparedPrompt(input_ids, attention_mask, embeds, positions, None, batch.images_per_row, visual, rows,
                          vision_ms)


def prepare_video(graphs: ArtifactGraphs, inputs, plan, input_ids: np.ndarray,
                  attention_mask: np.ndarray) -> tuple[PreparedPrompt, np.ndarray, float]:
    """Video graph (and per-video stage) -> splice at the video placeholders -> pruning inputs and
    the video layout's positions. -> (prompt, kept frame-token indices, stage ms)."""
    layout = video_layout_of(graphs.manifest)
    assert layout is not None
    video = graphs.manifest.video
    assert video is not None
    t0 = time.perf_counter()
    tokens, kept, reduce_ms = layout.tokens(graphs, inputs, plan)
    vision_ms = (time.perf_counter() - t0) * 1e3
    embeds = splice_image_embeds(graphs.embed(input_ids), input_ids, video.video_token_id, tokens[None])
    prune = None
    if graphs.has_prefill:  # in-LLM methods prune the frame tokens (never the newline)
        where = np.flatnonzero(input_ids[0] == video.video_token_id)[: plan.full].astype(np.int64)
        prune = (where[None], np.asarray(plan.llm_keep, dtype=np.int64))
    positions = layout.positions(input_ids, attention_mask, inputs)
    prompt = PreparedPrompt(input_ids, attention_mask, embeds, positions, prune, None, [len(tokens)], tokens[None],
                            vision_ms)
    return prompt, kept, reduce_ms


def prepare_text(graphs: ArtifactGraphs, input_ids: np.ndarray) -> PreparedPrompt:
    """A prompt of text only (no placeholders, no padding): the token embeddings as they are. The
    quantization measure (`tokedge.fidelity`) reads its evaluation text through it."""
    mask = np.ones(input_ids.shape, dtype=np.int64)
    return PreparedPrompt(input_ids, mask, graphs.embed(input_ids), None, None, None, [0] * len(input_ids), None)


def prefill(graphs: ArtifactGraphs, prompt: PreparedPrompt, room: int) -> tuple[np.ndarray, DecodeState]:
    """The prompt pass (the decoder, or an in-LLM method's prefill graph). -> (logits [b, vocab], state)."""
    return graphs.prefill(prompt.embeds, prompt.attention_mask, prompt.input_ids, room=room,
                          images_per_row=prompt.images_per_row, position_ids=prompt.positions, prune=prompt.prune)


def stepper(graphs: ArtifactGraphs, state: DecodeState, deadline=None) -> Callable[[np.ndarray], np.ndarray]:
    """`step(next_ids [b]) -> logits [b, vocab]` for `decode_loop`: embed, one decoder step."""

    def step(ids: np.ndarray) -> np.ndarray:
        if deadline is not None:
            deadline.check()
        return graphs.step(graphs.embed(ids[:, None]), state)

    return step


__all__ = ["PreparedPrompt", "per_row", "prefill", "prepare_images", "prepare_text", "prepare_video", "stepper"]
