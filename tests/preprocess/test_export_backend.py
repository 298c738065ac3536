"""Export where torchvision is installed (every GPU workstation): transformers 5 would build its
torchvision image processor, whose pixels differ from tokedge's runtime (the PIL backend) by a grey
level or more, and export validation of tiled families (their references run transformers' own
image processor) failed at embeds 5e-3..2e-2. Families load the PIL backend; exports validate.
Needs torchvision (`.venv-tv`)."""

from __future__ import annotations

import pytest

FIXTURES = ["tiny_llava_dir", "tiny_llava_next_dir", "tiny_llava_onevision_dir", "tiny_smolvlm_dir", "tiny_internvl_dir",
            "tiny_gemma3_dir"]


@pytest.mark.parametrize("fixture", FIXTURES)
def test_families_load_the_pil_image_processor(request, fixture):
    from tokedge.export.families import load_checkpoint

    directory = request.getfixturevalue(fixture)
    loaded = load_checkpoint(str(directory), directory)
    assert "Pil" in type(loaded.processor.image_processor).__name__


@pytest.mark.parametrize("fixture", ["tiny_smolvlm_dir", "tiny_internvl_dir"])
def test_tiled_export_validates_with_torchvision_installed(request, fixture, tmp_path):
    from tokedge.export.pipeline import ExportConfig, export

    result = export(ExportConfig(model=str(request.getfixturevalue(fixture)), out=tmp_path / "a", method="none"))
    assert result.parity["ok"]
