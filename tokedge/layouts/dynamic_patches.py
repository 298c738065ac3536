"""Dynamic patches with M-RoPE (Qwen2-VL, Qwen2.5-VL, Qwen3-VL): each image is resized to
multiples of patch x merge inside a pixel range, cut into patches, merged m x m into visual tokens
by the vision graph, and placed with 3-D (t, h, w) rotary positions. Each image gives its own
count; vision-side methods keep a count or a share of each image (`reduce.quota.TokenBudget`).
The mechanism (smart_resize, patchify, window index, rope_index) lives in `tokedge.runtime.qwen_vl`.
Older manifests call this layout "qwen_dynamic"."""

from __future__ import annotations

import math

from tokedge.layouts.base import TYPICAL_IMAGE, ImageBatch, ImageLayout, LayoutBounds, Range
from tokedge.manifest_schema import ManifestError

MAX_TOKENS_PER_IMAGE = 1 << 20  # bound on max_pixels / (patch x merge)^2 a manifest may declare
VISION_MEMORY_ENV = "TOKEDGE_VISION_MEMORY_GB"  # memory one vision-graph run may take (default: half of RAM)
# export's default pixel budget without --max-pixels: 1280 visual tokens per image (1280 x 28 x 28 =
# 1,003,520 pixels on Qwen2.5-VL, 1280 x 32 x 32 = 1,310,720 on Qwen3-VL), the max_pixels Qwen's own
# model cards suggest for a memory/quality balance and Qwen2VLImageProcessor's class default, instead
# of the hub checkpoints' 12.8-16.8 MP (a phone photo would be ~15k tokens); docs/cli.md "--max-pixels"
EDGE_IMAGE_TOKENS = 1280


def vision_memory_bytes() -> float:
    """The memory budget of one vision-graph run on this machine: $TOKEDGE_VISION_MEMORY_GB, else
    half of the physical memory (docs/safety.md)."""
    import os

    from tokedge.errors import UsageError

    given = os.environ.get(VISION_MEMORY_ENV)
    if given:
        try:
            value = float(given)
        except ValueError:
            value = float("nan")
        if not math.isfinite(value) or value <= 0:
            raise UsageError(f"{VISION_MEMORY_ENV}={given!r} is not a positive number of GB")
        return value * 1e9
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2


