"""The family x method matrix (issue: the spine): every pair `tokedge export` accepts on the tiny
presets goes through every command a user runs on it, in process through `tokedge.cli.main` (the
real CLI, its error mapping and exit codes): export, verify (tiny-llava: also against a fresh
reference from the checkpoint), run (image; video where the artifact
takes video; temporal methods run video only, their image graphs being `none`'s), profile at one budget, memory, check --target trt-10.3, build --dry-run for
jetson-orin-nano-8gb and rtx-4090. A pair export refuses must be refused in one line with exit 2.

Shape envelope: while run and profile execute, every input shape ONNX Runtime is fed is recorded
per graph (a wrapper around `OrtRunner.infer` that records and calls the real method), then each
must lie inside one optimisation profile of that graph in the build plan of each device profile
(`build.plan.plan_shapes`, the same planner `build` and `check` use). Every plan's ranges are
non-negative with min <= opt <= max.
"""

from __future__ import annotations

import json
import shlex
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from tokedge.reduce import METHODS

DEVICES = ("jetson-orin-nano-8gb", "rtx-4090")
TRT11_PRECISION = "TensorRT 11 is strongly typed"  # fp32 artifacts: build refuses rtx-4090 in one line
# Methods run on some presets only. `random` (the random baseline: the TopK + sort graph of cls-attn
# over constant scores, scoring with nothing a family supplies) adds ~60 s of CI on all five presets
# (measured per pair on the idle 2-core machine: llava-next 15 s, llava-onevision 14 s, qwen3-vl 11 s,
# llava 10 s, qwen2.5-vl 9 s; all five passed); tiny-llava and tiny-qwen2.5-vl cover both of its
# paths (`reduce` on a fixed view, `reduce_indexed` per image) for ~20 s.
SAMPLED = {"random": ("tiny-llava", "tiny-qwen2.5-vl"),
           # todre has no family code of its own (the families' signals, `reduce` / `reduce_indexed`):
           # tiny-llava, tiny-llava-next and tiny-qwen2.5-vl cover its three paths; Qwen3-VL's
           # reduced graph is checked against transformers in tests/export/test_qwen3_pre_llm.py's harness
           "todre": ("tiny-llava", "tiny-llava-next", "tiny-llava-onevision", "tiny-qwen2.5-vl")}


def methods_for(preset: str) -> list[str]:
    """The methods the matrix runs on `preset`: every method, `SAMPLED` ones on their presets only."""
    return sorted(m for m in METHODS if preset in SAMPLED.get(m, (preset,)))


# per preset: the reducing flags (a budget every image of the test clears, or a keep ratio) and the
# pixel budget of dynamic-resolution presets (small enough for every device profile's prompt limit)
# "checkpoint": the pair's artifact is also verified against a fresh transformers reference from the
# preset (`verify --checkpoint`; the recomputed logits within 1e-3 of the graphs'): on tiny-llava only,
# where it costs ~2 s a pair (it replaced a separate export of every method for the same check)
PRESETS = {
    "tiny-llava": {"reduce": ["--budget", "64"], "extra": [], "checkpoint": True},
    "tiny-llava-next": {"reduce": ["--budget", "64"], "extra": []},
    "tiny-llava-onevision": {"reduce": ["--budget", "64"], "extra": []},
    "tiny-qwen2.5-vl": {"reduce": ["--budget", "16"], "extra": ["--max-pixels", "50176"]},
    "tiny-qwen3-vl": {"reduce": ["--budget", "16"], "extra": ["--max-pixels", "131072"]},  # its min_pixels: 65536
    # in-LLM: 64 of an image's 80-272 tokens; vision-side methods keep 4 of each view's 16 (a square, for pool)
    "tiny-smolvlm": {"reduce": ["--budget", "64"], "view_reduce": ["--budget", "4"], "extra": []},
    # in-LLM: 32 of an image's 16-112 tokens; vision-side methods keep 4 of each view's 16 (a square, for pool)
    "tiny-internvl": {"reduce": ["--budget", "32"], "view_reduce": ["--budget", "4"], "extra": []},
    # 4 of an image's 16 pooled tokens (a square, for pool)
    "tiny-gemma3": {"reduce": ["--budget", "4"], "extra": []},
}


