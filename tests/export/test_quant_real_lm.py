"""Quantization on a REAL language model (tests/real_lm.py: SmolLM2-135M-Instruct inside a
LLaVA-1.5-layout checkpoint with a random CLIP tower, at 64 `cls-attn` visual tokens).

Independent references: transformers' fp32 checkpoint (the export reference the image prompts are
judged against) and the fp32 artifact (validated against transformers at export), whose greedy
answers and teacher-forced distributions over the built-in text the quantized artifacts are
compared with. One fp32 export and one default int4 export per session; the int8 (decoder and
vision) and qdq artifacts are made from the fp32 one with `tokedge quantize`; group 32 vs 128 is
measured on decoder graphs quantized in memory. The gate's thresholds and the numbers
these tests meet are in docs/quantization.md."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest

from tokedge.artifact import open_artifact, read_manifest
from tokedge.cli import main

# three of the ten factual prompts of bench/QUANT.md ("Greedy answers"), all answered right by fp32
FACTS = ("What is the capital of France?", "What is the capital of Japan?", "What is the capital of Italy?")
EXPORT = ["--method", "cls-attn", "--budget", "64"]


@pytest.fixture(scope="module")
def arts(real_llava_dir, tmp_path_factory):
    """name -> artifact path: `fp32`, `int4` (default `export --quantize int4`), and on request
    `tokedge quantize` products of the fp32 artifact."""
    root = tmp_path_factory.mktemp("real-lm")
    made = {"fp32": root / "fp32", "int4": root / "int4"}
    assert main(["export", str(real_llava_dir), *EXPORT, "--out", str(made["fp32"])]) == 0
    assert main(["export", str(real_llava_dir), *EXPORT, "--quantize", "int4", "--out", str(made["int4"])]) == 0
    return made


def _quantized(arts, name: str, *args: str):
    if name not in arts:
        out = arts["fp32"].parent / name
        assert main(["quantize", str(arts["fp32"]), "--out", str(out), *args]) == 0, name
        arts[name] = out
    return arts[name]


def first_sentence(text: str) -> str:
    match = re.search(r"[.!?](\s|$)", text)
    return (text[: match.end()] if match else text).strip()


def _answers(path, image) -> list[str]:
    from tokedge.runtime.pipeline import Pipeline

    with Pipeline.load(path) as pipe:
        return [pipe.generate(image, q, max_new_tokens=16).texts[0] for q in FACTS]


def test_default_int4_export_passes_the_gate_and_records_the_measure(arts):
    m = read_manifest(arts["int4"])
    q = m.quantization
    assert m.weights is None  # a trained language model: the gate applies
    assert (q.scheme, q.form, q.symmetric) == ("int4", "matmulnbits", False)
    tol = m.reference["tolerance"]
    assert {"kl_mean", "text_kl_mean", "text_kl_p99", "text_top1"} <= set(tol) and "gated" not in tol
    parity = m.reference["parity_at_export"]
    assert parity["ok"] and parity["text"]["tokens"] == q.fidelity["text_tokens"] == 512
    assert q.fidelity["text_kl_mean"] <= tol["text_kl_mean"] and q.fidelity["text_top1"] >= tol["text_top1"]
    # the measure saw a real change (not a no-op) and perplexity moved the way quantization moves it
    assert q.fidelity["text_kl_mean"] > 1e-3 and q.fidelity["ppl"] > q.fidelity["ppl_fp32"]


INT8 = ("--scheme", "int8", "--quant-graphs", "decoder,vision")  # int8 vision: judged on the same measure


def test_int4_and_int8_answer_as_fp32(arts, test_images):
    int8 = _quantized(arts, "int8", *INT8)
    image = test_images[1]
    expected = [first_sentence(a) for a in _answers(arts["fp32"], image)]
    assert expected == ["The capital of France is Paris.", "The capital of Japan is Tokyo.",
                        "The capital of Italy is Rome."]  # the real LM answers: the fixture is sane
    assert [first_sentence(a) for a in _answers(int8, image)] == expected
    # int4 costs this 135M model 0.27 nats/token: measured, it keeps the first of these answers and
    # garbles the other two ("Capital of Japan is Japan.", "... is Rome, Rome."; bench/QUANT.md)
    assert first_sentence(_answers(arts["int4"], image)[0]) == expected[0]


def test_int8_with_vision_passes_and_verify_repeats_the_measure(arts, capsys):
    int8 = _quantized(arts, "int8", *INT8)
    m = read_manifest(int8)
    fid = m.quantization.fidelity
    assert m.quantization.graphs == ("decoder", "vision") and m.reference["parity_at_export"]["ok"]
    assert fid["image_kl_mean"] <= m.reference["tolerance"]["kl_mean"]
    # measured 96.4% over 1024 tokens (bench/QUANT.md): below the 98% target; llama.cpp's q8_0
    # of the same GGUF measures 94.7% on the same tokens
    assert fid["text_top1"] >= 0.95 and fid["text_kl_mean"] < 0.01
    capsys.readouterr()
    assert main(["verify", str(int8), "--json"]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    # verify measured again, on ONNX Runtime + numpy, against the fp32 side stored at quantization
    assert report["text"]["tokens"] == 512
    assert abs(report["text"]["kl_mean"] - fid["text_kl_mean"]) < 1e-4


def test_top_k_kl_is_close_to_the_full_vocabulary_kl(arts):
    """The stored fp32 side keeps each position's top-K tokens; its KL (a lower bound) against the
    full-vocabulary KL computed from both artifacts' complete distributions."""
    from tokedge import fidelity
    from tokedge.runtime.graphs import ArtifactGraphs

    plan = fidelity.TextPlan(rows=2, steps=12)
    full = []
    outs = {}
    for name in ("fp32", "int4"):
        v = open_artifact(arts[name])
        ids = fidelity.text_ids(v.read("tokenizer.json").decode(), plan)
        with ArtifactGraphs(arts[name], v.manifest, verified=v) as graphs:
            outs[name] = np.stack(list(fidelity._positions(graphs, ids, plan.context)))
            if name == "fp32":
                ref = fidelity.record_reference(graphs, ids, plan.context)
    p, q = outs["fp32"], outs["int4"]
    full = (np.exp(p) * (p - q)).sum(-1).mean()
    top_k = np.mean([fidelity.kl_top_k(ref.top_logp[:, s], ref.top_ids[:, s], q[s]) for s in range(plan.steps)])
    assert top_k <= full + 1e-6 and top_k >= 0.8 * full  # measured: 87% of the full KL at int4


