"""Derived quantities of a manifest (tiles, tokens per tile, pixels after resize, window cells,
frame pixels) are bounded when any command reads it, not only each field (issue 22, item 10;
docs/safety.md "Limits")."""

from __future__ import annotations

import copy
import json
import os
import re
import resource
import shutil
import subprocess
import sys

import pytest

from tokedge.artifact import MANIFEST_NAME, Manifest
from tokedge.errors import ArtifactError

ANYRES = {"kind": "anyres", "tile": 336, "patch_grid": 24, "pinpoints": [[336, 672], [672, 336], [672, 672]],
          "max_tiles": None, "image_newline": True}
QWEN = {"kind": "qwen_dynamic", "patch_size": 14, "merge_size": 2, "temporal_patch_size": 2, "min_pixels": 3136,
        "max_pixels": 12845056, "window_size": 112, "fullatt_blocks": [0], "mrope_section": [16, 24, 24],
        "vision_start_token_id": 1, "vision_end_token_id": 2}
VIDEO = {"graph": "vision", "video_token": "<video>", "video_token_id": 5, "frame_size": 384, "patch_grid": 27,
         "pooled_grid": 14, "tokens_per_frame": 196, "newline": "one_per_video", "resample": 3,
         "rescale_factor": 1 / 255, "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5], "default_frames": 8,
         "max_frames": 64}

# name -> (layout overrides or None, video overrides or None, key named in the error)
ASPECT = {"kind": "aspect_tiles", "tile": 448, "patch_size": 14, "merge_size": 2, "view_tokens": 256, "min_tiles": 1,
          "max_tiles": 12}  # InternVL3
FRAMED = {"kind": "framed_view", "tile": 896, "patch_size": 14, "view_tokens": 256, "run_token": "<image_soft_token>",
          "frame_before": "\n\n<start_of_image>", "frame_after": "<end_of_image>\n\n"}  # Gemma 3
HOSTILE = {
    "aspect tiles 206 GB canvas": ({**ASPECT, "tile": 16384, "max_tiles": 256, "view_tokens": 65536}, None,
                                   "layout.max_tiles"),
    "aspect tiles above max": ({**ASPECT, "min_tiles": 13}, None, "layout.min_tiles"),
    "framed view no run token": ({**FRAMED, "run_token": ""}, None, "layout.run_token"),
    "framed view long frame": ({**FRAMED, "frame_before": "x" * 5000}, None, "layout.frame_before"),
    "qwen 2^30 pixels": ({**QWEN, "min_pixels": 1 << 30, "max_pixels": 1 << 30}, None, "layout.max_pixels"),
    "qwen patches per image": ({**QWEN, "patch_size": 1, "min_pixels": 4, "max_pixels": 1 << 24}, None,
                               "layout.max_pixels"),
    "qwen window cells": ({**QWEN, "window_size": 28 * 100000}, None, "layout.window_size"),
    "anyres 268M tiles": ({**ANYRES, "tile": 1, "patch_grid": 1, "pinpoints": [[16384, 16384]]}, None,
                          "layout.pinpoints[0]"),
    "anyres tokens per tile": ({**ANYRES, "tile": 16384, "patch_grid": 4096, "pinpoints": [[16384, 16384]]}, None,
                               "layout.patch_grid"),
    "anyres many tiles": ({**ANYRES, "tile": 64, "patch_grid": 8, "pinpoints": [[4096, 4096]]}, None,
                          "layout.pinpoints[0]"),
    "anyres pinpoint count": ({**ANYRES, "pinpoints": [[336, 336]] * 5000}, None, "layout.pinpoints"),
    "video frame 16384": (None, {"frame_size": 16384}, "video.frame_size"),
    "video all frames": (None, {"frame_size": 4096, "max_frames": 4096, "default_frames": 8}, "video.max_frames"),
}


@pytest.fixture(scope="module")
def base_art(artifacts):
    return artifacts("none", 576)


@pytest.fixture(scope="module")
def base_data(base_art) -> dict:
    return json.loads((base_art / MANIFEST_NAME).read_text())


def _with(data: dict, layout: dict | None, video: dict | None) -> dict:
    out = copy.deepcopy(data)
    if layout is not None:
        out["format_version"] = 5 if layout["kind"] in ("aspect_tiles", "framed_view") else 3
        out["layout"] = layout
    if video is not None:
        out["video"] = {**VIDEO, **video}
    return out


@pytest.mark.parametrize("layout,video", [(ANYRES, None), (QWEN, None), (None, {}), (ASPECT, None), (FRAMED, None)],
                         ids=["anyres", "qwen", "video", "aspect-tiles", "framed-view"])
def test_real_sized_layouts_pass(base_data, layout, video):
    Manifest.from_dict(_with(base_data, layout, video))


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_derived_sizes_are_refused_at_read(case, base_data):
    layout, video, key = HOSTILE[case]
    with pytest.raises(ArtifactError, match=re.escape(f"malformed manifest: {key} ")):
        Manifest.from_dict(_with(base_data, layout, video))


def _limited() -> None:  # a failing reader must not take the machine with it
    resource.setrlimit(resource.RLIMIT_AS, (6 << 30, 6 << 30))


@pytest.mark.parametrize("case", ["anyres 268M tiles", "qwen 2^30 pixels"])
@pytest.mark.parametrize("command", [["memory", "--profile", "jetson-orin-nano-8gb"],
                                     ["build", "--profile", "jetson-orin-nano-8gb", "--dry-run"], ["verify"]],
                         ids=["memory", "build-dry-run", "verify"])
def test_readers_refuse_in_one_line(command, case, base_art, base_data, tmp_path):
    art = tmp_path / "art"
    shutil.copytree(base_art, art)
    layout, video, key = HOSTILE[case]
    (art / MANIFEST_NAME).write_text(json.dumps(_with(base_data, layout, video)))
    env = {k: v for k, v in os.environ.items() if k != "TOKEDGE_DEBUG"}
    proc = subprocess.run([sys.executable, "-m", "tokedge", command[0], str(art), *command[1:]], capture_output=True,
                          text=True, timeout=120, env=env, preexec_fn=_limited)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 1 and len(lines) == 1, proc.stderr[-2000:]
    assert lines[0].startswith(f"error: malformed manifest: {key}"), lines[0]
