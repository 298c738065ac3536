"""Tiled with a thumbnail ("anyres": LLaVA-NeXT, LLaVA-OneVision): a base view plus tiles of a
canvas chosen from the image size, packed in-graph with a packing plan (the mechanism lives in
`tokedge.runtime.layout`). The vision graph runs one image's partitions at a time; each image
gives its own token count, or, for vision-side reduction, the artifact's per-image budget."""

from __future__ import annotations

import numpy as np

from tokedge.layouts.base import TYPICAL_IMAGE, ImageBatch, ImageLayout, LayoutBounds, Range
from tokedge.manifest_schema import ManifestError

# the canvases export builds a tiled artifact's reference cases from (height, width): 2304 and 2880
# candidates on LLaVA-NeXT; a reduced export's budget cannot exceed the larger
ANYRES_SIZES = ((480, 640), (1000, 1000))


class Tiled(ImageLayout):
    kind = "anyres"
    aliases = ("tiled",)
    format_version = 2

    @classmethod
    def check_record(cls, layout, format_version: int) -> None:
        from tokedge.manifest_schema import (
            MAX_PATCHES,
            MAX_PINPOINTS,
            MAX_PIXELS,
            MAX_TILES,
            MAX_TOKENS_PER_TILE,
            bounded,
            positive,
        )

        positive("layout.tile", layout.tile, high=16384)
        positive("layout.patch_grid", layout.patch_grid, high=4096)
        if not layout.pinpoints:
            raise ManifestError("layout.pinpoints", "a non-empty list of [height, width]", [])
        for i, (h, w) in enumerate(layout.pinpoints):
            if not (1 <= h <= 16384 and 1 <= w <= 16384) or h % layout.tile or w % layout.tile:
                raise ManifestError(f"layout.pinpoints[{i}]",
                                    f"[height, width], multiples of layout.tile ({layout.tile})", [h, w])
        positive("layout.max_tiles", layout.max_tiles, allow_none=True, high=4096)
        # derived sizes (docs/safety.md "Limits"): canvases, tiles, tokens per tile, patches per image
        grid = layout.patch_grid
        bounded("layout.pinpoints", "count", len(layout.pinpoints), MAX_PINPOINTS)
        bounded("layout.patch_grid", "square (tokens per tile)", grid * grid, MAX_TOKENS_PER_TILE)
        for i, (h, w) in enumerate(layout.pinpoints):
            tiles = (h // layout.tile) * (w // layout.tile)
            bounded(f"layout.pinpoints[{i}]", "pixel count", h * w, MAX_PIXELS)
            bounded(f"layout.pinpoints[{i}]", f"tile count (at layout.tile {layout.tile})", tiles, MAX_TILES)
            bounded(f"layout.pinpoints[{i}]", "patch count ((tiles + 1) * patch_grid^2)", (tiles + 1) * grid * grid,
                    MAX_PATCHES)
        if not all(0 <= c <= 255 for c in layout.pad_fill):
            raise ManifestError("layout.pad_fill", "three integers 0..255", list(layout.pad_fill))

    def mechanism(self):
        """The record as `runtime.layout.AnyresLayout` (the packing math)."""
        from tokedge.runtime.layout import AnyresLayout

        r = self.record
        return AnyresLayout(tile=r.tile, patch_grid=r.patch_grid, pinpoints=r.pinpoints, max_tiles=r.max_tiles,
                            interpolate_threshold=r.interpolate_threshold, multi_image_square=r.multi_image_square,
                            pad_fill=r.pad_fill)

    def image_budget(self) -> int | None:
        from tokedge.runtime.layout import image_budget

        return image_budget(self.manifest.reduction)

    def prompt_images(self, images: list) -> list:
        """One prompt's images -> per-image inputs: OneVision's rule (several images: each padded
        square, untiled) and, for vision-side reduction, the candidate plan with the budget."""
        from tokedge.runtime.layout import anyres_inputs

        layout = self.mechanism()
        tiled = not (layout.multi_image_square and len(images) > 1)
        keep = self.image_budget()
        return [anyres_inputs(image, layout, self.manifest.preprocess, tiled=tiled, budget=keep) for image in images]

    def prepare(self, groups, budget, check_budget) -> ImageBatch:
        from tokedge.errors import InputError

        red = self.manifest.reduction
        keep = self.image_budget()
        if budget is not None:
            if red.stages:
                check_budget(budget)  # in-LLM: the exported budget is the only value
            elif budget != keep:
                what = f"reduces every image to {keep} visual tokens" if keep else "keeps every visual token"
                raise InputError(f"this tiled artifact {what} (--method {red.method}); drop --budget")
        return self.batch_of(groups)

    def image_counts(self, image) -> tuple[int, int]:
        from tokedge.runtime.layout import plan_image

        layout = self.mechanism()
        plan = plan_image(layout, image.height, image.width)
        return plan.partitions, plan.tokens(layout)

    def feed(self, image_inputs, graph_inputs):
        return feed_of(image_inputs, graph_inputs)

    def bounds(self) -> LayoutBounds:
        from tokedge.runtime.layout import layout_bounds

        return layout_bounds(self.mechanism())

    def axes(self, max_prompt: int) -> dict[str, Range]:
        b = self.bounds()
        n = self.record.patch_grid ** 2
        typical_candidates = self.image_counts_typical()
        return {"partitions": b.partitions, "visual_tokens": b.tokens,
                "candidates": (min(n, b.tokens[0]), typical_candidates, b.tokens[2])}

    def largest_reduced_budget(self) -> int | None:
        """Export builds a reduced graph's reference cases from its example canvases and refuses a
        budget above their candidate tokens (newlines aside): the same count, from the manifest."""
        from tokedge.runtime.layout import candidate_plan, pack_plan, plan_image

        layout = self.mechanism()
        plans = [plan_image(layout, h, w) for h, w in ANYRES_SIZES]
        return max(int(candidate_plan(layout, plan, *pack_plan(layout, plan))[0].shape[0]) for plan in plans)

    def image_counts_typical(self) -> int:
        from tokedge.runtime.layout import candidate_plan, pack_plan, plan_image

        layout = self.mechanism()
        plan = plan_image(layout, *TYPICAL_IMAGE)
        return int(candidate_plan(layout, plan, *pack_plan(layout, plan))[0].shape[0])


def feed_of(image, graph_inputs) -> dict[str, np.ndarray]:
    """One tiled image's feed (`base_tile` only when the graph takes it: hired's tile map; the
    thumbnail guide's three inputs likewise: globalcom2's)."""
    feed = {"pixel_values": image.pixel_values.astype(np.float32, copy=False),
            "pack_index": image.pack_index, "pack_weight": image.pack_weight}
    if "base_tile" in graph_inputs:
        feed["base_tile"] = image.base_tile
    if "base_block" in graph_inputs:
        feed["base_block"], feed["guide_index"], feed["guide_weight"] = image.guide
    return feed


__all__ = ["TYPICAL_IMAGE", "Tiled", "feed_of"]