def test_group_32_is_never_worse_than_128(arts):
    """The decoder quantized in memory at group 32 and 128 (the default scheme otherwise), measured
    over the same text against the same fp32 side: the smaller group never measures worse. 384 tokens:
    over 192 the p99 is the second-worst token, and on an Intel Xeon (AMX int8 kernels) it flipped
    (g32 1.052 vs g128 0.967, means 0.262 vs 0.274); over 384 and 1,024 tokens g32 wins both."""
    import onnx

    from tokedge import fidelity
    from tokedge.export.quantize import QuantConfig, quantize_model
    from tokedge.runtime.graphs import ArtifactGraphs
    from tokedge.runtime.ort_backend import OrtRunner

    v = open_artifact(arts["fp32"])
    m = v.manifest
    plan = fidelity.TextPlan(rows=8, steps=48)
    ids = fidelity.text_ids(v.read("tokenizer.json").decode(), plan)
    with ArtifactGraphs(arts["fp32"], m, verified=v) as graphs:
        ref = fidelity.record_reference(graphs, ids, plan.context)
    got = {}
    for group in (32, 128):
        model = onnx.load(str(arts["fp32"] / m.graphs["decoder"].file))
        model, _ = quantize_model(model, QuantConfig(group_size=group), m.model.vocab_size)
        runners = {name: OrtRunner(arts["fp32"] / spec.file, name=name) for name, spec in m.graphs.items()}
        runners["decoder"] = OrtRunner(model.SerializeToString(), name="decoder")
        with ArtifactGraphs(arts["fp32"], m, runners=runners) as graphs:
            got[group] = fidelity.measure(graphs, ref)
    assert got[32].kl_mean <= got[128].kl_mean and got[32].kl_p99 <= got[128].kl_p99, (got[32].line(), got[128].line())


def test_qdq_for_tensorrt_passes_its_gate_and_check(arts):
    qdq = _quantized(arts, "qdq", "--quant-form", "qdq")
    m = read_manifest(qdq)
    assert m.quantization.symmetric and m.reference["parity_at_export"]["ok"]
    assert main(["check", str(qdq), "--target", "trt-10.3"]) == 0

