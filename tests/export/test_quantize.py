"""Weight-only quantization: the dequantized weights are within half a quantization step of the
fp32 weights (DequantizeLinear evaluated by onnx's pure-python reference, not ONNX Runtime); the
quantized graphs compute what transformers computes with those dequantized weights swapped in;
`tokedge check` takes the symmetric QDQ form for TensorRT and names a planted asymmetric zero
point and the ONNX Runtime-only MatMulNBits; manifests record the scheme."""

from __future__ import annotations

import json
import shutil

import numpy as np
import onnx
import pytest
from onnx import numpy_helper
from onnx.reference import ReferenceEvaluator

from tokedge.artifact import MANIFEST_NAME, load_artifact, read_manifest, sha256_file
from tokedge.cli import main
from tokedge.export.quantize import QuantConfig


@pytest.fixture(scope="module")
def fp32_art(artifacts):
    return artifacts("none")


@pytest.fixture(scope="module")
def quantized(fp32_art, tmp_path_factory):
    """name -> quantized copy of the fp32 artifact (via `tokedge quantize`)."""
    root = tmp_path_factory.mktemp("quantized")
    out = {}
    for name, args in {
        "int4-qdq": ["--scheme", "int4", "--quant-form", "qdq", "--group-size", "32"],
        "int8-qdq": ["--scheme", "int8", "--quant-form", "qdq", "--group-size", "32"],
        "int4-nbits-fp": ["--scheme", "int4", "--group-size", "32", "--accuracy-level", "0", "--symmetric",
                          "--float-lm-head"],
        "int4-nbits": ["--scheme", "int4", "--group-size", "32", "--quantize-lm-head"],
    }.items():
        assert main(["quantize", str(fp32_art), "--out", str(root / name), *args]) == 0, name
        out[name] = root / name
    return out


def _initializers(path) -> dict[str, np.ndarray]:
    model = onnx.load(str(path))
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


def _dequantized(path) -> dict[str, tuple[np.ndarray, np.ndarray, int]]:
    """Original weight name -> (dequantized [K, N], scales, block size), every DequantizeLinear
    run by onnx.reference (independent of ONNX Runtime)."""
    model = onnx.load(str(path))
    consts = {t.name: t for t in model.graph.initializer}
    out = {}
    for node in model.graph.node:
        if node.op_type != "DequantizeLinear":
            continue
        assert len(node.input) == 2, "symmetric: no zero point input"
        block = next(a.i for a in node.attribute if a.name == "block_size")
        sub = onnx.helper.make_model(
            onnx.helper.make_graph([onnx.helper.make_node("DequantizeLinear", list(node.input), ["y"], axis=0,
                                                          block_size=block)], "dq", [],
                                   [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None)],
                                   initializer=[consts[n] for n in node.input]),
            opset_imports=[onnx.helper.make_opsetid("", 21)])
        (deq,) = ReferenceEvaluator(sub).run(None, {})
        original = node.input[0].rsplit("_DQ_Q4", 1)[0].rsplit("_Q8", 1)[0]
        out[original] = (deq, numpy_helper.to_array(consts[node.input[1]]), block)
    return out


