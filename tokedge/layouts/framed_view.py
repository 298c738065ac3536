"""Framed single view (Gemma 3): every image is resized to one square view (`tile` x `tile`, no crop)
and gives the same count of visual tokens, as a single view; its placeholder (`prompt.image_token`,
Gemma's `<start_of_image>`) becomes `frame_before` + the run of `run_token` + `frame_after`
(`Placeholders.text`). The vision graph takes a batch of views [n, 3, S, S] -> [n, k, hidden]."""

from __future__ import annotations

from tokedge.layouts.base import ImageBatch, LayoutBounds, Placeholders
from tokedge.layouts.single_view import SingleView

MAX_FRAME = 256  # characters of a frame text or run token in a manifest


class FramedView(SingleView):
    kind = "framed_view"
    format_version = 5

    @classmethod
    def check_record(cls, layout, format_version: int) -> None:
        from tokedge.manifest_schema import ManifestError, positive

        positive("layout.tile", layout.tile, high=16384)
        positive("layout.view_tokens", layout.view_tokens, high=1 << 16)
        for name in ("frame_before", "frame_after", "run_token"):
            if len(getattr(layout, name)) > MAX_FRAME:
                raise ManifestError(f"layout.{name}", f"a text of at most {MAX_FRAME} characters", "a longer one")
        if not layout.run_token:
            raise ManifestError("layout.run_token", "the token string of the image run", layout.run_token)

    def run_token(self) -> str:
        return self.record.run_token

    def placeholder(self, count: int) -> Placeholders:
        r = self.record
        return Placeholders(count, f"{r.frame_before}{r.run_token * count}{r.frame_after}")

    def bounds(self) -> LayoutBounds:
        k = int(self.record.view_tokens)
        return LayoutBounds(partitions=(1, 1, 1), tokens=(k, k, k))

    def prepare(self, groups, budget, check_budget) -> ImageBatch:
        batch = super().prepare(groups, budget, check_budget)
        return ImageBatch(batch.inputs, [[self.placeholder(int(k)) for k in row] for row in batch.counts],
                          budget=batch.budget)


__all__ = ["FramedView"]
