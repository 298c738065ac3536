"""Qwen2.5-VL `--method none` export: the vision graph vs transformers' tower, the manifest's
dynamic-resolution layout record (format 3) and its schema checks, `--max-pixels`, one-line
refusals, and `tokedge profile` on the artifact. Generation through the runtime against
transformers' `generate` is tests/runtime/test_qwen2_5_vl_run.py."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from tokedge.runtime import qwen_vl

def _image(width, height, seed):
    from PIL import Image

    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8), "RGB")


def test_vision_graph_equals_transformers_tower(qwen2_5_vl_artifact, hf_qwen2_5_vl):
    """The artifact's vision graph alone (ONNX Runtime, no tokedge runtime) on a grid with partial
    windows (1000x750 -> 54 x 72 patches) equals transformers' tower + merger; the index inputs
    come from tokedge/runtime/qwen_vl.py (each compared with transformers in tests/runtime/test_qwen_vl.py)."""
    import onnxruntime as ort
    import torch

    model, _, processor = hf_qwen2_5_vl
    image = _image(1000, 750, seed=9)
    proc = processor(images=[image], return_tensors="pt")
    with torch.no_grad():
        ref = model.model.visual(proc["pixel_values"], grid_thw=proc["image_grid_thw"]).pooler_output.numpy()
    pixels, grid = qwen_vl.preprocess_image(image, qwen_vl.QwenImageSpec())
    idx = qwen_vl.qwen2_5_vision_inputs(grid[None])
    session = ort.InferenceSession(str(qwen2_5_vl_artifact / "vision.onnx"), providers=["CPUExecutionProvider"])
    (got,) = session.run(None, {"pixel_values": pixels[idx.patch_order], "vision_pos": idx.vision_pos,
                                "window_seg": idx.window_seg, "merge_restore": idx.merge_restore})
    assert got.shape == ref.shape == (27 * 36, model.config.text_config.hidden_size)
    np.testing.assert_allclose(got, ref, atol=1e-4, rtol=0)


def test_export_refuses_reduction_methods_with_one_line_before_loading(tiny_qwen2_5_vl_dir, tmp_path):
    from tokedge.errors import UsageError
    from tokedge.export.families import supported
    from tokedge.export.pipeline import ExportConfig, export

    with pytest.raises(UsageError) as err:
        export(ExportConfig(model=str(tiny_qwen2_5_vl_dir), out=tmp_path / "art", method="evs"))
    # the family takes video (`--method none` only): a temporal method is refused for it in one line
    assert "\n" not in str(err.value) and "temporal methods" in str(err.value) and "--method none" in str(err.value)
    assert not (tmp_path / "art").exists()
    assert "qwen2_5_vl" in supported()  # listed among the exportable families now


def test_max_pixels_is_refused_for_fixed_geometry_families(tiny_llava_dir, tmp_path):
    from tokedge.errors import UsageError
    from tokedge.export.pipeline import ExportConfig, export

    with pytest.raises(UsageError) as err:
        export(ExportConfig(model=str(tiny_llava_dir), out=tmp_path / "art", max_pixels=200_000))
    assert "--max-pixels" in str(err.value) and "\n" not in str(err.value)


def test_manifest_records_the_dynamic_layout_as_format_3(qwen2_5_vl_artifact, tiny_qwen2_5_vl_dir):
    """The layout record is read back from the manifest (hub geometry of the tiny preset) and names
    everything the runtime needs; format 3 so that readers of formats 1-2 refuse it in one line."""
    from tokedge.artifact import FORMAT_VERSION, load_artifact

    raw = json.loads((qwen2_5_vl_artifact / "tokedge.json").read_text())
    assert raw["format_version"] == 3 < FORMAT_VERSION  # the lowest format that reads it (4: split tiles)
    config = json.loads((tiny_qwen2_5_vl_dir / "config.json").read_text())
    processor = json.loads((tiny_qwen2_5_vl_dir / "preprocessor_config.json").read_text())
    layout = load_artifact(qwen2_5_vl_artifact).layout
    assert layout.kind == "dynamic_patches" and layout.position_rows == 3
    assert (layout.patch_size, layout.merge_size, layout.temporal_patch_size, layout.window_size) == (14, 2, 2, 112)
    # exported without --max-pixels: tokedge's edge default (1280 tokens), not the checkpoint's 12.8 MP
    assert layout.min_pixels == processor["size"]["shortest_edge"]
    assert layout.max_pixels == 1280 * 28 * 28 < processor["size"]["longest_edge"] == 12845056
    assert list(layout.mrope_section) == config["text_config"]["rope_parameters"]["mrope_section"]
    assert list(layout.fullatt_blocks) == config["vision_config"]["fullatt_block_indexes"]
    assert (layout.vision_start_token_id, layout.vision_end_token_id) == (config["vision_start_token_id"],
                                                                          config["vision_end_token_id"])
    decoder = {t["name"]: t["shape"] for t in raw["graphs"]["decoder"]["inputs"]}
    assert decoder["position_ids"] == [3, "batch", "sequence"]


@pytest.mark.parametrize("edit,fragment", [
    ({"format_version": 2}, "format_version"),
    ({"layout.max_pixels": 100}, "layout.max_pixels"),
    ({"layout.patch_size": 0}, "layout.patch_size"),
    ({"layout.window_size": 100}, "layout.window_size"),
    ({"layout.mrope_section": [2, 3]}, "layout.mrope_section"),
])
def test_bad_dynamic_layouts_are_refused_in_one_line(qwen2_5_vl_artifact, edit, fragment):
    from tokedge.artifact import Manifest
    from tokedge.manifest_schema import ManifestError

    data = json.loads((qwen2_5_vl_artifact / "tokedge.json").read_text())
    for key, value in edit.items():
        *parents, last = key.split(".")
        target = data
        for part in parents:
            target = target[part]
        target[last] = value
    with pytest.raises(ManifestError) as err:
        Manifest.from_dict(data)
    assert fragment in str(err.value) and "\n" not in str(err.value)


def test_max_pixels_resizes_large_images_down_and_verify_replays(tiny_qwen2_5_vl_dir, hf_qwen2_5_vl, tmp_path):
    """`--max-pixels 100000`: the manifest records it, a 1000x750 image is resized down exactly as
    transformers' processor does with that max_pixels (same grid), and `tokedge verify
    --checkpoint` recomputes the reference with it."""
    from tokedge.artifact import load_artifact
    from tokedge.export.pipeline import ExportConfig, export
    from tokedge.layouts import prompt_inputs
    from tokedge.verify import verify

    out = tmp_path / "art"
    result = export(ExportConfig(model=str(tiny_qwen2_5_vl_dir), out=out, max_pixels=100_000))
    assert result.parity["ok"] and result.warnings == []  # small enough: no dense-attention warning
    manifest = load_artifact(out)
    assert manifest.layout.max_pixels == 100_000 and manifest.reduction.full_tokens == 100_000 // 28**2
    image = _image(1000, 750, 3)
    (inputs,) = prompt_inputs(manifest, [image])
    ref = hf_qwen2_5_vl[2](images=[image], size={"shortest_edge": 3136, "longest_edge": 100_000},
                           return_tensors="np")
    np.testing.assert_array_equal(inputs.grid, ref["image_grid_thw"][0])
    assert inputs.tokens * 28**2 <= 100_000 < 750 * 1000  # resized down: each merged token covers 28 x 28 pixels
    report = verify(out, checkpoint=str(tiny_qwen2_5_vl_dir))
    assert report.ok and len(report.cases) == 2


def test_hub_style_config_is_read_without_weights():
    """A transformers-4.x hub config.json (text fields at the top level, `rope_scaling` with
    `mrope_section`, Qwen2.5-VL-3B's vision block) is inspected from the file alone."""
    from tokedge.export.families import for_checkpoint

    cfg = {"architectures": ["Qwen2_5_VLForConditionalGeneration"], "model_type": "qwen2_5_vl",
           "hidden_size": 2048, "num_hidden_layers": 36, "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]},
           "vision_start_token_id": 151652, "vision_end_token_id": 151653, "image_token_id": 151655,
           "vision_config": {"depth": 32, "hidden_size": 1280, "out_hidden_size": 2048, "patch_size": 14,
                             "spatial_merge_size": 2, "temporal_patch_size": 2, "window_size": 112,
                             "fullatt_block_indexes": [7, 15, 23, 31]}}
    spec = for_checkpoint(cfg).inspect(cfg)
    assert spec.layout.kind == "dynamic_patches" and spec.layout.mrope_section == (16, 24, 24)
    assert spec.layout.fullatt_blocks == (7, 15, 23, 31) and spec.text_layers == 36
    assert spec.full_tokens == 1003520 // 28**2  # the processor class default until the processor is read


def test_profile_runs_on_the_artifact(qwen2_5_vl_artifact, tmp_path):
    """`tokedge profile` on a Qwen2.5-VL artifact: each image's own visual-token count and FLOPs
    over its own patches (what branch qwenred compares reduced artifacts with)."""
    from tokedge.report.profile import ProfileConfig, run_profile

    paths = []
    for i, (w, h) in enumerate([(448, 448), (300, 900)]):
        _image(w, h, seed=i).save(tmp_path / f"{i}.png")
        paths.append(tmp_path / f"{i}.png")
    report = run_profile(ProfileConfig(artifact=qwen2_5_vl_artifact, images=tuple(paths), runs=1, warmup=0,
                                       max_new_tokens=2))
    (result,) = report.results
    assert [(p["vision_tokens"], p["visual_tokens"], p["partitions"]) for p in result.per_image] == \
        [(256, 256, 1), (352, 352, 1)]
    small, tall = (p["flops"]["vision"] for p in result.per_image)
    assert 0 < small < tall  # the tower's cost follows the image's patches
    assert result.visual_tokens == 352 and result.ttft_ms > 0


def test_export_summary_names_the_pixel_budget_and_how_to_raise_it(tiny_qwen2_5_vl_dir, tmp_path, capsys):
    """Without --max-pixels the manifest records the edge default (1280 visual tokens per image) and
    the summary says so, with the checkpoint's own limit and the flag that raises it; with
    --max-pixels the given value."""
    from tokedge.artifact import load_artifact
    from tokedge.cli import main

    out = tmp_path / "edge"
    assert main(["export", str(tiny_qwen2_5_vl_dir), "--out", str(out), "--no-validate", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    (note,) = summary["notes"]
    assert note.startswith("images: up to 1003520 pixels (1280 visual tokens) each, tokedge's edge default; "
                           "the checkpoint takes up to 12845056")
    assert "--max-pixels N" in note
    manifest = load_artifact(out)
    assert (manifest.layout.max_pixels, manifest.reduction.full_tokens) == (1003520, 1280)

    given = tmp_path / "given"
    assert main(["export", str(tiny_qwen2_5_vl_dir), "--out", str(given), "--no-validate", "--json",
                 "--max-pixels", "2000000"]) == 0
    (note,) = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["notes"]
    assert note.startswith("images: up to 2000000 pixels (2551 visual tokens) each, --max-pixels;")
    assert load_artifact(given).layout.max_pixels == 2000000

    # --profile: the default is what the device holds when that is less (the tiny preset fits whole)
    profiled = tmp_path / "profiled"
    assert main(["export", str(tiny_qwen2_5_vl_dir), "--out", str(profiled), "--no-validate", "--json",
                 "--profile", "jetson-orin-nano-8gb"]) == 0
    (note,) = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["notes"]
    assert note.startswith("images: up to 1003520 pixels (1280 visual tokens) each, tokedge's edge default;")

    # a device whose prompt holds 600 tokens: 600 - 64 text tokens = 536 visual tokens per image
    small = tmp_path / "small-device.toml"
    small.write_text((Path(__file__).parents[2] / "tokedge/profiles/jetson-orin-nano-8gb.toml").read_text()
                     .replace('name = "jetson-orin-nano-8gb"', 'name = "small-device"')
                     .replace("max_prompt_tokens = 3072", "max_prompt_tokens = 600"))
    capped = tmp_path / "capped"
    assert main(["export", str(tiny_qwen2_5_vl_dir), "--out", str(capped), "--no-validate", "--json",
                 "--profile", str(small)]) == 0
    (note,) = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["notes"]
    assert note.startswith(f"images: up to {536 * 28 * 28} pixels (536 visual tokens) each, what --profile "
                           f"{small} holds (tokedge's edge default: 1003520)")
    assert load_artifact(capped).layout.max_pixels == 536 * 28 * 28


def test_profile_pixel_limit_is_what_the_device_holds():
    """`memory.profile_pixel_limit`: at the limit the plan's vision attention fits beside the weights and
    KV cache and the image's tokens fit the prompt; one merged patch row more and one of them does not."""
    from dataclasses import replace

    from tokedge.memory import DEFAULT_TEXT_TOKENS, plan, profile_pixel_limit, resolve_target
    from tokedge.profiles import load_profile

    target, _ = resolve_target("qwen2.5-vl-3b", quantize="int4")
    nano = load_profile("jetson-orin-nano-8gb")
    limit = profile_pixel_limit(target, nano)
    assert limit is not None and limit % 28**2 == 0 and limit < 1280 * 28 * 28

    def fits(pixels: int) -> bool:
        p = plan(replace(target, layout=replace(target.layout, max_pixels=pixels)), nano)
        room = p.usable_bytes - sum(p.weight_bytes.values()) - p.kv_cache_bytes
        return p.vision_activation_bytes <= room and p.visual_tokens + DEFAULT_TEXT_TOKENS <= p.prompt_tokens

    assert fits(limit) and not fits(limit + 64 * 28**2)
    assert profile_pixel_limit(resolve_target("qwen2.5-vl-7b")[0], nano) is None  # fp16 weights: nothing fits
