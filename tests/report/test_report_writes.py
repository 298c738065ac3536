"""Report writes (`profile --out DIR`, video profiles) go through exclusive temporary files of
unpredictable names: symlinks planted at any name in DIR never redirect a write (issue 22, item 11)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from tokedge.report.profile import BudgetResult, ProfileReport

# the temporary names earlier tokedge versions used, and the final names
PLANTED = (".report.md.tmp", "report.json.tmp", "report.md.tmp", ".latency.png.tmp.png", ".flops.png.tmp.png",
           "report.json", "report.md", "latency.png")


def _report() -> ProfileReport:
    results = [BudgetResult(
        budget=k, backend="onnxruntime", visual_tokens=k, artifact="a", ttft_ms=50.0, vision_ms=10.0, prefill_ms=20.0,
        preprocess_ms=5.0, decode_ms_per_token=8.0, tokens_per_s=125.0, p90={"ttft_ms": 55.0, "decode_ms_per_token": 9.0},
        peak_rss_mb=100.0, reduction_ms=0.1, prompt_tokens=10, flops={"vision": 1.0, "prefill": k / 100,
                                                                       "decode_per_token": 0.1},
        achieved_gflops_per_s={"vision": 1.0, "prefill": 1.0, "decode": 1.0}, predicted=None) for k in (576, 64)]
    return ProfileReport(artifact="a", method="cls-attn", images=["i.png"], prompt="p", runs=2, warmup=1,
                         max_new_tokens=4, machine={}, gemm_peak_gflops_per_s=1.0, results=results)


@pytest.fixture
def planted(tmp_path) -> tuple[Path, Path]:
    victim = tmp_path / "victim.txt"
    victim.write_text("untouched\n")
    out = tmp_path / "out"
    out.mkdir()
    for name in PLANTED:
        (out / name).symlink_to(victim)
    return out, victim


def test_profile_report_writes_never_follow_planted_symlinks(planted):
    from tokedge.report.render import write_all

    out, victim = planted
    written = write_all(_report(), out)
    assert victim.read_text() == "untouched\n"
    for path in written:
        assert path.is_file() and not path.is_symlink()
    assert json.loads((out / "report.json").read_text())["method"] == "cls-attn"
    assert not [p for p in os.listdir(out) if p.endswith(".tmp") and p not in PLANTED]


def test_video_report_writes_never_follow_planted_symlinks(planted):
    from tokedge.report.video_profile import VideoProfileReport, write_video_report

    out, victim = planted
    report = VideoProfileReport(artifact="a", method="none", stage="none", video="v.mp4", frames=2,
                                frame_indices=[0, 1], tokens_per_frame=4, full_tokens=8, prompt="p", runs=1, warmup=0,
                                max_new_tokens=2, machine={}, decode_preprocess_ms=1.0)
    for path in write_video_report(report, out):
        assert path.is_file() and not path.is_symlink()
    assert victim.read_text() == "untouched\n"


def test_write_atomic_replaces_whole_and_keeps_the_umask(tmp_path):
    from tokedge.safeio import write_atomic

    path = tmp_path / "f.txt"
    write_atomic(path, "one")
    write_atomic(path, b"two")
    assert path.read_text() == "two" and os.listdir(tmp_path) == ["f.txt"]
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask
