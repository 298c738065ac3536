"""Built-in checkpoints for offline use.

`tiny-llava` is a deterministic random-weight LLaVA with LLaVA-1.5 geometry (336 px, patch 14,
576 visual tokens, CLS + feature layer -2), a real byte-level BPE tokenizer trained here on a fixed
corpus, a real CLIP image processor and a chat template. It is written as an ordinary llava-hf
checkpoint directory (`save_pretrained`) and then loaded through the same path as a user's model.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from tokedge.artifact import staged_directory

# config.json's `tokedge_weights` on checkpoints this module builds (a name, so that no string equal to
# the `random` method's name is compared outside tokedge/reduce: tests/test_structure.py)
RANDOM_WEIGHTS = "random"

# A fixed corpus: the tokenizer is trained on it, so the same merges come out every time.
_CORPUS = """
USER: What is shown in this image? ASSISTANT: The image shows a red car parked on a quiet street.
USER: Describe the picture in detail. ASSISTANT: A small dog sits on green grass next to a wooden fence.
USER: How many people are in the photo? ASSISTANT: There are three people standing near the door.
USER: What colour is the sky? ASSISTANT: The sky is blue with a few white clouds over the hills.
USER: Read the sign. ASSISTANT: The sign says stop, and it is mounted on a metal pole at the corner.
USER: Is there a cat? ASSISTANT: Yes, a grey cat is sleeping on the sofa beside a striped cushion.
USER: What is the man holding? ASSISTANT: He is holding an umbrella and a cup of coffee in the rain.
USER: Where was this taken? ASSISTANT: It looks like a kitchen with white cabinets and a large window.
The quick brown fox jumps over the lazy dog. A picture is worth a thousand words.
Vision language models turn images into tokens, and fewer tokens make inference faster on the edge.
Jetson Orin devices run TensorRT engines built from ONNX graphs exported on a workstation.
numbers 0 1 2 3 4 5 6 7 8 9 10 100 336 576 64 and punctuation , . ! ? : ; ( ) - ' "
"""

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] != 'system' %}{{ message['role'].upper() + ': ' }}{% endif %}"
    "{% if message['content'] is string %}{{ message['content'] + ' ' }}{% else %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\n' }}{% endfor %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'video') %}{{ '<video>\n' }}{% endfor %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] + ' ' }}"
    "{% endfor %}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)


@dataclass(frozen=True)
class TinyLlavaConfig:
    """Sizes of the built-in model; geometry follows LLaVA-1.5 (CLIP ViT-L/14 @ 336 px)."""

    image_size: int = 336
    patch_size: int = 14
    vision_hidden: int = 64
    vision_layers: int = 6  # 5 run up to the feature layer: enough for ToMe to reach 64 tokens
    vision_heads: int = 4
    text_hidden: int = 64
    text_layers: int = 3
    text_heads: int = 4
    text_kv_heads: int = 2  # grouped-query attention, as in newer decoders
    vocab_target: int = 480  # BPE vocabulary before special tokens
    init_std: float = 0.3  # wide enough that greedy decoding has clear winners
    seed: int = 0
    vision: str = "clip"  # "clip" (CLS + patches) or "siglip" (patches only, fixed-size resize)
    text: str = "llama"  # "llama", "qwen2" or "mistral"
    vocab_size: int = 0  # 0: the tokenizer's size; larger pads the embedding and LM head (bench models)
    text_intermediate: int = 0  # 0: 3 x text_hidden


# the hub LLaVA-NeXT checkpoints' canvases (height, width), in their order (ties keep the earlier one)
NEXT_PINPOINTS = ((336, 672), (672, 336), (672, 672), (1008, 336), (336, 1008))


@dataclass(frozen=True)
class TinyLlavaNextConfig(TinyLlavaConfig):
    """LLaVA-NeXT geometry (anyres: base view + 336 px tiles on the hub's 5 pinpoints, 576 features
    per partition, image_newline) with a smaller tower: up to 5 partitions run per image."""

    vision_layers: int = 3
    pinpoints: tuple[tuple[int, int], ...] = NEXT_PINPOINTS
    max_position_embeddings: int = 4096  # a 672x672 image alone is up to 2928 visual tokens


# Qwen2-style turns, images first then the text, as the hub LLaVA-OneVision template renders them
ONEVISION_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\n' }}{% endfor %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'video') %}{{ '<video>\n' }}{% endfor %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] }}"
    "{% endfor %}{% endif %}"
    "{{ '<|im_end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


@dataclass(frozen=True)
class TinyLlavaOnevisionConfig(TinyLlavaConfig):
    """LLaVA-OneVision geometry (SigLIP 384/14: 27 x 27 = 729 features per partition, the hub's 36
    pinpoints, anyres_max_9, image_newline, mean/std 0.5) with a small tower and a Qwen2 decoder."""

    image_size: int = 384
    vision_layers: int = 3
    vision: str = "siglip"
    text: str = "qwen2"
    # one image reaches 8,721 tokens (e.g. 1500 x 1014 px: a 108 x 73 map just under the shrink threshold)
    max_position_embeddings: int = 10240
    # "hub": preprocessor_config.json + flat processor_config.json + chat_template.json (the hub repos);
    # "nested": transformers 5's processor_config.json with the image processor inside + chat_template.jinja
    processor_files: str = "hub"


PRESETS: dict[str, TinyLlavaConfig | TinyQwen25VLConfig | TinyQwen3VLConfig] = {"tiny-llava": TinyLlavaConfig(), "tiny-llava-next": TinyLlavaNextConfig(),
                                       "tiny-llava-onevision": TinyLlavaOnevisionConfig()}


def preset_cache_dir() -> Path:
    base = os.environ.get("TOKEDGE_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "tokedge"
    )
    return Path(base) / "presets"


def build_tokenizer(cfg: TinyLlavaConfig, video: bool = False):
    """A real byte-level BPE tokenizer with BOS added by its post-processor, as Llama's does, and the
    special token `<image>` (plus `<video>` with `video`)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<unk>", "<s>", "</s>", "<pad>"]
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=cfg.vocab_target,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([line for line in _CORPUS.splitlines() if line], trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", tok.token_to_id("<s>"))]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        padding_side="left",
        extra_special_tokens={"image_token": "<image>", **({"video_token": "<video>"} if video else {})},
    )
    fast.add_special_tokens({"additional_special_tokens": ["<image>", "<video>"] if video else ["<image>"]})
    return fast


