"""Exit codes of every command that takes a path (docs/cli.md, "Errors"): a path the user gave that is
not there, is a file, or is a directory without a manifest is a wrong input, 2; an artifact that is
there but damaged (a listed graph missing, a manifest that is not JSON) is failed work, 1. The list
of commands is checked against the app, so a new command with a path argument needs a case here."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import typer

from tokedge.artifact import MANIFEST_NAME
from tokedge.cli import app, main

PROFILE = "jetson-orin-nano-8gb"


def _task(tmp: Path, image: Path) -> str:
    """A one-line POPE task about `image` (for `tokedge eval`)."""
    task = tmp / "pope.jsonl"
    task.write_text(json.dumps({"question": "Is there a cat?", "label": "no", "image": str(image)}) + "\n")
    return f"pope:{task}"


def _argv(command: str, target: Path, tmp: Path, image: Path) -> list[str]:
    """The command's minimal arguments around `target`, the path under test."""
    if command == "eval":
        return ["eval", str(target), "--task", _task(tmp, image), "--out", str(tmp / "out")]
    return {
        "export": ["export", str(target), "--out", str(tmp / "out"), "--no-validate"],
        "quantize": ["quantize", str(target), "--out", str(tmp / "out")],
        "optimize": ["optimize", str(target), "--out", str(tmp / "out"), "--passes", "fold"],
        "build": ["build", str(target), "--profile", PROFILE, "--dry-run"],
        "memory": ["memory", str(target), "--profile", PROFILE],
        "check": ["check", str(target)],
        "verify": ["verify", str(target)],
        "run": ["run", str(target), "--image", str(image), "--prompt", "hi"],
        "serve": ["serve", str(target), "--port", "0"],
        "profile": ["profile", str(target), "--image", str(image), "--out", str(tmp / "report")],
    }[command]


PATH_COMMANDS = ("export", "quantize", "optimize", "build", "memory", "check", "verify", "run", "serve", "profile",
                 "eval")


def test_every_command_with_a_path_argument_is_covered():
    """Commands whose first argument is a path (or a model that may be one): all in PATH_COMMANDS."""
    group = typer.main.get_command(app)
    with_path = {name for name, cmd in group.commands.items()
                 if any(p.param_type_name == "argument" for p in cmd.params)}
    assert with_path == set(PATH_COMMANDS)


@pytest.fixture
def places(tmp_path) -> dict[str, Path]:
    from PIL import Image

    image = tmp_path / "photo.png"
    Image.new("RGB", (32, 32), (10, 20, 30)).save(image)
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("not an artifact")
    return {"missing": tmp_path / "no-such-dir", "a file": image, "no manifest": empty, "image": image}


@pytest.mark.parametrize("command", PATH_COMMANDS)
@pytest.mark.parametrize("case", ["missing", "a file", "no manifest"])
def test_a_path_that_is_not_an_artifact_exits_2(command, case, places, tmp_path, capsys):
    rc = main(_argv(command, places[case], tmp_path, places["image"]))
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert rc == 2, err
    assert len(lines) == 1 and lines[0].startswith("error: ") and str(places[case]) in lines[0]
    assert not (tmp_path / "out").exists()


def _missing_graph(art: Path) -> None:
    (art / "decoder.onnx").unlink()


def _bad_manifest(art: Path) -> None:
    (art / MANIFEST_NAME).write_text("{ not json")


def _tampered_graph(art: Path) -> None:
    data = json.loads((art / MANIFEST_NAME).read_text())
    assert "decoder.onnx" in data["files"]
    with open(art / "decoder.onnx", "ab") as f:
        f.write(b"\0")


ARTIFACT_COMMANDS = ("quantize", "optimize", "build", "memory", "check", "verify", "run", "serve", "profile", "eval")


@pytest.mark.parametrize("command", ARTIFACT_COMMANDS)
@pytest.mark.parametrize("spoil", [_missing_graph, _bad_manifest, _tampered_graph],
                         ids=["missing-graph", "bad-manifest", "tampered-graph"])
def test_a_damaged_artifact_exits_1(command, spoil, artifacts, places, tmp_path, capsys):
    art = tmp_path / "art"
    shutil.copytree(artifacts("cls-attn", 64), art)
    spoil(art)
    rc = main(_argv(command, art, tmp_path, places["image"]))
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    if command == "memory" and spoil is _tampered_graph:
        assert rc == 0, err  # memory plans from the manifest and file sizes; it hashes nothing (docs/cli.md)
        return
    assert rc == 1, err
    assert len(lines) == 1 and lines[0].startswith("error: ")
