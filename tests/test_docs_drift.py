"""What the docs and help say matches what the tool has: no scratch paths from a developer
machine in docs/, `export --help` names every family and preset, the README's model table has a
video column (OneVision and Qwen2.5-VL take video, docs/video.md)."""

from __future__ import annotations

import re
from pathlib import Path

from typer.testing import CliRunner

ROOT = Path(__file__).resolve().parents[1]


def test_docs_hold_no_developer_machine_paths():
    offenders = []
    for path in [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]:
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if re.search(r"(?<![\w.])/(work|tmp|home|Users)/\w", line):
                offenders.append(f"{path.relative_to(ROOT)}:{n}: {line.strip()[:100]}")
    assert not offenders, offenders


def test_export_help_names_every_family_and_preset():
    from tokedge.cli import app
    from tokedge.export.presets import PRESETS

    text = " ".join(CliRunner().invoke(app, ["export", "--help"], env={"COLUMNS": "200"}).output.split())
    for preset in PRESETS:
        assert preset in text, preset
    for family in ("LLaVA-1.5", "LLaVA-NeXT", "LLaVA-OneVision", "Qwen2.5-VL", "Qwen3-VL", "SmolVLM", "InternVL3", "Gemma 3"):
        assert family in text, family


def test_readme_model_table_has_a_video_column():
    table = [line for line in (ROOT / "README.md").read_text().splitlines()
             if line.startswith("| LLaVA") or line.startswith("| Qwen") or line.startswith("| model |")]
    header = [c.strip() for c in table[0].strip("|").split("|")]
    assert header[-1] == "video"
    video = {row.split("|")[1].strip(): row.strip().strip("|").split("|")[-1].strip() for row in table[1:]}
    assert video["LLaVA-OneVision"].startswith("yes") and video["Qwen2.5-VL"].startswith("yes")
    assert video["LLaVA-1.5"] == video["LLaVA-NeXT"] == video["Qwen3-VL"] == "no"
