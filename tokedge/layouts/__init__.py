"""Token layouts as plug-ins: one module per mechanism, one registry keyed by the manifest's kind
(older names read as aliases). Everything outside this package asks `layout_of(manifest)` /
`video_layout_of(manifest)` and never branches on a kind (tests/test_structure.py)."""

from __future__ import annotations

from tokedge.layouts.aspect_tiles import AspectTiles
from tokedge.layouts.base import (
    TYPICAL_IMAGE,
    ImageBatch,
    ImageLayout,
    LayoutBounds,
    Placeholders,
    Range,
    VideoLayout,
)
from tokedge.layouts.dynamic_patches import DynamicPatches
from tokedge.layouts.framed_view import FramedView
from tokedge.layouts.single_view import SingleView
from tokedge.layouts.split_tiles import SplitTiles
from tokedge.layouts.tiled import Tiled
from tokedge.layouts.video_frames import VideoFrames
from tokedge.layouts.video_patches import VideoPatches

IMAGE_LAYOUTS: dict[str, type[ImageLayout]] = {c.kind: c for c in (SingleView, Tiled, DynamicPatches, SplitTiles, AspectTiles,
                                                              FramedView)}
VIDEO_LAYOUTS: dict[str, type[VideoLayout]] = {c.kind: c for c in (VideoFrames, VideoPatches)}
_IMAGE_ALIASES = {alias: c.kind for c in IMAGE_LAYOUTS.values() for alias in c.aliases}
_VIDEO_ALIASES = {alias: c.kind for c in VIDEO_LAYOUTS.values() for alias in c.aliases}


def canonical_kind(kind: str) -> str:
    """An image layout's kind as new manifests write it (aliases: older names)."""
    return _IMAGE_ALIASES.get(kind, kind)


def canonical_video_kind(kind: str) -> str:
    return _VIDEO_ALIASES.get(kind, kind)


def image_layout_class(kind: str) -> type[ImageLayout]:
    """The class of a kind (or alias); KeyError for unknown kinds (the manifest reader refuses those)."""
    return IMAGE_LAYOUTS[canonical_kind(kind)]


def video_layout_class(kind: str) -> type[VideoLayout]:
    return VIDEO_LAYOUTS[canonical_video_kind(kind)]


def layout_of(manifest) -> ImageLayout:
    """The artifact's image layout, bound to its manifest."""
    return image_layout_class(manifest.layout.kind)(manifest)


def video_layout_of(manifest) -> VideoLayout | None:
    """The artifact's video layout, or None for artifacts that take images only."""
    if manifest.video is None:
        return None
    return video_layout_class(manifest.video.kind)(manifest)


def record_bounds(record) -> LayoutBounds:
    """Bounds of a per-image layout from its record alone (a config read without an artifact)."""
    return image_layout_class(record.kind).of_record(record).bounds()


def prompt_inputs(manifest, images: list):
    """The vision-graph inputs of the images of ONE prompt, as every tokedge path builds them (run,
    serve, profile, verify, export validation): the layout's `prompt_images`."""
    return layout_of(manifest).prompt_images(images)


__all__ = [
    "IMAGE_LAYOUTS",
    "TYPICAL_IMAGE",
    "VIDEO_LAYOUTS",
    "ImageBatch",
    "ImageLayout",
    "LayoutBounds",
    "Placeholders",
    "Range",
    "VideoLayout",
    "canonical_kind",
    "canonical_video_kind",
    "image_layout_class",
    "layout_of",
    "prompt_inputs",
    "video_layout_class",
    "video_layout_of",
]
