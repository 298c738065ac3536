"""Artifacts written before the layouts became plug-ins still load, plan and run.

tests/fixtures/old-manifests/*.json are the manifests `tokedge export` wrote at commit 495dc9c
(layout kinds "single", "anyres", "qwen_dynamic", video kind "qwen_dynamic"); tests/fixtures/
old-qwen2.5-vl-none/ is a whole artifact exported then (tiny-qwen2.5-vl, --max-pixels 50176, the
layout and video kinds both "qwen_dynamic"). Reading, planning, memory and the prompt path must
take them as they are, with the same answers as a fresh export of the same preset.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

FIXTURES = Path(__file__).parent / "fixtures"
OLD_MANIFESTS = sorted((FIXTURES / "old-manifests").glob("*.json"))
OLD_QWEN = FIXTURES / "old-qwen2.5-vl-none"


def test_the_fixtures_are_old_format():
    kinds = {json.loads(p.read_text())["layout"]["kind"] for p in OLD_MANIFESTS}
    assert {"single", "anyres", "qwen_dynamic"} <= kinds
    assert json.loads((OLD_QWEN / "tokedge.json").read_text())["video"]["kind"] == "qwen_dynamic"


@pytest.mark.parametrize("path", OLD_MANIFESTS, ids=lambda p: p.stem)
def test_old_manifests_load_plan_and_count(path):
    from tokedge.artifact import Manifest
    from tokedge.build.plan import plan_shapes
    from tokedge.layouts import IMAGE_LAYOUTS, layout_of
    from tokedge.memory import image_bounds, plan_for_device
    from tokedge.profiles import load_profile

    manifest = Manifest.from_dict(json.loads(path.read_text()))
    assert manifest.layout.kind in IMAGE_LAYOUTS  # an old name reads as today's
    layout = layout_of(manifest)
    assert layout.kind == manifest.layout.kind
    bounds = image_bounds(manifest)
    assert 0 < bounds.vision_tokens[0] <= bounds.vision_tokens[1] <= bounds.vision_tokens[2]
    from tokedge.errors import UsageError

    profile = load_profile("jetson-agx-thor")  # the largest prompt of the shipped profiles
    try:
        graphs, _ = plan_shapes(manifest, profile)
    except UsageError as exc:  # a checkpoint-default --max-pixels: refused with the fix, never a bad plan
        assert layout.pixel_limit() is not None and "--max-pixels" in str(exc), exc
        return
    for profiles in graphs.values():
        for prof in profiles:
            for rng in prof.shapes.values():
                assert all(0 <= lo <= opt <= hi for lo, opt, hi in zip(rng.min, rng.opt, rng.max))
    assert plan_for_device(manifest, profile).total_bytes > 0


def test_an_old_qwen_artifact_runs_and_verifies_as_a_fresh_export(tmp_path, capsys):
    """The whole old artifact: verify (hashes and parity against its own reference), run with an
    image and with a video through the new layouts, tokens equal to a fresh export's."""
    from matrix.matrix_support import frame_dir, write_image

    from tokedge.cli import main
    from tokedge.runtime.pipeline import Pipeline

    old = tmp_path / "old"
    shutil.copytree(OLD_QWEN, old)
    assert main(["verify", str(old)]) == 0
    fresh = tmp_path / "fresh"
    assert main(["export", "tiny-qwen2.5-vl", "--max-pixels", "50176", "--out", str(fresh)]) == 0
    image = write_image(tmp_path / "image.png")
    clip = frame_dir(tmp_path / "clip", 4)
    answers = []
    for art in (old, fresh):
        with Pipeline.load(art) as pipe:
            img = pipe.generate(image, "What is shown?", max_new_tokens=4)
            vid = pipe.generate_video(clip, "What happens?", max_new_tokens=4)
            answers.append((img.token_ids, vid.token_ids, img.visual_tokens, vid.visual_tokens))
    assert answers[0] == answers[1]
    capsys.readouterr()


@pytest.mark.parametrize("name,recorded", [("q25-dart-keep0.5", 12845056), ("q3-fastv", 16777216)])
def test_old_manifests_keep_their_recorded_max_pixels(name, recorded):
    """Artifacts exported before the edge default (1280 tokens per image) recorded the checkpoint's
    max_pixels; they keep it: the layout's pixel limit and token bounds are the recorded ones, and an
    image between the edge default and the recorded limit is not resized down to the edge default."""
    from tokedge.artifact import Manifest
    from tokedge.layouts import layout_of
    from tokedge.runtime.qwen_vl import image_spec, smart_resize

    manifest = Manifest.from_dict(json.loads((FIXTURES / "old-manifests" / f"{name}.json").read_text()))
    layout = layout_of(manifest)
    factor = int(manifest.layout.patch_size) * int(manifest.layout.merge_size)
    assert layout.pixel_limit() == recorded and layout.bounds().tokens[2] == recorded // factor**2
    assert layout.default_pixel_limit() == 1280 * factor**2  # what a new export would pick
    spec = image_spec(manifest.layout, manifest.preprocess)
    h, w = smart_resize(1512, 2016, factor, spec.min_pixels, spec.max_pixels)  # 3 MP: above the edge default
    assert (h, w) == (round(1512 / factor) * factor, round(2016 / factor) * factor) and h * w > 1280 * factor**2