def _random_init(model_cls, config, seed: int, init_std: float):
    """`model_cls(config)` in eval mode with deterministic random weights (norms near 1, small biases,
    fan-in scaled matrices, wide embeddings so greedy decoding has clear winners)."""
    import torch

    config.tokedge_weights = RANDOM_WEIGHTS  # saved in config.json: export records that no gate means anything here
    torch.manual_seed(seed)
    model = model_cls(config).eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in sorted(model.named_parameters()):
            if "norm" in name:
                param.copy_(1.0 + 0.1 * torch.randn(param.shape, generator=gen))
            elif name.endswith("bias"):
                param.copy_(0.02 * torch.randn(param.shape, generator=gen))
            else:
                fan_in = param.shape[-1] if param.dim() > 1 else 1
                std = init_std if param.dim() == 1 or "embed" in name else fan_in**-0.5
                param.copy_(std * torch.randn(param.shape, generator=gen))
    return model


def _tiny_vision_config(cfg: TinyLlavaConfig):
    """The tiny vision tower's config: CLIP (quick_gelu, with a projection size) or SigLIP (no head)."""
    import transformers

    sizes = dict(
        hidden_size=cfg.vision_hidden,
        intermediate_size=cfg.vision_hidden * 4,
        num_hidden_layers=cfg.vision_layers,
        num_attention_heads=cfg.vision_heads,
        image_size=cfg.image_size,
        patch_size=cfg.patch_size,
    )
    if cfg.vision == "clip":
        return transformers.CLIPVisionConfig(**sizes, projection_dim=cfg.vision_hidden, hidden_act="quick_gelu")
    if cfg.vision == "siglip":
        return transformers.SiglipVisionConfig(**sizes, vision_use_head=False)
    raise ValueError(f"unknown tiny vision tower {cfg.vision!r}")


def _tiny_text_config(cfg: TinyLlavaConfig, tokenizer, max_positions: int):
    """The tiny decoder's config (Llama, Qwen2 or Mistral), sized from `cfg` and the tokenizer."""
    import transformers

    config_cls = {"llama": transformers.LlamaConfig, "qwen2": transformers.Qwen2Config,
                  "mistral": transformers.MistralConfig}[cfg.text]
    return config_cls(
        hidden_size=cfg.text_hidden,
        intermediate_size=cfg.text_intermediate or cfg.text_hidden * 3,
        num_hidden_layers=cfg.text_layers,
        num_attention_heads=cfg.text_heads,
        num_key_value_heads=cfg.text_kv_heads,
        vocab_size=max(cfg.vocab_size, len(tokenizer)),
        max_position_embeddings=max_positions,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )


def build_tiny_llava(out: Path, cfg: TinyLlavaConfig = TinyLlavaConfig(), force: bool = False) -> Path:
    """Write the tiny checkpoint directory (model + processor) at `out`, atomically."""
    if isinstance(cfg, TinyLlavaNextConfig):
        return build_tiny_llava_next(out, cfg, force=force)
    if isinstance(cfg, TinyLlavaOnevisionConfig):
        return build_tiny_llava_onevision(out, cfg, force=force)
    import transformers
    from transformers import LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor

    from tokedge.export.hf import quiet_transformers

    quiet_transformers()
    tokenizer = build_tokenizer(cfg)
    image_token_id = tokenizer.convert_tokens_to_ids("<image>")
    vision = _tiny_vision_config(cfg)
    text = _tiny_text_config(cfg, tokenizer, max_positions=2048)
    config = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_id=image_token_id,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default" if cfg.vision == "clip" else "full",
        projector_hidden_act="gelu",
    )
    model = _random_init(LlavaForConditionalGeneration, config, cfg.seed, cfg.init_std)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    if cfg.vision == "siglip":
        image_processor = transformers.SiglipImageProcessor(
            size={"height": cfg.image_size, "width": cfg.image_size}, resample=3, do_rescale=True,
            do_normalize=True, image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5], do_convert_rgb=True,
        )
    else:
        image_processor = transformers.CLIPImageProcessor(
            size={"shortest_edge": cfg.image_size},
            crop_size={"height": cfg.image_size, "width": cfg.image_size},
            do_center_crop=True,
            do_resize=True,
            do_rescale=True,
            do_normalize=True,
            do_convert_rgb=True,
            image_mean=[0.48145466, 0.4578275, 0.40821073],
            image_std=[0.26862954, 0.26130258, 0.27577711],
            resample=3,
        )
    processor = LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=cfg.patch_size,
        vision_feature_select_strategy="default" if cfg.vision == "clip" else "full",
        num_additional_image_tokens=1 if cfg.vision == "clip" else 0,
        chat_template=CHAT_TEMPLATE,
        image_token="<image>",
    )
    with staged_directory(out, force=force, marker="config.json") as stage:
        model.save_pretrained(stage, safe_serialization=True)
        processor.save_pretrained(stage)
    return out


CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def build_tiny_llava_next(out: Path, cfg: TinyLlavaNextConfig = TinyLlavaNextConfig(), force: bool = False) -> Path:
    """A tiny llava-hf LLaVA-NeXT checkpoint (`LlavaNextForConditionalGeneration` + `LlavaNextProcessor`
    with the PIL image processor), written at `out` atomically."""
    import transformers
    from transformers import LlavaNextConfig, LlavaNextForConditionalGeneration, LlavaNextProcessor

    from tokedge.export.hf import quiet_transformers

    quiet_transformers()
    if cfg.vision != "clip" or cfg.text != "llama":
        raise ValueError("the tiny LLaVA-NeXT preset has a CLIP tower and a Llama decoder")
    tokenizer = build_tokenizer(cfg)
    vision = _tiny_vision_config(cfg)
    text = _tiny_text_config(cfg, tokenizer, max_positions=cfg.max_position_embeddings)
    pinpoints = [list(p) for p in cfg.pinpoints]
    config = LlavaNextConfig(
        vision_config=vision,
        text_config=text,
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        projector_hidden_act="gelu",
        image_grid_pinpoints=pinpoints,
    )
    model = _random_init(LlavaNextForConditionalGeneration, config, cfg.seed, cfg.init_std)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    image_processor = transformers.LlavaNextImageProcessorPil(
        size={"shortest_edge": cfg.image_size},
        crop_size={"height": cfg.image_size, "width": cfg.image_size},
        image_grid_pinpoints=pinpoints,
        do_center_crop=True, do_resize=True, do_rescale=True, do_normalize=True, do_convert_rgb=True, do_pad=True,
        image_mean=list(CLIP_MEAN), image_std=list(CLIP_STD), resample=3,
    )
    processor = LlavaNextProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=cfg.patch_size,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=CHAT_TEMPLATE,
        image_token="<image>",
    )
    with staged_directory(out, force=force, marker="config.json") as stage:
        model.save_pretrained(stage, safe_serialization=True)
        processor.save_pretrained(stage)
    return out


