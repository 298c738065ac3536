"""`--dtype fp16` on the families added on the spine (SmolVLM, InternVL3; Gemma 3 refuses it): the export traces
(its vision graph keeps a float32 `pixel_values` input, as every family's: the runtime feeds float32
views) and validates against transformers in fp16 within the fp16 tolerance, and `tokedge run` answers.
InternVL3's fp16 export failed before (a float32 trace example fed its fp16 patch convolution)."""

from __future__ import annotations

import pytest

from tests.export.test_anyres_methods import textured_image


@pytest.mark.parametrize("fixture", ["tiny_smolvlm_dir", "tiny_internvl_dir"])
def test_fp16_export_validates_and_runs(request, fixture, tmp_path):
    from tokedge.artifact import load_artifact
    from tokedge.export.pipeline import ExportConfig, export
    from tokedge.runtime.pipeline import Pipeline

    out = tmp_path / "fp16"
    result = export(ExportConfig(model=str(request.getfixturevalue(fixture)), out=out, method="none", dtype="fp16"))
    assert result.parity["ok"]
    manifest = load_artifact(out)
    assert manifest.dtype == "fp16" and manifest.graphs["vision"].input("pixel_values").dtype == "float32"
    with Pipeline.load(out) as pipe:
        answer = pipe.generate([textured_image(480, 640, 3)], "What is shown?", max_new_tokens=4)
    assert answer.visual_tokens > 0 and len(answer.token_ids[0]) >= 1


def test_gemma3_refuses_fp16_in_one_line(tiny_gemma3_dir, tmp_path, capsys):
    """Gemma 3's activations overflow float16 on real checkpoints (transformers#36822): refused before loading."""
    from tokedge.cli import main

    assert main(["export", str(tiny_gemma3_dir), "--method", "none", "--dtype", "fp16", "--out", str(tmp_path / "a")]) == 2
    err = capsys.readouterr().err.strip()
    assert "overflow float16" in err and "export fp32" in err and len(err.splitlines()) == 1
