"""A minimal artifact client written only from docs/artifact.md (numpy + onnxruntime, and for the
whole path from an image file: Pillow, jinja2 and tokenizers).

It deliberately imports nothing from tokedge: the export tests use it to show that the artifact
contract, as documented, is enough to reproduce transformers' outputs. `generate` takes prepared
inputs (both layouts); `run` goes from PIL images and a question to tokens, planning tiled
("anyres") images itself (docs/artifact.md, "Planning a tiled image"), including reduced tiled
artifacts (candidate plan, `base_tile`, the thumbnail guide, and `image_keep` for in-LLM prefill graphs), and
dynamic-resolution ("dynamic_patches", formerly "qwen_dynamic") images with M-RoPE positions (docs/artifact.md, "Dynamic
resolution", "Running a prompt" step 5).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import onnxruntime as ort


def _taps(n, m):
    """Bilinear taps along an axis of n -> m positions (docs/artifact.md, the OneVision shrink)."""
    scale = np.float32(n / m)
    out = []
    for j in range(m):
        src = max(np.float32((np.float32(j) + np.float32(0.5)) * scale - np.float32(0.5)), np.float32(0))
        lo = min(math.floor(src), n - 1)
        out.append((lo, min(lo + 1, n - 1), np.float32(src - np.float32(lo))))
    return out


class ContractClient:
    def __init__(self, artifact: Path):
        self.root = Path(artifact)
        self.manifest = json.loads((self.root / "tokedge.json").read_text())
        self.layout = self.manifest.get("layout") or {"kind": "single"}  # absent: written before layouts
        if self.layout["kind"] not in ("single", "anyres", "dynamic_patches", "qwen_dynamic", "split_tiles", "aspect_tiles",
                                       "framed_view"):
            raise ValueError(f"this client implements the 'single', 'anyres', 'dynamic_patches' (formerly 'qwen_dynamic'), 'split_tiles', 'aspect_tiles' and 'framed_view' layouts, "
                             f"not '{self.layout['kind']}'")
        so = ort.SessionOptions()
        so.log_severity_level = 3
        self.sessions = {
            name: ort.InferenceSession(str(self.root / g["file"]), so, providers=["CPUExecutionProvider"])
            for name, g in self.manifest["graphs"].items()
        }
        dec = self.manifest["graphs"]["decoder"]
        self.past_inputs = [t for t in dec["inputs"] if t["name"].startswith("past_key_values.")]

    def image_embeds(self, pixel_values: np.ndarray, budget: int | None = None,
                     instruction: np.ndarray | None = None) -> np.ndarray:
        feed = {"pixel_values": pixel_values.astype(np.float32)}
        names = {t["name"]: t for t in self.manifest["graphs"]["vision"]["inputs"]}
        if "budget" in names:
            feed["budget"] = np.array(budget or self.manifest["reduction"]["budget"], dtype=np.int64)
        if "instruction" in names:  # the prompt's text: mean embedding over each row's text tokens
            feed["instruction"] = instruction.astype(names["instruction"]["dtype"])
        return self.sessions["vision"].run(["image_embeds"], feed)[0]

    def instruction(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        """docs/artifact.md, vision input `instruction`: per row, the mean of embed.onnx's output over
        the positions with attention_mask 1 that are not the image placeholder."""
        text = (attention_mask == 1) & (input_ids != self.manifest["prompt"]["image_token_id"])
        emb = self.embed(input_ids)[..., :self.manifest["model"]["hidden_size"]].astype(np.float32)
        return (emb * text[..., None]).sum(axis=1) / np.maximum(text.sum(axis=1, keepdims=True), 1)

    def embed(self, ids: np.ndarray) -> np.ndarray:
        return self.sessions["embed"].run(["inputs_embeds"], {"input_ids": ids.astype(np.int64)})[0]

    def _decoder(self, name, feed, masks_out=()):
        names = [o.name for o in self.sessions[name].get_outputs()]
        outs = dict(zip(names, self.sessions[name].run(names, feed)))
        new_past = {t["name"]: outs["present." + t["name"][len("past_key_values."):]] for t in self.past_inputs}
        return outs["logits"][:, -1, :], new_past, {m: outs[m] for m in masks_out}

    def generate(self, pixel_values, input_ids, attention_mask, new_tokens: int, budget: int | None = None,
                 positions: np.ndarray | None = None):
        """Greedy decoding per the contract's steps; returns (prefill_logits, tokens [b, n]).
        `pixel_values`: [b, 3, H, W] (single layout), or per row a list of that row's images'
        embeddings [T_i, hidden] (already run through the vision graph: see `run`)."""
        image_token = self.manifest["prompt"]["image_token_id"]
        if isinstance(pixel_values, np.ndarray):
            img = list(self.image_embeds(pixel_values, budget, self.instruction(input_ids, attention_mask)))
        else:
            img = [np.concatenate(row, axis=0) for row in pixel_values]  # a row's images in order
        embeds = self.embed(input_ids)
        image_pos = []
        for r in range(input_ids.shape[0]):
            pos = np.where(input_ids[r] == image_token)[0]
            assert len(pos) == img[r].shape[0]
            embeds[r, pos] = img[r]
            image_pos.append(pos)
        mask = attention_mask.astype(np.int64)
        if positions is None:  # M-RoPE layouts pass their [3, b, s] positions
            positions = np.clip(np.cumsum(mask, axis=1) - 1, 0, None).astype(np.int64)
        dec_inputs = [t["name"] for t in self.manifest["graphs"]["decoder"]["inputs"]]
        mask_names = [n for n in dec_inputs if n.startswith("attention_mask")]
        feed = {"inputs_embeds": embeds, "attention_mask": mask, "position_ids": positions}
        blocks = "token_blocks" in dec_inputs  # Gemma 3: each run of image tokens one bidirectional block
        if blocks:
            image = input_ids == image_token
            starts = image & ~np.concatenate([np.zeros_like(image[:, :1]), image[:, :-1]], axis=1)
            feed["token_blocks"] = np.where(image, np.cumsum(starts, axis=1) - 1, -1).astype(np.int64)
        if "prefill" in self.manifest["graphs"]:  # in-LLM pruning: per-group masks come back
            feed["image_positions"] = np.stack(image_pos).astype(np.int64)
            if any(t["name"] == "image_keep" for t in self.manifest["graphs"]["prefill"]["inputs"]):
                # each stage keeps its per-image count times the row's images (rows fed together agree)
                images = 1 if isinstance(pixel_values, np.ndarray) else len(pixel_values[0])
                assert isinstance(pixel_values, np.ndarray) or all(len(row) == images for row in pixel_values)
                feed["image_keep"] = np.array([s["keep"] * images for s in self.manifest["reduction"]["stages"]],
                                              np.int64)
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
        last = positions[..., -1:]
        for _ in range(new_tokens - 1):
            masks = {k: np.concatenate([v, np.ones((v.shape[0], 1), np.int64)], axis=1) for k, v in masks.items()}
            last = last + 1
            feed = {"inputs_embeds": self.embed(tokens[-1][:, None]), "position_ids": last, **masks, **past}
            if blocks:
                feed["token_blocks"] = np.full((input_ids.shape[0], 1), -1, np.int64)
            logits, past, _ = self._decoder("decoder", feed)
            tokens.append(logits.argmax(-1))
        return prefill, np.stack(tokens, axis=1)

    # --- from images and text (docs/artifact.md: "Running a prompt", "Planning a tiled image") ---

    def normalise(self, image) -> np.ndarray:
        """A PIL RGB image already at its final size -> [3, h, w] float32 (rescale, normalise)."""
        pre = self.manifest["preprocess"]
        x = np.asarray(image).astype(np.float64)
        if pre["do_rescale"]:
            x = x * pre["rescale_factor"]
        x = x.astype(np.float32)
        if pre["do_normalize"]:
            x = (x - np.asarray(pre["image_mean"], np.float32)) / np.asarray(pre["image_std"], np.float32)
        return np.ascontiguousarray(np.moveaxis(x, -1, 0), dtype=np.float32)

    def _canvas(self, W: int, H: int) -> tuple[int, int, int, int]:
        """Steps 1-2 of the plan: -> (canvas height, canvas width, resized height, resized width)."""
        best = None
        for h, w in self.layout["pinpoints"]:  # 1. canvas
            scale = min(w / W, h / H)
            effective = min(int(W * scale) * int(H * scale), W * H)
            wasted = h * w - effective
            if best is None or effective > best[0] or (effective == best[0] and wasted < best[1]):
                best = (effective, wasted, h, w)
        bh, bw = best[2], best[3]
        sw, sh = bw / W, bh / H  # 2. resize (the image is pasted centred on the canvas)
        if sw < sh:
            nw, nh = bw, min(math.ceil(H * sw), bh)
        else:
            nh, nw = bh, min(math.ceil(W * sh), bw)
        return bh, bw, nh, nw

    def base_tile(self, image) -> np.ndarray:
        """Reduced anyres graphs with a `base_tile` input (hired): per base-view token, the tile
        (row-major in the grid) under its centre on the canvas -> [N] int64."""
        S, p = self.layout["tile"], self.layout["patch_grid"]
        W, H = image.size
        bh, bw, nh, nw = self._canvas(W, H)
        top, left = (bh - nh) // 2, (bw - nw) // 2
        out = np.zeros(p * p, np.int64)
        for r in range(p):
            for c in range(p):
                y, x = top + (r + 0.5) / p * nh, left + (c + 0.5) / p * nw
                out[r * p + c] = math.floor(y / S) * (bw // S) + math.floor(x / S)
        return out

    def thumbnail_guide(self, image) -> dict[str, np.ndarray]:
        """Reduced anyres graphs with `base_block` (globalcom2): the base view's block split by the
        grid and its p x p map resized onto the tile map, per candidate (docs/artifact.md)."""
        p = self.layout["patch_grid"]
        self.plan_tiled(image)
        gh, gw, rows, cols = self.map_shape
        block = np.array([min(r // max(p // gh, 1), gh - 1) * gw + min(c // max(p // gw, 1), gw - 1)
                          for r in range(p) for c in range(p)], np.int64)
        index, weight = [[0, 0, 0, 0]] * (p * p), [[0.0] * 4] * (p * p)
        ys, xs = _taps(p, rows), _taps(p, cols)
        for y0, y1, fy in ys:
            for x0, x1, fx in xs:
                index.append([y0 * p + x0, y0 * p + x1, y1 * p + x0, y1 * p + x1])
                weight.append([(1 - fy) * (1 - fx), (1 - fy) * fx, fy * (1 - fx), fy * fx])
        return {"base_block": block, "guide_index": np.asarray(index, np.int64),
                "guide_weight": np.asarray(weight, np.float32)}

    def plan_tiled(self, image, tiled: bool = True):
        """-> (pixel_values [P, 3, S, S], pack_index [T, 4], pack_weight [T, 4]) for one image."""
        from PIL import Image

        lay, resample = self.layout, self.manifest["preprocess"]["resample"]
        S, p = lay["tile"], lay["patch_grid"]
        N = p * p
        image = image.convert("RGB")
        W, H = image.size
        if not tiled:
            side = max(H, W)
            square = Image.new("RGB", (side, side), tuple(lay["pad_fill"]))
            square.paste(image, ((side - W) // 2, (side - H) // 2))
            parts = [square.resize((S, S), resample)]
            index = np.zeros((N + 1, 4), np.int64)
            weight = np.zeros((N + 1, 4), np.float32)
            index[:N, 0], index[N, 0] = np.arange(N), N
            weight[:, 0] = 1
            return np.stack([self.normalise(x) for x in parts]), index, weight
        # 1-2. canvas, resize and pad
        bh, bw, nh, nw = self._canvas(W, H)
        gh, gw = bh // S, bw // S
        canvas = Image.new("RGB", (bw, bh), (0, 0, 0))
        canvas.paste(image.resize((nw, nh), resample), ((bw - nw) // 2, (bh - nh) // 2))
        # 3. partitions: base view, then tiles row-major
        parts = [image.resize((S, S), resample)]
        parts += [canvas.crop((c * S, r * S, (c + 1) * S, (r + 1) * S)) for r in range(gh) for c in range(gw)]
        P = len(parts)

        # 4. feature map
        def f(y, x):
            return (1 + (y // p) * gw + (x // p)) * N + (y % p) * p + (x % p)

        R, C = gh * p, gw * p
        # 5. unpadding
        top = left = 0
        rows, cols = R, C
        if W / H > C / R:
            pad = (R - int(round(H * C / W, 7))) // 2
            top, rows = pad, R - 2 * pad
        else:
            pad = (C - int(round(W * R / H, 7))) // 2
            left, cols = pad, C - 2 * pad
        # 6. interpolation
        out_rows, out_cols = rows, cols
        if lay.get("max_tiles") is not None:
            ratio = math.sqrt(rows * cols / (lay["max_tiles"] * p * p))
            if ratio > lay["interpolate_threshold"]:
                out_rows, out_cols = int(rows // ratio), int(cols // ratio)

        self.map_shape = (gh, gw, out_rows, out_cols)  # for `thumbnail_guide`
        # 7. packing plan
        index = [[i, 0, 0, 0] for i in range(N)]
        weight = [[1.0, 0.0, 0.0, 0.0] for _ in range(N)]
        interpolated = (out_rows, out_cols) != (rows, cols)
        ys = _taps(rows, out_rows) if interpolated else None
        xs = _taps(cols, out_cols) if interpolated else None
        for i in range(out_rows):
            for j in range(out_cols):
                if not interpolated:
                    index.append([f(top + i, left + j), 0, 0, 0])
                    weight.append([1.0, 0.0, 0.0, 0.0])
                    continue
                (y0, y1, fy), (x0, x1, fx) = ys[i], xs[j]
                index.append([f(top + y0, left + x0), f(top + y0, left + x1), f(top + y1, left + x0),
                              f(top + y1, left + x1)])
                weight.append([(1 - fy) * (1 - fx), (1 - fy) * fx, fy * (1 - fx), fy * fx])
            index.append([P * N, 0, 0, 0])
            weight.append([1.0, 0.0, 0.0, 0.0])
        pixel_values = np.stack([self.normalise(x) for x in parts])
        return pixel_values, np.asarray(index, np.int64), np.asarray(weight, np.float32)

    def tiled_embeds(self, image, tiled: bool = True) -> np.ndarray:
        """One image through the anyres vision graph -> [T, hidden]. Reduced (pre-LLM) artifacts
        take the candidate plan (no image_newline rows) and, when the graph has it, `base_tile`;
        they return `reduction.budget` rows."""
        pixel_values, index, weight = self.plan_tiled(image, tiled)
        reduction = self.manifest["reduction"]
        vision_inputs = {t["name"] for t in self.manifest["graphs"]["vision"]["inputs"]}
        feed = {"pixel_values": pixel_values}
        if reduction["stage"] == "pre-llm":
            candidate = index[:, 0] != len(pixel_values) * self.layout["patch_grid"] ** 2  # not image_newline
            index, weight = index[candidate], weight[candidate]
            if len(index) < reduction["budget"]:
                raise ValueError(f"{len(index)} candidates < budget {reduction['budget']}: image refused")
            if "base_tile" in vision_inputs:
                feed["base_tile"] = self.base_tile(image.convert("RGB"))
            if "base_block" in vision_inputs:
                feed.update(self.thumbnail_guide(image))
        feed.update(pack_index=index, pack_weight=weight)
        return self.sessions["vision"].run(["image_embeds"], feed)[0][0]

    def render(self, question: str, images: int = 1) -> str:
        """One user turn with `images` image items then the question, as the chat template renders it."""
        import jinja2
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        prompt = self.manifest["prompt"]
        if prompt["chat_template"] is None:
            assert images == 1
            return f"USER: {prompt['image_token']}\n{question} ASSISTANT:"

        def raise_exception(message):
            raise jinja2.exceptions.TemplateError(message)

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
        env.globals["raise_exception"] = raise_exception
        env.filters["tojson"] = lambda x, **kw: json.dumps(x, **kw)
        content = [{"type": "image"}] * images + [{"type": "text", "text": question}]
        return env.from_string(prompt["chat_template"]).render(
            messages=[{"role": "user", "content": content}], add_generation_prompt=True,
            **prompt.get("special_tokens", {}))

    def encode(self, rendered: str, counts: list) -> np.ndarray:
        """Each placeholder, in order, expanded to its image's count (or its text: split tiles);
        tokenized -> ids [1, t]."""
        from tokenizers import Tokenizer

        token = self.manifest["prompt"]["image_token"]
        pieces = rendered.split(token)
        assert len(pieces) == len(counts) + 1, "one placeholder per image"
        text = pieces[0] + "".join((k if isinstance(k, str) else token * k) + rest for k, rest in zip(counts, pieces[1:]))
        tok = Tokenizer.from_file(str(self.root / self.manifest["prompt"]["tokenizer_file"]))
        return np.asarray([tok.encode(text, add_special_tokens=True).ids], np.int64)

    def run(self, images, question: str, new_tokens: int):
        """PIL images (all in one prompt) + a question -> (prefill_logits [1, vocab], tokens [1, n],
        input_ids [1, t]). A tiled layout plans every image (untiled when `multi_image_square` and
        there are several)."""
        if self.layout["kind"] in ("dynamic_patches", "qwen_dynamic"):
            planned = [self.dynamic_embeds(image) for image in images]
            ids = self.encode(self.render(question, len(images)), [len(e) for e, _ in planned])
            positions = self.mrope_positions(ids, [grid for _, grid in planned])
            logits, tokens = self.generate([[e for e, _ in planned]], ids, np.ones_like(ids), new_tokens,
                                           positions=positions)
            return logits, tokens, ids
        if self.layout["kind"] in ("split_tiles", "aspect_tiles"):
            embed = self.split_embeds if self.layout["kind"] == "split_tiles" else self.aspect_embeds
            planned = [embed(image) for image in images]
            ids = self.encode(self.render(question, len(images)), [text for _, text in planned])
            logits, tokens = self.generate([[e for e, _ in planned]], ids, np.ones_like(ids), new_tokens)
            return logits, tokens, ids
        if self.layout["kind"] == "framed_view":  # one S x S view per image, its run framed by text
            lay, pre = self.layout, self.manifest["preprocess"]
            S = lay["tile"]
            views = np.stack([self.normalise(image.convert("RGB").resize((S, S), pre["resample"])) for image in images])
            embeds = list(self.image_embeds(views))
            texts = [lay["frame_before"] + lay["run_token"] * len(e) + lay["frame_after"] for e in embeds]
            ids = self.encode(self.render(question, len(images)), texts)
            logits, tokens = self.generate([embeds], ids, np.ones_like(ids), new_tokens)
            return logits, tokens, ids
        assert self.layout["kind"] == "anyres", "run() plans tiled images; single views take generate()"
        tiled = not (self.layout.get("multi_image_square") and len(images) > 1)
        embeds = [self.tiled_embeds(image, tiled) for image in images]
        ids = self.encode(self.render(question, len(images)), [len(e) for e in embeds])
        logits, tokens = self.generate([embeds], ids, np.ones_like(ids), new_tokens)
        return logits, tokens, ids

    # --- split tiles (docs/artifact.md: "Split tiles with text between them") ---

    def split_embeds(self, image):
        """One image -> (image_embeds [views * T, hidden], the text its placeholder becomes)."""
        from PIL import Image

        lay, pre = self.layout, self.manifest["preprocess"]
        L, M, T = lay["longest_edge"], lay["tile"], lay["view_tokens"]
        resample = Image.Resampling(pre["resample"])
        if image.mode != "RGB":  # transparency onto white
            rgba = image.convert("RGBA")
            image = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")
        W, H = image.size
        if W >= H:
            w1, h1 = L, int(L / (W / H))
            h1 += h1 % 2
        else:
            h1, w1 = L, int(L * (W / H))
            w1 += w1 % 2
        h1, w1 = max(h1, 1), max(w1, 1)  # (the 4096 cap is not reached at these sizes)
        step1 = image.resize((w1, h1), resample)
        rows = cols = 0
        views = [step1.resize((M, M), resample)]
        if lay["split_image"]:
            if w1 >= h1:
                w2 = math.ceil(w1 / M) * M
                h2 = math.ceil(int(w2 / (w1 / h1)) / M) * M
            else:
                h2 = math.ceil(h1 / M) * M
                w2 = math.ceil(int(h2 * (w1 / h1)) / M) * M
            if h2 > M or w2 > M:
                step2 = step1.resize((w2, h2), resample)
                rows, cols = h2 // M, w2 // M
                views = [step2.crop((c * M, r * M, (c + 1) * M, (r + 1) * M)) for r in range(rows) for c in range(cols)]
                views.append(step2.resize((M, M), resample))
        pixel_values = np.stack([self.normalise(v) for v in views])
        embeds = self.sessions["vision"].run(["image_embeds"], {"pixel_values": pixel_values})[0][0]
        run = self.manifest["prompt"]["image_token"] * T
        fake, glob = "<fake_token_around_image>", f"<fake_token_around_image><global-img>{run}<fake_token_around_image>"
        text = "".join("".join(f"{fake}<row_{r + 1}_col_{c + 1}>{run}" for c in range(cols)) + "\n" for r in range(rows))
        return embeds, (text + "\n" + glob if rows else glob)

    # --- aspect-ratio tiles (docs/artifact.md: "Aspect-ratio tiles") ---

    def aspect_embeds(self, image):
        """One image -> (image_embeds [views * T, hidden], the text its placeholder becomes)."""
        from PIL import Image

        lay, pre = self.layout, self.manifest["preprocess"]
        M, lo, hi = lay["tile"], lay["min_tiles"], lay["max_tiles"]
        resample = Image.Resampling(pre["resample"])
        image = image.convert("RGB")
        W, H = image.size
        if hi == 1:
            views = [image.resize((M, M), resample)]
        else:
            grids = sorted([(c, r) for c in range(1, hi + 1) for r in range(1, hi + 1) if lo <= c * r <= hi],
                           key=lambda g: g[0] * g[1])
            best, diff = (1, 1), float("inf")
            for c, r in grids:
                d = abs(W / H - c / r)
                if d < diff or (d == diff and H * W > 0.5 * M * M * c * r):
                    best, diff = (c, r), min(d, diff)
            cols, rows = best
            canvas = image.resize((cols * M, rows * M), resample)
            views = [canvas.crop((c * M, r * M, (c + 1) * M, (r + 1) * M)) for r in range(rows) for c in range(cols)]
            if len(views) > 1:
                views.append(image.resize((M, M), resample))
        pixel_values = np.stack([self.normalise(v) for v in views])
        embeds = self.sessions["vision"].run(["image_embeds"], {"pixel_values": pixel_values})[0][0]
        return embeds, "<img>" + self.manifest["prompt"]["image_token"] * len(embeds) + "</img>"

    # --- dynamic resolution (docs/artifact.md: "Dynamic resolution", "Running a prompt" step 5) ---

    def dynamic_embeds(self, image):
        """One image -> (image_embeds [T, hidden], grid (gh, gw) in patches)."""
        lay, pre = self.layout, self.manifest["preprocess"]
        P, m, T = lay["patch_size"], lay["merge_size"], lay["temporal_patch_size"]
        F = P * m
        image = image.convert("RGB")
        W, H = image.size
        assert max(H, W) / min(H, W) <= 200
        h, w = round(H / F) * F, round(W / F) * F  # 1. size
        if h * w > lay["max_pixels"]:
            beta = math.sqrt(H * W / lay["max_pixels"])
            h, w = max(F, math.floor(H / beta / F) * F), max(F, math.floor(W / beta / F) * F)
        elif h * w < lay["min_pixels"]:
            beta = math.sqrt(lay["min_pixels"] / (H * W))
            h, w = math.ceil(H * beta / F) * F, math.ceil(W * beta / F) * F
        if (h, w) != (H, W):  # 2. pixels
            image = image.resize((w, h), pre["resample"])
        x = self.normalise(image)
        gh, gw = h // P, w // P  # 3. patches, block-major
        x = x.reshape(3, gh // m, m, P, gw // m, m, P).transpose(1, 4, 2, 5, 0, 3, 6)
        x = np.repeat(x[:, :, :, :, :, None], T, axis=5).reshape(gh * gw, 3 * T * P * P)
        pos = []
        for bh in range(gh // m):
            for bw in range(gw // m):
                for mh in range(m):
                    for mw in range(m):
                        pos.append((bh * m + mh, bw * m + mw))
        pos = np.asarray(pos, np.int64)
        feed = {"pixel_values": np.ascontiguousarray(x, np.float32), "vision_pos": pos}
        if lay["window_size"] is not None:  # 4. windows
            ws = lay["window_size"] // m // P
            lh, lw = gh // m, gw // m
            rows, cols = lh + (ws - lh % ws), lw + (ws - lw % ws)
            grid = -np.ones((rows, cols), np.int64)
            grid[:lh, :lw] = np.arange(lh * lw).reshape(lh, lw)
            order, seg, windows = [], [], 0
            for wr in range(rows // ws):
                for wc in range(cols // ws):
                    cells = [int(v) for v in grid[wr * ws:(wr + 1) * ws, wc * ws:(wc + 1) * ws].ravel() if v >= 0]
                    if cells:  # empty windows take no number
                        seg += [windows] * (len(cells) * m * m)
                        order += cells
                        windows += 1
            window_index = np.asarray(order, np.int64)
            perm = (window_index[:, None] * m * m + np.arange(m * m)).ravel()
            feed = {"pixel_values": feed["pixel_values"][perm], "vision_pos": pos[perm],
                    "window_seg": np.asarray(seg, np.int64), "merge_restore": np.argsort(window_index)}
        out = self.sessions["vision"].run(["image_embeds"], feed)[0]
        return out, (gh, gw)

    def mrope_positions(self, ids: np.ndarray, grids: list) -> np.ndarray:
        """Step 5, M-RoPE: [3, 1, t] positions of one unpadded prompt whose images have `grids`."""
        m = self.layout["merge_size"]
        image = (ids[0] == self.manifest["prompt"]["image_token_id"]).tolist()
        cols, cur, i, k = [], 0, 0, 0
        while i < len(image):
            j = i
            while j < len(image) and image[j] == image[i]:
                j += 1
            if not image[i]:
                cols += [(cur + n, cur + n, cur + n) for n in range(j - i)]
                cur += j - i
            else:
                lh, lw = grids[k][0] // m, grids[k][1] // m
                k += 1
                assert lh * lw == j - i
                cols += [(cur, cur + r, cur + c) for r in range(lh) for c in range(lw)]
                cur += max(lh, lw)
            i = j
        return np.asarray(cols, np.int64).T[:, None, :]


def assert_runs_like_tokedge(path, tokedge_run, prompts_images: list, question: str, new_tokens: int) -> None:
    """This client and tokedge (`tokedge_run(path, images) -> (result, ids, prefill logits)`) on each
    prompt's images: the same prompt ids, prefill logits within 1e-4, tokedge's greedy tokens a prefix
    of this client's."""
    client = ContractClient(path)
    for images in prompts_images:
        logits, tokens, ids = client.run(images, question, new_tokens)
        result, got_ids, got_logits = tokedge_run(path, images)
        np.testing.assert_array_equal(ids[0], got_ids)
        np.testing.assert_allclose(logits[0], got_logits, atol=1e-4, rtol=0)
        assert tokens[0].tolist()[: len(result.token_ids[0])] == result.token_ids[0]
