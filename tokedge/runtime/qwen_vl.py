"""Qwen2-VL / Qwen2.5-VL / Qwen3-VL inputs in numpy (torch-free): dynamic-resolution preprocessing,
the vision tower's index inputs and the decoder's M-RoPE positions.

Everything here follows transformers' processors and models exactly (docs/research/qwen-vl.md
sections 2, 3 and 5); tests/runtime/test_qwen_vl.py compares each function with transformers' own.
Shapes: `P` patch size, `m` merge size, `T` temporal patch size, grid `(t, gh, gw)` in patches;
the LLM sees `t * gh * gw / m**2` merged tokens per image, in raster order of the merged grid.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np
from PIL import Image

from tokedge.errors import InputError


@dataclass(frozen=True)
class QwenImageSpec:
    """The image processor's settings that shape the pixels (Qwen2VLImageProcessor's fields)."""

    patch_size: int = 14  # P (16 on Qwen3-VL)
    merge_size: int = 2  # m: m x m patches form one LLM token
    temporal_patch_size: int = 2  # T: a still image is repeated T times
    min_pixels: int = 3136  # size.shortest_edge: a pixel COUNT, not an edge
    max_pixels: int = 12845056  # size.longest_edge: a pixel count
    mean: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
    std: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)
    rescale: float = 1 / 255
    resample: int = 3  # PIL bicubic

    @property
    def factor(self) -> int:
        return self.patch_size * self.merge_size


def smart_resize(height: int, width: int, factor: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """(height, width) rounded to multiples of `factor` with the pixel count inside [min, max].

    Python's round (half to even), as transformers uses; raises InputError on aspect ratios over 200.
    """
    if min(height, width) <= 0:
        raise InputError(f"image of {width}x{height} pixels is empty; pass a real image")
    if max(height, width) / min(height, width) > 200:
        raise InputError(f"image of {width}x{height} pixels has an aspect ratio over 200, which Qwen-VL "
                         "processors refuse; crop or pad it first")
    h = round(height / factor) * factor
    w = round(width / factor) * factor
    if h * w > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h = max(factor, math.floor(height / beta / factor) * factor)
        w = max(factor, math.floor(width / beta / factor) * factor)
    elif h * w < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h = math.ceil(height * beta / factor) * factor
        w = math.ceil(width * beta / factor) * factor
    return h, w


def patchify(chw: np.ndarray, spec: QwenImageSpec) -> tuple[np.ndarray, np.ndarray]:
    """[C, H, W] float32 (H, W multiples of P*m) -> (pixel_values [gh*gw, C*T*P*P], grid_thw [3]).

    Rows are block-major: the m*m patches of one merge unit are consecutive; inside a row the
    layout is [C][T][P][P] with the T temporal copies identical.
    """
    c, height, width = chw.shape
    p, m, t = spec.patch_size, spec.merge_size, spec.temporal_patch_size
    gh, gw = height // p, width // p
    x = chw.reshape(c, gh // m, m, p, gw // m, m, p).transpose(1, 4, 2, 5, 0, 3, 6)
    x = np.broadcast_to(x[:, :, :, :, :, None], x.shape[:5] + (t, p, p))
    pixels = np.ascontiguousarray(x).reshape(gh * gw, c * t * p * p).astype(np.float32, copy=False)
    return pixels, np.array([1, gh, gw], np.int64)


def preprocess_image(image: Image.Image, spec: QwenImageSpec) -> tuple[np.ndarray, np.ndarray]:
    """An RGB image -> (pixel_values [n, C*T*P*P] float32, grid_thw [3] int64), as
    Qwen2VLImageProcessorPil does: smart_resize, PIL resize on uint8, rescale, normalize, patchify."""
    h, w = smart_resize(image.height, image.width, spec.factor, spec.min_pixels, spec.max_pixels)
    return patchify(_normalised(image, spec, h, w), spec)


def _normalised(image: Image.Image, spec: QwenImageSpec, h: int, w: int) -> np.ndarray:
    """An RGB image resized to h x w (PIL, on uint8), rescaled and normalised -> [C, h, w] float32."""
    if (h, w) != (image.height, image.width):
        image = image.resize((w, h), resample=spec.resample)
    chw = np.asarray(image, dtype=np.uint8).transpose(2, 0, 1).astype(np.float32)
    chw = chw * np.float32(spec.rescale)
    mean = np.asarray(spec.mean, np.float32)[:, None, None]
    std = np.asarray(spec.std, np.float32)[:, None, None]
    return (chw - mean) / std


def video_patchify(frames: np.ndarray, spec: QwenImageSpec) -> tuple[np.ndarray, np.ndarray]:
    """[F, C, H, W] float32 frames (F a multiple of T; H, W multiples of P*m) -> (pixel_values
    [t*gh*gw, C*T*P*P], grid_thw [3] = (F/T, gh, gw)), as Qwen2VLVideoProcessor's patchify: rows in
    (temporal group, merge-block row, merge-block col, in-block row, in-block col) order, each row
    [C][T][P][P] holding the group's T consecutive frames."""
    f, c, height, width = frames.shape
    p, m, tp = spec.patch_size, spec.merge_size, spec.temporal_patch_size
    if f % tp:
        raise ValueError(f"{f} frames is not a multiple of the temporal patch size {tp}")
    t, gh, gw = f // tp, height // p, width // p
    x = frames.reshape(t, tp, c, gh // m, m, p, gw // m, m, p).transpose(0, 3, 6, 4, 7, 2, 1, 5, 8)
    pixels = np.ascontiguousarray(x).reshape(t * gh * gw, c * tp * p * p).astype(np.float32, copy=False)
    return pixels, np.array([t, gh, gw], np.int64)


def _block_major(a: np.ndarray, h: int, w: int, m: int) -> np.ndarray:
    """[h, w, ...] in raster order -> [h*w, ...] with each m x m merge unit consecutive."""
    rest = a.shape[2:]
    return a.reshape((h // m, m, w // m, m) + rest).transpose((0, 2, 1, 3) + tuple(range(4, 4 + len(rest)))) \
        .reshape((h * w,) + rest)


def vision_positions(grid_thw: np.ndarray, merge_size: int = 2) -> np.ndarray:
    """[n_img, 3] grids -> (row, col) of every patch in processor (block-major) order, [N, 2] int64:
    the vision tower's 2-D rotary positions."""
    out = []
    for t, h, w in np.asarray(grid_thw, np.int64).reshape(-1, 3):
        rows, cols = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
        hw = _block_major(np.stack([rows, cols], -1), int(h), int(w), merge_size)
        out.append(np.tile(hw, (int(t), 1)))
    return np.concatenate(out).astype(np.int64)


def window_index(grid_thw: np.ndarray, merge_size: int = 2, window_size: int = 112,
                 patch_size: int = 14) -> tuple[np.ndarray, np.ndarray]:
    """Qwen2.5-VL's window partition: (window_index [N/m²] merged-token permutation, cu_window_seqlens
    in patches, consecutive duplicates removed), as transformers' `get_vision_window_index`."""
    ws = window_size // merge_size // patch_size
    order, cu, base = [], [0], 0
    for t, h, w in np.asarray(grid_thw, np.int64).reshape(-1, 3):
        lh, lw = int(h) // merge_size, int(w) // merge_size
        ph, pw = ws - lh % ws, ws - lw % ws  # a whole empty window when divisible, as transformers pads
        nh, nw = (lh + ph) // ws, (lw + pw) // ws
        ids = np.full((int(t), lh + ph, lw + pw), -1, np.int64)
        ids[:, :lh, :lw] = np.arange(int(t) * lh * lw).reshape(int(t), lh, lw)
        ids = ids.reshape(int(t), nh, ws, nw, ws).transpose(0, 1, 3, 2, 4).reshape(-1, ws * ws)
        counts = (ids >= 0).sum(1)
        flat = ids.reshape(-1)
        order.append(flat[flat >= 0] + base)
        cu.extend((np.cumsum(counts) * merge_size**2 + cu[-1]).tolist())
        base += int(t) * lh * lw
    cu_arr = np.asarray(cu, np.int64)
    cu_arr = cu_arr[np.concatenate([[True], cu_arr[1:] != cu_arr[:-1]])]
    return np.concatenate(order).astype(np.int64), cu_arr


@dataclass(frozen=True)
class VisionIndexInputs:
    """The Qwen2.5-VL vision graph's small index inputs for one image (t = 1), from its grid alone.

    `patch_order` permutes the processor's patch rows into window order (whole merge units);
    `vision_pos` the (row, col) of each permuted patch; `window_seg` the window id of each permuted
    patch (window blocks attend where ids are equal); `merge_restore` = argsort(window_index) puts the
    merged tokens back into raster order of the merged grid.
    """

    patch_order: np.ndarray  # [N] int64
    vision_pos: np.ndarray  # [N, 2] int64
    window_seg: np.ndarray  # [N] int64
    merge_restore: np.ndarray  # [N / m²] int64


def qwen2_5_vision_inputs(grid_thw: np.ndarray, merge_size: int = 2, window_size: int = 112,
                          patch_size: int = 14) -> VisionIndexInputs:
    grid = np.asarray(grid_thw, np.int64).reshape(-1, 3)
    if len(grid) != 1:
        raise ValueError("one image per vision run")
    unit = merge_size**2
    windows, cu = window_index(grid, merge_size, window_size, patch_size)
    order = (windows[:, None] * unit + np.arange(unit)).reshape(-1)
    seg = np.repeat(np.arange(len(cu) - 1), np.diff(cu))
    return VisionIndexInputs(patch_order=order, vision_pos=vision_positions(grid, merge_size)[order],
                             window_seg=seg.astype(np.int64), merge_restore=np.argsort(windows).astype(np.int64))


def rope_index(mm_token_type: np.ndarray, grids: np.ndarray, merge_size: int = 2,
               attention_mask: np.ndarray | None = None, video_grids: np.ndarray | None = None,
               second_per_grid: np.ndarray | None = None,
               tokens_per_second: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """M-RoPE positions as transformers' (5.23) `Qwen2_5_VLModel.get_rope_index`.

    mm_token_type [B, L] (0 text, 1 image, 2 video), grids [n_img, 3] and video_grids [n_vid, 3]
    consumed in order across the batch, attention_mask [B, L] or None -> (position_ids [3, B, L]
    int64, rope_delta [B, 1] int64). A text run advances every axis by one per token; an image run
    of grid (t, gh, gw) gets (cur, cur + row, cur + col) over its merged grid in raster order, then
    cur += max(gh, gw) / m. A video run's temporal row is cur + int(g * tokens_per_second *
    second_per_grid) for temporal group g (float32, truncated, as transformers); the text after it
    still resumes at cur + max(gh, gw) / m. `rope_delta` = largest position + 1 - tokens (what a
    forward without position_ids decodes from); transformers' `generate` decodes at the last
    column + 1 instead, which differs when a video's temporal row passes the text after it
    (tokedge's decode loop follows generate; tests/runtime/test_qwen2_5_vl_video.py pins it).
    """
    no_video = np.zeros((0, 3), np.int64)
    video_iter = iter(np.asarray(video_grids if video_grids is not None else no_video, np.int64).reshape(-1, 3))
    seconds = iter(np.asarray(second_per_grid if second_per_grid is not None else [], np.float32).reshape(-1))
    types_all = np.asarray(mm_token_type, np.int64)
    batch, length = types_all.shape
    positions = np.zeros((3, batch, length), np.int64)
    deltas = []
    grid_iter = iter(np.asarray(grids, np.int64).reshape(-1, 3))
    for b in range(batch):
        keep = np.ones(length, bool) if attention_mask is None else np.asarray(attention_mask[b]).astype(bool)
        types = types_all[b][keep]
        cols, cur, i = [], 0, 0
        while i < len(types):
            j = i
            while j < len(types) and types[j] == types[i]:
                j += 1
            if types[i] == 0:
                cols.append(np.broadcast_to(np.arange(j - i) + cur, (3, j - i)))
                cur += j - i
            else:
                video = types[i] == 2
                what = "video" if video else "image"
                try:
                    t, h, w = (int(v) for v in next(video_iter if video else grid_iter))
                    steps = np.arange(t)
                    if video:
                        interval = np.float32(tokens_per_second) * next(seconds, np.float32(1.0))
                        steps = (np.arange(t, dtype=np.float32) * interval).astype(np.int64)
                except StopIteration:
                    raise InputError(f"the prompt has more {what}-token runs than {what}s; give one {what} per "
                                     f"{what} placeholder") from None
                if t * (h // merge_size) * (w // merge_size) != j - i:
                    raise InputError(f"a {what} run of {j - i} tokens does not match its grid {t}x{h}x{w}")
                tt, hh, ww = np.meshgrid(steps, np.arange(h // merge_size), np.arange(w // merge_size),
                                         indexing="ij")
                cols.append(np.stack([tt.ravel(), hh.ravel(), ww.ravel()]) + cur)
                cur += max(h, w) // merge_size
            i = j
        pos = np.concatenate(cols, 1) if cols else np.zeros((3, 0), np.int64)
        positions[:, b, keep] = pos
        deltas.append((int(pos.max()) + 1 if pos.size else 0) - len(types))
    return positions, np.asarray(deltas, np.int64)[:, None]


def mrope_axis_map(mrope_section, head_dim: int, interleaved: bool = False) -> np.ndarray:
    """Which position axis (0 t, 1 h, 2 w) drives each of the head_dim/2 rotary frequencies:
    chunked `t*s0 h*s1 w*s2` (Qwen2/2.5-VL) or interleaved `t h w t h w ... t` (Qwen3-VL)."""
    half = head_dim // 2
    s = [int(v) for v in mrope_section]
    if sum(s) != half:
        raise ValueError(f"mrope_section {s} must sum to head_dim/2 = {half}")
    if not interleaved:
        return np.repeat(np.arange(3), s).astype(np.int64)
    axes = np.zeros(half, np.int64)
    axes[1:3 * s[1]:3] = 1
    axes[2:3 * s[2]:3] = 2
    return axes


def interpolation_inputs(grid_thw: np.ndarray, side: int, merge_size: int = 2) -> tuple[np.ndarray, np.ndarray]:
    """Qwen3-VL's learned position embedding resampled to a grid: (index [N, 4] int64 into the
    flattened `side x side` table, weight [N, 4] float32), rows in processor (block-major) order.

    Bilinear with align_corners, as transformers' `get_vision_interpolation_indices_and_weights`:
    per axis `src = i * (side - 1) / max(n - 1, 1)` in float32, taps floor(src) and floor(src) + 1
    (clamped to the table), weights from the unclamped taps; the 2 x 2 taps ordered
    (r0c0, r0c1, r1c0, r1c1). The tower adds `sum_k table[index[:, k]] * weight[:, k]` to each patch.
    """

    def axis(n: int) -> tuple[np.ndarray, np.ndarray]:
        src = (np.arange(n, dtype=np.float32) * np.float32(side - 1) / np.float32(max(n - 1, 1))).astype(np.float32)
        low = np.floor(src)
        taps = np.stack([low, low + 1], -1)
        weight = np.clip(np.float32(1) - np.abs(src[:, None] - taps), 0, None).astype(np.float32)
        return np.clip(taps.astype(np.int64), 0, side - 1), weight

    index, weight = [], []
    for t, h, w in np.asarray(grid_thw, np.int64).reshape(-1, 3):
        row_taps, row_w = axis(int(h))
        col_taps, col_w = axis(int(w))
        idx = (row_taps[:, None, :, None] * side + col_taps[None, :, None, :]).reshape(int(h), int(w), 4)
        wgt = (row_w[:, None, :, None] * col_w[None, :, None, :]).astype(np.float32).reshape(int(h), int(w), 4)
        index.append(np.tile(_block_major(idx, int(h), int(w), merge_size), (int(t), 1)))
        weight.append(np.tile(_block_major(wgt, int(h), int(w), merge_size), (int(t), 1)))
    return np.concatenate(index).astype(np.int64), np.concatenate(weight).astype(np.float32)


# --- the artifact's side: one builder of an image's vision inputs, and the prompt's positions ---------


def image_spec(layout, preprocess) -> QwenImageSpec:
    """The manifest's "dynamic_patches" layout and preprocessing record as a `QwenImageSpec`."""
    return QwenImageSpec(patch_size=int(layout.patch_size), merge_size=int(layout.merge_size),
                         temporal_patch_size=int(layout.temporal_patch_size), min_pixels=int(layout.min_pixels),
                         max_pixels=int(layout.max_pixels), mean=tuple(preprocess.image_mean),
                         std=tuple(preprocess.image_std), rescale=float(preprocess.rescale_factor),
                         resample=int(preprocess.resample))


@dataclass(frozen=True)
class QwenImageInputs:
    """One image's inputs to a Qwen-VL vision graph and how many visual tokens it gives.

    `pixel_values` rows are already in the graph's order (window order when the layout has window
    attention); `grid` = (t, gh, gw) in patches, which M-RoPE positions need."""

    pixel_values: np.ndarray  # [N, C*T*P*P] float32
    grid: np.ndarray  # [3] int64
    vision_pos: np.ndarray  # [N, 2] int64
    window_seg: np.ndarray | None  # [N] int64 (window attention only)
    merge_restore: np.ndarray | None  # [N / m²] int64 (window attention only)
    merge_size: int = 2
    partitions: int = 1  # one vision run per image
    keep: int | None = None  # pre-LLM reduction: tokens the vision graph keeps of this image (None: all)
    interp_index: np.ndarray | None = None  # [N, 4] int64 (learned position table only: Qwen3-VL)
    interp_weight: np.ndarray | None = None  # [N, 4] float32

    @property
    def full_tokens(self) -> int:
        """Visual tokens of the image before reduction (t * gh * gw / m²)."""
        return int(np.prod(self.grid)) // self.merge_size**2

    @property
    def tokens(self) -> int:
        """Visual tokens this image gives in the prompt (all, or the kept ones)."""
        return self.full_tokens if self.keep is None else self.keep

    def feed(self, graph_inputs) -> dict[str, np.ndarray]:
        feed = {"pixel_values": self.pixel_values, "vision_pos": self.vision_pos}
        if "keep" in graph_inputs:  # a reduced vision graph: this image's count
            feed["keep"] = np.array(self.tokens, dtype=np.int64)
        if "window_seg" in graph_inputs:
            feed["window_seg"] = self.window_seg
            feed["merge_restore"] = self.merge_restore
        if "interp_index" in graph_inputs:
            feed["interp_index"] = self.interp_index
            feed["interp_weight"] = self.interp_weight
        return feed


def image_inputs(image: Image.Image, layout, preprocess, budget=None) -> QwenImageInputs:
    """An image -> its vision-graph inputs under the manifest's layout: smart_resize with the
    artifact's [min_pixels, max_pixels] (an image beyond max_pixels is resized down, as the
    processor does), normalise, patchify, then the index inputs from the grid alone. `budget`
    (a `tokedge.reduce.quota.TokenBudget`): pre-LLM reduction, the image keeps
    `budget.per_image(n)` of its n tokens."""
    inputs = _image_inputs(image, layout, preprocess)
    if budget is None:
        return inputs
    return replace(inputs, keep=budget.per_image(inputs.full_tokens))


def _image_inputs(image: Image.Image, layout, preprocess) -> QwenImageInputs:
    from tokedge.runtime.preprocess import to_rgb

    if preprocess.do_convert_rgb or image.mode != "RGB":
        image = to_rgb(image)
    spec = image_spec(layout, preprocess)
    pixels, grid = preprocess_image(image, spec)
    m = spec.merge_size
    if layout.window_size is None:
        index, weight = (None, None) if layout.position_table is None else \
            interpolation_inputs(grid[None], int(layout.position_table), m)
        return QwenImageInputs(pixels, grid, vision_positions(grid[None], m), None, None, m,
                               interp_index=index, interp_weight=weight)
    idx = qwen2_5_vision_inputs(grid[None], m, int(layout.window_size), spec.patch_size)
    return QwenImageInputs(np.ascontiguousarray(pixels[idx.patch_order]), grid, idx.vision_pos, idx.window_seg,
                           idx.merge_restore, m)


def prompt_positions(layout, image_token_id: int, input_ids: np.ndarray, attention_mask: np.ndarray,
                     images, kept=None) -> np.ndarray:
    """M-RoPE `position_ids [3, b, s]` of a left-padded batch whose image placeholders are already
    expanded; `images` = every image of the batch in prompt order (their grids are consumed in
    that order). Decoding continues at the last column + 1 on all three rows. `kept`: pre-LLM
    reduction, per image the merged-grid indices the vision graph kept (its `kept_index`): each
    kept token takes the position it has in the unreduced prompt."""
    if kept is not None and any(k is not None for k in kept):
        return _kept_positions(layout, image_token_id, input_ids, attention_mask, images, kept)
    types = ((input_ids == image_token_id) & (attention_mask > 0)).astype(np.int64)
    grids = np.stack([np.asarray(x.grid, np.int64) for x in images]) if images else np.zeros((0, 3), np.int64)
    positions, _ = rope_index(types, grids, int(layout.merge_size), attention_mask)
    return positions


def token_bounds(layout, typical: tuple[int, int]) -> tuple[int, int, int]:
    """Visual tokens of one image under the layout: (fewest, a `typical` (height, width) image, most)."""
    factor = int(layout.patch_size) * int(layout.merge_size)
    fewest = max(1, math.ceil(int(layout.min_pixels) / factor**2))
    h, w = smart_resize(typical[0], typical[1], factor, int(layout.min_pixels), int(layout.max_pixels))
    return fewest, (h // factor) * (w // factor), int(layout.max_pixels) // factor**2


def _kept_positions(layout, image_token_id: int, input_ids: np.ndarray, attention_mask: np.ndarray, images,
                    kept) -> np.ndarray:
    """`prompt_positions` of a prompt whose image runs hold only the kept tokens: per row, the
    unreduced prompt's positions (`rope_index` with every image at its full count), then the columns
    of its text and of each image's kept tokens."""
    m = int(layout.merge_size)
    out = np.zeros((3,) + input_ids.shape, np.int64)
    pending = iter(zip(images, kept))
    for b in range(input_ids.shape[0]):
        real = np.flatnonzero(attention_mask[b] > 0)
        ids = input_ids[b, real]
        types, take, grids, j = [], [], [], 0
        while j < len(ids):
            if ids[j] != image_token_id:
                take.append(len(types))
                types.append(0)
                j += 1
                continue
            end = j
            while end < len(ids) and ids[end] == image_token_id:
                end += 1
            try:
                image, index = next(pending)
            except StopIteration:
                raise InputError("the prompt has more image-token runs than images; give one image per "
                                 "image placeholder") from None
            index = np.arange(image.full_tokens) if index is None else np.asarray(index, np.int64).reshape(-1)
            if len(index) != end - j:
                raise InputError(f"an image run of {end - j} tokens does not match the {len(index)} tokens its "
                                 "vision graph kept")
            take.extend((len(types) + index).tolist())
            types.extend([1] * image.full_tokens)
            grids.append(np.asarray(image.grid, np.int64))
            j = end
        grid = np.stack(grids) if grids else np.zeros((0, 3), np.int64)
        full, _ = rope_index(np.asarray([types], np.int64), grid, m)
        out[:, b, real] = full[:, 0, take]
    return out


# --- video (Qwen2.5-VL; docs/research/video.md section 2) ---------------------------------------------


@dataclass(frozen=True)
class QwenVideoInputs:
    """One video's inputs: its temporal groups (T consecutive frames each) as image-shaped vision
    runs. Qwen2.5-VL's tower attends within one temporal group only (full-attention blocks per
    group, windows per group), so running the image vision graph once per group, grid (1, gh, gw),
    gives transformers' `get_video_features` exactly; the tokens are concatenated group-major."""

    groups: tuple[QwenImageInputs, ...]  # one per temporal group, rows in the graph's order
    grid: np.ndarray  # [3] int64 (t, gh, gw): t temporal groups of gh x gw patches
    second_per_grid: float  # seconds one temporal group spans (T / sampled fps)
    indices: np.ndarray  # [F] 0-based source index of each sampled frame (before padding to a multiple of T)
    total: int  # frames in the source
    fps: float | None  # source frame rate (None: frame images)
    merge_size: int = 2

    @property
    def frames(self) -> int:
        return len(self.indices)

    @property
    def tokens_per_group(self) -> int:
        return int(self.grid[1] * self.grid[2]) // self.merge_size**2

    @property
    def full_tokens(self) -> int:
        return int(self.grid[0]) * self.tokens_per_group


def video_inputs(frames: list[np.ndarray], indices: np.ndarray, total: int, fps: float | None, layout,
                 preprocess) -> QwenVideoInputs:
    """Sampled RGB frames [H, W, 3] uint8 -> the video's vision inputs, as Qwen2VLVideoProcessor:
    one smart_resize of the clip's size for every frame (the layout's pixel range), rescale,
    normalise, pad to a multiple of T by repeating the last frame, patchify; then each temporal
    group's window-order rows and index inputs from its grid alone. `second_per_grid` =
    T / (sampled frames / total * fps), fps 24 when the source has none (as transformers)."""
    spec = image_spec(layout, preprocess)
    if not frames:
        raise InputError("the video gave no frames; pass a clip with at least one decodable frame")
    height, width = frames[0].shape[:2]
    h, w = smart_resize(height, width, spec.factor, spec.min_pixels, spec.max_pixels)
    chw = [_normalised(Image.fromarray(np.asarray(f, np.uint8)), spec, h, w) for f in frames]
    tp = spec.temporal_patch_size
    chw += [chw[-1]] * (-len(chw) % tp)
    pixels, grid = video_patchify(np.stack(chw), spec)
    m, t = spec.merge_size, int(grid[0])
    per_group = int(grid[1] * grid[2])
    one = np.array([1, grid[1], grid[2]], np.int64)
    groups = []
    for g in range(t):
        rows = pixels[g * per_group:(g + 1) * per_group]
        if layout.window_size is None:
            groups.append(QwenImageInputs(np.ascontiguousarray(rows), one, vision_positions(one[None], m), None, None, m))
            continue
        idx = qwen2_5_vision_inputs(one[None], m, int(layout.window_size), spec.patch_size)
        groups.append(QwenImageInputs(np.ascontiguousarray(rows[idx.patch_order]), one, idx.vision_pos,
                                      idx.window_seg, idx.merge_restore, m))
    sampled_fps = len(frames) / max(total, 1) * (fps if fps else 24.0)
    return QwenVideoInputs(tuple(groups), grid, tp / sampled_fps, np.asarray(indices, np.int64), int(total), fps, m)


def video_prompt_positions(layout, video_token_id: int, tokens_per_second: float, input_ids: np.ndarray,
                           attention_mask: np.ndarray, video: QwenVideoInputs) -> np.ndarray:
    """M-RoPE `position_ids [3, 1, s]` of a one-video prompt whose placeholders are expanded."""
    types = ((input_ids == video_token_id) & (attention_mask > 0)).astype(np.int64) * 2
    positions, _ = rope_index(types, np.zeros((0, 3), np.int64), int(layout.merge_size), attention_mask,
                              video.grid[None], np.array([video.second_per_grid], np.float32), tokens_per_second)
    return positions
