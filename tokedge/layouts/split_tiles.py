"""Split tiles with text between them (SmolVLM / Idefics3 lineage): each image is resized and cut
into tiles of one view size plus a global view (the mechanism: `tokedge.runtime.idefics3`); every
view gives the same count of visual tokens, and the prompt places each view's run after its own
text tokens (`<fake_token_around_image><row_r_col_c>`, the global view's `<global-img>`), so an
image's placeholder becomes a text with several image-token runs (`Placeholders.text`). The vision
graph runs one image's views [v, 3, S, S] -> [1, v * view_tokens, hidden] in prompt order."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from tokedge.layouts.base import TYPICAL_IMAGE, ImageLayout, LayoutBounds, Placeholders, Range
from tokedge.manifest_schema import ManifestError

MAX_VIEWS = 1 + 64 * 64  # a manifest's longest_edge / tile may not make more tiles than this


@dataclass(frozen=True)
class SplitImage:
    """One image's vision input and its placeholders."""

    pixel_values: np.ndarray  # [views, 3, S, S] float32
    plan: object  # runtime.idefics3.SplitPlan
    tokens: Placeholders  # views * view_tokens, with the image's prompt text


class SplitTiles(ImageLayout):
    kind = "split_tiles"
    format_version = 4

    @classmethod
    def check_record(cls, layout, format_version: int) -> None:
        from tokedge.manifest_schema import bounded, positive

        positive("layout.tile", layout.tile, high=16384)
        positive("layout.longest_edge", layout.longest_edge, high=16384)
        positive("layout.view_tokens", layout.view_tokens, high=1 << 16)
        side = -(-layout.longest_edge // layout.tile)
        bounded("layout.longest_edge", f"views (at layout.tile {layout.tile})", side * side + 1, MAX_VIEWS)
        if not isinstance(layout.split_image, bool):
            raise ManifestError("layout.split_image", "true or false", layout.split_image)

    def per_view(self) -> int:
        """Visual tokens each view gives in the prompt: the view's own count, or a vision-side
        method's budget (kept tokens of every view)."""
        from tokedge.reduce.base import Stage

        red = None if self.manifest is None else self.manifest.reduction
        if red is not None and Stage(red.stage) in (Stage.PRE_LLM, Stage.IN_VIT):
            return int(red.budget)
        return int(self.record.view_tokens)

    def budget_full(self) -> int:
        return int(self.record.view_tokens)

    def describe_budget(self) -> str:
        """Export's summary: a vision-side budget is kept in every view, of its view_tokens."""
        if self.per_view() != self.record.view_tokens:
            return f"; kept in every view, each of {self.record.view_tokens} (every tile and the global view)"
        return ""

    def _plan(self, height: int, width: int):
        from tokedge.runtime.idefics3 import plan_split

        r = self.record
        return plan_split(height, width, r.longest_edge, r.tile, r.split_image)

    def _views(self, image, plan) -> list:
        """The image's views (PIL, before rescaling), in prompt order."""
        from tokedge.runtime.idefics3 import split_views

        return split_views(image, plan, self.record.tile, self.manifest.preprocess.resample)

    def _text(self, plan, per_view: int) -> str:
        """What the image's placeholder becomes: per-view runs with the tile markers between them."""
        from tokedge.runtime.idefics3 import prompt_text

        return prompt_text(plan.rows, plan.cols, per_view, self.manifest.prompt.image_token)

    def prompt_images(self, images: list) -> list[SplitImage]:
        from tokedge.runtime.idefics3 import normalise
        from tokedge.runtime.preprocess import to_rgb

        pre = self.manifest.preprocess
        per_view = self.per_view()
        out = []
        for image in images:
            if pre.do_convert_rgb or image.mode != "RGB":
                image = to_rgb(image)
            plan = self._plan(image.height, image.width)
            pixel_values = np.stack([normalise(v, pre.rescale_factor if pre.do_rescale else 1.0,
                                               pre.image_mean if pre.do_normalize else (0, 0, 0),
                                               pre.image_std if pre.do_normalize else (1, 1, 1))
                                     for v in self._views(image, plan)])
            out.append(SplitImage(pixel_values, plan, Placeholders(plan.views * per_view, self._text(plan, per_view))))
        return out

    def prepare(self, groups, budget, check_budget):
        from tokedge.errors import InputError

        if budget is not None:
            raise InputError(f"this artifact keeps every visual token of each view (--method "
                             f"{self.manifest.reduction.method}); drop --budget")
        return self.batch_of(groups)

    def feed(self, image_inputs, graph_inputs):
        return {"pixel_values": image_inputs.pixel_values.astype(np.float32, copy=False)}

    def image_counts(self, image) -> tuple[int, int]:
        plan = self._plan(image.height, image.width)
        return plan.views, plan.views * self.record.view_tokens

    def bounds(self) -> LayoutBounds:
        r = self.record
        # the longest edge always becomes longest_edge: `side` tiles along it, 1..side across (a strip)
        side = -(-r.longest_edge // r.tile) if r.split_image else 1
        most = side * side + 1 if side > 1 else 1
        fewest = side + 1 if side > 1 else 1
        typical = self._plan(*TYPICAL_IMAGE).views
        return LayoutBounds(partitions=(fewest, typical, most),
                            tokens=(fewest * r.view_tokens, typical * r.view_tokens, most * r.view_tokens))

    def axes(self, max_prompt: int) -> dict[str, Range]:
        """The vision graph's views and the tokens it emits (every view's, or a method's kept ones)."""
        b = self.bounds()
        k = self.per_view()
        fewest, typical, most = b.partitions
        return {"partitions": b.partitions, "visual_tokens": (fewest * k, typical * k, most * k)}


__all__ = ["SplitImage", "SplitTiles"]
