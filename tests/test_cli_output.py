"""What a person reads: listing commands at 80 columns keep every key value whole, `--json` of
every listing command is one object of the documented shape, help texts survive narrow terminals
and literal brackets, and `--debug` works before or after the subcommand."""

from __future__ import annotations

import json
import re

import pytest
import typer

from tokedge.cli import app, main


@pytest.fixture
def narrow(monkeypatch):
    monkeypatch.setenv("COLUMNS", "80")
    monkeypatch.setenv("LINES", "24")


def _lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.strip()]


def test_profiles_at_80_columns_show_full_names(narrow, capsys):
    from tokedge.profiles import list_profiles

    assert main(["profiles"]) == 0
    out = capsys.readouterr().out
    first_column = [line.split()[0] for line in _lines(out)[1:]]
    assert first_column == sorted(list_profiles())  # each name whole, usable as --profile as printed
    assert all(len(line) <= 80 for line in out.splitlines())
    assert "…" not in out


def test_methods_at_80_columns_keep_names_and_arxiv_ids(narrow, capsys):
    from tokedge.reduce import METHODS

    assert main(["methods"]) == 0
    out = capsys.readouterr().out
    assert all(len(line) <= 80 for line in out.splitlines())
    assert "…" not in out
    rows = [line.split()[0] for line in out.splitlines() if line and not line.startswith(" ")][1:]
    assert rows == list(METHODS)
    flat = " ".join(out.split())
    for m in METHODS.values():
        for arxiv in re.findall(r"\d{4}\.\d{4,5}", m.paper):
            assert arxiv in flat
    assert len(out.splitlines()) <= 2 + 4 * len(METHODS)  # a row, then summary, arXiv ids, families, code followed
    assert "families: llava_onevision" in flat  # the temporal methods name the one family with their graph


def test_passes_listing(narrow, capsys):
    from tokedge.export.passes import PASSES

    assert main(["passes"]) == 0
    out = capsys.readouterr().out
    assert [line.split()[0] for line in out.splitlines() if line and not line.startswith(" ")][1:] == list(PASSES)


@pytest.mark.parametrize("command,key", [("methods", "methods"), ("profiles", "profiles"), ("passes", "passes")])
def test_listing_json_is_one_object_of_the_documented_shape(command, key, capsys):
    from pathlib import Path

    assert main([command, "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert isinstance(data, dict) and list(data) == [key]
    assert data[key] and all(isinstance(row, dict) and "name" in row for row in data[key])
    docs = (Path(__file__).resolve().parents[1] / "docs" / "cli.md").read_text()
    assert f"`tokedge {command} --json`" in docs and f'"{key}": [' in docs


def _commands():
    return [c.name or c.callback.__name__ for c in app.registered_commands]


@pytest.mark.parametrize("command", _commands())
def test_help_texts_are_whole_at_80_columns(command, narrow, capsys):
    assert main([command, "--help"]) == 0
    out = capsys.readouterr().out
    flat = " ".join(out.split())
    cmd = typer.main.get_command(app).commands[command]
    for param in cmd.params:
        text = getattr(param, "help", None)
        if text:
            assert " ".join(text.split()) in flat, f"{command}: help of {param.name} is cut or mangled"
        if getattr(param, "show_default", False) and param.default not in (None, False, [], ()):
            assert f"[default: {param.default}]" in flat or "default:" in flat
    assert "…" not in out and all(len(line) <= 80 for line in out.splitlines())


def test_verify_help_shows_the_extra_in_brackets(narrow, capsys):
    assert main(["verify", "--help"]) == 0
    assert "(needs [export])" in " ".join(capsys.readouterr().out.split())


def test_top_level_help_lists_every_command_without_cutting(narrow, capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for name in _commands():
        line = next(line for line in out.splitlines() if line.strip().startswith(name + " "))
        assert not line.rstrip().endswith("...")


@pytest.mark.parametrize("where", ["before", "after"])
def test_debug_before_or_after_the_subcommand(where, tmp_path, capsys):
    from tokedge.errors import ArtifactError

    args = ["verify", str(tmp_path / "missing")]
    argv = ["--debug", *args] if where == "before" else [*args, "--debug"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and len(err.strip().splitlines()) == 1
    with pytest.raises(ArtifactError):  # --debug lets the traceback through
        main(argv)


def _parity_at_80_columns(art, capsys) -> tuple[list[str], dict]:
    """verify's lines at COLUMNS=80 (each checked to fit, none splitting a word) and its --json."""
    assert main(["verify", str(art), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert main(["verify", str(art)]) == 0
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert all(len(line) <= 80 for line in lines), lines
    words = " ".join(err.split()).split(" ")
    for case in report["cases"]:  # every number whole: a word cut at the margin would not be found
        for value in (case["max_abs_image_embeds"], max(case["max_abs_prefill_logits"], case["max_abs_step_logits"])):
            assert f"{value:.2e}," in words
    return lines, report


def test_parity_lines_fit_80_columns_without_splitting_words(artifacts, narrow, capsys):
    lines, _ = _parity_at_80_columns(artifacts("cls-attn", 64), capsys)
    assert lines[0].startswith("✓ hashes ok; parity: 1 case within tolerance 0.001")
    flat = " ".join(" ".join(lines).split())
    assert "2 prompts x 1 image, 64 visual tokens each: embeds" in flat and "tokens match" in flat


def test_parity_cases_are_labelled_by_their_sample(artifacts, tiny_llava_next_dir, narrow, capsys):
    """Issue 28 item 14: a tiled artifact's cases read "budget 2928; budget 2928". Each is now named
    by its own image's size and visual tokens, read back independently from reference.npz."""
    import numpy as np

    art = artifacts("none", checkpoint=tiny_llava_next_dir)
    lines, report = _parity_at_80_columns(art, capsys)
    flat = " ".join(" ".join(lines).split())
    with np.load(art / "reference.npz") as ref:
        expected = [f"image {ref[f'case{i}.image'].shape[1]}x{ref[f'case{i}.image'].shape[0]}, "
                    f"{ref[f'case{i}.image_embeds'].shape[-2]} visual tokens" for i in range(len(report["cases"]))]
    assert len(expected) >= 2 and len(set(expected)) == len(expected)
    assert [c["label"] for c in report["cases"]] == expected
    for label in expected:
        assert f"{label}: embeds" in flat
    assert "budget" not in flat


def test_export_parity_lines_at_80_columns(tiny_llava_dir, tmp_path, narrow, capsys):
    """export prints the same labelled parity lines as verify, none wider than the terminal."""
    out = tmp_path / "art"
    assert main(["export", str(tiny_llava_dir), "--method", "cls-attn", "--budget", "32", "--out", str(out),
                 "--json"]) == 0
    captured = capsys.readouterr()
    summary = json.loads(captured.out.strip().splitlines()[-1])
    lines = captured.err.splitlines()
    start = next(i for i, line in enumerate(lines) if "parity: " in line)
    end = next(i for i, line in enumerate(lines) if line.startswith("wrote "))
    parity = lines[start:end]
    assert parity[0].endswith(f"parity: {len(summary['parity']['cases'])} case within tolerance 0.001")
    assert all(len(line) <= 80 for line in parity)
    flat = " ".join(" ".join(parity).split())
    for case in summary["parity"]["cases"]:
        assert case["label"] == "2 prompts x 1 image, 32 visual tokens each"
        assert f"{case['label']}: embeds {case['max_abs_image_embeds']:.2e}," in flat
