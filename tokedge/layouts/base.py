"""The interface every token layout implements, and what they share.

A *layout* is how images (or a video) become visual tokens: which inputs the vision graph takes,
how many placeholders each image puts in the prompt, the prompt's positions (1-D or M-RoPE), and
the bounds of every symbolic axis its graphs declare. One module per layout, named after its
mechanism (`single_view`, `tiled`, `dynamic_patches`, `video_frames`, `video_patches`); the rest
of tokedge asks the layout (`tokedge.layouts.layout_of(manifest)`) and never branches on its kind
(tests/test_structure.py). docs/architecture.md has the worked example.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

Range = tuple[int, int, int]  # (min, typical, max)


@dataclass(frozen=True)
class LayoutBounds:
    """What any one image can give under a layout, from the layout alone (no image): the
    partitions its vision graph runs and its visual tokens before reduction, as (min, typical,
    max); typical = an image of TYPICAL_IMAGE. Build planning, FLOPs, memory and serve limits read these."""

    partitions: Range
    tokens: Range


TYPICAL_IMAGE = (768, 1024)  # (height, width) of a 4:3 photo: the "typical" image of shape planning


class Placeholders(int):
    """An image's count of image placeholders that also carries how they stand in the prompt: `text`
    is what the image's one placeholder becomes (its image-token runs with the layout's own text
    between them, e.g. SmolVLM's tile markers). An int everywhere else (sums, splicing, JSON)."""

    text: str

    def __new__(cls, count: int, text: str) -> Placeholders:  # noqa: PYI034 - Python 3.10 has no typing.Self
        obj = super().__new__(cls, count)
        obj.text = text
        return obj


@dataclass
class ImageBatch:
    """The images of a batch of prompts as the layout prepared them for the vision graph.

    `inputs`: the layout's own (an array of views, or one per-image input each) in prompt order;
    `counts`: per prompt, each image's placeholders; `budget`: the vision graph's runtime
    `budget` input (None when the graph has none)."""

    inputs: Any
    counts: list[list[int]]
    budget: int | None = None

    @property
    def images_per_row(self) -> list[int]:
        return [len(c) for c in self.counts]

    @classmethod
    def join(cls, batches: list[ImageBatch]) -> ImageBatch:
        """Several requests' batches as one (the server batches prompts): rows in order."""
        parts = [b.inputs for b in batches]
        inputs = np.concatenate(parts) if all(isinstance(p, np.ndarray) for p in parts) else \
            [x for p in parts for x in p]
        return cls(inputs, [c for b in batches for c in b.counts], batches[0].budget if batches else None)

    @classmethod
    def of(cls, inputs, images_per_row: list[int] | None = None, budget: int | None = None) -> ImageBatch:
        """A batch from inputs a layout made (`prompt_images`: an array of views or a list of per-image
        inputs; or an `ImageBatch`, returned as it is), `images_per_row` images per prompt (default
        one each); placeholder counts are then unknown (0)."""
        if isinstance(inputs, ImageBatch):
            return inputs
        rows = images_per_row if images_per_row is not None else [1] * len(inputs)
        return cls(inputs, [[0] * n for n in rows], budget)


