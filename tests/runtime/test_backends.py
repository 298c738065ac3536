"""`--backend ort-cuda | ort-tensorrt`: ONNX Runtime's GPU execution providers. This machine has
no GPU and a CPU-only onnxruntime, so what is tested here is what can be: the refusal in one line
when the provider is absent (every command that takes --backend), and, with a provider list as
onnxruntime-gpu reports it, the session's providers and their options as ONNX Runtime documents
them (CUDA EP: device_id, arena_extend_strategy, cudnn_conv_algo_search, do_copy_in_default_stream;
TensorRT EP: device_id, trt_fp16_enable, trt_engine_cache_enable/_path, trt_timing_cache_enable/_path,
trt_max_workspace_size, trt_profile_min/opt/max_shapes "name:AxB,..."). Creating a GPU session
is type-checked but not run here."""

from __future__ import annotations

import json

import pytest

from tokedge.artifact import load_artifact
from tokedge.build.plan import plan_shapes
from tokedge.cli import main
from tokedge.profiles import load_profile
from tokedge.runtime.backends import Backend
from tokedge.runtime.ort_backend import GpuOptions, OrtOptions, session_providers

GPU = ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]


def _parse(text: str) -> list[tuple[str, tuple[int, ...]]]:
    out = []
    for entry in text.split(","):
        name, dims = entry.rsplit(":", 1)
        out.append((name, tuple(int(d) for d in dims.split("x"))))
    return out


def test_cpu_backend_is_the_cpu_provider_only():
    assert session_providers(OrtOptions(), "vision", GPU) == [("CPUExecutionProvider", {})]


def test_cuda_provider_options():
    opts = OrtOptions(backend="ort-cuda", gpu=GpuOptions(device_id=1))
    assert session_providers(opts, "decoder", GPU) == [
        ("CUDAExecutionProvider", {"device_id": 1, "arena_extend_strategy": "kSameAsRequested",
                                   "cudnn_conv_algo_search": "HEURISTIC", "do_copy_in_default_stream": True}),
        ("CPUExecutionProvider", {}),
    ]


@pytest.mark.parametrize("graphs", [("vision", "decoder")])
def test_tensorrt_provider_options_carry_the_build_plan(artifacts, tmp_path, graphs):
    art = artifacts("cls-attn", 64)
    manifest = load_artifact(art)
    backend = Backend(name="ort-tensorrt", device_id=0, device_profile="jetson-orin-nano-8gb",
                      cache_dir=tmp_path / "cache", fp16=False)
    options = backend.ort_options(manifest, art)
    plan, _ = plan_shapes(manifest, load_profile("jetson-orin-nano-8gb"))
    for graph in graphs:
        chosen = session_providers(options, graph, GPU)
        assert [p for p, _ in chosen] == GPU
        trt = chosen[0][1]
        assert trt["device_id"] == 0 and trt["trt_fp16_enable"] is False
        assert trt["trt_engine_cache_enable"] is True and trt["trt_timing_cache_enable"] is True
        assert trt["trt_engine_cache_path"] == str(tmp_path / "cache" / graph) == trt["trt_timing_cache_path"]
        assert trt["trt_max_workspace_size"] == 2048 << 20  # the profile's workspace_mb
        # one entry per dynamic input per optimisation profile, in the plan's order, min/opt/max as planned
        for key, pick in (("trt_profile_min_shapes", "min"), ("trt_profile_opt_shapes", "opt"),
                          ("trt_profile_max_shapes", "max")):
            expected = [(name, getattr(r, pick)) for opt in plan[graph] for name, r in opt.shapes.items() if r.min]
            assert _parse(trt[key]) == expected
        assert len(_parse(trt["trt_profile_min_shapes"])) >= len(plan[graph])
    decoder = session_providers(options, "decoder", GPU)[0][1]
    names = [n for n, _ in _parse(decoder["trt_profile_min_shapes"])]
    # the decoder of an artifact without a prefill graph gets two profiles (prefill, decode): each input twice
    assert len(plan["decoder"]) == 2 and names.count("inputs_embeds") == 2


def test_tensorrt_provider_without_cuda_falls_back_to_cpu_only():
    opts = OrtOptions(backend="ort-tensorrt")
    chosen = session_providers(opts, "vision", ["TensorrtExecutionProvider", "CPUExecutionProvider"])
    assert [p for p, _ in chosen] == ["TensorrtExecutionProvider", "CPUExecutionProvider"]
    assert "trt_profile_min_shapes" not in chosen[0][1] and chosen[0][1]["trt_engine_cache_enable"] is False


def test_ort_tensorrt_needs_a_device_profile(artifacts):
    from tokedge.errors import UsageError
    from tokedge.runtime.backends import this_device_profile

    assert this_device_profile() is None  # this CPU-only machine matches none (doctor's own tests cover devices)
    with pytest.raises(UsageError, match="--device-profile"):
        Backend(name="ort-tensorrt").ort_options(load_artifact(artifacts("cls-attn", 64)), artifacts("cls-attn", 64))


@pytest.mark.parametrize("backend", ["ort-cuda", "ort-tensorrt"])
def test_gpu_backends_refuse_in_one_line_on_this_cpu_only_machine(artifacts, tmp_path, capsys, backend):
    import onnxruntime

    if {"CUDAExecutionProvider", "TensorrtExecutionProvider"} & set(onnxruntime.get_available_providers()):
        pytest.skip("this onnxruntime has GPU providers")
    art = str(artifacts("cls-attn", 64))
    image = tmp_path / "x.png"
    from PIL import Image

    Image.new("RGB", (64, 48), "red").save(image)
    commands = [["run", art, "--image", str(image), "--prompt", "hi", "--backend", backend],
                ["verify", art, "--backend", backend],
                ["profile", art, "--image", str(image), "--backend", backend, "--out", str(tmp_path / "p")],
                ["serve", art, "--backend", backend, "--port", "0"]]
    for argv in commands:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and f"--backend {backend} needs ONNX Runtime's" in err[0] and "onnxruntime-gpu" in err[0]


def test_backend_flags_belong_to_their_backend(artifacts, tmp_path, capsys):
    art = str(artifacts("cls-attn", 64))
    assert main(["verify", art, "--device-profile", "jetson-orin-nano-8gb"]) == 2
    assert "--device-profile and --trt-cache are for --backend ort-tensorrt" in capsys.readouterr().err


def test_profile_report_records_the_backend_and_providers(artifacts, tmp_path, test_images, capsys):
    image = tmp_path / "x.png"
    test_images[0].save(image)
    out = tmp_path / "p"
    assert main(["profile", str(artifacts("cls-attn", 64)), "--image", str(image), "--runs", "1", "--warmup", "0",
                 "--max-new-tokens", "2", "--out", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["runtime"]["backend"] == "onnxruntime"
    assert set(report["runtime"]["providers"]) >= {"vision", "decoder"}
    assert all(p == ["CPUExecutionProvider"] for p in report["runtime"]["providers"].values())
