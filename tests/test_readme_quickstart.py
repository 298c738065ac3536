"""The README's quantization quick-start block runs verbatim: every command line of it, in order,
in an empty directory, with the exit code its comment names ("exit 3") or 0. On the random-weight
preset the quantization gate does not apply; export and quantize say so in one line and record it."""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

from tokedge.cli import main

README = Path(__file__).resolve().parent.parent / "README.md"


def quick_start_block(heading: str = "### Quantization and memory") -> list[str]:
    text = README.read_text()
    start = text.index(heading)
    block = text[text.index("```sh\n", start) + 6:]
    return [line for line in block[: block.index("```")].splitlines() if line.strip()]


def test_readme_quantization_block_runs_verbatim(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    lines = quick_start_block()
    assert any("--quantize int4" in line for line in lines) and any("--quant-form qdq" in line for line in lines)
    for line in lines:
        command, _, comment = line.partition("#")
        args = shlex.split(command)
        assert args[0] == "tokedge", line
        expected = int(m.group(1)) if (m := re.search(r"exit (\d+)", comment)) else 0
        assert main(args[1:]) == expected, (line, capsys.readouterr().err)
    err = capsys.readouterr().err
    assert "weights are random (preset tiny-llava)" in err and "gate does not apply" in err
    int4 = next(Path(a) for line in lines if "--quantize int4" in line
                for a in [shlex.split(line.partition("#")[0])[-1]])
    manifest = json.loads((tmp_path / int4 / "tokedge.json").read_text())
    assert manifest["weights"] == "random (preset tiny-llava)"
    assert manifest["reference"]["tolerance"]["gated"] is False
    fid = manifest["quantization"]["fidelity"]  # measured all the same
    assert fid["text_tokens"] == 512 and fid["text_kl_mean"] > 0 and 0 <= fid["text_top1"] <= 1