FAMILY = {"tiny-llava": "llava", "tiny-llava-next": "llava_next", "tiny-llava-onevision": "llava_onevision",
          "tiny-qwen2.5-vl": "qwen2_5_vl", "tiny-qwen3-vl": "qwen3_vl", "tiny-smolvlm": "smolvlm",
          "tiny-internvl": "internvl", "tiny-gemma3": "gemma3"}
# `tokedge methods` lists a family when the rules that need no weights accept the method; these pairs
# are refused later, by their default options (pdrop's three stages on M-RoPE families)
REFUSED_BY_OPTIONS = {("qwen2_5_vl", "pdrop"), ("qwen3_vl", "pdrop")}


def cli(capsys, *args) -> tuple[int, str, str]:
    """`tokedge ARGS` in this process -> (exit code, stdout, stderr)."""
    from tokedge.cli import main

    capsys.readouterr()
    rc = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return rc, out, err


@dataclass
class ShapeLog:
    """Input shapes (and 0-d values) fed to each graph, recorded while the real runner runs."""

    fed: dict[str, set[tuple]] = field(default_factory=dict)
    values: dict[str, set[tuple[str, int]]] = field(default_factory=dict)

    def record(self, graph: str, feed: dict) -> None:
        shapes = []
        for name, value in feed.items():
            shape = tuple(value.shape() if callable(getattr(value, "shape", None)) else np.shape(value))
            if shape == ():
                self.values.setdefault(graph, set()).add((name, int(np.asarray(value))))
            else:
                shapes.append((name, shape))
        self.fed.setdefault(graph, set()).add(tuple(sorted(shapes)))


def recording(monkeypatch, log: ShapeLog) -> None:
    from tokedge.runtime.ort_backend import OrtRunner

    real = OrtRunner.infer

    def infer(self, feed, keep=frozenset()):
        log.record(self.name, feed)
        return real(self, feed, keep)

    monkeypatch.setattr(OrtRunner, "infer", infer)


def assert_plan_ranges(graphs: dict) -> None:
    """Every range of a plan: non-negative, min <= opt <= max."""
    for graph, profiles in graphs.items():
        for prof in profiles:
            for name, rng in [*prof.shapes.items(), *prof.values.items()]:
                assert all(0 <= lo <= opt <= hi for lo, opt, hi in zip(rng.min, rng.opt, rng.max)), \
                    f"{graph}/{prof.name}/{name}: {rng}"


def assert_in_envelope(graphs: dict, log: ShapeLog, device: str) -> int:
    """Each recorded feed lies inside one of its graph's profiles. -> feeds checked."""
    checked = 0
    for graph, feeds in log.fed.items():
        assert graph in graphs, f"{graph} was run but has no engine plan on {device}"
        for feed in feeds:
            def inside(prof, feed=feed) -> bool:
                for name, shape in feed:
                    rng = prof.shapes.get(name)
                    if rng is None or len(rng.min) != len(shape) or not all(
                            lo <= d <= hi for lo, d, hi in zip(rng.min, shape, rng.max)):
                        return False
                return True

            assert any(inside(p) for p in graphs[graph]), \
                f"{device}: {graph} was fed {dict(feed)}, outside every profile " + \
                "; ".join(f"{p.name}: {({n: (r.min, r.max) for n, r in p.shapes.items()})}" for p in graphs[graph])
            checked += 1
    for graph, values in log.values.items():
        for name, value in values:
            for prof in graphs[graph]:
                if name in prof.values:
                    rng = prof.values[name]
                    assert rng.min[0] <= value <= rng.max[0], f"{device}: {graph}.{name}={value} outside {rng}"
    return checked