def build_tiny_llava_onevision(out: Path, cfg: TinyLlavaOnevisionConfig = TinyLlavaOnevisionConfig(),
                               force: bool = False) -> Path:
    """A tiny llava-hf LLaVA-OneVision checkpoint written at `out` atomically: the model with
    `save_pretrained`, and, since `LlavaOnevisionProcessor` cannot be built without torchvision,
    its parts as transformers writes them (`cfg.processor_files` picks the file layout)."""
    import json

    import transformers
    from transformers import LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration

    from tokedge.export.hf import quiet_transformers

    quiet_transformers()
    if cfg.vision != "siglip" or cfg.text != "qwen2":
        raise ValueError("the tiny LLaVA-OneVision preset has a SigLIP tower and a Qwen2 decoder")
    if cfg.processor_files not in ("hub", "nested"):
        raise ValueError(f"processor_files is 'hub' or 'nested', not {cfg.processor_files!r}")
    tokenizer = build_tokenizer(cfg, video=True)
    config = LlavaOnevisionConfig(
        vision_config=_tiny_vision_config(cfg),
        text_config=_tiny_text_config(cfg, tokenizer, max_positions=cfg.max_position_embeddings),
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        video_token_id=tokenizer.convert_tokens_to_ids("<video>"),
        vision_feature_layer=-1,
        vision_feature_select_strategy="full",
        vision_aspect_ratio="anyres_max_9",
        projector_hidden_act="gelu",
    )
    model = _random_init(LlavaOnevisionForConditionalGeneration, config, cfg.seed, cfg.init_std)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    image_processor = transformers.LlavaOnevisionImageProcessorPil(
        size={"height": cfg.image_size, "width": cfg.image_size}, image_mean=[0.5] * 3, image_std=[0.5] * 3,
        resample=3, do_pad=True, do_convert_rgb=True,
    )
    fields = {"processor_class": "LlavaOnevisionProcessor", "image_token": "<image>", "video_token": "<video>",
              "num_image_tokens": (cfg.image_size // cfg.patch_size) ** 2, "vision_feature_select_strategy": "full",
              "vision_aspect_ratio": "anyres_max_9"}
    with staged_directory(out, force=force, marker="config.json") as stage:
        model.save_pretrained(stage, safe_serialization=True)
        tokenizer.save_pretrained(stage)
        if cfg.processor_files == "hub":
            image_processor.save_pretrained(stage)  # preprocessor_config.json
            (stage / "processor_config.json").write_text(json.dumps(fields, indent=2) + "\n")
            (stage / "chat_template.json").write_text(json.dumps({"chat_template": ONEVISION_CHAT_TEMPLATE}) + "\n")
        else:
            nested = {**fields, "image_processor": image_processor.to_dict()}
            (stage / "processor_config.json").write_text(json.dumps(nested, indent=2) + "\n")
            (stage / "chat_template.jinja").write_text(ONEVISION_CHAT_TEMPLATE)
    return out


PRESET_STAMP = "tokedge-preset.json"


def _stamp(cfg: TinyLlavaConfig) -> str:
    import dataclasses
    import hashlib
    import json

    template = (ONEVISION_CHAT_TEMPLATE if isinstance(cfg, TinyLlavaOnevisionConfig)
                else QWEN2_VL_CHAT_TEMPLATE if isinstance(cfg, TinyQwen25VLConfig)
                else QWEN3_VL_CHAT_TEMPLATE if isinstance(cfg, TinyQwen3VLConfig)
                else INTERNVL_CHAT_TEMPLATE if isinstance(cfg, TinyInternVLConfig)
                else GEMMA3_CHAT_TEMPLATE if isinstance(cfg, TinyGemma3Config) else CHAT_TEMPLATE)
    blob = json.dumps({"config": dataclasses.asdict(cfg), "corpus": _CORPUS, "template": template}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def random_weights(source: str, config) -> str | None:
    """The manifest's `weights` record for a checkpoint whose weights are random: a preset named as
    `source`, or a directory written by this module's builders (marked in its config.json)."""
    if source in PRESETS:
        return f"random (preset {source})"
    if getattr(config, "tokedge_weights", None) == RANDOM_WEIGHTS:
        return "random (built by tokedge.export.presets)"
    return None


def resolve_preset(name: str) -> Path | None:
    """Path of a built-in checkpoint (built on first use, rebuilt when its definition changed), or
    None when `name` is not a preset."""
    if name not in PRESETS:
        return None
    import json

    cfg = PRESETS[name]
    path = preset_cache_dir() / name
    stamp = path / PRESET_STAMP
    current = _stamp(cfg)
    try:
        fresh = json.loads(stamp.read_text())["sha256"] == current and (path / "config.json").is_file()
    except (OSError, ValueError, KeyError):
        fresh = False
    if not fresh:
        import logging

        logging.getLogger("tokedge").info("building built-in checkpoint %s at %s", name, path)
        if isinstance(cfg, TinyQwen25VLConfig):
            build_tiny_qwen2_5_vl(path, cfg, force=True)
        elif isinstance(cfg, TinyQwen3VLConfig):
            build_tiny_qwen3_vl(path, cfg, force=True)
        elif isinstance(cfg, TinySmolVLMConfig):
            build_tiny_smolvlm(path, cfg, force=True)
        elif isinstance(cfg, TinyInternVLConfig):
            build_tiny_internvl(path, cfg, force=True)
        elif isinstance(cfg, TinyGemma3Config):
            build_tiny_gemma3(path, cfg, force=True)
        else:
            build_tiny_llava(path, cfg, force=True)
        (path / PRESET_STAMP).write_text(json.dumps({"preset": name, "sha256": current}) + "\n")
    return path


# ---------------------------------------------------------------------------------------------
# Qwen2.5-VL (docs/research/qwen-vl.md sections 6 and 7)

# the hub Qwen2-VL / Qwen2.5-VL chat template (default system message, vision markers per image item)
QWEN2_VL_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

QWEN_VISION_TOKENS = ("<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|vision_pad|>",
                      "<|image_pad|>", "<|video_pad|>")


@dataclass(frozen=True)
class TinyQwen25VLConfig:
    """A small Qwen2.5-VL: hub image geometry (patch 14, merge 2, 112 px windows, pixels 56^2..3584^2),
    a 4-block window/full vision tower and a 3-layer Qwen2 decoder with chunked M-RoPE [2, 3, 3]."""

    vision_depth: int = 4
    vision_hidden: int = 32
    vision_heads: int = 2
    fullatt_blocks: tuple[int, ...] = (1, 3)
    text_hidden: int = 64
    text_layers: int = 3
    text_heads: int = 4
    text_kv_heads: int = 2
    mrope_section: tuple[int, int, int] = (2, 3, 3)
    vocab_target: int = 400
    min_pixels: int = 3136
    max_pixels: int = 12845056
    max_position_embeddings: int = 8192
    init_std: float = 0.3
    seed: int = 0


def build_qwen_tokenizer(cfg: TinyQwen25VLConfig | TinyQwen3VLConfig):
    """A real `Qwen2Tokenizer`: byte-level BPE trained on the corpus with Qwen's split regex, no BOS,
    the chat and vision special tokens atomic, EOS `<|im_end|>`."""
    import json

    from tokenizers import Regex, Tokenizer, models, pre_tokenizers, trainers
    from transformers import Qwen2Tokenizer
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    trainer = trainers.BpeTrainer(vocab_size=cfg.vocab_target, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([line for line in _CORPUS.splitlines() if line], trainer=trainer)
    bpe = json.loads(tok.to_str())["model"]
    qwen = Qwen2Tokenizer(vocab=bpe["vocab"], merges=[tuple(m) for m in bpe["merges"]], eos_token="<|im_end|>",
                          pad_token="<|endoftext|>", unk_token=None, bos_token=None)
    qwen.add_special_tokens({"additional_special_tokens": list(QWEN_VISION_TOKENS)})
    qwen.eos_token = "<|im_end|>"
    return qwen


def build_tiny_qwen2_5_vl(out: Path, cfg: TinyQwen25VLConfig = TinyQwen25VLConfig(), force: bool = False) -> Path:
    """A tiny Qwen2_5_VLForConditionalGeneration directory at `out` (atomic): model, Qwen2Tokenizer with
    chat_template.jinja and the PIL Qwen2-VL image processor (`Qwen2_5_VLProcessor` needs torchvision)."""
    import transformers
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    from tokedge.export.hf import quiet_transformers

    quiet_transformers()
    tok = build_qwen_tokenizer(cfg)
    ids = {t: tok.convert_tokens_to_ids(t) for t in ("<|endoftext|>", *QWEN_VISION_TOKENS)}
    head_dim = cfg.text_hidden // cfg.text_heads
    if sum(cfg.mrope_section) * 2 != head_dim:
        raise ValueError(f"mrope_section {cfg.mrope_section} must sum to head_dim/2 = {head_dim // 2}")
    config = Qwen2_5_VLConfig(
        vision_config={"depth": cfg.vision_depth, "hidden_size": cfg.vision_hidden,
                       "intermediate_size": cfg.vision_hidden * 2, "num_heads": cfg.vision_heads,
                       "out_hidden_size": cfg.text_hidden, "window_size": 112,
                       "fullatt_block_indexes": list(cfg.fullatt_blocks), "patch_size": 14,
                       "spatial_merge_size": 2, "temporal_patch_size": 2, "tokens_per_second": 2},
        text_config={"vocab_size": len(tok), "hidden_size": cfg.text_hidden, "intermediate_size": cfg.text_hidden * 2,
                     "num_hidden_layers": cfg.text_layers, "num_attention_heads": cfg.text_heads,
                     "num_key_value_heads": cfg.text_kv_heads, "max_position_embeddings": cfg.max_position_embeddings,
                     "rope_parameters": {"rope_type": "default", "rope_theta": 1e6,
                                         "mrope_section": list(cfg.mrope_section)},
                     "bos_token_id": ids["<|endoftext|>"], "eos_token_id": [ids["<|im_end|>"], ids["<|endoftext|>"]],
                     "pad_token_id": ids["<|endoftext|>"], "tie_word_embeddings": False},
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=False,
    )
    model = _random_init(Qwen2_5_VLForConditionalGeneration, config, cfg.seed, cfg.init_std)
    model.generation_config.pad_token_id = ids["<|endoftext|>"]
    model.generation_config.eos_token_id = [ids["<|im_end|>"], ids["<|endoftext|>"]]
    image_processor = transformers.Qwen2VLImageProcessorPil(min_pixels=cfg.min_pixels, max_pixels=cfg.max_pixels)
    tok.chat_template = QWEN2_VL_CHAT_TEMPLATE
    with staged_directory(out, force=force, marker="config.json") as stage:
        model.save_pretrained(stage, safe_serialization=True)
        tok.save_pretrained(stage)
        image_processor.save_pretrained(stage)
    return out


PRESETS["tiny-qwen2.5-vl"] = TinyQwen25VLConfig()


# ---------------------------------------------------------------------------------------------
# Qwen3-VL (docs/research/qwen-vl.md sections 3.4, 4, 6 and 7)

# the Qwen3-VL template reduced to user/assistant/system turns without tools: no default system
# message, vision markers per image item (renders as the hub template does for these messages)
QWEN3_VL_CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@dataclass(frozen=True)
class TinyQwen3VLConfig:
    """A small Qwen3-VL: hub image geometry (patch 16, merge 2, pixels 256^2..4096^2, mean/std 0.5), a
    4-block full-attention tower with a 12 x 12 learned position table and DeepStack on blocks 1 and 2,
    and a 3-layer Qwen3 decoder (q/k norms, head_dim 32) with interleaved M-RoPE [6, 5, 5]."""

    vision_depth: int = 4
    vision_hidden: int = 32
    vision_heads: int = 2
    position_embeddings: int = 144  # a square: the learned table is 12 x 12, resampled to each grid
    deepstack_blocks: tuple[int, ...] = (1, 2)
    text_hidden: int = 64
    text_layers: int = 3
    text_heads: int = 2
    text_kv_heads: int = 1
    head_dim: int = 32
    mrope_section: tuple[int, int, int] = (6, 5, 5)
    vocab_target: int = 400
    min_pixels: int = 65536
    max_pixels: int = 16777216
    max_position_embeddings: int = 8192
    # untied: with random weights a tied head scores each fed token against itself and greedy decoding
    # repeats it (the 2B/4B hub checkpoints tie, 8B does not; the graphs handle both)
    tie_word_embeddings: bool = False
    init_std: float = 0.3
    seed: int = 0


def build_tiny_qwen3_vl(out: Path, cfg: TinyQwen3VLConfig = TinyQwen3VLConfig(), force: bool = False) -> Path:
    """A tiny Qwen3VLForConditionalGeneration directory at `out` (atomic): model, Qwen2Tokenizer with
    chat_template.jinja and the PIL Qwen2-VL image processor with Qwen3-VL's settings (the
    `Qwen3VLProcessor` needs torchvision, so no processor file)."""
    import transformers
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration

    from tokedge.export.hf import quiet_transformers

    quiet_transformers()
    tok = build_qwen_tokenizer(cfg)
    ids = {t: tok.convert_tokens_to_ids(t) for t in ("<|endoftext|>", *QWEN_VISION_TOKENS)}
    if sum(cfg.mrope_section) * 2 != cfg.head_dim:
        raise ValueError(f"mrope_section {cfg.mrope_section} must sum to head_dim/2 = {cfg.head_dim // 2}")
    config = Qwen3VLConfig(
        vision_config={"depth": cfg.vision_depth, "hidden_size": cfg.vision_hidden,
                       "intermediate_size": cfg.vision_hidden * 2, "num_heads": cfg.vision_heads,
                       "out_hidden_size": cfg.text_hidden, "patch_size": 16, "spatial_merge_size": 2,
                       "temporal_patch_size": 2, "num_position_embeddings": cfg.position_embeddings,
                       "deepstack_visual_indexes": list(cfg.deepstack_blocks)},
        text_config={"vocab_size": len(tok), "hidden_size": cfg.text_hidden, "intermediate_size": cfg.text_hidden * 2,
                     "num_hidden_layers": cfg.text_layers, "num_attention_heads": cfg.text_heads,
                     "num_key_value_heads": cfg.text_kv_heads, "head_dim": cfg.head_dim,
                     "max_position_embeddings": cfg.max_position_embeddings,
                     "rope_parameters": {"rope_type": "default", "rope_theta": 5e6,
                                         "mrope_section": list(cfg.mrope_section), "mrope_interleaved": True},
                     "bos_token_id": ids["<|endoftext|>"], "eos_token_id": [ids["<|im_end|>"], ids["<|endoftext|>"]],
                     "pad_token_id": ids["<|endoftext|>"]},
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=cfg.tie_word_embeddings,
    )
    model = _random_init(Qwen3VLForConditionalGeneration, config, cfg.seed, cfg.init_std)
    model.generation_config.pad_token_id = ids["<|endoftext|>"]
    model.generation_config.eos_token_id = [ids["<|im_end|>"], ids["<|endoftext|>"]]
    image_processor = transformers.Qwen2VLImageProcessorPil(
        patch_size=16, image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5],
        size={"shortest_edge": cfg.min_pixels, "longest_edge": cfg.max_pixels})
    tok.chat_template = QWEN3_VL_CHAT_TEMPLATE
    with staged_directory(out, force=force, marker="config.json") as stage:
        model.save_pretrained(stage, safe_serialization=True)
        tok.save_pretrained(stage)
        image_processor.save_pretrained(stage)
    return out


PRESETS["tiny-qwen3-vl"] = TinyQwen3VLConfig()


# --- SmolVLM (Idefics3 lineage) ----------------------------------------------------------------------

SMOLVLM_CHAT_TEMPLATE = (  # SmolVLM's (transformers' DEFAULT_CHAT_TEMPLATE of processing_smolvlm, images only)
    "<|im_start|>{% for message in messages %}{{message['role'] | capitalize}}"
    "{% if message['content'] is string %}{{': ' + message['content']}}{% else %}"
    "{% if message['content'][0]['type'] == 'image' %}{{':'}}{% else %}{{': '}}{% endif %}"
    "{% for line in message['content'] %}{% if line['type'] == 'text' %}{{line['text']}}"
    "{% elif line['type'] == 'image' %}{{ '<image>' }}{% endif %}{% endfor %}{% endif %}"
    "<end_of_utterance>\n{% endfor %}{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)


@dataclass(frozen=True)
class TinySmolVLMConfig:
    """SmolVLM-256M's structure at toy sizes: SigLIP-like tower (64 px views, patch 8: 64 patches),
    pixel shuffle x2 -> 16 tokens per view, tiles of 64 px under a longest edge of 256 (up to 4 x 4
    tiles + the global view), a Llama decoder; Idefics3 classes, as the 256M checkpoint's config."""

    image_size: int = 64
    patch_size: int = 8
    scale_factor: int = 2
    longest_edge: int = 256
    vision_hidden: int = 32
    vision_layers: int = 2
    vision_heads: int = 2
    text_hidden: int = 64
    text_layers: int = 3
    text_heads: int = 4
    text_kv_heads: int = 2
    vocab_target: int = 400
    seed: int = 0
    init_std: float = 0.6


def byte_level_tokenizer(vocab_target: int, trained_specials: list[str], **named):
    """A byte-level BPE tokenizer trained on the corpus (no BOS added): `trained_specials` take the first
    ids in order, `named` are the fast tokenizer's bos/eos/unk/pad tokens; left padding."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_target, special_tokens=trained_specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([line for line in _CORPUS.splitlines() if line], trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, padding_side="left", **named)


def build_smolvlm_tokenizer(cfg: TinySmolVLMConfig):
    """A byte-level BPE tokenizer (no BOS, as SmolLM2's) with SmolVLM's special tokens as single tokens."""
    fast = byte_level_tokenizer(cfg.vocab_target, ["<unk>", "<|im_start|>", "<|im_end|>", "<pad>"],
                                bos_token="<|im_start|>", eos_token="<end_of_utterance>", unk_token="<unk>",
                                pad_token="<pad>")
    rows = cfg.longest_edge // cfg.image_size
    fast.add_special_tokens({"additional_special_tokens": [
        "<fake_token_around_image>", "<image>", "<end_of_utterance>", "<global-img>",
        *(f"<row_{r + 1}_col_{c + 1}>" for r in range(max(rows, 6)) for c in range(max(rows, 6)))]})
    return fast


def smolvlm_config(cfg: TinySmolVLMConfig, text_config: dict, tokenizer, version: int = 1):
    """`Idefics3Config` (SmolVLM; `version` 2: `SmolVLMConfig`, SmolVLM2) of a SmolVLM checkpoint: the tiny
    vision tower of `cfg`, the language model of `text_config`, `<image>` of `tokenizer` as the image token."""
    import transformers

    config_class = transformers.SmolVLMConfig if version == 2 else transformers.Idefics3Config
    return config_class(
        vision_config={"hidden_size": cfg.vision_hidden, "intermediate_size": cfg.vision_hidden * 4,
                       "num_hidden_layers": cfg.vision_layers, "num_attention_heads": cfg.vision_heads,
                       "image_size": cfg.image_size, "patch_size": cfg.patch_size},
        text_config=text_config, scale_factor=cfg.scale_factor, image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False,
    )


def smolvlm_processor(cfg: TinySmolVLMConfig, tokenizer):
    """`Idefics3Processor` (PIL image processor: tiles of the view size under `cfg.longest_edge`, Lanczos;
    the view's token count) with SmolVLM's chat template."""
    import transformers
    from transformers import Idefics3Processor

    image_processor = transformers.Idefics3ImageProcessorPil(
        size={"longest_edge": cfg.longest_edge}, max_image_size={"longest_edge": cfg.image_size}, resample=1)
    per_view = (cfg.image_size // cfg.patch_size) ** 2 // cfg.scale_factor**2
    return Idefics3Processor(image_processor=image_processor, tokenizer=tokenizer, image_seq_len=per_view,
                             chat_template=SMOLVLM_CHAT_TEMPLATE)


def build_tiny_smolvlm(out: Path, cfg: TinySmolVLMConfig = TinySmolVLMConfig(), force: bool = False,
                       version: int = 1) -> Path:
    """A tiny SmolVLM checkpoint (`Idefics3ForConditionalGeneration` + `Idefics3Processor` with the PIL
    image processor), written at `out` atomically. `version` 2: SmolVLM2's classes
    (`SmolVLMForConditionalGeneration`, the PIL `SmolVLMImageProcessor`) and `SmolVLMProcessor`'s files
    written as transformers writes them (the class itself needs torchvision and num2words)."""
    import json

    import transformers
    from transformers import Idefics3ForConditionalGeneration, SmolVLMForConditionalGeneration

    from tokedge.export.hf import quiet_transformers

    quiet_transformers()
    tokenizer = build_smolvlm_tokenizer(cfg)
    config = smolvlm_config(cfg, {
        "model_type": "llama", "hidden_size": cfg.text_hidden, "intermediate_size": cfg.text_hidden * 3,
        "num_hidden_layers": cfg.text_layers, "num_attention_heads": cfg.text_heads,
        "num_key_value_heads": cfg.text_kv_heads, "vocab_size": len(tokenizer), "rms_norm_eps": 1e-5,
        "max_position_embeddings": 4096, "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id,
        "tie_word_embeddings": False}, tokenizer, version)
    model_class = SmolVLMForConditionalGeneration if version == 2 else Idefics3ForConditionalGeneration
    model = _random_init(model_class, config, cfg.seed, cfg.init_std)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    processor = smolvlm_processor(cfg, tokenizer)
    with staged_directory(out, force=force, marker="config.json") as stage:
        model.save_pretrained(stage, safe_serialization=True)
        if version == 2:
            transformers.SmolVLMImageProcessorPil(**processor.image_processor.to_dict()).save_pretrained(stage)
            tokenizer.save_pretrained(stage)
            (stage / "processor_config.json").write_text(json.dumps(
                {"processor_class": "SmolVLMProcessor", "image_seq_len": processor.image_seq_len}, indent=2) + "\n")
            (stage / "chat_template.jinja").write_text(SMOLVLM_CHAT_TEMPLATE)
        else:
            processor.save_pretrained(stage)
    return out


PRESETS["tiny-smolvlm"] = TinySmolVLMConfig()


# --- InternVL3 (transformers' InternVLForConditionalGeneration) -------------------------------------

# InternVL3-hf's template for user/assistant/system turns (each image item becomes `<IMG_CONTEXT>` + newline)
INTERNVL_CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' %}{{ '<IMG_CONTEXT>\n' }}{% elif content['type'] == 'video' %}{{ '<video>\n' }}"
    "{% elif content['type'] == 'text' %}{{ content['text'] }}{% endif %}{% endfor %}{% endif %}"
    "{{ '<|im_end|>\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
INTERNVL_TOKENS = {"start_image_token": "<img>", "end_image_token": "</img>", "context_image_token": "<IMG_CONTEXT>",
                   "video_token": "<video>"}


@dataclass(frozen=True)
class TinyInternVLConfig:
    """InternVL3-1B's structure at toy sizes: an InternViT-like tower (32 px views, patch 4: 64 patches,
    CLS, layer scale), pixel shuffle 0.5 -> 16 tokens per view, 1..6 tiles of the closest aspect ratio
    plus a thumbnail, the LayerNorm-MLP projector, a Qwen2 decoder with tied embeddings."""

    image_size: int = 32
    patch_size: int = 4
    min_tiles: int = 1
    max_tiles: int = 6
    vision_hidden: int = 32
    vision_layers: int = 2
    vision_heads: int = 2
    text_hidden: int = 64
    text_layers: int = 3
    text_heads: int = 4
    text_kv_heads: int = 2
    text_model_type: str = "qwen2"  # InternVL3; "qwen3": InternVL3.5's 1B-8B language models
    vocab_target: int = 400
    max_position_embeddings: int = 8192
    seed: int = 0
    init_std: float = 0.6


def build_internvl_tokenizer(cfg: TinyInternVLConfig):
    """The tiny Qwen2Tokenizer with InternVL's image markers as named special tokens (tokenizer
    attributes `start_image_token`, `context_image_token`, ... as InternVL3-hf's tokenizer_config)."""
    tok = build_qwen_tokenizer(cfg)  # type: ignore[arg-type]  # reads vocab_target only
    tok.add_special_tokens({"extra_special_tokens": list(INTERNVL_TOKENS.values())}, replace_extra_special_tokens=False)
    tok._set_model_specific_special_tokens(INTERNVL_TOKENS)
    return tok


def build_tiny_internvl(out: Path, cfg: TinyInternVLConfig = TinyInternVLConfig(), force: bool = False) -> Path:
    """A tiny InternVLForConditionalGeneration directory at `out` (atomic): the model, the tokenizer, the
    PIL GotOcr2 image processor (tiles, bicubic, ImageNet mean/std as InternVL3's) and the processor's
    fields and chat template as files (`InternVLProcessor` cannot be built without torchvision)."""
    import json

    from transformers import InternVLConfig, InternVLForConditionalGeneration
    from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import GotOcr2ImageProcessorPil

    from tokedge.export.hf import quiet_transformers

    quiet_transformers()
    tok = build_internvl_tokenizer(cfg)
    end, pad = tok.convert_tokens_to_ids("<|im_end|>"), tok.convert_tokens_to_ids("<|endoftext|>")
    config = InternVLConfig(
        vision_config={"hidden_size": cfg.vision_hidden, "intermediate_size": cfg.vision_hidden * 4,
                       "num_hidden_layers": cfg.vision_layers, "num_attention_heads": cfg.vision_heads,
                       "image_size": [cfg.image_size] * 2, "patch_size": [cfg.patch_size] * 2},
        text_config={"model_type": cfg.text_model_type, "vocab_size": len(tok), "hidden_size": cfg.text_hidden,
                     "head_dim": cfg.text_hidden // cfg.text_heads,
                     "intermediate_size": cfg.text_hidden * 3, "num_hidden_layers": cfg.text_layers,
                     "num_attention_heads": cfg.text_heads, "num_key_value_heads": cfg.text_kv_heads,
                     "max_position_embeddings": cfg.max_position_embeddings, "rms_norm_eps": 1e-6,
                     "bos_token_id": pad, "eos_token_id": end, "pad_token_id": pad, "tie_word_embeddings": True},
        image_token_id=tok.convert_tokens_to_ids("<IMG_CONTEXT>"),
        image_seq_length=(cfg.image_size // cfg.patch_size) ** 2 // 4, downsample_ratio=0.5, tie_word_embeddings=True,
    )
    model = _random_init(InternVLForConditionalGeneration, config, cfg.seed, cfg.init_std)
    model.generation_config.pad_token_id = pad
    model.generation_config.eos_token_id = end
    image_processor = GotOcr2ImageProcessorPil(
        size={"height": cfg.image_size, "width": cfg.image_size}, crop_to_patches=True, min_patches=cfg.min_tiles,
        max_patches=cfg.max_tiles, image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225], resample=3)
    fields = {"processor_class": "InternVLProcessor", "image_seq_length": config.image_seq_length}
    with staged_directory(out, force=force, marker="config.json") as stage:
        model.save_pretrained(stage, safe_serialization=True)
        tok.save_pretrained(stage)
        image_processor.save_pretrained(stage)
        (stage / "processor_config.json").write_text(json.dumps(fields, indent=2) + "\n")
        (stage / "chat_template.jinja").write_text(INTERNVL_CHAT_TEMPLATE)
    return out


PRESETS["tiny-internvl"] = TinyInternVLConfig()


# --- Gemma 3 (Gemma3ForConditionalGeneration) --------------------------------------------------------

# Gemma 3's template for user/model turns without the leading <bos> (the tiny tokenizer adds none)
GEMMA3_CHAT_TEMPLATE = (
    "{% for message in messages %}{% set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
    "{{ '<start_of_turn>' + role + '\n' }}{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for item in message['content'] %}{% if item['type'] == 'image' %}{{ '<start_of_image>' }}"
    "{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}{% endfor %}{% endif %}"
    "{{ '<end_of_turn>\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}"
)
GEMMA3_TOKENS = {"boi_token": "<start_of_image>", "eoi_token": "<end_of_image>", "image_token": "<image_soft_token>"}


@dataclass(frozen=True)
class TinyGemma3Config:
    """Gemma-3-4B's structure at toy sizes: a SigLIP tower (64 px, patch 8: 8 x 8 patches) pooled 2 x 2
    to 16 tokens per image, Gemma 3 text layers (q/k norms, four norms, scaled embeddings) with
    sliding-window layers (window 12, shorter than the prompts, so the windows matter) and one full
    layer of every three, tied embeddings."""

    image_size: int = 64
    patch_size: int = 8
    tokens_per_image: int = 16
    vision_hidden: int = 32
    vision_layers: int = 2
    vision_heads: int = 2
    text_hidden: int = 64
    text_layers: int = 4
    text_heads: int = 4
    text_kv_heads: int = 2
    head_dim: int = 16
    sliding_window: int = 12
    layer_types: tuple[str, ...] = ("sliding_attention", "sliding_attention", "full_attention", "sliding_attention")
    vocab_target: int = 400
    seed: int = 0
    init_std: float = 0.6


def build_gemma3_tokenizer(cfg: TinyGemma3Config):
    """A byte-level BPE tokenizer (no BOS added) with Gemma 3's turn and image tokens as single tokens
    and its named image tokens (`boi_token`, `eoi_token`, `image_token`) as tokenizer attributes."""
    fast = byte_level_tokenizer(cfg.vocab_target, ["<pad>", "<eos>", "<bos>", "<unk>"], bos_token="<bos>",
                                eos_token="<eos>", unk_token="<unk>", pad_token="<pad>")
    fast.add_special_tokens({"extra_special_tokens": ["<start_of_turn>", "<end_of_turn>", *GEMMA3_TOKENS.values()]},
                            replace_extra_special_tokens=False)
    fast._set_model_specific_special_tokens(GEMMA3_TOKENS)
    return fast


def build_tiny_gemma3(out: Path, cfg: TinyGemma3Config = TinyGemma3Config(), force: bool = False) -> Path:
    """A tiny Gemma3ForConditionalGeneration directory at `out` (atomic): the model, its Gemma3Processor
    (the PIL Gemma 3 image processor: bilinear to the view size, no pan-and-scan) and chat template."""
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration, Gemma3Processor
    from transformers.models.gemma3.image_processing_pil_gemma3 import Gemma3ImageProcessorPil

    from tokedge.export.hf import quiet_transformers

    quiet_transformers()
    tok = build_gemma3_tokenizer(cfg)
    ids = {name: tok.convert_tokens_to_ids(t) for name, t in GEMMA3_TOKENS.items()}
    end = tok.convert_tokens_to_ids("<end_of_turn>")
    config = Gemma3Config(
        vision_config={"model_type": "siglip_vision_model", "hidden_size": cfg.vision_hidden,
                       "intermediate_size": cfg.vision_hidden * 4, "num_hidden_layers": cfg.vision_layers,
                       "num_attention_heads": cfg.vision_heads, "image_size": cfg.image_size,
                       "patch_size": cfg.patch_size, "vision_use_head": False},
        text_config={"model_type": "gemma3_text", "vocab_size": len(tok), "hidden_size": cfg.text_hidden,
                     "intermediate_size": cfg.text_hidden * 3, "num_hidden_layers": cfg.text_layers,
                     "num_attention_heads": cfg.text_heads, "num_key_value_heads": cfg.text_kv_heads,
                     "head_dim": cfg.head_dim, "query_pre_attn_scalar": cfg.head_dim,
                     "sliding_window": cfg.sliding_window, "layer_types": list(cfg.layer_types),
                     "max_position_embeddings": 8192, "rope_parameters": {
                         "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1_000_000.0},
                         "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0}},
                     "bos_token_id": tok.bos_token_id, "eos_token_id": [tok.eos_token_id, end],
                     "pad_token_id": tok.pad_token_id},
        mm_tokens_per_image=cfg.tokens_per_image, boi_token_index=ids["boi_token"], eoi_token_index=ids["eoi_token"],
        image_token_index=ids["image_token"],
    )
    model = _random_init(Gemma3ForConditionalGeneration, config, cfg.seed, cfg.init_std)
    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.eos_token_id = [tok.eos_token_id, end]
    image_processor = Gemma3ImageProcessorPil(size={"height": cfg.image_size, "width": cfg.image_size},
                                              image_mean=[0.5] * 3, image_std=[0.5] * 3, resample=2,
                                              do_pan_and_scan=False)
    processor = Gemma3Processor(image_processor=image_processor, tokenizer=tok, chat_template=GEMMA3_CHAT_TEMPLATE,
                                image_seq_length=cfg.tokens_per_image)
    with staged_directory(out, force=force, marker="config.json") as stage:
        model.save_pretrained(stage, safe_serialization=True)
        processor.save_pretrained(stage)
    return out


PRESETS["tiny-gemma3"] = TinyGemma3Config()
