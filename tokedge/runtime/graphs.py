"""The artifact's graphs behind the runner protocol, plus the contract's glue: splicing image
embeddings into the prompt, masks, position ids, and the KV cache between steps (with per-group
lengths when an in-LLM method prunes inside the prefill).

numpy only; docs/artifact.md describes exactly what this does, so any client can do the same.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from tokedge.artifact import Manifest, VerifiedArtifact
from tokedge.errors import InputError
from tokedge.reduce.quota import image_spans, prefill_budget
from tokedge.runtime.base import Runner
from tokedge.runtime.ort_backend import OrtOptions, OrtRunner

if TYPE_CHECKING:
    from tokedge.runtime.deadline import Deadline


def position_ids_from_mask(attention_mask: np.ndarray) -> np.ndarray:
    """Left-padded mask [b, t] -> position ids [b, t]: 0 at each row's first real token."""
    return np.maximum(np.cumsum(attention_mask, axis=1) - 1, 0).astype(np.int64)


def image_positions(input_ids: np.ndarray, image_token_id: int, count: int | Sequence[int]) -> np.ndarray:
    """[b, count] positions of each row's image placeholder tokens (a list when `count` is per row)."""
    rows = [np.flatnonzero(row == image_token_id) for row in input_ids]
    counts = [count] * len(rows) if isinstance(count, int) else list(count)
    for r, (where, expected) in enumerate(zip(rows, counts)):
        if len(where) != expected:
            raise InputError(
                f"prompt {r} has {len(where)} image placeholder tokens but its images have {expected} visual tokens; "
                "expand the placeholder to the artifact's count"
            )
    if isinstance(count, int) or len(set(counts)) == 1:
        return np.stack(rows).astype(np.int64)
    return [r.astype(np.int64) for r in rows]


def token_blocks(input_ids: np.ndarray, image_token_id: int) -> np.ndarray:
    """[b, s] int64: the image each token belongs to, counted per row from 0 (each run of consecutive
    image tokens is one image), -1 for text; transformers' `get_block_sequence_ids_for_mask`."""
    image = input_ids == image_token_id
    starts = image & ~np.pad(image, ((0, 0), (1, 0)))[:, :-1]
    return np.where(image, np.cumsum(starts, axis=1) - 1, -1).astype(np.int64)


def splice_image_embeds(
    text_embeds: np.ndarray, input_ids: np.ndarray, image_token_id: int, image_embeds: np.ndarray | list[np.ndarray]
) -> np.ndarray:
    """Replace each row's image-placeholder positions, in order, by that row's image embeddings
    ([b, k, D], or one [k_i, D] per row when images give different counts: anyres layouts)."""
    out = text_embeds.copy()
    counts = image_embeds.shape[1] if isinstance(image_embeds, np.ndarray) else [len(e) for e in image_embeds]
    positions = image_positions(input_ids, image_token_id, counts)
    for row in range(input_ids.shape[0]):
        out[row, positions[row]] = image_embeds[row].astype(out.dtype)
    return out


@dataclass
class DecodeState:
    """KV cache and padding masks between decoder calls. Masks are preallocated buffers with room
    for `room` more tokens (filled with ones); each call sees a growing view of them."""

    past: dict  # past_key_values.* -> numpy array or a runner's device-resident value
    buffers: dict[str, np.ndarray]  # mask name -> [b, length + room]
    lengths: dict[str, int]
    last_position: np.ndarray  # [b, 1] position id of the last token fed ([3, b, 1] with M-RoPE)
    pruned: np.ndarray | None = None  # [b] image tokens an in-LLM method dropped from each row

    def masks(self, extra: int = 0) -> dict[str, np.ndarray]:
        return {name: buf[:, : self.lengths[name] + extra] for name, buf in self.buffers.items()}

    def grow(self) -> None:
        for name in self.lengths:
            self.lengths[name] += 1

    def visual_tokens(self, vision_tokens: int) -> int:
        """Image tokens of row 0 the last layer group attends to: its image tokens, less what an
        in-LLM method pruned (read from the prefill's masks, not from the manifest)."""
        if self.pruned is not None:
            return vision_tokens - int(self.pruned[0])
        lengths = list(self.lengths.values())
        return vision_tokens - (lengths[0] - lengths[-1])