def write_image(path: Path, size=(200, 150), seed=0) -> Path:
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(path)
    return path


def frame_dir(path: Path, frames: int = 8, size=(96, 72)) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    for i in range(frames):
        write_image(path / f"frame_{i:03d}.png", size, seed=100 + i)
    return path


TEMPORAL_BUDGET = ["--budget", "392"]  # temporal methods: frame tokens kept of a video (OneVision: 8 x 196)


def export_args(preset: str, method: str) -> list[str]:
    cfg = PRESETS[preset]
    m = METHODS[method]
    reduce = [] if m.keeps_all else TEMPORAL_BUDGET if m.reduces_over_time else \
        cfg.get("view_reduce", cfg["reduce"]) if m.reduces_in_vision else cfg["reduce"]
    return ["export", preset, "--method", method, *reduce, *cfg["extra"]]


def run_pair(preset: str, method: str, tmp: Path, capsys, monkeypatch) -> dict:
    """One pair through every command. -> what was covered (for the test's list of pairs)."""
    from tokedge.artifact import load_artifact
    from tokedge.build.plan import plan_shapes
    from tokedge.profiles import load_profile

    art = tmp / "art"
    rc, out, err = cli(capsys, *export_args(preset, method), "--out", art)
    if rc != 0:  # refused: one error line (after any progress lines), exit 2 (wrong input), nothing written
        lines = [line for line in err.strip().splitlines() if line and not line.startswith("✓ ")]
        assert rc == 2 and len(lines) == 1 and lines[0].startswith("error: "), (rc, err)
        assert not art.exists()
        return {"pair": f"{preset} x {method}", "status": "refused", "why": lines[0]}
    manifest = load_artifact(art)
    image = write_image(tmp / "image.png")
    from tests.reduce.test_every_method import assert_static_graphs

    assert_static_graphs(art)  # no data-dependent ops, TopK k within TensorRT's limit
    covered = ["export"]

    rc, out, err = cli(capsys, "verify", art)
    assert rc == 0, err
    covered.append("verify")
    if PRESETS[preset].get("checkpoint"):
        rc, out, err = cli(capsys, "verify", art, "--checkpoint", preset, "--json")
        assert rc == 0, err
        report = json.loads(out)
        # the recomputed reference is the checkpoint's own: logits agree far inside the tolerance
        assert report["ok"] and max(max(c["max_abs_prefill_logits"], c["max_abs_step_logits"])
                                    for c in report["cases"]) < 1e-3, report
        covered.append("verify --checkpoint")

    log = ShapeLog()
    # temporal methods leave images unreduced: their image graphs are `none`'s, which its own pair runs
    images = not METHODS[method].reduces_over_time
    with monkeypatch.context() as mp:
        recording(mp, log)
        if images:
            rc, out, err = cli(capsys, "run", art, "--image", image, "--prompt", "What is shown?",
                               "--max-new-tokens", "3", "--json")
            assert rc == 0, err
            result = json.loads(out)
            assert result["token_ids"], out
            if manifest.layout.kind == "single":  # one view: the reduced count (in-LLM: after the pruning prefill)
                assert result["visual_tokens"] == manifest.reduction.budget, (result["visual_tokens"],
                                                                              manifest.reduction)
            covered.append("run image")
        if manifest.video is not None:
            frames = manifest.video.default_frames
            clip = frame_dir(tmp / "clip", frames)
            rc, out, err = cli(capsys, "run", art, "--video", clip, "--frames", frames, "--prompt",
                               "What happens?", "--max-new-tokens", "3", "--json")
            assert rc == 0 or (rc == 2 and len(err.strip().splitlines()) == 1), err
            covered.append("run video" if rc == 0 else f"run video refused: {err.strip()}")
            rc, out, err = cli(capsys, "profile", art, "--video", clip, "--frames", frames, "--runs", 1,
                               "--warmup", 0, "--max-new-tokens", 2, "--out", tmp / "vprof")
            assert rc == 0 or (rc == 2 and len(err.strip().splitlines()) == 1), err
            assert "internal error" not in err
            covered.append("profile video" if rc == 0 else "profile video refused in one line")
        if images:
            rc, out, err = cli(capsys, "profile", art, "--image", image, "--runs", 1, "--warmup", 0,
                               "--max-new-tokens", 2, "--out", tmp / "prof")
            assert rc == 0, err
            covered.append("profile")

    rc, out, err = cli(capsys, "memory", art, "--profile", "jetson-orin-nano-8gb", "--json")
    assert rc in (0, 3), err  # 3: "does not fit" (docs/cli.md)
    json.loads(out)
    covered.append("memory")

    rc, out, err = cli(capsys, "check", art, "--target", "trt-10.3", "--json")
    report = json.loads(out)
    plan_findings = {f["node"] for f in report["findings"] if f["op"] == "profile"}
    # every op and dtype passes TensorRT 10.3's parser (docs/engines.md says so; holitom once had float64)
    op_findings = [f for f in report["findings"] if f["op"] != "profile"]
    assert not op_findings, op_findings[:3]
    covered.append("check")

    checked = 0
    for device in DEVICES:
        rc, out, err = cli(capsys, "build", art, "--profile", device, "--dry-run")
        if device == "rtx-4090" and rc != 0:  # fp32 artifact on a strongly typed TensorRT: one line
            assert TRT11_PRECISION in err and len(err.strip().splitlines()) == 1, err
        else:
            assert rc == 0, err
        if device == "jetson-orin-nano-8gb":  # check and build agree: one planner
            assert (rc == 0) == (device not in plan_findings), (err, report)
        graphs, _ = plan_shapes(manifest, load_profile(device))
        assert_plan_ranges(graphs)
        checked += assert_in_envelope(graphs, log, device)
        covered.append(f"build --dry-run {device}")
    assert checked > 0
    return {"pair": f"{preset} x {method}", "status": "covered", "commands": covered, "feeds_checked": checked,
            "export": shlex.join(export_args(preset, method))}