@pytest.mark.parametrize("name,qmin,qmax", [("int4-qdq", -8, 7), ("int8-qdq", -127, 127)])
def test_dequantized_weights_within_half_a_step(fp32_art, quantized, name, qmin, qmax):
    fp32 = _initializers(fp32_art / "decoder.onnx")
    deq = _dequantized(quantized[name] / "decoder.onnx")
    manifest = load_artifact(quantized[name])
    vocab = manifest.model.vocab_size
    assert len(deq) == manifest.quantization.quantized["decoder"] > 0
    for original, (w_hat, scales, block) in deq.items():
        w = fp32[original]
        assert w.shape == w_hat.shape and w.shape[-1] != vocab  # lm_head stays float by default
        assert block == 32 and scales.shape == (-(-w.shape[0] // block), w.shape[1])
        scale = np.repeat(scales, block, axis=0)[: w.shape[0]]  # int4 scales carry the sign of the block's extreme
        ideal = w / scale
        assert np.all(np.abs(ideal) <= max(-qmin, qmax) + 1e-4)  # symmetric: the scale covers the block's largest value
        err = np.abs(w - w_hat)
        representable = (ideal >= qmin - 0.5) & (ideal <= qmax + 0.5)
        assert np.all(err[representable] <= np.abs(scale[representable]) / 2 + 1e-6)  # round to nearest
        assert np.all(err <= np.abs(scale) + 1e-6)  # the one-sided int4 end clips by at most one step


def _hf_with_weights(checkpoint, fp32_decoder, dequantized):
    """transformers' model with each decoder Linear weight replaced by its dequantized values,
    matched to the fp32 graph's initializers by value: a whole initializer, or a block of columns
    of one (the export's fuse-matmuls pass concatenates q/k/v and gate/up along N)."""
    import torch
    from transformers import LlavaForConditionalGeneration

    model = LlavaForConditionalGeneration.from_pretrained(checkpoint, dtype=torch.float32).eval()
    found = set()
    for module in model.model.language_model.modules():
        if not isinstance(module, torch.nn.Linear):
            continue
        wt = module.weight.detach().numpy().T
        for name, a in fp32_decoder.items():
            if name not in dequantized or a.ndim != 2 or a.shape[0] != wt.shape[0]:
                continue
            starts = [c for c in np.flatnonzero((a == wt[:, :1]).all(axis=0)) if c + wt.shape[1] <= a.shape[1]]
            at = next((c for c in starts if np.array_equal(a[:, c:c + wt.shape[1]], wt)), None)
            if at is not None:
                block = dequantized[name][0][:, at:at + wt.shape[1]]
                module.weight.data = torch.from_numpy(np.ascontiguousarray(block.T))
                found.add(name)
                break
    assert found == set(dequantized)
    return model


def _artifact_logits(path, optimization: str = "all") -> tuple[np.ndarray, dict]:
    from tokedge.export.validate import greedy_arrays, load_reference
    from tokedge.runtime.graphs import ArtifactGraphs
    from tokedge.runtime.ort_backend import OrtOptions

    manifest = load_artifact(path)
    pixel_values, cases = load_reference(path / manifest.reference["file"])
    case = cases[0]
    with ArtifactGraphs(path, manifest, options=OrtOptions(optimization=optimization)) as graphs:
        out = greedy_arrays(graphs, pixel_values, case["input_ids"], case["attention_mask"], 0, int(case["budget"]))
    return out["prefill_logits"], {"pixel_values": pixel_values, **case}


def test_quantized_graphs_compute_transformers_with_dequantized_weights(tiny_llava_dir, fp32_art, quantized):
    import torch

    fp32 = _initializers(fp32_art / "decoder.onnx")
    deq = _dequantized(quantized["int4-qdq"] / "decoder.onnx")
    model = _hf_with_weights(tiny_llava_dir, fp32, deq)
    # at "basic", ONNX Runtime keeps DequantizeLinear -> MatMul in float (its full optimisation
    # fuses them into MatMulNBits with int8 activations)
    qdq_logits, case = _artifact_logits(quantized["int4-qdq"], optimization="basic")
    with torch.no_grad():
        expected = model(input_ids=torch.from_numpy(case["input_ids"]),
                         attention_mask=torch.from_numpy(case["attention_mask"]),
                         pixel_values=torch.from_numpy(case["pixel_values"])).logits[:, -1].numpy()
    np.testing.assert_allclose(qdq_logits, expected, atol=1e-4, rtol=0)
    # MatMulNBits (float compute) holds the same int4 weights: same logits
    nbits_logits, _ = _artifact_logits(quantized["int4-nbits-fp"])
    np.testing.assert_allclose(nbits_logits, expected, atol=1e-4, rtol=0)
    # and the quantization moved the logits away from fp32 (the test would notice a no-op)
    assert np.abs(case["prefill_logits"] - expected).max() > 1e-2


def test_manifest_records_scheme_and_verify_passes(fp32_art, quantized, capsys):
    m = read_manifest(quantized["int4-nbits"])
    q = m.quantization
    assert (q.scheme, q.form, q.group_size, q.symmetric, q.lm_head, q.accuracy_level) == ("int4", "matmulnbits", 32,
                                                                                         False, True, 4)
    assert m.reference["tolerance"]["text_kl_mean"] == q.tolerance["text_kl_mean"]
    # random weights (the tiny builder marks them): measured and recorded, never judged
    assert m.weights == "random (built by tokedge.export.presets)" and m.reference["tolerance"]["gated"] is False
    assert m.reference["parity_at_export"]["ok"] and q.fidelity["text_tokens"] == 512
    ops = [n.op_type for n in onnx.load(str(quantized["int4-nbits"] / "decoder.onnx")).graph.node]
    assert "MatMulNBits" in ops
    sizes = q.weight_bytes["decoder"]
    assert sizes["after"] <= 0.35 * sizes["before"]  # lm_head included here
    assert main(["verify", str(quantized["int4-nbits"])]) == 0
    # older manifests (no quantization key) still read, as float artifacts
    data = json.loads((fp32_art / MANIFEST_NAME).read_text())
    data.pop("quantization", None)
    assert read_manifest_from(data).quantization is None


def read_manifest_from(data):
    from tokedge.artifact import Manifest

    return Manifest.from_dict(data)


def test_check_takes_symmetric_qdq_and_refuses_matmulnbits(quantized, capsys):
    for target in ("trt-10.3", "trt-11"):
        assert main(["check", str(quantized["int4-qdq"]), "--target", target]) == 0
        assert main(["check", str(quantized["int8-qdq"]), "--target", target]) == 0
    capsys.readouterr()
    assert main(["check", str(quantized["int4-nbits"]), "--target", "trt-10.3"]) == 1
    err = capsys.readouterr().err
    assert "MatMulNBits" in err and "ONNX Runtime contrib op" in err and "qdq" in err


def test_check_names_planted_asymmetric_zero_point(quantized, tmp_path, capsys):
    art = tmp_path / "art"
    shutil.copytree(quantized["int4-qdq"], art)
    model = onnx.load(str(art / "decoder.onnx"))
    consts = {t.name: t for t in model.graph.initializer}
    node = next(n for n in model.graph.node if n.op_type == "DequantizeLinear")
    scales = numpy_helper.to_array(consts[node.input[1]])
    zp = np.zeros(scales.shape, dtype=np.int8)
    zp.flat[3] = 2
    packed = (zp.reshape(-1).astype(np.uint8) & 0x0F)
    packed = np.pad(packed, (0, packed.size % 2))
    raw = (packed[0::2] | (packed[1::2] << 4)).astype(np.uint8).tobytes()
    model.graph.initializer.append(onnx.helper.make_tensor("planted_zero_point", onnx.TensorProto.INT4,
                                                           list(scales.shape), raw, raw=True))
    node.input.append("planted_zero_point")
    onnx.save(model, str(art / "decoder.onnx"))
    manifest = json.loads((art / MANIFEST_NAME).read_text())
    manifest["files"]["decoder.onnx"] = sha256_file(art / "decoder.onnx")
    (art / MANIFEST_NAME).write_text(json.dumps(manifest))
    assert main(["check", str(art), "--target", "trt-10.3"]) == 1
    err = capsys.readouterr().err
    assert "planted_zero_point" in err and "asymmetric" in err and node.name in err
    assert err.strip().splitlines()[-1].startswith("error:")


def test_export_quantize_flag(tiny_llava_dir, tmp_path, capsys):
    out = tmp_path / "q8"
    assert main(["export", str(tiny_llava_dir), "--method", "cls-attn", "--budget", "64", "--out", str(out),
                 "--quantize", "int8", "--group-size", "32", "--symmetric", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["quantization"]["scheme"] == "int8" and summary["parity"]["ok"]
    case = summary["parity"]["cases"][0]
    assert case["logit_cosine"] >= 0.995 and case["top1_agreement"] >= 0.9 and case["kl_mean"] < 1e-3
    assert summary["quantization"]["fidelity"]["text_kl_mean"] < 1e-2
    manifest = load_artifact(out)
    assert manifest.quantization.graphs == ("decoder",)  # no prefill graph for a pre-LLM method


def test_in_llm_artifact_reads_the_text_through_its_decoder(artifacts, quantized, tmp_path, capsys):
    """fastv's artifact has a prefill graph (it prunes image tokens); the text measure holds no image,
    so it runs through the decoder graph, which is the same network as the `none` artifact's: the same
    scheme must measure the same on both, and verify repeats it from the artifact alone."""
    out = tmp_path / "fastv-int4-qdq"
    assert main(["quantize", str(artifacts("fastv")), "--out", str(out), "--scheme", "int4", "--quant-form", "qdq",
                 "--group-size", "32"]) == 0
    m = read_manifest(out)
    assert "prefill" in m.graphs and set(m.quantization.graphs) == {"decoder", "prefill"}
    fid, same = m.quantization.fidelity, read_manifest(quantized["int4-qdq"]).quantization.fidelity
    assert fid["text_tokens"] == same["text_tokens"] == 512 and m.reference["text"]["rows"] == 8
    for key in ("text_kl_mean", "text_top1", "ppl_fp32", "ppl"):
        assert fid[key] == pytest.approx(same[key], rel=1e-3, abs=1e-5), key
    capsys.readouterr()
    assert main(["verify", str(out), "--json"]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["text"]["kl_mean"] == pytest.approx(fid["text_kl_mean"], abs=1e-6)


@pytest.mark.parametrize("args,needle", [
    (["--scheme", "int3"], "--quantize int3"),
    (["--group-size", "100"], "--group-size 100"),
    (["--quant-graphs", "decoder,lm"], "unknown graph 'lm'"),
    (["--quant-form", "qdq", "--quantize-embeddings"], "--quantize-embeddings"),
    (["--quant-form", "qdq", "--asymmetric"], "symmetric only"),
    (["--quant-algorithm", "gptq"], "--quant-algorithm gptq"),
    (["--quant-algorithm", "hqq", "--scheme", "int8"], "hqq needs int4"),
    (["--int8-matmuls", "up_proj"], "unknown 'up_proj'"),
    (["--int8-matmuls", "down_proj", "--scheme", "int8"], "needs --quantize int4"),
    (["--int8-matmuls", "lm_head", "--quantize-lm-head"], "drop --quantize-lm-head"),
])
def test_quantize_bad_input_is_one_line(fp32_art, tmp_path, capsys, args, needle):
    assert main(["quantize", str(fp32_art), "--out", str(tmp_path / "x"), *args]) == 2
    err = capsys.readouterr().err.strip()
    assert needle in err and len(err.splitlines()) == 1 and "Traceback" not in err


def test_quantizing_twice_is_refused(quantized, tmp_path, capsys):
    assert main(["quantize", str(quantized["int4-qdq"]), "--out", str(tmp_path / "again")]) == 2
    assert "already quantized" in capsys.readouterr().err
    assert not (tmp_path / "again").exists()


def test_quant_config_defaults_int8_lm_head_under_int4_and_float_embeddings():
    cfg = QuantConfig()
    assert (cfg.scheme, cfg.form, cfg.group_size, cfg.lm_head, cfg.embeddings, cfg.accuracy_level) == (
        "int4", "matmulnbits", 32, None, False, 4)
    assert not cfg.is_symmetric and QuantConfig(form="qdq").is_symmetric  # zero points for ONNX Runtime only
    # the lm_head's default, as the manifest records it: int8 under int4 matmulnbits (bench/QUANT.md), else float
    assert (cfg.resolved().lm_head, cfg.resolved().int8) == (False, ("lm_head",))
    for other in (QuantConfig(form="qdq"), QuantConfig(scheme="int8"), QuantConfig(lm_head=False), QuantConfig(lm_head=True)):
        assert other.resolved().int8 == () and other.resolved().lm_head == bool(other.lm_head)
    assert QuantConfig(int8=("down_proj",)).resolved().int8 == ("down_proj", "lm_head")


def test_profile_shows_the_scheme_and_a_cheaper_decode_prediction(fp32_art, quantized, tmp_path, test_images, capsys):
    image = tmp_path / "img.png"
    test_images[1].save(image)
    reports = {}
    for name, art in (("fp32", fp32_art), ("int4", quantized["int4-nbits"])):
        out = tmp_path / name
        assert main(["profile", str(art), "--image", str(image), "--runs", "1", "--warmup", "0", "--max-new-tokens", "2",
                     "--predict", "jetson-orin-nano-8gb", "--out", str(out), "--json"]) == 0
        reports[name] = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    q = reports["int4"]["quantization"]
    assert q["scheme"] == "int4" and reports["fp32"]["quantization"] is None
    md = (tmp_path / "int4" / "report.md").read_text()
    assert "Weights: int4 matmulnbits (group 32, zero points, rtn)" in md
    assert "Fidelity vs fp32 (at quantization, 512 tokens of the built-in text): KL mean" in md
    # decode's memory term: int4 weights (lm_head too) move far fewer bytes (the tiny model's total
    # prediction sits on the kernel-launch floor, so compare the bandwidth term itself)
    fp32_decode = reports["fp32"]["results"][0]["predicted"]["memory_ms"]["decode"]
    int4_decode = reports["int4"]["results"][0]["predicted"]["memory_ms"]["decode"]
    assert int4_decode < 0.5 * fp32_decode


def test_int4_decoder_bytes_at_most_035_of_fp32_with_a_float_lm_head():
    """The bench checkpoint's proportions (bench/run_bench.py: 12 layers of hidden 768, MLP 2048, a
    32000-token lm_head kept float; measured there: 0.349 at the default group 32), scaled down 4x
    in every dimension so the lm_head's share of the weights is the same."""
    from onnx import TensorProto, helper

    from tokedge.export.quantize import _weight_bytes, quantize_model

    hidden, inter, vocab, layers = 192, 512, 8000, 12
    rng = np.random.default_rng(0)
    nodes, inits, x = [], [], "x"
    shapes = [(hidden, hidden)] * 4 + [(hidden, inter), (hidden, inter), (inter, hidden)]
    for i in range(layers):
        for j, (k, n) in enumerate(shapes):  # a chain whose widths match: the graph only has to hold the weights
            name = f"w{i}_{j}"
            inits.append(numpy_helper.from_array(rng.standard_normal((k, n)).astype(np.float32) * 0.05, name))
            src = x if k == hidden else f"h{i}_5"
            nodes.append(helper.make_node("MatMul", [src, name], [f"h{i}_{j}"], name=f"/layer{i}/m{j}/MatMul"))
        x = f"h{i}_6"
    inits.append(numpy_helper.from_array(rng.standard_normal((hidden, vocab)).astype(np.float32) * 0.05, "head"))
    nodes.append(helper.make_node("MatMul", [x, "head"], ["logits"], name="/lm_head/MatMul"))
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, hidden])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, vocab])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    before = _weight_bytes(model)
    quantized, count = quantize_model(model, QuantConfig(lm_head=False), vocab)
    assert count == layers * len(shapes)  # every MatMul but the lm_head
    assert _weight_bytes(quantized) <= 0.35 * before
    # the default keeps the lm_head at int8 (one more MatMulNBits, 8 bits): fewer bytes still
    mixed, count = quantize_model(model, QuantConfig(), vocab)
    head = [n for n in mixed.graph.node if n.name.startswith("/lm_head/")]
    assert count == layers * len(shapes) + 1 and [a.i for a in head[0].attribute if a.name == "bits"] == [8]
    assert _weight_bytes(mixed) < 0.25 * before