def _left_pad_concat(parts: list[np.ndarray], name: str) -> np.ndarray:
    """Rows of one prefill output from separate runs -> one batch: a cache's sequence axis (2)
    or a mask's (1) left-padded with zeros (masked out) to the longest row; logits as they are."""
    axis = 2 if name.startswith("present.") else 1 if name.startswith("attention_mask") else None
    if axis is None:
        return np.concatenate(parts)
    longest = max(p.shape[axis] for p in parts)
    padded = []
    for p in parts:
        width = [(0, 0)] * p.ndim
        width[axis] = (longest - p.shape[axis], 0)
        padded.append(np.pad(p, width))
    return np.concatenate(padded)


def _buffer(mask: np.ndarray, room: int) -> np.ndarray:
    buf = np.ones((mask.shape[0], mask.shape[1] + room), dtype=np.int64)
    buf[:, : mask.shape[1]] = mask
    return buf


class ArtifactGraphs:
    """Opens the runners of an artifact (ONNX Runtime by default)."""

    def __init__(self, root: Path | str, manifest: Manifest, runners: dict[str, Runner] | None = None,
                 options: OrtOptions = OrtOptions(), verified: VerifiedArtifact | None = None):
        """`verified` (from `open_artifact`) gives the graphs' verified bytes; without it the
        graphs are read from `root` (only for directories tokedge itself just wrote)."""
        self.root = Path(root)
        self.manifest = manifest
        if runners is None and verified is not None:
            runners = {}
            for name in manifest.graphs:
                model, external = verified.graph_bytes(name)
                runners[name] = OrtRunner(model, options, name=name, external=external)
        self.runners: dict[str, Runner] = runners if runners is not None else {
            name: OrtRunner(self.root / spec.file, options, name=name) for name, spec in manifest.graphs.items()
        }
        dec = manifest.graphs["decoder"]
        self.past_names = [t.name for t in dec.inputs if t.name.startswith("past_key_values.")]
        self.mask_names = [t.name for t in dec.inputs if t.name.startswith("attention_mask")]
        self.float_dtype = np.dtype(dec.input("inputs_embeds").dtype)
        self.has_prefill = "prefill" in manifest.graphs
        self.blocks = dec.input("token_blocks") is not None  # Gemma 3: bidirectional attention within an image

    def __enter__(self) -> ArtifactGraphs:
        for runner in self.runners.values():
            runner.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        for runner in self.runners.values():
            runner.__exit__(*exc)

    @contextlib.contextmanager
    def limited(self, deadline: Deadline | None) -> Iterator[None]:
        """Runs inside this block stop when `deadline` passes: a runner that can stop a run in
        progress does (ONNX Runtime); every step checks it before starting."""
        if deadline is None:
            yield
            return
        for runner in self.runners.values():
            runner.deadline = deadline
        try:
            yield
        finally:
            for runner in self.runners.values():
                runner.deadline = None

    def vision(self, pixel_values: np.ndarray, budget: int | None = None,
               instruction: np.ndarray | None = None) -> np.ndarray:
        feed = {"pixel_values": pixel_values.astype(np.float32, copy=False)}
        if self.manifest.graphs["vision"].input("budget") is not None:
            feed["budget"] = np.array(budget if budget is not None else self.manifest.reduction.budget, dtype=np.int64)
        spec = self.manifest.graphs["vision"].input("instruction")
        if spec is not None:  # methods scoring with the prompt's text (docs/artifact.md, "instruction")
            if instruction is None:
                raise InputError("this artifact's vision graph takes the prompt's text (instruction); "
                                 "run it through a prompt (tokedge run / serve), not on images alone")
            feed["instruction"] = instruction.astype(np.dtype(spec.dtype), copy=False)
        return self.runners["vision"].infer(feed)["image_embeds"]

    def vision_indexed(self, feeds: Sequence[dict]) -> tuple[list[np.ndarray], list[np.ndarray | None]]:
        """The vision graph once per image, from each image's feed (the layout builds them:
        `tokedge.layouts`). -> one [T_i, hidden] array per image, and per image the `kept_index`
        output of graphs that select tokens whose positions the prompt needs (else None)."""
        outs = [self.runners["vision"].infer(feed) for feed in feeds]
        embeds = [o["image_embeds"][0] if o["image_embeds"].ndim == 3 else o["image_embeds"] for o in outs]
        return embeds, [o.get("kept_index") for o in outs]  # [1, T, D] (tiled) or [T, D] (dynamic)

    def embed(self, input_ids: np.ndarray) -> np.ndarray:
        return self.runners["embed"].infer({"input_ids": input_ids.astype(np.int64, copy=False)})["inputs_embeds"]

    def empty_past(self, batch: int) -> dict[str, np.ndarray]:
        m = self.manifest.model
        shape = (batch, m.num_key_value_heads, 0, m.head_dim)
        return {name: np.zeros(shape, dtype=self.float_dtype) for name in self.past_names}

    def _run(self, name: str, host: dict[str, np.ndarray], past: dict) -> tuple[dict, dict]:
        """Run a graph whose present.* outputs become the next past_key_values.* (kept resident
        with runners that support IO binding). Returns (host outputs, next past)."""
        present_to_past = {p.replace("past_key_values.", "present."): p for p in self.past_names}
        out = self.runners[name].infer({**host, **past}, keep=frozenset(present_to_past))
        return out, {past_name: out[p] for p, past_name in present_to_past.items()}

    def prefill(self, inputs_embeds: np.ndarray, attention_mask: np.ndarray, input_ids: np.ndarray,
                room: int, images_per_row: Sequence[int] | None = None,
                position_ids: np.ndarray | None = None,
                prune: tuple[np.ndarray, np.ndarray] | None = None) -> tuple[np.ndarray, DecodeState]:
        """Prompt pass. `images_per_row`: how many images each row's prompt holds (default one each).
        `position_ids`: the layout's own ([3, b, s] M-RoPE, `runtime.layout.prompt_positions`);
        None: 1-D positions from the mask. Decode steps continue at the last column + 1.
        `prune`: (image_positions [b, n], image_keep [stages]) for the prefill graph, given by the
        caller instead of derived from image placeholders (a video's frame tokens).
        -> (logits [b, vocab] fp32, state for `step`)."""
        attention_mask = attention_mask.astype(np.int64, copy=False)
        if position_ids is None:
            position_ids = position_ids_from_mask(attention_mask)
        host = {"inputs_embeds": inputs_embeds, "attention_mask": attention_mask,
                "position_ids": position_ids.astype(np.int64, copy=False)}
        if self.blocks:
            host["token_blocks"] = token_blocks(input_ids, self.manifest.model.image_token_id)
        pruned = None
        text_only = images_per_row is not None and not any(images_per_row) and prune is None
        if text_only and self.has_prefill:  # nothing to prune: the decoder runs the prompt, every cache full
            feed = {"inputs_embeds": inputs_embeds, "position_ids": host["position_ids"],
                    **{n: attention_mask for n in self.mask_names},
                    **({"token_blocks": host["token_blocks"]} if self.blocks else {})}
            out, past = self._run("decoder", feed, self.empty_past(input_ids.shape[0]))
            masks = {"attention_mask": attention_mask, **{n: attention_mask for n in self.mask_names}}
            pruned = np.zeros(input_ids.shape[0], dtype=np.int64)
        elif self.has_prefill:  # in-LLM pruning: the prefill graph shortens later layers' caches
            counts = [1] * len(input_ids) if images_per_row is None else images_per_row
            if prune is not None:
                out, past = self._run("prefill", {**host, "image_positions": prune[0], "image_keep": prune[1]}, {})
            else:
                out, past = self._pruning_prefill(host, input_ids, counts)
            # pruning before layer 0 (dart layer=0) leaves group 0 without layers: no `attention_mask` input
            masks = {"attention_mask": attention_mask,
                     **{n: out[n] for n in self.mask_names if n != "attention_mask"}}
            pruned = attention_mask.sum(axis=1) - masks[self.mask_names[-1]].sum(axis=1)
        else:
            out, past = self._run("decoder", host, self.empty_past(input_ids.shape[0]))
            masks = {"attention_mask": attention_mask}
        state = DecodeState(past=past, buffers={n: _buffer(m, room) for n, m in masks.items()},
                            lengths={n: m.shape[1] for n, m in masks.items()},
                            last_position=host["position_ids"][..., -1:], pruned=pruned)
        return out["logits"][:, -1].astype(np.float32), state

    def _pruning_prefill(self, host: dict, input_ids: np.ndarray, images: Sequence[int]) -> tuple[dict, dict]:
        """Run prefill.onnx. Its `image_positions` are every image token of a row (all images of
        its prompt) and `image_keep` is each stage's per-image keep times the row's image count,
        so rows run together only when they share both counts; otherwise each group of rows runs
        alone and the shortened caches of later layer groups are left-padded (mask 0) to one
        length. Prefill graphs without `image_keep` (older exports) take one image per row."""
        token = self.manifest.model.image_token_id
        if self.manifest.graphs["prefill"].input("image_keep") is None:
            if any(n != 1 for n in images):
                raise InputError("this artifact's prefill graph takes one image per prompt (exported by an older "
                                 "tokedge); re-export it to run prompts with several images")
            host = {**host, "image_positions": image_positions(input_ids, token, self.manifest.prompt.visual_tokens)}
            return self._run("prefill", host, {})
        rows = [np.flatnonzero(row == token).astype(np.int64) for row in input_ids]
        keeps = [self._image_keep(where, int(count)) for where, count in zip(rows, images)]
        groups: dict[tuple, list[int]] = {}
        for r, (where, (keep, quotas)) in enumerate(zip(rows, keeps)):
            groups.setdefault((len(where), tuple(keep), tuple(quotas or ())), []).append(r)

        def feed(members: list[int]) -> dict:
            keep, quotas = keeps[members[0]]
            rows_of = {k: (v[:, members] if k == "position_ids" and v.ndim == 3 else v[members])  # M-RoPE [3, b, t]
                       for k, v in host.items()}
            out = {**rows_of, "image_positions": np.stack([rows[r] for r in members]),
                   "image_keep": np.array(keep, dtype=np.int64)}
            if quotas is not None:  # DART with a quota per image: which image each token is, and its quota
                span = np.repeat(np.arange(len(quotas)), image_spans(rows[members[0]]))
                out["image_span"] = np.broadcast_to(span, (len(members), len(span))).astype(np.int64)
                out["image_quota"] = np.broadcast_to(np.asarray(quotas)[span], (len(members), len(span))).astype(np.int64)
            return out

        if len(groups) == 1:
            (members,) = groups.values()
            return self._run("prefill", feed(members), {})
        outs = {}
        for members in groups.values():
            out = self.runners["prefill"].infer(feed(members))  # host arrays: merged below
            for i, r in enumerate(members):
                outs[r] = {name: value[i:i + 1] for name, value in out.items()}
        merged = {name: _left_pad_concat([outs[r][name] for r in range(len(rows))], name)
                  for name in outs[0]}
        present_to_past = {p.replace("past_key_values.", "present."): p for p in self.past_names}
        return merged, {past: merged[present] for present, past in present_to_past.items()}

    def _image_keep(self, where: np.ndarray, images: int) -> tuple[list[int], list[int] | None]:
        """`image_keep` for one row, and DART's per-image quotas when the prefill takes them."""
        from tokedge.layouts import layout_of

        red = self.manifest.reduction
        budget = layout_of(self.manifest).prefill_budget()  # per-image counts on layouts whose images differ
        spans = image_spans(where)
        edge = self.manifest.graphs["prefill"].input("image_quota") is not None
        return prefill_budget([int(s["keep"]) for s in red.stages], budget, spans, images, edge)

    def step(self, token_embeds: np.ndarray, state: DecodeState) -> np.ndarray:
        """One decode step for one new token per row; updates `state`. -> logits [b, vocab]."""
        positions = state.last_position + 1
        masks = {n: m for n, m in state.masks(extra=1).items() if n in self.mask_names}
        host = {"inputs_embeds": token_embeds, "position_ids": positions, **masks}
        if self.blocks:  # a generated token is text
            host["token_blocks"] = np.full(token_embeds.shape[:2], -1, dtype=np.int64)
        out, state.past = self._run("decoder", host, state.past)
        state.grow()
        state.last_position = positions
        return out["logits"][:, -1].astype(np.float32)
