"""A minimal artifact client written only from docs/artifact.md (numpy + onnxruntime).

It deliberately imports nothing from tokedge: the export tests use it to show that the artifact
contract, as documented, is enough to reproduce transformers' outputs.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnxruntime as ort


class ContractClient:
    def __init__(self, artifact: Path):
        self.root = Path(artifact)
        self.manifest = json.loads((self.root / "tokedge.json").read_text())
        kind = self.manifest.get("layout", {"kind": "single"})["kind"]  # absent: written before layouts
        if kind != "single":
            raise ValueError(f"this client implements the 'single' visual layout only, not '{kind}'")
        so = ort.SessionOptions()
        so.log_severity_level = 3
        self.sessions = {
            name: ort.InferenceSession(str(self.root / g["file"]), so, providers=["CPUExecutionProvider"])
            for name, g in self.manifest["graphs"].items()
        }
        dec = self.manifest["graphs"]["decoder"]
        self.past_inputs = [t for t in dec["inputs"] if t["name"].startswith("past_key_values.")]

    def image_embeds(self, pixel_values: np.ndarray, budget: int | None = None) -> np.ndarray:
        feed = {"pixel_values": pixel_values.astype(np.float32)}
        if any(t["name"] == "budget" for t in self.manifest["graphs"]["vision"]["inputs"]):
            feed["budget"] = np.array(budget or self.manifest["reduction"]["budget"], dtype=np.int64)
        return self.sessions["vision"].run(["image_embeds"], feed)[0]

    def embed(self, ids: np.ndarray) -> np.ndarray:
        return self.sessions["embed"].run(["inputs_embeds"], {"input_ids": ids.astype(np.int64)})[0]

    def _decoder(self, name, feed, masks_out=()):
        names = [o.name for o in self.sessions[name].get_outputs()]
        outs = dict(zip(names, self.sessions[name].run(names, feed)))
        new_past = {t["name"]: outs["present." + t["name"][len("past_key_values."):]] for t in self.past_inputs}
        return outs["logits"][:, -1, :], new_past, {m: outs[m] for m in masks_out}

    def generate(self, pixel_values, input_ids, attention_mask, new_tokens: int, budget: int | None = None):
        """Greedy decoding per the contract's steps; returns (prefill_logits, tokens [b, n])."""
        image_token = self.manifest["prompt"]["image_token_id"]
        img = self.image_embeds(pixel_values, budget)
        embeds = self.embed(input_ids)
        image_pos = []
        for r in range(input_ids.shape[0]):
            pos = np.where(input_ids[r] == image_token)[0]
            assert len(pos) == img.shape[1]
            embeds[r, pos] = img[r]
            image_pos.append(pos)
        mask = attention_mask.astype(np.int64)
        positions = np.clip(np.cumsum(mask, axis=1) - 1, 0, None).astype(np.int64)
        dec_inputs = [t["name"] for t in self.manifest["graphs"]["decoder"]["inputs"]]
        mask_names = [n for n in dec_inputs if n.startswith("attention_mask")]
        feed = {"inputs_embeds": embeds, "attention_mask": mask, "position_ids": positions}
        if "prefill" in self.manifest["graphs"]:  # in-LLM pruning: per-group masks come back
            feed["image_positions"] = np.stack(image_pos).astype(np.int64)
            if any(t["name"] == "image_keep" for t in self.manifest["graphs"]["prefill"]["inputs"]):
                # one image per row here: each stage keeps its per-image count
                feed["image_keep"] = np.array([s["keep"] for s in self.manifest["reduction"]["stages"]], np.int64)
            logits, past, extra = self._decoder("prefill", feed, mask_names[1:])
            masks = {"attention_mask": mask, **extra}
        else:
            m = self.manifest["model"]
            dtype = np.float16 if self.manifest["dtype"] == "fp16" else np.float32
            past = {t["name"]: np.zeros((input_ids.shape[0], m["num_key_value_heads"], 0, m["head_dim"]), dtype)
                    for t in self.past_inputs}
            logits, past, _ = self._decoder("decoder", {**feed, **past})
            masks = {"attention_mask": mask}
        prefill = logits
        tokens = [logits.argmax(-1)]
        last = positions[:, -1:]
        for _ in range(new_tokens - 1):
            masks = {k: np.concatenate([v, np.ones((v.shape[0], 1), np.int64)], axis=1) for k, v in masks.items()}
            last = last + 1
            feed = {"inputs_embeds": self.embed(tokens[-1][:, None]), "position_ids": last, **masks, **past}
            logits, past, _ = self._decoder("decoder", feed)
            tokens.append(logits.argmax(-1))
        return prefill, np.stack(tokens, axis=1)
