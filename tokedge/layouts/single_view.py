"""Single view: every image is resized/cropped to one view and gives the same count of visual tokens
(LLaVA-1.5). The vision graph takes a batch of views [n, 3, H, W] and, for artifacts exported with
--dynamic-budget, a runtime `budget`."""

from __future__ import annotations

import numpy as np

from tokedge.layouts.base import ImageBatch, ImageLayout, LayoutBounds


class SingleView(ImageLayout):
    kind = "single"
    format_version = 1
    counts_per_image = False

    def prompt_images(self, images):
        from tokedge.runtime.preprocess import preprocess_batch

        return preprocess_batch(list(images), self.manifest.preprocess)

    def prepare(self, groups, budget, check_budget) -> ImageBatch:
        from tokedge.runtime.preprocess import preprocess_batch

        views = preprocess_batch([image for group in groups for image in group], self.manifest.preprocess)
        k = check_budget(budget)
        return ImageBatch(views, [[k] * len(group) for group in groups],
                          budget=k if self.manifest.reduction.budget_range else None)

    def run_vision(self, graphs, batch, instruction=None):
        return graphs.vision(batch.inputs, batch.budget, instruction), None

    def image_counts(self, image) -> tuple[int, int]:
        return 1, self.manifest.reduction.full_tokens

    def vision_feed(self, image):
        from tokedge.runtime.preprocess import preprocess_batch

        return {"pixel_values": preprocess_batch([image], self.manifest.preprocess)}

    def bounds(self) -> LayoutBounds:
        full = self.manifest.reduction.full_tokens
        return LayoutBounds(partitions=(1, 1, 1), tokens=(full, full, full))



__all__ = ["SingleView", "np"]