def report_pairs(preset: str, covered: list[dict]) -> None:
    """The list of pairs this run covered, printed (pytest -s shows it) and written next to the
    test cache; every method appears, covered or refused in one line: none is skipped silently."""
    import os

    methods = methods_for(preset)
    done = sorted(c["pair"].split(" x ")[1] for c in covered)
    assert done == methods, f"{preset}: pairs not run: {sorted(set(methods) - set(done))}"
    # not vacuous: every family exports `none` and at least one reducing method through every command
    status = {c["pair"].split(" x ")[1]: c["status"] for c in covered}
    assert status["none"] == "covered" and sum(s == "covered" for s in status.values()) >= 2, covered
    # `tokedge methods` (its `families`) says what the matrix found: covered pairs are listed, refused ones not
    from tokedge.export.families import families_for

    family = FAMILY[preset]
    for method, state in status.items():
        listed = family in families_for(METHODS[method])
        assert listed == (state == "covered" or (family, method) in REFUSED_BY_OPTIONS), (preset, method, state)
    where = Path(os.environ.get("TOKEDGE_CACHE", ".")) / f"matrix-{preset}.json"
    where.parent.mkdir(parents=True, exist_ok=True)
    where.write_text(json.dumps(covered, indent=1))
    for c in covered:
        print(f"{c['pair']}: {c['status']}: {c.get('why') or ', '.join(c['commands'])}")


def family_tests(preset: str):
    """The two tests of one preset's matrix file: every method through `run_pair`, then the list."""
    import pytest

    covered: list[dict] = []

    @pytest.mark.parametrize("method", methods_for(preset))
    def test_pair(method, tmp_path, capsys, monkeypatch):
        covered.append(run_pair(preset, method, tmp_path, capsys, monkeypatch))

    def test_pairs_listed():
        report_pairs(preset, covered)

    return test_pair, test_pairs_listed