class ImageLayout:
    """One image layout, bound to an artifact's manifest (`layout_of`). Subclasses set `kind`
    (written in new manifests), `aliases` (older names still read), and implement the methods
    below; the class attributes are what export asks before any manifest exists."""

    kind: ClassVar[str]
    aliases: ClassVar[tuple[str, ...]] = ()
    format_version: ClassVar[int] = 1  # the oldest manifest format that reads this layout
    counts_per_image: ClassVar[bool] = True  # each image gives its own token count (no fixed count)
    takes_max_pixels: ClassVar[bool] = False  # export's --max-pixels / --keep apply (images resized to a pixel budget)
    takes_max_tiles: ClassVar[bool] = False  # export's --max-tiles applies (a tile range per image)

    def __init__(self, manifest, record=None):
        self.manifest = manifest
        self.record = manifest.layout if record is None else record

    @classmethod
    def of_record(cls, record) -> ImageLayout:
        """The layout of a record alone, before any manifest exists (what a config describes): the
        questions that need only the record (`bounds` of per-image layouts, `axes`)."""
        return cls(None, record)

    # --- the record ------------------------------------------------------------------------------
    @classmethod
    def check_record(cls, record, format_version: int) -> None:
        """Refuse a manifest record this layout cannot use (`ManifestError`), derived sizes included."""

    # --- images -> vision inputs and placeholder counts --------------------------------------------
    def prompt_images(self, images: list) -> Any:
        """ONE prompt's PIL images -> the vision graph's inputs (per image, or an array of views)."""
        raise NotImplementedError

    def placeholder(self, count: int) -> int:
        """What one image of `count` visual tokens puts in the prompt: the count (its placeholder
        repeated), or `Placeholders` with the text the layout writes around the run."""
        return count

    def run_token(self) -> str:
        """The token string of each visual token in the prompt (its id is `prompt.image_token_id`):
        the placeholder itself, unless the layout frames the run with another token (Gemma 3)."""
        return self.manifest.prompt.image_token

    def prepare(self, groups: list[list], budget: int | None, check_budget) -> ImageBatch:
        """The PIL images of each prompt -> an `ImageBatch`. `budget`: a runtime budget asked for
        (None: the artifact's); `check_budget(budget) -> int` validates it against the artifact."""
        raise NotImplementedError

    def run_vision(self, graphs, batch: ImageBatch, instruction=None) -> tuple[Any, list | None]:
        """The vision graph over a batch -> (image embeddings: [n, k, D] or one [T_i, D] per image,
        the `kept_index` per image when the graph selects tokens whose positions matter, else None).
        `instruction` [n, hidden]: each image's prompt text, for graphs that take it (single view)."""
        names = {t.name for t in self.manifest.graphs["vision"].inputs}
        feeds = [self.feed(x, names) for x in batch.inputs]
        if "instruction" in names:  # per-image graphs: each image's [hidden] row
            if instruction is None:
                raise ValueError("this vision graph takes the prompt's text (instruction); none was given")
            dtype = np.dtype(self.manifest.graphs["vision"].input("instruction").dtype)
            for feed, row in zip(feeds, instruction):
                feed["instruction"] = row.astype(dtype, copy=False)
        return graphs.vision_indexed(feeds)

    def feed(self, image_inputs, graph_inputs) -> dict[str, np.ndarray]:
        """One prepared image's feed for a vision graph whose input names are `graph_inputs`."""
        raise NotImplementedError

    def positions(self, input_ids: np.ndarray, attention_mask: np.ndarray, batch: ImageBatch,
                  kept) -> np.ndarray | None:
        """The prefill's `position_ids` when the layout decides them (M-RoPE); None: 1-D from the mask."""
        return None

    def image_counts(self, image) -> tuple[int, int]:
        """(partitions the vision graph runs, visual tokens before reduction) for one PIL image."""
        raise NotImplementedError

    def vision_feed(self, image) -> dict[str, np.ndarray]:
        """One image's vision-graph feed as the runtime builds it (profile's stage timing)."""
        (inputs,) = self.prompt_images([image])
        return self.feed(inputs, {t.name for t in self.manifest.graphs["vision"].inputs})

    def batch_of(self, groups: list[list]) -> ImageBatch:
        """Per-image layouts: each prompt's images prepared, each image's placeholders its own count."""
        inputs = [x for group in groups for x in self.prompt_images(group)]
        tokens = iter(x.tokens for x in inputs)
        return ImageBatch(inputs, [[next(tokens) for _ in group] for group in groups])

    # --- counts, as data --------------------------------------------------------------------------
    def bounds(self) -> LayoutBounds:
        raise NotImplementedError

    def prompt_tokens(self, image_tokens: int, budget: int | None = None) -> int:
        """Placeholders of an image whose packing gives `image_tokens` under a vision-side method
        (the budget when given, else the artifact's)."""
        return self.manifest.reduction.budget if budget is None else budget

    def prefill_budget(self):
        """The per-image `TokenBudget` in-LLM stages keep on this layout (None: each stage keeps its
        fixed `keep` per image)."""
        return

    def pixel_limit(self) -> int | None:
        """The largest image area (pixels) the vision graph is fed, when images are resized to a
        pixel budget (None: fixed views)."""
        return None

    def pixels_for_tokens(self, tokens: int) -> int:
        """The largest pixel budget whose images give at most `tokens` visual tokens (layouts with a
        `pixel_limit`; others have no pixel budget to lower)."""
        raise NotImplementedError

    def largest_reduced_budget(self) -> int | None:
        """The largest budget a reduction method can be exported at, when export's example images
        bound it below the visual-token count (None: the count is the bound)."""
        return None

    def budget_full(self) -> int | None:
        """What a vision-side method's `--budget` is out of, when not the model's full count (None):
        e.g. each view's tokens where every view keeps the budget."""
        return None

    def describe_budget(self) -> str:
        """What export's summary line adds about the budget (e.g. "for the largest image")."""
        return ""

    def default_pixel_limit(self, device_limit: int | None = None) -> int | None:
        """Export's pixel budget when --max-pixels is not given (layouts with a `pixel_limit`; None:
        fixed views, nothing to choose). `device_limit`: the most pixels a device profile holds."""
        return None

    def axes(self, max_prompt: int) -> dict[str, Range]:
        """Bounds of the symbolic axes this layout's vision graph declares, for a device that holds
        `max_prompt` prompt tokens."""
        return {}


