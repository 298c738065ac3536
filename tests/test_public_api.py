"""`from tokedge import Pipeline`: the public Python API, and the README's example run verbatim
(its file names replaced by a test artifact and image) against `tokedge run`'s output."""

from __future__ import annotations

import contextlib
import io
import json
import re
import subprocess
import sys
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_import_tokedge_loads_no_runtime():
    code = ("import sys, tokedge; assert 'Pipeline' in dir(tokedge); "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('onnxruntime', 'torch', 'transformers', 'numpy')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_public_names_are_the_runtime_classes():
    import tokedge
    from tokedge.runtime.backends import Backend
    from tokedge.runtime.pipeline import Pipeline, Result

    assert (tokedge.Pipeline, tokedge.Result, tokedge.Backend) == (Pipeline, Result, Backend)
    try:
        tokedge.Pipelin  # noqa: B018
    except AttributeError as exc:
        assert "Pipelin" in str(exc)
    else:
        raise AssertionError("unknown attributes must raise")


def test_readme_python_example_runs(artifacts, test_images, tmp_path, monkeypatch, capsys):
    from tokedge.cli import main

    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    example = next(b for b in blocks if "from tokedge import Pipeline" in b)
    art = artifacts("cls-attn", 64)
    test_images[0].save(tmp_path / "photo.jpg", quality=95)
    monkeypatch.chdir(tmp_path)
    code = example.replace("./tiny-llava-cls-attn-64", str(art))
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        exec(compile(code, "README.md", "exec"), {})
    first_line = printed.getvalue().splitlines()[0]
    capsys.readouterr()
    assert main(["run", str(art), "--image", "photo.jpg", "--prompt", "What is shown in this image?",
                 "--max-new-tokens", "32", "--json"]) == 0
    expected = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert first_line.startswith(f"{expected['text']} {expected['visual_tokens']} ")
    assert first_line.endswith("ms to the first token")
