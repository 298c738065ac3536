"""A preset's random weights are visible wherever output or numbers from its artifact are shown
(issue 28, item 9): the manifest records them, and export, run (text and --json), verify, profile
(terminal and report.md banner, report.json) and serve (its ready lines) say so once. An artifact
from before the record existed (no `weights`) says nothing."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

from tokedge.artifact import read_manifest
from tokedge.cli import main

NOTICE = "weights are random"
OLD = Path(__file__).parent / "fixtures" / "old-qwen2.5-vl-none"


def _notices(text: str) -> int:
    return " ".join(text.split()).count(NOTICE)


def test_preset_artifacts_say_so_once_per_command(artifacts, test_images, tmp_path, capsys):
    art = artifacts("cls-attn", 64)
    assert read_manifest(art).weights == "random (built by tokedge.export.presets)" \
        or read_manifest(art).weights.startswith("random (preset")
    image = tmp_path / "x.png"
    test_images[0].save(image)
    for argv in (["run", art, "--image", image, "--prompt", "Hi", "--max-new-tokens", "2"],
                 ["run", art, "--image", image, "--prompt", "Hi", "--max-new-tokens", "2", "--json"],
                 ["verify", art],
                 ["profile", art, "--image", image, "--runs", "1", "--warmup", "0", "--max-new-tokens", "2",
                  "--out", tmp_path / "p"]):
        capsys.readouterr()
        assert main([str(a) for a in argv]) == 0
        out, err = capsys.readouterr()
        assert _notices(err) == 1 and _notices(out) == 0, (argv, err)  # stdout stays clean for --json
    report = json.loads((tmp_path / "p" / "report.json").read_text())
    assert report["weights"] == read_manifest(art).weights
    assert (tmp_path / "p" / "report.md").read_text().splitlines()[2].startswith("> **Random weights.**")


def test_export_of_a_preset_says_so(tmp_path, capsys):
    assert main(["export", "tiny-llava", "--method", "cls-attn", "--budget", "32", "--out", str(tmp_path / "a"),
                 "--no-validate"]) == 0
    assert _notices(capsys.readouterr().err) == 1
    assert read_manifest(tmp_path / "a").weights == "random (preset tiny-llava)"


def test_an_artifact_without_the_record_says_nothing(tmp_path, capsys):
    art = tmp_path / "old"
    shutil.copytree(OLD, art)
    assert read_manifest(art).weights is None
    assert main(["verify", str(art)]) == 0
    assert _notices(capsys.readouterr().err) == 0


def test_serve_ready_lines_say_so(artifacts):
    import threading

    from tests.serve.test_cli_serve import free_port

    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "tokedge.cli", "serve", str(artifacts("cls-attn", 64)), "--port",
                             str(port)], text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(iter(proc.stderr.readline, "")), daemon=True)
    reader.start()
    try:
        deadline = time.monotonic() + 120
        while not any("note:" in line for line in lines) and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.1)
    finally:
        proc.terminate()
        proc.wait(timeout=60)
        reader.join(timeout=10)
    err = "".join(lines)
    assert "ready on http://" in err and _notices(err) == 1, err
