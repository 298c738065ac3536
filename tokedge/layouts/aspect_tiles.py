"""Aspect-ratio tiles with a thumbnail last (InternVL3 / 3.5): each image is resized to the grid of
`min_tiles..max_tiles` tiles closest to its aspect ratio and cut into tiles of one view size, then
(with more than one tile) the whole image squashed to one view is appended (the mechanism:
`tokedge.runtime.internvl`). Every view gives `view_tokens` visual tokens and an image's views form
ONE run in the prompt, between `<img>` and `</img>` (`Placeholders.text`). The vision graph runs one
image's views [v, 3, S, S] -> [1, v * view_tokens, hidden] in prompt order, as split tiles do."""

from __future__ import annotations

from tokedge.layouts.base import TYPICAL_IMAGE, LayoutBounds
from tokedge.layouts.split_tiles import SplitTiles

MOST_TILES = 256  # a manifest may not declare more tiles per image (InternVL3 uses 12; grids are enumerated)


class AspectTiles(SplitTiles):
    kind = "aspect_tiles"
    format_version = 5
    takes_max_tiles = True

    @classmethod
    def check_record(cls, layout, format_version: int) -> None:
        from tokedge.manifest_schema import MAX_PATCHES, MAX_PIXELS, bounded, positive

        positive("layout.tile", layout.tile, high=16384)
        positive("layout.view_tokens", layout.view_tokens, high=1 << 16)
        positive("layout.min_tiles", layout.min_tiles, high=MOST_TILES)
        positive("layout.max_tiles", layout.max_tiles, high=MOST_TILES)
        bounded("layout.min_tiles", "count (at most layout.max_tiles)", layout.min_tiles, layout.max_tiles)
        # the largest grid's canvas is resized in memory, and its views' tokens are what a prompt holds
        bounded("layout.max_tiles", f"canvas pixels (at layout.tile {layout.tile})",
                layout.max_tiles * layout.tile * layout.tile, MAX_PIXELS)
        bounded("layout.max_tiles", f"visual tokens (at layout.view_tokens {layout.view_tokens})",
                (layout.max_tiles + 1) * layout.view_tokens, MAX_PATCHES)

    def _plan(self, height: int, width: int):
        from tokedge.runtime.internvl import plan_tiles

        r = self.record
        return plan_tiles(height, width, r.tile, r.min_tiles, r.max_tiles)

    def _views(self, image, plan) -> list:
        from tokedge.runtime.internvl import tile_views

        return tile_views(image, plan, self.record.tile, self.manifest.preprocess.resample)

    def _text(self, plan, per_view: int) -> str:
        """One run for the whole image between `<img>` and `</img>`."""
        from tokedge.runtime.internvl import prompt_text

        return prompt_text(plan.views * per_view, self.manifest.prompt.image_token)

    def bounds(self) -> LayoutBounds:
        r = self.record
        views = [c * rr + (1 if c * rr > 1 else 0) for c, rr in _grids(r.min_tiles, r.max_tiles)]
        fewest, most = min(views), max(views)
        typical = self._plan(*TYPICAL_IMAGE).views
        return LayoutBounds(partitions=(fewest, typical, most),
                            tokens=(fewest * r.view_tokens, typical * r.view_tokens, most * r.view_tokens))


def _grids(min_tiles: int, max_tiles: int):
    from tokedge.runtime.internvl import candidates

    return candidates(min_tiles, max_tiles) if max_tiles > 1 else ((1, 1),)


__all__ = ["AspectTiles"]
