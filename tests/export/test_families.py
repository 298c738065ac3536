"""Other towers and decoders that transformers' LLaVA class accepts: SigLIP (no CLS, fixed-size
resize) with Qwen2 (q/k/v biases), and CLIP with Mistral. Checked against transformers' generate."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from tests.contract_client import ContractClient
from tests.export.test_parity import assert_matches_generate, chat


@pytest.mark.parametrize("vision,text,image_size", [("siglip", "qwen2", 224), ("clip", "mistral", 336)])
def test_family_matches_transformers(tmp_path_factory, artifacts, test_images, vision, text, image_size):
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    from tokedge.export.presets import TinyLlavaConfig, build_tiny_llava

    ckpt = build_tiny_llava(tmp_path_factory.mktemp("ckpt") / f"{vision}-{text}",
                            TinyLlavaConfig(vision=vision, text=text, image_size=image_size, seed=3))
    art = artifacts("none", checkpoint=ckpt)
    client = ContractClient(art)
    assert client.manifest["model"]["vision_model_type"].startswith(vision)
    assert client.manifest["model"]["text_model_type"] == text
    model = LlavaForConditionalGeneration.from_pretrained(ckpt, dtype=torch.float32).eval()
    processor = AutoProcessor.from_pretrained(ckpt)
    processor.tokenizer.padding_side = "left"
    inputs = processor(images=test_images[:2], text=[chat(processor, "Hi?"), chat(processor, "What is this?")],
                       padding=True, return_tensors="pt")
    assert_matches_generate(client, model, inputs)


# --- the family interface: registry, import rule, layout in the manifest ----------------------------

# The import rule (nothing outside families/ imports a family module, nothing branches on a family's
# name) is checked by tests/test_structure.py.


def test_registry_finds_the_family_by_model_type_and_checks_architectures(tiny_llava_dir):
    from tokedge.errors import UnsupportedModelError
    from tokedge.export.families import Family, families, for_checkpoint

    registered = families()
    from tests.test_structure import family_modules

    assert sorted(registered) == family_modules()  # every family module registers itself
    config = json.loads((tiny_llava_dir / "config.json").read_text())
    family = for_checkpoint(config)
    assert isinstance(family, Family) and family.name == "llava" == config["model_type"]
    assert for_checkpoint({"architectures": config["architectures"]}) is family  # no model_type: by architecture
    for bad in ({**config, "model_type": "blip-2"},
                {**config, "architectures": ["LlavaNextForConditionalGeneration"]},
                {"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}):
        with pytest.raises(UnsupportedModelError) as err:
            for_checkpoint(bad)
        message = str(err.value)
        assert "\n" not in message and "unsupported architecture" in message
        # it lists what is supported (a family still in progress, `exportable = False`, is not)
        assert all(name in message for name, f in registered.items() if getattr(f, "exportable", True))


def test_inspect_reads_the_config_without_weights(tiny_llava_dir, tmp_path):
    from tokedge.export.families import inspect_checkpoint

    config_only = tmp_path / "config-only"
    config_only.mkdir()
    shutil.copy(tiny_llava_dir / "config.json", config_only / "config.json")
    family, spec = inspect_checkpoint(str(config_only), config_only)
    assert family.name == "llava"
    config = json.loads((config_only / "config.json").read_text())
    vc = config["vision_config"]
    patches = (vc["image_size"] // vc["patch_size"]) ** 2
    assert spec.full_tokens == patches == 576
    assert spec.text_layers == config["text_config"]["num_hidden_layers"]
    assert spec.geometry.patch_tokens == patches and spec.geometry.has_cls
    assert spec.layout.kind == "single"


def test_manifest_records_the_single_layout(artifacts):
    from tokedge.artifact import FORMAT_VERSION, load_artifact

    art = artifacts("none", 576)
    raw = json.loads((art / "tokedge.json").read_text())
    assert raw["format_version"] == 1 < FORMAT_VERSION  # single layouts stay readable by format-1 readers
    assert raw["layout"]["kind"] == "single" and raw["layout"]["pinpoints"] == []
    assert load_artifact(art).layout.kind == "single"


def test_v1_manifest_without_layout_loads_and_runs(artifacts, hf_tiny, test_images, tmp_path):
    """A manifest written before `layout` existed reads as one 'single' view and still generates
    transformers' tokens."""
    import torch

    from tests.export.test_parity import chat
    from tokedge.runtime.pipeline import Pipeline

    art = tmp_path / "v1"
    shutil.copytree(artifacts("none", 576), art)
    manifest = json.loads((art / "tokedge.json").read_text())
    del manifest["layout"]
    (art / "tokedge.json").write_text(json.dumps(manifest))
    model, processor = hf_tiny
    inputs = processor(images=test_images[0], text=chat(processor, "What is this?"), return_tensors="pt")
    with torch.no_grad():
        expected = model.generate(**inputs, max_new_tokens=6, do_sample=False, eos_token_id=None,
                                  pad_token_id=model.config.text_config.pad_token_id)
    expected = expected[0, inputs["input_ids"].shape[1]:].tolist()
    with Pipeline.load(art) as pipe:
        assert pipe.manifest.layout.kind == "single"
        result = pipe.generate(test_images[0], "What is this?", max_new_tokens=6)
    eos = set(pipe.manifest.model.eos_token_ids)
    cut = next((i for i, t in enumerate(expected) if t in eos), len(expected))
    assert result.token_ids[0] == expected[:cut]


