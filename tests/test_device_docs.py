"""docs/device.md's systemd unit is a valid unit: `systemd-analyze verify` accepts it where the
tool exists (it is on this machine), and either way it parses as an INI file with the sections and
keys a service needs, running `tokedge serve` with the key from a file, never on the command line."""

from __future__ import annotations

import configparser
import re
import shutil
import subprocess
from pathlib import Path

import pytest

DOC = Path(__file__).resolve().parents[1] / "docs" / "device.md"


def _unit() -> str:
    text = DOC.read_text()
    blocks = re.findall(r"```ini\n(.*?)```", text, flags=re.S)
    units = [b for b in blocks if "[Service]" in b]
    assert len(units) == 1
    return units[0]


def test_unit_parses_and_serves_with_a_key_file():
    parser = configparser.ConfigParser(strict=False, interpolation=None, comment_prefixes=("#", ";"))
    parser.optionxform = str  # systemd keys are case-sensitive
    parser.read_string(_unit())
    assert parser.sections() == ["Unit", "Service", "Install"]
    exec_start = parser["Service"]["ExecStart"]
    assert exec_start.split()[0].startswith("/") and exec_start.split()[1] == "serve"
    assert "--api-key-file" in exec_start and "--api-key " not in exec_start + " "
    assert parser["Service"]["KillSignal"] == "SIGTERM"
    assert parser["Install"]["WantedBy"] == "multi-user.target"


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed here")
def test_systemd_analyze_verifies_the_unit(tmp_path):
    # ExecStart's binary must exist for verify: point it at a real executable, keep everything else
    unit = re.sub(r"ExecStart=\S+", f"ExecStart={shutil.which('true')}", _unit())
    path = tmp_path / "tokedge.service"
    path.write_text(unit)
    proc = subprocess.run(["systemd-analyze", "verify", "--man=no", str(path)], capture_output=True, text=True,
                          timeout=60, check=False)
    problems = [line for line in proc.stderr.splitlines() if "tokedge.service" in line]
    assert proc.returncode == 0 and not problems, proc.stderr
