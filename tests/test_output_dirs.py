"""Output and index directories (issue 22, items 19, 20, 21; docs/safety.md): `--force` replaces
only a directory tokedge wrote, not one that merely holds a file named tokedge.json; commands leave
no temporary directory behind; engines.json is bounded before it is read."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from tokedge.artifact import MANIFEST_NAME, check_target
from tokedge.cli import main
from tokedge.errors import UsageError


@pytest.fixture(scope="module")
def base_art(artifacts):
    return artifacts("none", 576)


@pytest.fixture(scope="module")
def image_file(tmp_path_factory, test_images):
    path = tmp_path_factory.mktemp("img") / "i.png"
    test_images[0].save(path)
    return path


def _one_line(err: str) -> str:
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    return lines[0]


# --- 19. --force ---------------------------------------------------------------------------------------


def _lookalikes(tmp_path: Path, base_art: Path) -> dict[str, Path]:
    project = tmp_path / "project"  # a user's directory with its own tokedge.json
    project.mkdir()
    (project / MANIFEST_NAME).write_text(json.dumps({"name": "my settings", "format_version": 1}))
    (project / "notes.txt").write_text("keep me")
    copied = tmp_path / "copied"  # a real manifest copied into a directory without the artifact's files
    copied.mkdir()
    shutil.copy(base_art / MANIFEST_NAME, copied / MANIFEST_NAME)
    (copied / "notes.txt").write_text("keep me")
    linked = tmp_path / "linked"  # tokedge.json is a symlink to a real manifest
    linked.mkdir()
    (linked / MANIFEST_NAME).symlink_to(base_art / MANIFEST_NAME)
    (linked / "notes.txt").write_text("keep me")
    return {"project": project, "copied": copied, "linked": linked}


@pytest.mark.parametrize("case", ["project", "copied", "linked"])
def test_force_keeps_a_directory_that_only_holds_a_tokedge_json(case, base_art, tmp_path, capsys):
    out = _lookalikes(tmp_path, base_art)[case]
    rc = main(["optimize", str(base_art), "--out", str(out), "--passes", "fold", "--force"])
    assert rc == 2 and "not a tokedge artifact" in _one_line(capsys.readouterr().err)
    assert (out / "notes.txt").read_text() == "keep me"


def test_force_keeps_a_directory_that_only_holds_an_engines_json(tmp_path):
    plain = tmp_path / "plain"
    plain.mkdir()
    (plain / "engines.json").write_text("{}")
    (plain / "data.bin").write_text("keep me")
    with pytest.raises(UsageError, match="not a tokedge engines directory"):
        check_target(plain, force=True, marker="engines.json")
    index = {"engines": {"vision": {"plan": "vision.plan", "sha256": "0" * 64}}, "artifact_manifest_sha256": "0" * 64}
    (plain / "engines.json").write_text(json.dumps(index))
    check_target(plain, force=True, marker="engines.json")  # what `tokedge build` writes is replaced


def test_force_still_replaces_an_artifact(base_art, tmp_path, capsys):
    out = tmp_path / "opt"
    shutil.copytree(base_art, out)
    assert main(["optimize", str(base_art), "--out", str(out), "--passes", "fold", "--force"]) == 0, \
        capsys.readouterr().err


# --- 20. no temporary directory left behind ----------------------------------------------------------


@pytest.fixture
def private_tmp(tmp_path, monkeypatch) -> Path:
    where = tmp_path / "tmp"
    where.mkdir()
    monkeypatch.setenv("TMPDIR", str(where))
    monkeypatch.setattr(tempfile, "tempdir", None)  # re-read TMPDIR
    return where


def _directories(where: Path) -> list[str]:
    """Directories left in TMPDIR (ONNX Runtime itself keeps a small `.ses` file there; not ours)."""
    return sorted(p.name for p in where.iterdir() if p.is_dir())


@pytest.mark.parametrize("command", ["run", "verify"])
def test_commands_leave_no_temporary_directory(command, base_art, image_file, private_tmp):
    args = {"run": ["run", str(base_art), "--image", str(image_file), "--prompt", "Describe it.",
                    "--max-new-tokens", "2"],
            "verify": ["verify", str(base_art)]}[command]
    env = {k: v for k, v in os.environ.items() if k != "TOKEDGE_DEBUG"}
    proc = subprocess.run([sys.executable, "-m", "tokedge", *args], capture_output=True, text=True, timeout=120,
                          env=env)
    assert proc.returncode == 0, proc.stderr
    assert _directories(private_tmp) == []


def test_loading_an_artifact_leaves_no_temporary_directory(base_art, private_tmp):
    """What `serve` does at start (and every Pipeline.load)."""
    from tokedge.runtime.pipeline import Pipeline

    with Pipeline.load(base_art):
        assert _directories(private_tmp) == []
    assert _directories(private_tmp) == []


# --- 21. engines.json bounded before it is read -----------------------------------------------------------


def test_huge_engines_index_is_not_read(base_art, image_file, tmp_path, capsys, monkeypatch):
    engines = tmp_path / "engines"
    engines.mkdir()
    with open(engines / "engines.json", "wb") as fh:
        fh.truncate(17 << 20)  # sparse: costs no disk
    real = Path.read_bytes

    def no_whole_read(self):
        assert self.name != "engines.json", "engines.json was read whole"
        return real(self)

    monkeypatch.setattr(Path, "read_bytes", no_whole_read)
    rc = main(["run", str(base_art), "--image", str(image_file), "--prompt", "x", "--backend", "tensorrt",
               "--engines", str(engines)])
    assert rc == 1 and "over the limit" in _one_line(capsys.readouterr().err)


def test_engines_index_symlink_is_refused(base_art, image_file, tmp_path, capsys):
    engines = tmp_path / "engines"
    engines.mkdir()
    (tmp_path / "elsewhere.json").write_text("{}")
    (engines / "engines.json").symlink_to(tmp_path / "elsewhere.json")
    rc = main(["run", str(base_art), "--image", str(image_file), "--prompt", "x", "--backend", "tensorrt",
               "--engines", str(engines)])
    assert rc == 1 and "symbolic link" in _one_line(capsys.readouterr().err)
