"""Bad input to `tokedge export` / `verify`: exit code, one line on stderr, no traceback, nothing
written outside the expected place."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest

from tokedge.cli import main


def _copy_ckpt(src: Path, dst: Path, drop=(), edit_config=None) -> Path:
    shutil.copytree(src, dst)
    for name in drop:
        for p in dst.glob(name):
            p.unlink()
    if edit_config:
        cfg = json.loads((dst / "config.json").read_text())
        edit_config(cfg)
        (dst / "config.json").write_text(json.dumps(cfg))
    return dst


def _set(path: list[str], value):
    def edit(cfg):
        node = cfg
        for key in path[:-1]:
            node = node[key]
        node[path[-1]] = value

    return edit


CASES = [
    # (id, extra args, checkpoint mutation, expected exit code, message fragment)
    ("budget-zero", ["--method", "cls-attn", "--budget", "0"], None, 2, "out of range"),
    ("budget-too-big", ["--method", "cls-attn", "--budget", "577"], None, 2, "1..576"),
    ("none-with-budget", ["--method", "none", "--budget", "64"], None, 2, "keeps all 576"),
    ("unknown-method", ["--method", "magic"], None, 2, "unknown method 'magic'"),
    ("bad-dtype", ["--dtype", "int4"], None, 2, "--dtype int4"),
    ("bad-range-syntax", ["--method", "cls-attn", "--dynamic-budget", "16-64"], None, 2, "MIN:MAX"),
    ("range-excludes-budget", ["--method", "cls-attn", "--budget", "64", "--dynamic-budget", "100:200"], None, 2,
     "MIN <= --budget"),
    ("range-for-none", ["--dynamic-budget", "16:576"], None, 2, "cannot take a runtime budget"),
    ("no-weights", [], {"drop": ["*.safetensors"]}, 2, "no model weights"),
    ("no-tokenizer", [], {"drop": ["tokenizer.json"]}, 2, "no tokenizer.json"),
    ("no-config", [], {"drop": ["config.json"]}, 2, "no config.json"),
    ("unsupported-arch", [], {"edit": _set(["model_type"], "blip-2")}, 2, "unsupported architecture"),
    ("unsupported-lm", [], {"edit": _set(["text_config", "model_type"], "gpt2")}, 2, "unsupported language model"),
    ("pickle-weights", [], {"pickle": True}, 2, "--allow-pickle"),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_export_bad_input(case, tiny_llava_dir, tmp_path, capsys):
    _, args, mutate, code, fragment = case
    ckpt = tiny_llava_dir
    if mutate:
        ckpt = _copy_ckpt(tiny_llava_dir, tmp_path / "ckpt", drop=mutate.get("drop", ()), edit_config=mutate.get("edit"))
        if mutate.get("pickle"):
            for p in ckpt.glob("*.safetensors"):
                p.rename(p.with_name("pytorch_model.bin"))
    canary = tmp_path / "canary.txt"
    canary.write_text("untouched")
    before = sorted(p.name for p in tmp_path.iterdir())
    out = tmp_path / "artifact"
    rc = main(["export", str(ckpt), "--out", str(out), *args])
    err = capsys.readouterr().err.strip()
    assert rc == code
    assert fragment in err
    assert len(err.splitlines()) == 1 and err.startswith("error: ") and "Traceback" not in err
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == before
    assert canary.read_text() == "untouched"


def test_existing_artifact_needs_force(artifacts, tiny_llava_dir, tmp_path, capsys):
    out = tmp_path / "art"
    shutil.copytree(artifacts("none", 576), out)
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    rc = main(["export", str(tiny_llava_dir), "--out", str(out)])
    assert rc == 2 and "--force" in capsys.readouterr().err
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before


def test_force_replaces_whole_and_leaves_no_staging(artifacts, tiny_llava_dir, tmp_path, capsys):
    out = tmp_path / "art"
    shutil.copytree(artifacts("none", 576), out)
    (out / "stale.txt").write_text("from an older export")
    rc = main(["export", str(tiny_llava_dir), "--out", str(out), "--method", "cls-attn", "--budget", "32", "--force",
               "--json"])
    assert rc == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["budget"] == 32 and summary["parity"]["ok"] is True
    assert not (out / "stale.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["art"]


def test_verify_cli(artifacts, tmp_path, capsys):
    assert main(["verify", str(artifacts("cls-attn", 64)), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["ok"] is True
    assert main(["verify", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert "not a tokedge artifact" in err and len(err.splitlines()) == 1


def test_methods_lists_registry(capsys):
    assert main(["methods", "--json"]) == 0
    rows = {r["name"]: r for r in json.loads(capsys.readouterr().out)["methods"]}
    assert rows["cls-attn"]["stage"] == "pre-llm" and rows["cls-attn"]["needs_attention"]
    assert rows["none"]["stage"] == "none"


@pytest.fixture
def config_only(tiny_llava_dir, tmp_path):
    """A checkpoint directory with config.json and no weights: anything that loads weights fails."""
    import shutil

    d = tmp_path / "config-only"
    d.mkdir()
    shutil.copy(tiny_llava_dir / "config.json", d / "config.json")
    return d


def test_flag_problems_come_before_already_exists_and_loading(config_only, tmp_path, capsys):
    existing = tmp_path / "exists"
    existing.mkdir()
    assert main(["export", str(config_only), "--method", "visionzip", "--dynamic-budget", "16:576",
                 "--out", str(existing)]) == 2
    err = capsys.readouterr().err
    assert "cannot take a runtime budget" in err and "cls-attn" in err and "already exists" not in err


def test_unreachable_budget_is_refused_before_loading_with_the_minimum(config_only, tmp_path, capsys):
    from tokedge.reduce.tome import merge_schedule

    assert main(["export", str(config_only), "--method", "tome", "--budget", "16", "--out", str(tmp_path / "a")]) == 2
    err = capsys.readouterr().err
    fewest = int(re.search(r"--budget >= (\d+)", err).group(1))
    assert "cannot merge down" in err and "weights" not in err
    # the exporter's own schedule reaches the minimum it names, and nothing below it
    assert merge_schedule(576, fewest, 5) is not None and merge_schedule(576, fewest - 1, 5) is None


def test_unknown_method_suggests_the_closest(capsys, tmp_path):
    assert main(["export", "tiny-llava", "--method", "fastV", "--out", str(tmp_path / "a")]) == 2
    assert "did you mean 'fastv'?" in capsys.readouterr().err


def test_offline_hub_is_detected_quickly(monkeypatch, tmp_path, capsys):
    import time

    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens there
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    start = time.perf_counter()
    assert main(["export", "someone/some-llava", "--out", str(tmp_path / "a")]) == 2
    assert time.perf_counter() - start < 15
    err = capsys.readouterr().err
    assert "cannot be reached" in err and "HF_HUB_OFFLINE=1" in err and "local directory" in err
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert main(["export", "someone/some-llava", "--out", str(tmp_path / "a")]) == 2
    assert "HF_HUB_OFFLINE=1 is set" in capsys.readouterr().err


def test_runtime_budget_advice_only_for_methods_that_take_one(artifacts, tmp_path, test_images, capsys):
    image = tmp_path / "i.png"
    test_images[0].save(image)
    args = ["--image", str(image), "--prompt", "hi", "--budget", "32", "--max-new-tokens", "2"]
    assert main(["run", str(artifacts("cls-attn", 64)), *args]) == 2
    assert "re-export with --dynamic-budget" in capsys.readouterr().err
    assert main(["run", str(artifacts("visionzip", 64)), *args]) == 2
    err = capsys.readouterr().err
    assert "takes no runtime budget" in err and "--dynamic-budget" not in err


@pytest.mark.parametrize("argv,suggestion", [
    (["export", "tiny-lava"], "did you mean 'tiny-llava'?"),
    (["export", "tiny-qwen2.5vl"], "did you mean 'tiny-qwen2.5-vl'?"),
    (["optimize", "ART", "--out", "OUT", "--passes", "fold,ort-fusion"], "did you mean 'ort-fusions'?"),
    (["optimize", "ART", "--out", "OUT", "--passes", "fuse-selections"], "did you mean 'fuse-selection'?"),
])
def test_unknown_preset_or_pass_suggests_the_closest(argv, suggestion, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # "tiny-lava" must not exist as a directory here
    assert main([a.replace("ART", str(tmp_path / "art")).replace("OUT", str(tmp_path / "o")) for a in argv]) == 2
    err = capsys.readouterr().err.strip()
    assert suggestion in err and len(err.splitlines()) == 1
    assert not (tmp_path / "o").exists()


def test_far_names_get_no_suggestion(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["export", "my-model-dir"]) == 2
    assert "did you mean" not in capsys.readouterr().err
