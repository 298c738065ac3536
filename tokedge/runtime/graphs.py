"""The artifact's three graphs behind the runner protocol, plus the contract's glue: splicing
image embeddings into the prompt, masks, position ids and the KV cache between steps.

numpy only; docs/artifact.md describes exactly what this does, so any client can do the same.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from tokedge.artifact import Manifest
from tokedge.errors import InputError
from tokedge.runtime.base import Runner
from tokedge.runtime.onnxruntime import OrtOptions, OrtRunner


def position_ids_from_mask(attention_mask: np.ndarray) -> np.ndarray:
    """Left-padded mask [b, t] -> position ids [b, t]: 0 at each row's first real token."""
    return np.maximum(np.cumsum(attention_mask, axis=1) - 1, 0).astype(np.int64)


def splice_image_embeds(
    text_embeds: np.ndarray, input_ids: np.ndarray, image_token_id: int, image_embeds: np.ndarray
) -> np.ndarray:
    """Replace each row's image-placeholder positions, in order, by that row's image embeddings."""
    out = text_embeds.copy()
    for row in range(input_ids.shape[0]):
        where = np.flatnonzero(input_ids[row] == image_token_id)
        if len(where) != image_embeds.shape[1]:
            raise InputError(
                f"prompt {row} has {len(where)} image placeholder tokens but the image has "
                f"{image_embeds.shape[1]} visual tokens; expand the placeholder to the artifact's count"
            )
        out[row, where] = image_embeds[row].astype(out.dtype)
    return out


@dataclass
class StepResult:
    logits: np.ndarray  # [b, vocab] at the last position, fp32
    past: dict[str, np.ndarray] = field(default_factory=dict)


class ArtifactGraphs:
    """Opens the vision, embed and decoder runners of an artifact (ONNX Runtime by default)."""

    def __init__(self, root: Path | str, manifest: Manifest, runners: dict[str, Runner] | None = None,
                 options: OrtOptions = OrtOptions()):
        self.root = Path(root)
        self.manifest = manifest
        self.runners: dict[str, Runner] = runners or {
            name: OrtRunner(self.root / spec.file, options, name=name) for name, spec in manifest.graphs.items()
        }
        dec = manifest.graphs["decoder"]
        self.past_names = [t.name for t in dec.inputs if t.name.startswith("past_key_values.")]
        self.float_dtype = np.dtype(dec.input("inputs_embeds").dtype)

    def __enter__(self) -> "ArtifactGraphs":
        for runner in self.runners.values():
            runner.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        for runner in self.runners.values():
            runner.__exit__(*exc)

    def vision(self, pixel_values: np.ndarray, budget: int | None = None) -> np.ndarray:
        feed = {"pixel_values": pixel_values.astype(np.float32, copy=False)}
        if self.manifest.graphs["vision"].input("budget") is not None:
            feed["budget"] = np.array(budget if budget is not None else self.manifest.reduction.budget, dtype=np.int64)
        return self.runners["vision"].infer(feed)["image_embeds"]

    def embed(self, input_ids: np.ndarray) -> np.ndarray:
        return self.runners["embed"].infer({"input_ids": input_ids.astype(np.int64, copy=False)})["inputs_embeds"]

    def empty_past(self, batch: int) -> dict[str, np.ndarray]:
        m = self.manifest.model
        shape = (batch, m.num_key_value_heads, 0, m.head_dim)
        return {name: np.zeros(shape, dtype=self.float_dtype) for name in self.past_names}

    def decode(self, inputs_embeds: np.ndarray, attention_mask: np.ndarray, position_ids: np.ndarray,
               past: dict) -> StepResult:
        """One decoder call. `past` holds numpy arrays or, with runners that support IO binding,
        the device-resident values returned by the previous step (never copied back to the host)."""
        host = {"inputs_embeds": inputs_embeds, "attention_mask": attention_mask.astype(np.int64, copy=False),
                "position_ids": position_ids.astype(np.int64, copy=False)}
        runner = self.runners["decoder"]
        present_to_past = {name.replace("past_key_values.", "present."): name for name in self.past_names}
        if hasattr(runner, "infer_bound"):
            arrays = {k: v for k, v in past.items() if isinstance(v, np.ndarray)}
            resident = {k: v for k, v in past.items() if not isinstance(v, np.ndarray)}
            out, kept = runner.infer_bound({**host, **arrays}, resident, keep=set(present_to_past))
        else:
            out = runner.infer({**host, **past})
            kept = out
        return StepResult(logits=out["logits"][:, -1].astype(np.float32),
                          past={past_name: kept[p] for p, past_name in present_to_past.items()})

    def greedy(self, pixel_values: np.ndarray, input_ids: np.ndarray, attention_mask: np.ndarray, steps: int,
               budget: int | None = None) -> dict[str, np.ndarray]:
        """Prefill then `steps` greedy decode steps; returns the arrays parity checks compare."""
        image_embeds = self.vision(pixel_values, budget)
        embeds = splice_image_embeds(self.embed(input_ids), input_ids, self.manifest.model.image_token_id, image_embeds)
        positions = position_ids_from_mask(attention_mask)
        result = self.decode(embeds, attention_mask, positions, self.empty_past(input_ids.shape[0]))
        out = {"image_embeds": image_embeds, "prefill_logits": result.logits}
        tokens = [result.logits.argmax(-1)]
        step_logits = []
        for _ in range(steps):
            attention_mask = np.concatenate([attention_mask, np.ones_like(attention_mask[:, :1])], axis=1)
            positions = positions[:, -1:] + 1
            result = self.decode(self.embed(tokens[-1][:, None]), attention_mask, positions, result.past)
            step_logits.append(result.logits)
            tokens.append(result.logits.argmax(-1))
        out["tokens"] = np.stack(tokens, axis=1)
        out["step_logits"] = np.stack(step_logits, axis=1) if step_logits else np.zeros((input_ids.shape[0], 0, 0))
        return out