def _manifest_dict(artifacts, **layout):
    from tokedge.artifact import load_artifact

    data = load_artifact(artifacts("none", 576)).to_dict()
    data = json.loads(json.dumps(data))  # tuples -> lists, as read from disk
    data["layout"] = layout
    return data


ANYRES = {"kind": "anyres", "tile": 336, "patch_grid": 24,
          "pinpoints": [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]], "image_newline": True}


def test_anyres_layout_round_trips_into_the_runtime_layout(artifacts):
    from tokedge.artifact import Manifest
    from tokedge.runtime.layout import AnyresLayout, plan_image

    data = _manifest_dict(artifacts, **ANYRES)
    data["format_version"] = 2
    layout = Manifest.from_dict(data).layout
    assert layout.pinpoints == ((336, 672), (672, 336), (672, 672), (1008, 336), (336, 1008))
    runtime = layout.anyres()
    assert runtime == AnyresLayout(tile=336, patch_grid=24, pinpoints=layout.pinpoints)
    assert plan_image(runtime, 336, 336).canvas == (336, 672)  # ties keep the earlier pinpoint (spec 1.1)


@pytest.mark.parametrize("edit,fragment", [
    ({"kind": "tiles"}, "layout.kind"),
    ({**ANYRES}, "format_version"),  # a tiled layout in a version-1 manifest: old readers would ignore it
    ({**ANYRES, "version": 2, "pinpoints": [[300, 672]]}, "layout.pinpoints[0]"),
    ({**ANYRES, "version": 2, "pinpoints": []}, "layout.pinpoints"),
    ({**ANYRES, "version": 2, "tile": None}, "layout.tile"),
    ({**ANYRES, "version": 2, "pad_fill": [0, 0, 300]}, "layout.pad_fill"),
    ({"kind": 1}, "layout.kind"),
])
def test_bad_layouts_are_refused_in_one_line(artifacts, edit, fragment):
    from tokedge.artifact import Manifest
    from tokedge.manifest_schema import ManifestError

    edit = dict(edit)
    version = edit.pop("version", 1)
    data = _manifest_dict(artifacts, **edit)
    data["format_version"] = version
    with pytest.raises(ManifestError) as err:
        Manifest.from_dict(data)
    assert fragment in str(err.value) and "\n" not in str(err.value)