class VideoLayout:
    """How a video becomes visual tokens (the manifest's `video` record), bound to a manifest."""

    kind: ClassVar[str]
    aliases: ClassVar[tuple[str, ...]] = ()

    def __init__(self, manifest):
        self.manifest = manifest
        self.record = manifest.video

    @classmethod
    def check_record(cls, record) -> None:
        """Refuse a video record this layout cannot use (`ManifestError`)."""

    def read(self, source, frames: int | None, fps: float | None):
        """A clip / frame directory / frame files -> the layout's video inputs."""
        raise NotImplementedError

    def clip(self, source, frames: int | None, fps: float | None, size, resample: int):
        """The sampled frames of a clip file, a frame directory or frame files in time order, each
        resized by `size` (a (w, h) or a callable of the decoded size) as it is decoded; refused when
        more frames were sampled than the artifact takes."""
        from tokedge.runtime.video import read_frame_files, read_video
        from tokedge.runtime.video_pipeline import check_sampled

        video = self.record
        if isinstance(source, (list, tuple)):
            clip = read_frame_files(source, frames, fps, video.sampling, video.default_frames, size=size,
                                    resample=resample)
        else:
            clip = read_video(source, frames, fps, video.sampling, size=size, resample=resample,
                              default=video.default_frames)
        check_sampled(video, len(clip.frames))
        return clip

    def plan(self, frames: int, budget: int | None, keep: float | None, inputs):
        """-> `VideoPlan` (how many of the video's tokens reach the LLM)."""
        raise NotImplementedError

    def tokens(self, graphs, inputs, plan) -> tuple[np.ndarray, np.ndarray, float]:
        """The video's tokens as they replace its placeholders, the kept frame-token indices, and
        the per-video stage's milliseconds."""
        raise NotImplementedError

    def positions(self, input_ids: np.ndarray, attention_mask: np.ndarray, inputs) -> np.ndarray | None:
        return None

    def separate_graph(self) -> bool:
        """The video runs a graph of its own (its weights count apart from the image graph's)."""
        return False

    def fewest_tokens(self) -> int:
        """The fewest video tokens a prompt can carry (the prefill's shortest prompt may be a video's)."""
        return 1

    def axes(self) -> dict[str, Range]:
        return {}
