"""Memory plan and architecture numbers, each against an independent reference:
- parameter formulas of every named geometry against transformers' own modules built from the same
  published config on the meta device (no weights), and the published Llama-7B size;
- the architecture record an export writes against transformers' modules of the tiny checkpoint
  and against the config-only formulas (`tokedge memory CHECKPOINT_DIR`);
- `tokedge memory ARTIFACT` against the artifact's graph files on disk (within 2%, four families,
  float and int8/int4 artifacts);
- the vision graph's working set and `vision_patch_limit` against ONNX Runtime's measured peak;
- KV cache and int4 decoder bytes against hand computations from the published config;
- the plan in build --dry-run, profile --predict and as an export warning."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

from tokedge.architecture import from_directory, named, named_geometries
from tokedge.artifact import load_artifact, read_manifest
from tokedge.cli import main
from tokedge.memory import (
    EXIT_DOES_NOT_FIT,
    check_artifact_size,
    plan_for_device,
    target_of,
    vision_patch_limit,
    vision_working_set,
)
from tokedge.profiles import load_profile

# --- parameter counts ---------------------------------------------------------------------------------


def _hf_counts(model, config: dict) -> dict[str, int]:
    """vision graph / token table / decoder graph parameters of a transformers VLM, counted from its
    modules: the tower up to the feature layer (+ embeddings, pre-norm, projector, newline row) or
    Qwen's whole `visual`; the decoder's layers and norm plus lm_head (its own copy even when tied)."""
    inner = model.model
    lm = getattr(inner, "language_model", None) or inner.text_model
    embed = lm.embed_tokens.weight.numel()
    decoder = sum(p.numel() for n, p in lm.named_parameters() if not n.startswith("embed_tokens"))
    decoder += model.lm_head.weight.numel()
    if hasattr(inner, "visual"):
        return {"vision": sum(p.numel() for p in inner.visual.parameters()), "embed": embed, "decoder": decoder}
    if hasattr(inner, "connector") or config["model_type"] in ("internvl", "gemma3"):  # every tower layer
        tower = getattr(inner, "vision_model", None) or inner.vision_tower
        head = getattr(inner, "connector", None) or inner.multi_modal_projector
        vision = sum(p.numel() for p in tower.parameters()) + sum(p.numel() for p in head.parameters())
        return {"vision": vision, "embed": embed, "decoder": decoder}
    tower = getattr(inner.vision_tower, "vision_model", inner.vision_tower)
    feature = config.get("vision_feature_layer", -2 if config["model_type"] in ("llava", "llava_next") else -1)
    run = feature if feature >= 0 else len(tower.encoder.layers) + 1 + feature
    vision = sum(p.numel() for layer in tower.encoder.layers[:run] for p in layer.parameters())
    vision += sum(p.numel() for p in tower.embeddings.parameters())
    vision += sum(p.numel() for p in getattr(tower, "pre_layrnorm", tower.embeddings).parameters()) \
        if hasattr(tower, "pre_layrnorm") else 0
    vision += sum(p.numel() for p in inner.multi_modal_projector.parameters())
    vision += inner.image_newline.numel() if getattr(inner, "image_newline", None) is not None else 0
    return {"vision": vision, "embed": embed, "decoder": decoder}


@pytest.mark.parametrize("name", sorted(named_geometries()))
def test_named_geometry_parameters_match_transformers(name):
    """Every shipped geometry: the formulas give exactly what transformers builds from that config."""
    import torch
    import transformers

    cfg = named_geometries()[name]["config"]
    with torch.device("meta"):
        model = transformers.AutoModelForImageTextToText.from_config(transformers.AutoConfig.for_model(**cfg))
    formula = {g: r.parameters for g, r in named(name).architecture.graphs.items()}
    assert formula == _hf_counts(model, cfg)


def test_llama_7b_parameter_count_matches_the_published_size():
    # LLaVA-NeXT-7B's decoder is Vicuna-7B (Llama-2-7B): 6,738,415,616 parameters with its 32000-token table
    p = named("llava-next-7b").architecture.graphs
    assert p["embed"].parameters + p["decoder"].parameters == 6_738_415_616


def test_geometry_list_and_a_checkpoint_directory(tiny_qwen3_vl_dir, tmp_path, capsys):
    assert main(["memory", "--list", "--json"]) == 0
    names = {g["name"] for g in json.loads(capsys.readouterr().out)["geometries"]}
    assert {"llava-1.5-7b", "llava-next-7b", "llava-onevision-7b", "qwen2.5-vl-3b", "qwen2.5-vl-7b", "qwen3-vl-2b",
            "qwen3-vl-4b", "qwen3-vl-8b"} <= names
    # a checkpoint directory: config.json and the image processor's pixel range, never the weights
    ckpt = tmp_path / "config-only"
    ckpt.mkdir()
    for name in ("config.json", "preprocessor_config.json"):
        shutil.copy(tiny_qwen3_vl_dir / name, ckpt / name)
    assert main(["memory", str(ckpt), "--profile", "rtx-4090", "--json"]) == EXIT_DOES_NOT_FIT
    plan = json.loads(capsys.readouterr().out)  # 16.8 Mpx images: 65536 patches of dense attention
    assert plan["counted"] == "config-formulas" and plan["visual_tokens"] == 16777216 // 32**2
    assert main(["memory", str(ckpt), "--profile", "rtx-4090", "--max-pixels", "1003520", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["visual_tokens"] == 1003520 // 32**2


def test_hub_id_offline_is_one_line(capsys, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # no network here either way
    assert main(["memory", "no-such-owner/no-such-model", "--profile", "rtx-4090"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: cannot download config.json of 'no-such-owner/no-such-model'") and "\n" not in err
    assert main(["memory", "no-such-geometry", "--profile", "rtx-4090"]) == 2
    assert "named geometry" in capsys.readouterr().err


# --- exported artifacts: the record and the bytes ---------------------------------------------------------


@pytest.fixture(scope="module")
def exported(artifacts, tiny_llava_next_dir, tiny_qwen2_5_vl_dir, tiny_qwen3_vl_dir, tmp_path_factory):
    """One artifact per family (float), and two quantized ones: {label: (artifact, checkpoint)}."""
    from tokedge.export.pipeline import ExportConfig, export
    from tokedge.export.quantize import QuantConfig

    root = tmp_path_factory.mktemp("memory-artifacts")
    out = {"llava": (artifacts("none"), None)}
    int8 = QuantConfig(scheme="int8", form="qdq", group_size=32)
    int4 = QuantConfig(scheme="int4", form="matmulnbits", group_size=32)
    specs = {
        "llava-next": {"model": str(tiny_llava_next_dir), "method": "none"},
        # the checkpoint processor's 12.8 MP, not the edge default: its vision attention cannot fit a Nano
        "qwen2.5-vl-dart": {"model": str(tiny_qwen2_5_vl_dir), "method": "dart", "keep": 0.5, "max_pixels": 12845056},
        "qwen3-vl": {"model": str(tiny_qwen3_vl_dir), "method": "none"},
        "llava-int8-qdq": {"model": str(artifacts.checkpoint), "method": "cls-attn", "budget": 64, "quantize": int8},
        "qwen2.5-vl-int4": {"model": str(tiny_qwen2_5_vl_dir), "method": "dart", "keep": 0.5, "quantize": int4},
    }
    for label, kw in specs.items():
        export(ExportConfig(out=root / label, validate=False, **kw))
        out[label] = (root / label, kw["model"])
    out["llava"] = (out["llava"][0], str(artifacts.checkpoint))
    return out


def test_memory_agrees_with_the_artifact_bytes_within_2_percent(exported, capsys):
    """`tokedge memory ART`: the graphs' predicted bytes (parameters at their stored width + each
    graph's structure, from the manifest alone) against the files on disk, measured here."""
    for label, (art, _) in exported.items():
        manifest = read_manifest(art)
        on_disk = sum(os.path.getsize(art / f) for g in manifest.graphs.values() for f in (g.file, g.external_data) if f)
        assert main(["memory", str(art), "--profile", "rtx-4090", "--json"]) in (0, EXIT_DOES_NOT_FIT)
        plan = json.loads(capsys.readouterr().out)
        predicted = sum(plan["artifact_bytes"].values())
        assert plan["counted"] == "onnx-initializers"
        assert abs(predicted / on_disk - 1) < 0.02, (label, predicted, on_disk)
        assert sum(plan["artifact_bytes_measured"].values()) == on_disk
        if "int" in label:  # quantized: the decoder's weights really are stored in fewer bytes
            rec = manifest.architecture.graphs["decoder"]
            assert 0 < rec.quantized < rec.parameters and rec.scale_groups > 0


