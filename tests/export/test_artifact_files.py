"""Artifact files: manifest contract, external data, fp16, verify and tamper detection."""

from __future__ import annotations

import json
import shutil

import numpy as np
import onnx
import pytest

from tests.contract_client import ContractClient
from tokedge.artifact import MANIFEST_NAME, load_artifact, read_manifest, sha256_file
from tokedge.errors import ArtifactError, IntegrityError
from tokedge.verify import verify


def test_manifest_describes_graphs(artifacts):
    art = artifacts("cls-attn", 64)
    m = load_artifact(art)
    assert m.reduction.method == "cls-attn" and m.reduction.budget == 64 and m.reduction.full_tokens == 576
    assert m.prompt.visual_tokens == 64 and m.preprocess.crop_size == (336, 336)
    assert set(m.files) == {"vision.onnx", "embed.onnx", "decoder.onnx", "tokenizer.json", "reference.npz"}
    for name, spec in m.graphs.items():
        model = onnx.load(art / spec.file)
        assert [i.name for i in model.graph.input] == [t.name for t in spec.inputs], name
        assert [o.name for o in model.graph.output] == [t.name for t in spec.outputs], name
    dec = m.graphs["decoder"]
    assert dec.input("past_key_values.0.key").shape == ("batch", 2, "past_sequence", 16)
    assert dec.outputs[0].shape == ("batch", 1, m.model.vocab_size)
    assert m.graphs["vision"].outputs[0].shape == ("batch", 64, 64)
    for key in ("torch", "transformers", "onnx", "onnxruntime"):
        assert key in m.versions


def test_external_data_one_file_per_graph(artifacts):
    art = artifacts("none", 576, external_data_threshold=0)
    m = load_artifact(art)
    for name, spec in m.graphs.items():
        assert spec.external_data == f"{name}.onnx.data" and (art / spec.external_data).is_file()
        assert spec.external_data in m.files
    assert (art / "decoder.onnx").stat().st_size < (art / "decoder.onnx.data").stat().st_size
    assert verify(art).ok


def test_fp16_artifact(artifacts):
    art = artifacts("none", 576, dtype="fp16")
    m = load_artifact(art)
    assert m.dtype == "fp16"
    assert m.graphs["decoder"].input("inputs_embeds").dtype == "float16"
    assert m.graphs["vision"].input("pixel_values").dtype == "float32"
    assert m.graphs["decoder"].outputs[0].dtype == "float32"
    assert m.reference["parity_at_export"]["ok"] is True


def test_verify_passes_and_against_checkpoint(artifacts, tiny_llava_dir):
    art = artifacts("cls-attn", 64)
    report = verify(art)
    assert report.ok and report.cases[0].max_abs_prefill_logits < 1e-3
    assert verify(art, checkpoint=str(tiny_llava_dir)).ok


def test_verify_detects_flipped_byte(artifacts, tmp_path):
    art = tmp_path / "copy"
    shutil.copytree(artifacts("none", 576), art)
    data = bytearray((art / "decoder.onnx").read_bytes())
    data[len(data) // 2] ^= 0x01
    (art / "decoder.onnx").write_bytes(bytes(data))
    with pytest.raises(IntegrityError, match="decoder.onnx"):
        verify(art)


def test_verify_detects_wrong_numbers_even_with_rehashed_manifest(artifacts, tmp_path):
    """Perturb one decoder weight and update the manifest hash: hashes pass, parity must not."""
    from onnx import numpy_helper

    art = tmp_path / "copy"
    shutil.copytree(artifacts("none", 576), art)
    model = onnx.load(art / "decoder.onnx")
    init = next(t for t in model.graph.initializer if t.name == "norm.weight")
    init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init) + 0.05, init.name))
    onnx.save(model, art / "decoder.onnx")
    manifest = json.loads((art / MANIFEST_NAME).read_text())
    manifest["files"]["decoder.onnx"] = sha256_file(art / "decoder.onnx")
    (art / MANIFEST_NAME).write_text(json.dumps(manifest))
    report = verify(art)
    assert not report.ok
    assert report.cases[0].max_abs_prefill_logits > 1e-3


def test_graph_that_cannot_run_is_an_artifact_error(artifacts, tmp_path):
    """A decoder of the wrong dtype swapped in (hash updated) fails with a one-line ArtifactError."""
    art = tmp_path / "copy"
    shutil.copytree(artifacts("none", 576), art)
    shutil.copy(artifacts("none", 576, dtype="fp16") / "decoder.onnx", art / "decoder.onnx")
    manifest = json.loads((art / MANIFEST_NAME).read_text())
    manifest["files"]["decoder.onnx"] = sha256_file(art / "decoder.onnx")
    (art / MANIFEST_NAME).write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match="decoder"):
        verify(art)


def test_newer_format_and_non_artifact_refused(artifacts, tmp_path):
    art = tmp_path / "copy"
    shutil.copytree(artifacts("none", 576), art)
    manifest = json.loads((art / MANIFEST_NAME).read_text())
    manifest["format_version"] = 99
    (art / MANIFEST_NAME).write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match="newer"):
        read_manifest(art)
    with pytest.raises(ArtifactError, match="not a tokedge artifact"):
        read_manifest(tmp_path)


def test_reference_records_transformers_outputs(artifacts):
    art = artifacts("cls-attn", 64, dynamic=(16, 576))
    m = load_artifact(art)
    assert m.reference["budgets"] == [16, 64, 576]
    with np.load(art / "reference.npz") as ref:
        assert ref["case0.image_embeds"].shape == (2, 16, 64)
        assert ref["case2.image_embeds"].shape == (2, 576, 64)
    client = ContractClient(art)
    out = client.image_embeds(np.load(art / "reference.npz")["pixel_values"], budget=100)
    assert out.shape == (2, 100, 64)
