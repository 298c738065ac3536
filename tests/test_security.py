"""Issue-15 guarantees, each through the CLI as a user (or an attacker) would hit it: exit code,
one line on stderr, no traceback, nothing outside touched. See docs/safety.md."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest

from tokedge.artifact import MANIFEST_NAME, sha256_file
from tokedge.cli import main

PY = [sys.executable, "-m", "tokedge"]


def _one_line(err: str) -> str:
    """The one error line; other stderr lines may only be an export's progress ticks."""
    lines = [line for line in err.strip().splitlines() if not line.startswith("\u2713 ")]
    assert len(lines) == 1 and lines[0].startswith("error: "), f"expected one error line on stderr, got:\n{err}"
    assert "Traceback" not in err and "\x1b" not in lines[0]
    return lines[0]


def _cli(capsys, *args) -> tuple[int, str, str]:
    rc = main([str(a) for a in args])
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


def _sub(*args, timeout: float = 60, cwd=None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("TOKEDGE_DEBUG", None)
    return subprocess.run([*PY, *[a if isinstance(a, bytes) else str(a) for a in args]], capture_output=True,
                          text=True, errors="replace", timeout=timeout, env=env, cwd=cwd)


def _manifest(art: Path) -> dict:
    return json.loads((art / MANIFEST_NAME).read_text())


def _write_manifest(art: Path, data: dict) -> None:
    (art / MANIFEST_NAME).write_text(json.dumps(data))


def _rehash(art: Path, *rels: str) -> None:
    data = _manifest(art)
    for rel in rels:
        data["files"][rel] = sha256_file(art / rel)
    _write_manifest(art, data)


@pytest.fixture(scope="module")
def base_art(artifacts):
    return artifacts("none", 576)


@pytest.fixture
def art(base_art, tmp_path):
    out = tmp_path / "art"
    shutil.copytree(base_art, out)
    return out


@pytest.fixture(scope="module")
def image_file(tmp_path_factory, test_images):
    path = tmp_path_factory.mktemp("img") / "i.png"
    test_images[0].save(path)
    return path


@pytest.fixture
def canary(tmp_path):
    path = tmp_path / "canary.txt"
    path.write_text("untouched\n")
    return path


# --- 1. external data wherever ONNX can hold a tensor -----------------------------------------


def _external(name: str, location: str, dims=(4,)):
    from onnx import TensorProto

    t = TensorProto(name=name, data_type=TensorProto.FLOAT, dims=list(dims))
    t.data_location = TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", "0"), ("length", str(4 * int(np.prod(dims))))):
        entry = t.external_data.add()
        entry.key, entry.value = key, value
    return t


def _plant(model, where: str, location: str) -> None:
    from onnx import AttributeProto, FunctionProto, SparseTensorProto, TensorProto, helper

    ext = _external("planted", location)
    if where == "initializer":
        model.graph.initializer.append(ext)
    elif where == "sparse_initializer":
        indices = helper.make_tensor("planted_idx", TensorProto.INT64, [4], [0, 1, 2, 3])
        model.graph.sparse_initializer.append(SparseTensorProto(values=ext, indices=indices, dims=[8]))
    elif where == "sparse_value_attribute":
        indices = helper.make_tensor("planted_idx", TensorProto.INT64, [4], [0, 1, 2, 3])
        node = helper.make_node("Constant", [], ["planted_out"])
        attr = node.attribute.add()
        attr.name, attr.type = "sparse_value", AttributeProto.SPARSE_TENSOR
        attr.sparse_tensor.CopyFrom(SparseTensorProto(values=ext, indices=indices, dims=[8]))
        model.graph.node.append(node)
    elif where == "subgraph_attribute":
        inner = helper.make_node("Constant", [], ["inner"], value=ext)
        body = helper.make_graph([inner], "body", [], [helper.make_tensor_value_info("inner", TensorProto.FLOAT, [4])])
        cond = helper.make_tensor("planted_cond", TensorProto.BOOL, [], [True])
        model.graph.initializer.append(cond)
        model.graph.node.append(helper.make_node("If", ["planted_cond"], ["planted_out"], then_branch=body,
                                                 else_branch=body))
    elif where == "function":
        inner = helper.make_node("Constant", [], ["y"], value=ext)
        model.functions.append(FunctionProto(name="planted_fn", domain="planted", output=["y"], node=[inner],
                                             opset_import=[helper.make_opsetid("", 17)]))
        model.opset_import.append(helper.make_opsetid("planted", 1))
        model.graph.node.append(helper.make_node("planted_fn", [], ["planted_out"], domain="planted"))
    else:  # pragma: no cover
        raise ValueError(where)


LOCATIONS = ["initializer", "sparse_initializer", "sparse_value_attribute", "subgraph_attribute", "function"]


@pytest.mark.parametrize("hard_link", [False, True], ids=["unlisted-file", "hard-link-outside"])
@pytest.mark.parametrize("where", LOCATIONS)
def test_external_data_anywhere_in_the_graph_is_refused(where, hard_link, art, tmp_path, image_file, capsys):
    import onnx

    model = onnx.load(art / "embed.onnx", load_external_data=False)
    _plant(model, where, "evil.data")
    (art / "embed.onnx").write_bytes(model.SerializeToString())
    payload = np.arange(8, dtype=np.float32).tobytes()
    if hard_link:
        (tmp_path / "outside.data").write_bytes(payload)
        os.link(tmp_path / "outside.data", art / "evil.data")
    else:
        (art / "evil.data").write_bytes(payload)
    _rehash(art, "embed.onnx")  # the attacker controls the manifest too
    for args in (["verify", art], ["run", art, "--image", image_file, "--prompt", "hi", "--max-new-tokens", "2"]):
        rc, out, err = _cli(capsys, *args)
        assert rc == 1, (args[0], out, err)
        assert "evil.data" in _one_line(err)
        assert ("hard link" if hard_link else "not its manifest-listed") in err
        assert "hashes ok" not in out + err


# --- 2. the bytes that run are the bytes that were hashed ------------------------------------


def test_graph_swapped_during_runs_never_runs(art, tmp_path, image_file, capsys):
    import onnx
    from onnx import numpy_helper

    args = ["run", art, "--image", image_file, "--prompt", "Describe it.", "--max-new-tokens", "6", "--json"]
    rc, out, _ = _cli(capsys, *args)
    assert rc == 0
    original = json.loads(out.strip().splitlines()[-1])["token_ids"]

    # an embed graph with other weights: what an attacker would swap in
    model = onnx.load(art / "embed.onnx")
    init = max(model.graph.initializer, key=lambda t: int(np.prod(t.dims)))
    table = numpy_helper.to_array(init)
    noise = np.random.default_rng(0).normal(0, 50 * float(table.std()) + 1, table.shape).astype(table.dtype)
    init.CopyFrom(numpy_helper.from_array(noise, init.name))
    good, evil = (art / "embed.onnx").read_bytes(), model.SerializeToString()
    check = tmp_path / "check"
    shutil.copytree(art, check)
    (check / "embed.onnx").write_bytes(evil)
    _rehash(check, "embed.onnx")
    rc, out, _ = _cli(capsys, "run", check, *args[2:])
    assert rc == 0
    swapped = json.loads(out.strip().splitlines()[-1])["token_ids"]
    assert swapped != original, "the swapped graph must change the output for this test to mean anything"

    stop = threading.Event()

    def swapper() -> None:
        staging = [tmp_path / "good.onnx", tmp_path / "evil.onnx"]
        i = 0
        while not stop.is_set():
            target = staging[i % 2]
            target.write_bytes(good if i % 2 == 0 else evil)
            os.replace(target, art / "embed.onnx")
            i += 1
            time.sleep(0.002)

    thread = threading.Thread(target=swapper, daemon=True)
    thread.start()
    outcomes = {"original": 0, "refused": 0}
    try:
        for _ in range(20):
            rc, out, err = _cli(capsys, *args)
            if rc == 0:
                assert json.loads(out.strip().splitlines()[-1])["token_ids"] == original, "a swapped graph ran"
                outcomes["original"] += 1
            else:
                assert rc == 1 and "sha256" in _one_line(err)
                outcomes["refused"] += 1
    finally:
        stop.set()
        thread.join()
    assert sum(outcomes.values()) == 20


# --- 3, 5, 6. output paths: locks, staging globs, --force ----------------------------------------


def test_export_lock_symlink_is_not_followed(tiny_llava_dir, tmp_path, canary, capsys):
    (tmp_path / ".art.lock").symlink_to(canary)
    rc, _, err = _cli(capsys, "export", tiny_llava_dir, "--out", tmp_path / "art", "--no-validate")
    assert rc == 1 and "symbolic link" in _one_line(err)
    assert canary.read_text() == "untouched\n"
    assert not (tmp_path / "art").exists()


def test_staging_cleanup_glob_is_escaped(base_art, tmp_path, capsys):
    other = tmp_path / ".art1.partial-concurrent"  # a concurrent export of `art1` is writing here
    other.mkdir()
    (other / "vision.onnx").write_text("in progress")
    rc, _, err = _cli(capsys, "optimize", base_art, "--out", tmp_path / "art[1]", "--passes", "fold")
    assert rc == 0, err
    assert (other / "vision.onnx").read_text() == "in progress"
    assert (tmp_path / "art[1]" / MANIFEST_NAME).is_file()


def _force_cases(tmp_path: Path, ckpt: Path):
    plain = tmp_path / "mydata"
    plain.mkdir()
    (plain / "notes.txt").write_text("keep me")
    afile = tmp_path / "afile"
    afile.write_text("keep me")
    nested = tmp_path / "work" / "sub"
    nested.mkdir(parents=True)
    return {
        "non-artifact directory": (plain, tmp_path, "not a tokedge artifact", plain / "notes.txt"),
        "a file": (afile, tmp_path, "is a file", afile),
        "the source checkpoint": (ckpt, tmp_path, "source", ckpt / "config.json"),
        "the current directory": (Path("."), nested, "current directory", None),
        "a parent of the cwd": (Path(".."), nested, "current directory", None),
    }


@pytest.mark.parametrize("case", ["non-artifact directory", "a file", "the source checkpoint",
                                  "the current directory", "a parent of the cwd"])
def test_force_replaces_only_artifacts(case, tiny_llava_dir, tmp_path, capsys, monkeypatch):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(tiny_llava_dir, ckpt)
    out, cwd, fragment, keep = _force_cases(tmp_path, ckpt)[case]
    before = keep.read_bytes() if keep is not None else None
    monkeypatch.chdir(cwd)
    rc, _, err = _cli(capsys, "export", ckpt, "--out", out, "--force", "--no-validate")
    assert rc == 2 and fragment in _one_line(err)
    if keep is not None:
        assert keep.read_bytes() == before
    assert not list(tmp_path.rglob(".*.old-*")) and not list(tmp_path.rglob(".*.partial-*"))


def test_force_replaces_an_artifact(base_art, tmp_path, capsys):
    out = tmp_path / "opt"
    assert _cli(capsys, "optimize", base_art, "--out", out, "--passes", "fold")[0] == 0
    (out / "stray").write_text("x")
    rc, _, err = _cli(capsys, "optimize", base_art, "--out", out, "--passes", "fold", "--force")
    assert rc == 0, err
    assert not (out / "stray").exists()


# --- 4. signals ------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("sig,code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)], ids=["SIGINT", "SIGTERM"])
def test_interrupted_export_exits_nonzero_and_cleans_up(sig, code, tiny_llava_dir, tmp_path):
    out = tmp_path / "art"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([*PY, "export", str(tiny_llava_dir), "--out", str(out), "--method", "cls-attn"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not list(tmp_path.glob(".art.partial-*/vision.onnx")):
            assert proc.poll() is None and time.monotonic() < deadline, "export ended before the signal"
            time.sleep(0.02)
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == code
    assert "interrupted" in _one_line(err.split("\r")[-1])
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # no target, no staging, no lock


# --- 7. limits against a hostile artifact ----------------------------------------------------------


def _set_template(art: Path, template: str) -> None:
    data = _manifest(art)
    data["prompt"]["chat_template"] = template
    _write_manifest(art, data)


@pytest.mark.parametrize("template,fragment", [
    ("{% for a in range(99999) %}{% for b in range(99999) %}{% for c in range(99999) %}{% endfor %}{% endfor %}"
     "{% endfor %}<image>", "longer than"),
    ("{% set x = [0] %}{% for a in x * 99999 %}{% for b in x * 99999 %}{% endfor %}{% endfor %}<image>",
     "longer than"),
    ("{{ 'x' * 50000000 }}<image>", "failed to render"),
    ("{% for a in range(99999) %}{{ 'x' * 1000 }}{% endfor %}<image>", "more than"),
    ("{% macro f(n) %}{{ f(n) }}{% endmacro %}{{ f(1) }}<image>", "template"),
], ids=["nested-range-loops", "nested-list-loops", "huge-string", "huge-output", "recursion"])
def test_hostile_chat_template_is_bounded(template, fragment, art, image_file):
    _set_template(art, template)
    start = time.monotonic()
    proc = _sub("run", art, "--image", image_file, "--prompt", "hi", "--max-new-tokens", "2", timeout=60)
    assert proc.returncode == 2, proc.stderr
    assert fragment in _one_line(proc.stderr)
    assert time.monotonic() - start < 30


def test_graph_with_unbounded_loop_is_refused(art, image_file):
    import onnx
    from onnx import TensorProto, helper

    model = onnx.load(art / "embed.onnx")
    body = helper.make_graph(
        [helper.make_node("Identity", ["cond_in"], ["cond_out"])], "body",
        [helper.make_tensor_value_info("i", TensorProto.INT64, []),
         helper.make_tensor_value_info("cond_in", TensorProto.BOOL, [])],
        [helper.make_tensor_value_info("cond_out", TensorProto.BOOL, [])])
    model.graph.initializer.extend([helper.make_tensor("trips", TensorProto.INT64, [], [2**63 - 1]),
                                    helper.make_tensor("always", TensorProto.BOOL, [], [True])])
    model.graph.node.append(helper.make_node("Loop", ["trips", "always"], [], body=body))
    (art / "embed.onnx").write_bytes(model.SerializeToString())
    _rehash(art, "embed.onnx")
    proc = _sub("run", art, "--image", image_file, "--prompt", "hi", timeout=60)
    assert proc.returncode == 1 and "control flow (Loop)" in _one_line(proc.stderr)


@pytest.mark.parametrize("listed", [False, True])
def test_fifo_as_tokenizer_file_does_not_hang(listed, art, image_file):
    os.mkfifo(art / "fifo.json")
    data = _manifest(art)
    data["prompt"]["tokenizer_file"] = "fifo.json"
    if listed:
        data["files"]["fifo.json"] = "0" * 64
    _write_manifest(art, data)
    proc = _sub("run", art, "--image", image_file, "--prompt", "hi", timeout=60)
    assert proc.returncode == 1
    assert ("not a regular file" if listed else "not covered by the manifest") in _one_line(proc.stderr)


def test_huge_manifest_is_not_read(art, capsys):
    with open(art / MANIFEST_NAME, "r+b") as fh:
        fh.truncate(1 << 30)  # sparse: costs no disk
    rc, _, err = _cli(capsys, "verify", art)
    assert rc == 1 and "over the limit" in _one_line(err)


def test_reference_that_unpacks_to_gigabytes_is_refused(art, capsys):
    ref = art / "reference.npz"
    zero = bytes(64 << 20)
    with zipfile.ZipFile(ref, "w", compression=zipfile.ZIP_DEFLATED, allowZip64=True) as archive:
        with archive.open("pixel_values.npy", "w", force_zip64=True) as member:
            for _ in range(24):  # 1.5 GiB of zeros: a few MB on disk
                member.write(zero)
    assert ref.stat().st_size < 8 << 20
    _rehash(art, "reference.npz")
    rc, _, err = _cli(capsys, "verify", art)
    assert rc == 1 and "unpacks to" in _one_line(err)


def test_run_timeout(art, image_file, capsys):
    rc, _, err = _cli(capsys, "run", art, "--image", image_file, "--prompt", "hi", "--timeout", "0.001")
    assert rc == 1 and "--timeout" in _one_line(err)
    rc, _, err = _cli(capsys, "run", art, "--image", image_file, "--prompt", "hi", "--timeout", "-1")
    assert rc == 2 and "--timeout" in _one_line(err)


# --- 8. one line, whatever happens ---------------------------------------------------------------


def test_tokenizer_panic_is_one_line(art, image_file):
    import base64

    tok = json.loads((art / "tokenizer.json").read_text())
    tok["normalizer"] = {"type": "Precompiled", "precompiled_charsmap": base64.b64encode(b"\xff" * 3).decode()}
    (art / "tokenizer.json").write_text(json.dumps(tok))
    _rehash(art, "tokenizer.json")
    proc = _sub("run", art, "--image", image_file, "--prompt", "hi", timeout=60)
    assert proc.returncode == 1 and "tokenizer" in _one_line(proc.stderr)
    assert "panicked" not in proc.stderr and "RUST_BACKTRACE" not in proc.stderr


def test_onnxruntime_load_failure_is_one_line(art, image_file):
    import onnx
    from onnx import helper

    model = onnx.load(art / "embed.onnx")
    model.graph.node.append(helper.make_node("NoSuchOp", [model.graph.input[0].name], ["junk"], domain="nowhere"))
    model.opset_import.append(helper.make_opsetid("nowhere", 1))
    (art / "embed.onnx").write_bytes(model.SerializeToString())
    _rehash(art, "embed.onnx")
    proc = _sub("run", art, "--image", image_file, "--prompt", "hi", timeout=60)
    assert proc.returncode == 1 and "ONNX Runtime cannot load the embed graph" in _one_line(proc.stderr)


def test_library_warnings_stay_off_stderr(base_art, tmp_path):
    import io
    import struct

    from PIL import Image, TiffImagePlugin

    info = TiffImagePlugin.ImageFileDirectory_v2()
    info[282] = 72.0  # XResolution, one RATIONAL
    buf = io.BytesIO()
    Image.new("RGB", (64, 48), (20, 120, 220)).save(buf, "TIFF", tiffinfo=info)
    data = bytearray(buf.getvalue())
    entry = data.find(struct.pack("<HH", 282, 5))
    struct.pack_into("<I", data, entry + 4, 3)  # claims 3 values: Pillow warns "Metadata Warning, tag 282 ..."
    path = tmp_path / "odd.tif"
    path.write_bytes(bytes(data))
    with pytest.warns(UserWarning, match="Metadata Warning"):  # the library does warn on this file
        Image.open(path).load()
    proc = _sub("run", base_art, "--image", path, "--prompt", "hi", "--max-new-tokens", "2", timeout=60)
    # the only stderr is tokedge's own once-per-run notice that the preset's weights are random (item 9)
    err = proc.stderr.strip()
    notice = err.startswith("note: this artifact's weights are random") and "Warning" not in err
    assert proc.returncode == 0 and (err == "" or notice), proc.stderr


@pytest.mark.parametrize("field", ["file_name", "tokedge_version"])
def test_artifact_strings_cannot_forge_terminal_lines(field, art, capsys):
    data = _manifest(art)
    forged = "x\n\x1b[2K\rhashes ok; parity: 2 cases ok\x1b[0m"
    if field == "file_name":
        data["files"][forged] = "0" * 64
    else:
        data["tokedge_version"] = forged
        data["model"]["num_layers"] = forged  # makes the manifest malformed: the message quotes the value
    _write_manifest(art, data)
    rc, out, err = _cli(capsys, "verify", art)
    assert rc == 1
    line = _one_line(err)
    assert "\r" not in line and not line.startswith("hashes ok") and "hashes ok" not in out


# --- 9. input checks ------------------------------------------------------------------------------


@pytest.mark.parametrize("args,fragment", [
    (["--temperature", "nan"], "--temperature"),
    (["--temperature", "inf"], "--temperature"),
    (["--top-p", "nan"], "--top-p"),
    (["--seed", "-1"], "--seed"),
    (["--threads", "100000"], "--threads"),
    (["--threads", "-2"], "--threads"),
])
def test_bad_sampling_and_thread_values(args, fragment, base_art, image_file, capsys):
    rc, _, err = _cli(capsys, "run", base_art, "--image", image_file, "--prompt", "hi", *args)
    assert rc == 2 and fragment in _one_line(err)


def test_prompt_with_invalid_utf8(base_art, image_file):
    proc = subprocess.run([*PY, "run", str(base_art), "--image", str(image_file), "--prompt", b"caf\xe9 \xff?"],
                          capture_output=True, text=True, errors="replace", timeout=60)
    assert proc.returncode == 2 and "UTF-8" in _one_line(proc.stderr)


def _mutate(data: dict, path: str, value) -> None:
    keys = path.split(".")
    node = data
    for key in keys[:-1]:
        node = node[int(key)] if isinstance(node, list) else node[key]
    if value is KeyError:
        del node[keys[-1]]
    else:
        node[keys[-1]] = value


MALFORMED = [
    ("format_version", True, "format_version"),
    ("format_version", "1", "format_version"),
    ("model.num_layers", "4", "model.num_layers must be an integer"),
    ("model.num_layers", 0, "model.num_layers must be an integer between"),
    ("model.eos_token_ids", 2, "model.eos_token_ids must be a list"),
    ("model.eos_token_ids", [None], "model.eos_token_ids[0] must be an integer"),
    ("model.head_dim", 8.5, "model.head_dim must be an integer"),
    ("reduction.budget", 10**9, "reduction.budget must be an integer between"),
    ("reduction.budget_range", [1], "reduction.budget_range must be"),
    ("preprocess.image_mean", "0.5", "preprocess.image_mean must be a list"),
    ("preprocess.image_std", [0, 0, 0], "preprocess.image_std must be non-zero"),
    ("preprocess.crop_size", [336, -1], "preprocess.crop_size[1]"),
    ("prompt.visual_tokens", None, "prompt.visual_tokens must be an integer"),
    ("prompt.tokenizer_file", 7, "prompt.tokenizer_file must be a string"),
    ("graphs", [], "graphs must be an object"),
    ("graphs.decoder", KeyError, "graphs.decoder must be present"),
    ("graphs.vision.inputs.0.dtype", "complex256", "graphs.vision.inputs[0].dtype"),
    ("files", {"vision.onnx": 5}, "files.vision.onnx must be a string"),
    ("reference.tolerance", None, "reference.tolerance"),
    ("model", KeyError, "model must be present"),
]


@pytest.mark.parametrize("path,value,fragment", MALFORMED, ids=[f"{p}={v!r}"[:40] for p, v, _ in MALFORMED])
def test_malformed_manifest_names_the_key(path, value, fragment, art, image_file, capsys):
    data = _manifest(art)
    _mutate(data, path, value)
    _write_manifest(art, data)
    for args in (["verify", art], ["run", art, "--image", image_file, "--prompt", "hi"]):
        rc, _, err = _cli(capsys, *args)
        assert rc == 1, err
        line = _one_line(err)
        assert fragment in line and "internal error" not in line


# --- 10. integrity scope ---------------------------------------------------------------------------


def test_tokenizer_and_reference_must_be_listed(art, image_file, capsys):
    shutil.copy(art / "tokenizer.json", art / "tok2.json")
    data = _manifest(art)
    data["prompt"]["tokenizer_file"] = "tok2.json"
    _write_manifest(art, data)
    rc, _, err = _cli(capsys, "run", art, "--image", image_file, "--prompt", "hi")
    assert rc == 1 and "prompt.tokenizer_file 'tok2.json' is not covered" in _one_line(err)

    data["prompt"]["tokenizer_file"] = "tokenizer.json"
    shutil.copy(art / "reference.npz", art / "ref2.npz")
    data["reference"]["file"] = "ref2.npz"
    _write_manifest(art, data)
    rc, out, err = _cli(capsys, "verify", art)
    assert rc == 1 and "reference.file 'ref2.npz' is not covered" in _one_line(err) and "hashes ok" not in out


@pytest.mark.parametrize("kind", ["symlink", "hard link"])
def test_manifest_must_be_a_file_of_the_artifact(kind, art, tmp_path, capsys):
    outside = tmp_path / "outside.json"
    shutil.move(art / MANIFEST_NAME, outside)
    if kind == "symlink":
        (art / MANIFEST_NAME).symlink_to(outside)
    else:
        os.link(outside, art / MANIFEST_NAME)
    rc, _, err = _cli(capsys, "verify", art)
    assert rc == 1 and {"symlink": "symbolic link", "hard link": "hard link"}[kind] in _one_line(err)