def test_record_counts_what_transformers_holds(exported):
    """The parameters counted in each written graph equal the tiny checkpoint's modules in
    transformers (vision, token table, decoder + lm_head), and the config-only formulas of
    `tokedge memory CHECKPOINT` agree with both."""
    import transformers

    for label in ("llava", "llava-next", "qwen2.5-vl-dart", "qwen3-vl"):
        art, ckpt = exported[label]
        model = transformers.AutoModelForImageTextToText.from_pretrained(ckpt)
        config = json.loads((__import__("pathlib").Path(ckpt) / "config.json").read_text())
        hf = _hf_counts(model, config)
        graphs = read_manifest(art).architecture.graphs
        counted = {g: graphs[g].parameters for g in ("vision", "embed", "decoder")}
        assert counted == hf, label
        formulas = from_directory(__import__("pathlib").Path(ckpt)).architecture.graphs
        assert {g: formulas[g].parameters for g in counted} == hf, label
        if "prefill" in graphs:  # the in-LLM prefill graph: a second copy of the decoder's weights
            assert graphs["prefill"].parameters >= graphs["decoder"].parameters


def test_old_manifests_without_the_record_still_plan(exported, tmp_path, capsys):
    src = exported["llava"][0]
    old = tmp_path / "old"
    shutil.copytree(src, old)
    data = json.loads((old / "tokedge.json").read_text())
    del data["architecture"]
    (old / "tokedge.json").write_text(json.dumps(data))
    assert main(["memory", str(old), "--profile", "rtx-4090", "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["counted"] == "model-info-formulas" and any("predates" in n for n in plan["notes"])
    # a hostile record is refused at load, one line naming the key
    data = json.loads((src / "tokedge.json").read_text())
    data["architecture"]["graphs"]["decoder"]["parameters"] = -1
    (old / "tokedge.json").write_text(json.dumps(data))
    assert main(["memory", str(old), "--profile", "rtx-4090"]) == 1
    assert "architecture.graphs.decoder.parameters" in capsys.readouterr().err


# --- the vision graph's attention -------------------------------------------------------------------------

MEASURE = r"""
import json, sys
import numpy as np, onnxruntime as ort
from PIL import Image
from tokedge.artifact import open_artifact
from tokedge.layouts import layout_of, prompt_inputs
va = open_artifact(sys.argv[1])
side = int(sys.argv[2])
image = Image.fromarray((np.random.default_rng(0).random((side, side, 3)) * 255).astype(np.uint8))
(inputs,) = prompt_inputs(va.manifest, [image])
model, _ = va.graph_bytes("vision")
so = ort.SessionOptions()
so.intra_op_num_threads, so.enable_cpu_mem_arena = 1, False
sess = ort.InferenceSession(model, so, providers=["CPUExecutionProvider"])
names = [i.name for i in sess.get_inputs()]
feed = {k: v for k, v in layout_of(va.manifest).feed(inputs, names).items() if k in names}
def hwm():  # this process image's peak RSS (ru_maxrss would carry the forking parent's across exec)
    line = next(l for l in open("/proc/self/status") if l.startswith("VmHWM:"))
    return int(line.split()[1]) * 1024
before = hwm()
sess.run(None, feed)
after = hwm()
print(json.dumps({"patches": int(feed["pixel_values"].shape[0]), "peak": after - before, "before": before}))
"""


@pytest.mark.parametrize("label,side", [("qwen2.5-vl-dart", 896), ("qwen3-vl", 1024)])
def test_vision_working_set_and_patch_limit_against_onnxruntime(exported, label, side):
    """One vision-graph run on a 4096-patch image under ONNX Runtime (CPU, fp32, no arena): the
    peak RSS growth it measures is the working set the plan predicts (Qwen2.5-VL: the masked scores
    beside the scores and the window mask; Qwen3-VL: one score buffer), and `vision_patch_limit`
    for that many bytes gives back the image's patch count."""
    art = exported[label][0]
    proc = subprocess.run([sys.executable, "-c", MEASURE, str(art), str(side)], capture_output=True, text=True,
                          timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"}, check=False)
    assert proc.returncode == 0, proc.stderr
    measured = json.loads(proc.stdout.strip().splitlines()[-1])
    manifest = read_manifest(art)
    v, lay = manifest.architecture.vision, manifest.layout
    pixel_row = 3 * lay.temporal_patch_size * lay.patch_size**2
    n = measured["patches"]
    assert n == 4096
    # the graph's own working set (the feed, n x pixel_row float32, was allocated before the measurement)
    predicted = vision_working_set(v, n, 4.0)
    assert 0.9 <= measured["peak"] / predicted <= 1.1, (measured, predicted)
    limit = vision_patch_limit(manifest, measured["peak"] + n * pixel_row * 4, value_bytes=4.0)
    assert abs(limit - n) <= 0.05 * n and limit % 4 == 0


def test_patch_limit_by_hand_and_none_for_fixed_views(exported):
    manifest = read_manifest(exported["qwen2.5-vl-dart"][0])
    # by hand for the tiny Qwen2.5-VL (2 heads, 32 wide, 64-wide SwiGLU, 14 px patches, 2 frames):
    # per N x N position 2 score buffers x 2 heads x 4 B + 5 B of mask = 21 B; per patch
    # (3 x 32 + 2 x 64) x 4 B of block buffers + 3 x 2 x 14 x 14 x 4 B of input
    n = 1000
    budget = 21 * n * n + ((3 * 32 + 2 * 64) * 4 + 3 * 2 * 14 * 14 * 4) * n
    assert vision_patch_limit(manifest, budget, value_bytes=4.0) == n
    assert vision_patch_limit(manifest, budget - 1, value_bytes=4.0) == n - 4  # whole merged tokens only
    assert vision_patch_limit(read_manifest(exported["llava"][0]), 1e12) is None


def test_a_qwen_artifact_whose_vision_attention_cannot_fit_says_so(exported, capsys):
    art = exported["qwen2.5-vl-dart"][0]
    assert main(["memory", str(art), "--profile", "jetson-orin-nano-8gb"]) == EXIT_DOES_NOT_FIT
    out = capsys.readouterr().out
    assert "does NOT fit (run)" in out and "vision graph's attention cannot fit at max_pixels" in out
    assert "--max-pixels" in out
    assert main(["memory", str(art), "--profile", "jetson-orin-nano-8gb", "--json"]) == EXIT_DOES_NOT_FIT
    plan = json.loads(capsys.readouterr().out)
    assert not plan["run_fits"] and plan["vision_activation_bytes"] > plan["usable_bytes"]
    assert plan["weight_bytes"]["prefill"] > 0  # dart: the prefill graph is planned too


# --- named geometries: plans against hand computations ----------------------------------------------------


def test_qwen2_5_vl_7b_int4_dart_plan_counts_the_prefill_graph(capsys):
    nano = load_profile("jetson-orin-nano-8gb")
    argv = ["memory", "qwen2.5-vl-7b", "--quantize", "int4", "--method", "dart", "--keep", "0.5",
            "--profile", nano.name]
    assert main(argv) == EXIT_DOES_NOT_FIT
    out = capsys.readouterr().out
    assert "prefill" in out.splitlines()[0] and "does NOT fit" in out
    assert main(argv + ["--json"]) == EXIT_DOES_NOT_FIT
    plan = json.loads(capsys.readouterr().out)
    w = plan["weight_bytes"]
    # by hand from the published config: 28 layers of q/o 3584x3584, k/v 3584x512, three 3584x18944
    # MLP matrices at 4 bits + an fp16 scale per 128; biases (3584 + 2 x 512), two norms, the final
    # norm and the 152064 x 3584 lm_head in fp16
    matrices = 28 * (2 * 3584 * 3584 + 2 * 3584 * 512 + 3 * 3584 * 18944)
    rest = 28 * (3584 + 2 * 512 + 2 * 3584) + 3584 + 152064 * 3584
    assert w["decoder"] == w["prefill"] == int(rest * 2 + matrices / 2 + -(-matrices // 128) * 2)
    assert set(w) == {"vision", "embed", "decoder", "prefill"}
    # KV at the profile's sequence limit: 2 x 28 layers x 4 kv heads x 128 x (3072 + 256) x 2 B
    assert plan["kv_cache_bytes"] == 2 * 28 * 4 * 128 * (3072 + 256) * 2
    assert plan["prompt_tokens"] == 3072 and plan["new_tokens"] == 256


def test_fits_and_does_not_fit_examples(capsys):
    assert main(["memory", "llava-1.5-7b", "--profile", "jetson-orin-nano-8gb"]) == EXIT_DOES_NOT_FIT
    assert "does NOT fit" in capsys.readouterr().out
    assert main(["memory", "qwen3-vl-2b", "--quantize", "int4", "--max-pixels", "1003520", "--profile",
                 "jetson-agx-orin-64gb", "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["fits"] and plan["visual_tokens"] == 1003520 // 32**2
    # fp16 LLaVA-1.5-7B: the decoder alone is ~6.6B parameters at 2 bytes
    assert main(["memory", "llava-1.5-7b", "--profile", "rtx-4090", "--json"]) in (0, EXIT_DOES_NOT_FIT)
    plan = json.loads(capsys.readouterr().out)
    assert 13.0e9 < plan["weight_bytes"]["decoder"] < 13.5e9
    assert main(["memory", "llava-1.5-7b", "--profile", "rtx-4090", "--keep", "0.5"]) == 2
    assert "--keep applies to dynamic-resolution models" in capsys.readouterr().err


def test_memory_plan_of_a_tiled_artifact_holds_its_largest_image(exported, capsys):
    """LLaVA-NeXT: the largest image the layout allows (base view + the 672x672 pinpoint's 48 x 48
    map + 48 newlines) runs 5 partitions through the tower; the KV cache holds the profile's limit."""
    art = exported["llava-next"][0]
    nx = load_profile("jetson-orin-nx-16gb")
    assert main(["memory", str(art), "--profile", nx.name, "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    m = load_artifact(art).model
    assert plan["visual_tokens"] == 576 + 48 * 49
    tokens = min(nx.max_sequence, m.max_position_embeddings)
    assert plan["kv_cache_bytes"] == 2 * m.num_layers * m.num_key_value_heads * m.head_dim * tokens * nx.max_batch * 2
    v = read_manifest(art).architecture.vision
    assert plan["vision_activation_bytes"] == 5 * vision_working_set(v, 577, 2.0) * nx.max_batch
    assert any("largest image (2928 visual tokens, 5 partitions)" in n for n in plan["notes"])


# --- where the plan shows up -----------------------------------------------------------------------------


def test_build_dry_run_and_export_warn_when_the_device_cannot_hold_it(artifacts, tiny_llava_dir, tmp_path, capsys):
    art = artifacts("cls-attn", 64)
    assert main(["build", str(art), "--profile", "jetson-orin-nano-8gb", "--dry-run", "--json"]) == 0
    memory = json.loads(capsys.readouterr().out)["memory"]
    assert memory["fits"] and memory["weight_bytes"]["decoder"] > 0 and memory["kv_cache_bytes"] > 0
    small = tmp_path / "tiny-device.toml"
    text = (load_profile("jetson-orin-nano-8gb").__dict__)
    small.write_text("\n".join(f"{k} = {json.dumps(v)}" for k, v in {**text, "name": "tiny-device",
                                                                       "memory_gb": 0.001}.items()) + "\n")
    assert main(["build", str(art), "--profile", str(small), "--dry-run"]) == 0
    err = capsys.readouterr().err
    assert "warning" in err and "does NOT fit" in err
    plan = plan_for_device(load_artifact(art), load_profile(str(small)))
    assert not plan.fits
    out = tmp_path / "exported"
    assert main(["export", str(tiny_llava_dir), "--method", "cls-attn", "--budget", "64", "--out", str(out),
                 "--profile", str(small), "--no-validate", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert any("does NOT fit" in w for w in summary["warnings"])
    assert main(["export", str(tiny_llava_dir), "--out", str(tmp_path / "x"), "--profile", "no-such-device"]) == 2
    assert "unknown device profile" in capsys.readouterr().err


def test_predicted_artifact_bytes_and_profile_memory_section(artifacts, tmp_path, test_images, capsys):
    art = artifacts("cls-attn", 64)
    check = check_artifact_size(art, load_artifact(art))
    assert 0.98 <= check.ratio <= 1.02
    image = tmp_path / "img.png"
    test_images[0].save(image)
    assert main(["profile", str(art), "--image", str(image), "--runs", "1", "--warmup", "0", "--max-new-tokens", "2",
                 "--threads", "1", "--predict", "jetson-orin-nano-8gb", "--out", str(tmp_path / "r"), "--json"]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["threads"] == 1
    mem = report["memory"]
    assert 0.98 <= mem["artifact_bytes"]["ratio"] <= 1.02
    assert mem["device"]["fits"] and mem["cpu"]["peak_rss_bytes"] > mem["cpu"]["predicted_bytes"] > 0
    r = report["results"][0]
    for stage in ("vision", "prefill", "decode"):
        assert r["share_of_gemm_peak"][stage] == pytest.approx(
            r["achieved_gflops_per_s"][stage] / report["gemm_peak_gflops_per_s"], abs=2e-3)
    md = (tmp_path / "r" / "report.md").read_text()
    assert "GEMM peak" in md and "predicted by the memory plan" in md
    assert target_of(load_artifact(art)).architecture.counted == "onnx-initializers"


def test_an_artifact_quantized_after_export(exported, tmp_path, capsys):
    """`tokedge quantize` keeps the float export's record: the plan estimates the quantized counts
    from the layer sizes (and says so); `recount_graphs` (for commands that rewrite graphs) makes
    the record exact again, which the files on disk confirm."""
    from tokedge.artifact import write_manifest
    from tokedge.export.architecture import recount_graphs

    out = tmp_path / "int4"
    assert main(["quantize", str(exported["llava"][0]), "--out", str(out), "--scheme", "int4", "--quant-form", "qdq",
                 "--group-size", "32"]) == 0
    capsys.readouterr()
    manifest = read_manifest(out)
    estimated = target_of(manifest)
    assert any("predates this artifact's quantization" in n for n in estimated.notes)
    recounted = recount_graphs(out, manifest)
    exact = recounted.architecture.graphs["decoder"]
    # the estimate is the decoder's MatMul weights: exact when every one was quantized (lm_head stays float)
    assert estimated.graphs["decoder"].quantized == exact.quantized > 0
    write_manifest(out, recounted)
    assert main(["memory", str(out), "--profile", "rtx-4090", "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert abs(sum(plan["artifact_bytes"].values()) / sum(plan["artifact_bytes_measured"].values()) - 1) < 0.02


def test_onevision_record_counts_both_tower_graphs(ov_artifacts, tiny_llava_onevision_dir, capsys):
    """LLaVA-OneVision: the image graph and the per-frame video graph each hold the tower and the
    projector (counted twice: TensorRT engines do not share weights); both equal transformers'
    modules, and the plan's bytes agree with the files within 2%."""
    import transformers

    art = ov_artifacts("none")[0]
    graphs = read_manifest(art).architecture.graphs
    model = transformers.AutoModelForImageTextToText.from_pretrained(tiny_llava_onevision_dir)
    config = json.loads((tiny_llava_onevision_dir / "config.json").read_text())
    hf = _hf_counts(model, config)
    assert {g: graphs[g].parameters for g in ("vision", "embed", "decoder")} == hf
    video = read_manifest(art).video.graph
    assert graphs[video].parameters == hf["vision"]  # tower, projector and the newline row it outputs
    assert main(["memory", str(art), "--profile", "jetson-agx-orin-64gb", "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert abs(sum(plan["artifact_bytes"].values()) / sum(plan["artifact_bytes_measured"].values()) - 1) < 0.02
    assert plan["visual_tokens"] == 8829 and video in plan["weight_bytes"]


def _bytes(text: str) -> float:
    number, unit = text.split()
    return float(number) * {"B": 1, "kB": 1e3, "MB": 1e6, "GB": 1e9}[unit]


def test_summary_line_reads_in_fitting_units(artifacts, capsys):
    """Issue 28 item 14: a tiny artifact printed "weights 0.00 GB (vision 0.00, ...)" and the KV cache
    as "(2047+1 tokens x1)". Every size now carries a unit that shows it (parsed back and compared
    with --json's bytes to the shown precision), and the KV cache says what it holds."""
    import re

    art = str(artifacts("cls-attn", 64))
    assert main(["memory", art, "--profile", "jetson-orin-nano-8gb", "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert main(["memory", art, "--profile", "jetson-orin-nano-8gb"]) == 0
    line = capsys.readouterr().out.splitlines()[0]
    assert "0.00 GB" not in line and " GB (" not in line.split("+")[0]  # MB-sized weights are not shown in GB
    size = r"(\d+(?:\.\d+)? (?:B|kB|MB|GB))"
    weights = re.search(rf"weights {size} \(([^)]*)\)", line)
    shown = {graph: _bytes(value) for graph, value in re.findall(rf"(\w+) {size}", weights.group(2))}
    assert set(shown) == set(plan["weight_bytes"])
    for graph, value in plan["weight_bytes"].items():
        assert shown[graph] == pytest.approx(value, rel=0.06), graph
    assert _bytes(weights.group(1)) == pytest.approx(sum(plan["weight_bytes"].values()), rel=0.06)
    kv = re.search(rf"KV cache {size} \((\d+) sequences? of (\d+) prompt \+ (\d+) new tokens\)", line)
    assert _bytes(kv.group(1)) == pytest.approx(plan["kv_cache_bytes"], rel=0.06)
    assert [int(kv.group(i)) for i in (2, 3, 4)] == [plan["batch"], plan["prompt_tokens"], plan["new_tokens"]]