class DynamicPatches(ImageLayout):
    kind = "dynamic_patches"
    aliases = ("qwen_dynamic",)
    format_version = 3
    takes_max_pixels = True

    @classmethod
    def check_record(cls, layout, format_version: int) -> None:
        from tokedge.manifest_schema import MAX_PATCHES, MAX_PIXELS, bounded, positive

        positive("layout.patch_size", layout.patch_size, high=1024)
        positive("layout.merge_size", layout.merge_size, high=64)
        positive("layout.temporal_patch_size", layout.temporal_patch_size, high=64)
        factor = layout.patch_size * layout.merge_size
        positive("layout.min_pixels", layout.min_pixels, high=1 << 30)
        positive("layout.max_pixels", layout.max_pixels, high=1 << 30)
        if layout.max_pixels < max(layout.min_pixels, factor * factor):
            raise ManifestError("layout.max_pixels", f"at least layout.min_pixels ({layout.min_pixels}) and one "
                                f"merged patch ({factor * factor})", layout.max_pixels)
        if layout.max_pixels // (factor * factor) > MAX_TOKENS_PER_IMAGE:
            raise ManifestError("layout.max_pixels", f"at most {MAX_TOKENS_PER_IMAGE} merged patches of "
                                f"{factor}x{factor} pixels", layout.max_pixels)
        bounded("layout.max_pixels", "pixel count", layout.max_pixels, MAX_PIXELS)  # docs/safety.md "Limits"
        bounded("layout.max_pixels", f"patch count (/ patch_size^2 = {layout.patch_size ** 2})",
                layout.max_pixels // layout.patch_size ** 2, MAX_PATCHES)
        if layout.window_size is not None and (layout.window_size < factor or layout.window_size % factor
                                               or layout.window_size > 64 * factor):
            raise ManifestError("layout.window_size", f"a multiple of patch_size * merge_size ({factor}), at most "
                                f"{64 * factor}, or null", layout.window_size)
        if len(layout.mrope_section) not in (0, 3) or any(v < 1 for v in layout.mrope_section):
            raise ManifestError("layout.mrope_section", "three positive integers (or empty for 1-D positions)",
                                list(layout.mrope_section))
        positive("layout.position_table", layout.position_table, allow_none=True, high=4096)
        if not 0 <= layout.deepstack_levels <= 64:
            raise ManifestError("layout.deepstack_levels", "an integer 0..64", layout.deepstack_levels)
        for key in ("vision_start_token_id", "vision_end_token_id"):
            value = getattr(layout, key)
            if value is not None and not 0 <= value < 1 << 31:
                raise ManifestError(f"layout.{key}", "a token id >= 0", value)

    def vision_budget(self):
        from tokedge.reduce.quota import vision_budget

        return vision_budget(self.manifest.reduction)  # pre-LLM reduction: each image keeps its own count

    def check_size(self, image, limit: int | None) -> None:
        """Refuse, before anything is resized or run, an image with more patches than `limit`, the most
        the vision graph's dense attention holds in this machine's budget (`memory.vision_patch_limit`;
        issue: images within --max-pixels that exhaust memory)."""
        from tokedge.errors import InputError
        from tokedge.runtime.qwen_vl import smart_resize

        r = self.record
        p, m = int(r.patch_size), int(r.merge_size)
        h, w = smart_resize(image.height, image.width, p * m, int(r.min_pixels), int(r.max_pixels))
        patches = (h // p) * (w // p)
        if limit is not None and patches > limit:
            fits = max(limit, m * m) * p * p
            raise InputError(f"a {image.width}x{image.height} image gives {patches} patches ({w}x{h} after resizing "
                             f"within --max-pixels {r.max_pixels}), more than the {limit} whose vision attention fits "
                             f"this machine's budget of {vision_memory_bytes() / 1e9:.3g} GB ({VISION_MEMORY_ENV}); "
                             f"use a smaller image, or an artifact exported with --max-pixels {fits} or less")

    def prompt_images(self, images: list) -> list:
        from tokedge.memory import vision_patch_limit
        from tokedge.runtime.qwen_vl import image_inputs

        budget = self.vision_budget()
        limit = vision_patch_limit(self.manifest, vision_memory_bytes())
        for image in images:  # every image of the prompt, before any is preprocessed
            self.check_size(image, limit)
        return [image_inputs(image, self.record, self.manifest.preprocess, budget) for image in images]

    def prepare(self, groups, budget, check_budget) -> ImageBatch:
        from tokedge.errors import InputError

        red = self.manifest.reduction
        if budget is not None:
            if red.stages:
                check_budget(budget)
            elif red.keep is not None or budget != self.vision_budget_count():
                per_image = self.vision_budget()
                what = "keeps every visual token" if per_image is None else \
                    f"keeps {per_image.describe()} of each image"
                raise InputError(f"this dynamic-resolution artifact {what} (--method {red.method}); drop --budget")
        return self.batch_of(groups)

    def vision_budget_count(self) -> int | None:
        budget = self.vision_budget()
        return None if budget is None else budget.count

    def feed(self, image_inputs, graph_inputs):
        return image_inputs.feed(graph_inputs)

    def positions(self, input_ids, attention_mask, batch, kept):
        from tokedge.runtime.qwen_vl import prompt_positions

        return prompt_positions(self.record, self.manifest.model.image_token_id, input_ids, attention_mask,
                                batch.inputs, kept)

    def image_counts(self, image) -> tuple[int, int]:
        (inputs,) = self.prompt_images([image])
        return inputs.partitions, inputs.full_tokens

    def bounds(self) -> LayoutBounds:
        from tokedge.runtime.qwen_vl import token_bounds

        return LayoutBounds(partitions=(1, 1, 1), tokens=token_bounds(self.record, TYPICAL_IMAGE))

    def prompt_tokens(self, image_tokens: int, budget: int | None = None) -> int:
        if budget is not None:
            return budget
        per_image = self.vision_budget()
        return image_tokens if per_image is None else per_image.per_image(image_tokens)

    def prefill_budget(self):
        from tokedge.reduce.quota import TokenBudget

        red = self.manifest.reduction
        return TokenBudget(keep=red.keep) if red.keep is not None else TokenBudget(count=red.budget)

    def pixel_limit(self) -> int | None:
        return int(self.record.max_pixels)

    def pixels_for_tokens(self, tokens: int) -> int:
        """The largest --max-pixels whose images give at most `tokens` visual tokens."""
        factor = int(self.record.patch_size) * int(self.record.merge_size)
        return max(1, tokens) * factor * factor

    def describe_budget(self) -> str:
        return f" for the largest image, --max-pixels {self.record.max_pixels}"

    def default_pixel_limit(self, device_limit: int | None = None) -> int | None:
        """EDGE_IMAGE_TOKENS per image, never more than the record's (the checkpoint's) max_pixels
        nor than `device_limit`, and never below one merged patch or min_pixels."""
        factor = int(self.record.patch_size) * int(self.record.merge_size)
        pixels = min(int(self.record.max_pixels), self.pixels_for_tokens(EDGE_IMAGE_TOKENS))
        if device_limit is not None:
            pixels = min(pixels, int(device_limit))
        pixels -= pixels % (factor * factor)
        return max(pixels, factor * factor, -(-int(self.record.min_pixels) // factor**2) * factor**2)

    def axes(self, max_prompt: int) -> dict[str, Range]:
        lo, opt, hi = self.bounds().tokens
        m2 = int(self.record.merge_size) ** 2
        kept = (1, opt, hi)
        per_image = self.vision_budget()
        if per_image is not None:
            kept = (per_image.per_image(lo), per_image.per_image(opt), per_image.per_image(hi))
        return {"patches": (lo * m2, opt * m2, hi * m2), "image_tokens": (lo, opt, hi), "kept_tokens": kept}


__all__ = ["DynamicPatches"]
