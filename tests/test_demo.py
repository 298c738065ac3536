"""`make demo` says up front that tiny-llava has random weights, and echoes commands that paste back."""

from __future__ import annotations

import shlex
import subprocess
import sys

from tokedge.demo import command_line


def test_echoed_commands_paste_back_into_a_shell():
    argv = ["run", "demo out/art", "--image", "demo out/demo.png", "--prompt", "What is shown in this image?"]
    line = command_line(argv)
    assert shlex.split(line) == ["tokedge", *argv]  # what a POSIX shell would pass back


def test_demo_says_the_weights_are_random_before_anything_else(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    proc = subprocess.run([sys.executable, "-m", "tokedge.demo", "--out", str(blocker / "out")], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode != 0  # the output folder cannot be created under a file
    first = " ".join(proc.stdout.split("\n\n")[0].split())  # the banner's paragraph, wrapped to the terminal
    assert first.startswith("demo: ") and "RANDOM weights" in first and "gibberish" in first


def test_banner_at_80_columns_splits_no_word(monkeypatch):
    from tokedge.demo import BANNER, banner

    monkeypatch.setenv("COLUMNS", "80")
    lines = banner().splitlines()
    assert len(lines) > 1 and all(len(line) <= 80 for line in lines)
    assert " ".join(banner().split()) == " ".join(BANNER.split())  # the same words, none cut in two
