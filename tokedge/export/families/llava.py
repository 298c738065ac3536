"""LLaVA family (llava-hf layout: `LlavaForConditionalGeneration` + `LlavaProcessor`).

Read top to bottom: what is supported, how a checkpoint is inspected and loaded, the graph
modules (vision + reduction + projector, token embedding, KV decoder, pruning prefill), what the
manifest records (one 'single' visual layout: one crop, one token block per image), and the
transformers-side reference the exported graphs are validated against. `LlavaFamily` at the end
gathers these behind the `Family` protocol and registers itself under "llava".
"""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from torch import nn

from tokedge.artifact import ModelInfo, PreprocessInfo, PromptInfo, VisualLayout
from tokedge.errors import InputError, UnsupportedModelError, UsageError
from tokedge.export.decoder import KVDecoder, PruningPrefill, TokenEmbedder
from tokedge.export.families import CheckpointSpec, FamilyBase, LoadedCheckpoint, register
from tokedge.export.towers import VisionTower, layers_to_feature
from tokedge.reduce.base import Method, VisionFeatures, VisionGeometry

SUPPORTED_VISION = ("clip_vision_model", "siglip_vision_model")
SUPPORTED_TEXT = ("llama", "mistral", "qwen2")
SUPPORTED_ARCHITECTURES = ("LlavaForConditionalGeneration",)

log = logging.getLogger("tokedge")


# --- the config (no weights) ---------------------------------------------------------------------


def full_tokens_from_config(cfg: dict) -> int:
    """Visual tokens per image before reduction, from a config.json dict."""
    vc = cfg.get("vision_config") or {}
    n = (int(vc.get("image_size", 336)) // int(vc.get("patch_size", 14))) ** 2
    if cfg.get("vision_feature_select_strategy", "default") == "full" and vc.get("model_type") != "siglip_vision_model":
        n += 1
    return n


def vision_geometry(cfg: dict) -> VisionGeometry | None:
    """The vision tower's token and layer counts from a config.json dict (no weights); None when
    the config leaves them at the class defaults (then the check waits for the loaded model)."""
    vc = cfg.get("vision_config") or {}
    if not all(k in vc for k in ("num_hidden_layers", "image_size", "patch_size")):
        return None
    has_cls = vc.get("model_type", "clip_vision_model") == "clip_vision_model"
    feature_layer = cfg.get("vision_feature_layer", -2)
    layers = int(vc["num_hidden_layers"])
    index = layers_to_feature(feature_layer, layers) if isinstance(feature_layer, int) else layers
    return VisionGeometry(patch_tokens=(int(vc["image_size"]) // int(vc["patch_size"])) ** 2, layers=index,
                          has_cls=has_cls)


def inspect_config(cfg: dict) -> CheckpointSpec:
    """Check a config.json dict is supported and describe it (cheap; errors before the slow part)."""
    check_supported(cfg)
    layers = (cfg.get("text_config") or {}).get("num_hidden_layers")  # absent when it is the default
    return CheckpointSpec(family="llava", full_tokens=full_tokens_from_config(cfg), geometry=vision_geometry(cfg),
                          text_layers=int(layers) if layers is not None else None, layout=VisualLayout(kind="single"))


def check_kind(cfg: dict, *, family: str, architectures: tuple[str, ...], vision: tuple[str, ...],
               text: tuple[str, ...], default_vision: str, default_text: str, where: str = "") -> None:
    """The checks every llava-hf family makes first (one line each): its `model_type` and
    architectures, then a vision tower and a language model it can export (`default_*`: what the
    config class assumes when config.json leaves the sub-config's model_type out; `where`: a
    suffix naming the model in the tower messages)."""
    archs = cfg.get("architectures") or []
    model_type = cfg.get("model_type")
    if model_type != family or (archs and not set(archs) & set(architectures)):
        raise UnsupportedModelError(
            f"unsupported architecture {archs or model_type!r}; the {family} family reads "
            f"{', '.join(architectures)} (model_type '{family}') checkpoints"
        )
    tower = (cfg.get("vision_config") or {}).get("model_type", default_vision)
    lm = (cfg.get("text_config") or {}).get("model_type", default_text)
    if tower not in vision:
        raise UnsupportedModelError(f"unsupported vision tower '{tower}'{where}; supported: {', '.join(vision)}")
    if lm not in text:
        raise UnsupportedModelError(f"unsupported language model '{lm}'{where}; supported: {', '.join(text)}")


def check_supported(cfg: dict) -> None:
    check_kind(cfg, family="llava", architectures=SUPPORTED_ARCHITECTURES, vision=SUPPORTED_VISION,
               text=SUPPORTED_TEXT, default_vision="clip_vision_model", default_text="llama")


def _check_weights(local: Path, allow_pickle: bool) -> None:
    safetensors = list(local.glob("*.safetensors"))
    pickles = list(local.glob("*.bin")) + list(local.glob("*.pt"))
    if safetensors:
        return
    if pickles and not allow_pickle:
        raise InputError(
            f"'{local}' has only pickle weights ({pickles[0].name}); convert them to safetensors or pass "
            "--allow-pickle to load them (with torch weights_only)"
        )
    if not pickles:
        raise InputError(f"'{local}' has no model weights (*.safetensors); it is not a complete checkpoint")


def load_hf_checkpoint(model_class: str, source: str, local: Path | None, *, trust_remote_code: bool = False,
                       allow_pickle: bool = False, load_processor=None):
    """(model, processor) of a llava-hf style checkpoint: weights and tokenizer files present (local
    directories), transformers' `model_class` in fp32 eval mode (safetensors unless allow_pickle),
    its processor with an image processor and a fast tokenizer. Shared by the LLaVA families.
    `load_processor(where, trust_remote_code)` replaces `AutoProcessor.from_pretrained` for a family
    whose processor class cannot be built here (LLaVA-OneVision without torchvision)."""
    if local is not None:
        _check_weights(local, allow_pickle)
        for name in ("tokenizer.json", "tokenizer_config.json"):
            if not (local / name).is_file():
                raise InputError(
                    f"'{local}' has no {name}; save the processor with the model (processor.save_pretrained)"
                )
    import transformers
    from transformers import AutoProcessor

    from tokedge.export.hf import pil_backend, quiet_transformers

    quiet_transformers()
    where = str(local) if local is not None else source
    try:
        model = getattr(transformers, model_class).from_pretrained(
            where,
            dtype=torch.float32,
            use_safetensors=not allow_pickle,
            trust_remote_code=trust_remote_code,
        ).eval()
        if load_processor is None:
            processor = AutoProcessor.from_pretrained(where, trust_remote_code=trust_remote_code, **pil_backend())
        else:
            processor = load_processor(where, trust_remote_code)
    except Exception as exc:  # the loading boundary: unpickling refusals, shape mismatches, missing files
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise InputError(f"cannot load the checkpoint at '{where}': {first}") from exc
    if getattr(processor, "image_processor", None) is None or getattr(processor, "tokenizer", None) is None:
        raise InputError(f"'{where}' has no image processor and tokenizer (processor files are missing)")
    if getattr(processor.tokenizer, "backend_tokenizer", None) is None:
        raise InputError(f"'{where}' has no fast tokenizer (tokenizer.json); tokedge's runtime needs one")
    return model, processor


def load_llava(
    source: str,
    local: Path | None,
    *,
    trust_remote_code: bool = False,
    allow_pickle: bool = False,
) -> LoadedCheckpoint:
    """Load model and processor from a llava-hf directory or hub id, refusing what we cannot export."""
    from tokedge.export.families import read_config

    spec = inspect_config(read_config(source, local, trust_remote_code))
    model, processor = load_hf_checkpoint("LlavaForConditionalGeneration", source, local,
                                          trust_remote_code=trust_remote_code, allow_pickle=allow_pickle)
    if getattr(model.model.language_model.layers[0].self_attn, "q_norm", None) is not None:
        raise UnsupportedModelError("language models with per-head q/k norms (Qwen3-style) are not supported yet")
    full_config = model.config.to_dict()  # with the class defaults the config file left out
    full = full_tokens_from_config(full_config)
    if full != spec.full_tokens:
        raise InputError(f"checkpoint geometry gives {full} visual tokens, config says {spec.full_tokens}")
    spec = replace(spec, geometry=vision_geometry(full_config), text_layers=int(model.config.text_config.num_hidden_layers))
    return LoadedCheckpoint(family=FAMILY, source=source, model=model, processor=processor, path=local, spec=spec)


# --- the three graph modules --------------------------------------------------------------------


class VisionGraph(nn.Module):
    """pixel_values [b, 3, H, W] -> image_embeds [b, k, hidden]: tower, reduction, projector."""

    def __init__(self, llava: LoadedCheckpoint, method: Method, k: int, options: dict):
        super().__init__()
        cfg = llava.model.config
        if isinstance(cfg.vision_feature_layer, (list, tuple)):
            raise UnsupportedModelError("multi-layer vision features (list vision_feature_layer) are not supported yet")
        drop_cls = cfg.vision_feature_select_strategy == "default"
        tower = llava.model.model.vision_tower
        has_cls = cfg.vision_config.model_type == "clip_vision_model"
        needs_cls = {"cls_attention", "cls_token"} & method.needs
        if needs_cls and not has_cls:
            raise InputError(f"--method {method.name} needs a CLS token, and this vision tower has none (SigLIP)")
        schedule = None
        if method.merges_in_vit:
            from tokedge.reduce.tome import merge_schedule

            index = layers_to_feature(cfg.vision_feature_layer, cfg.vision_config.num_hidden_layers)
            schedule = merge_schedule(llava.full_tokens - (0 if drop_cls or not has_cls else 1), k, index,
                                      protected=1 if has_cls else 0, mode=options.get("schedule", "even"))
            if schedule is None:
                patches = llava.full_tokens - (0 if drop_cls or not has_cls else 1)
                fewest = method.fewest_tokens(VisionGeometry(patches, index, has_cls)) if method.fewest_tokens else k + 1
                raise InputError(
                    f"--method {method.name} cannot merge down to {k} tokens in this model's {index} vision layers "
                    f"(each merges at most half): use --budget >= {fewest}"
                )
        self.schedule = schedule
        depth = layers_to_feature(cfg.vision_feature_layer, cfg.vision_config.num_hidden_layers)
        object_layer = method.object_layer(options, depth, has_cls) if method.object_layer else None
        self.tower = VisionTower(tower, cfg.vision_feature_layer, drop_cls, method.needs, schedule, object_layer)
        self.projector = llava.model.model.multi_modal_projector
        self.method = method
        self.k = k
        self.options = options

    def forward(self, pixel_values, instruction=None):
        vf = self.tower(pixel_values)
        vf.project = self.projector
        vf.instruction = instruction  # [b, hidden]: methods scoring with the prompt's text (cdpruner)
        return self.method.reduce(vf, self.k, self.options)


def build_graph_modules(llava: LoadedCheckpoint, method: Method, k: int, options: dict, plan=None) -> dict[str, nn.Module]:
    """vision, embed, decoder (and prefill for in-LLM methods, whose vision graph keeps every token)."""
    m = llava.model
    lm = m.model.language_model
    modules = {
        "vision": VisionGraph(llava, method, k, options).eval(),
        "embed": TokenEmbedder(lm.embed_tokens).eval(),
    }
    if plan is not None:
        modules["prefill"] = PruningPrefill(lm, m.lm_head, plan).eval()
    modules["decoder"] = KVDecoder(lm, m.lm_head, plan).eval()
    return modules


# --- metadata for the manifest --------------------------------------------------------------------


def model_info(llava: LoadedCheckpoint) -> ModelInfo:
    cfg = llava.model.config
    tc, vc = cfg.text_config, cfg.vision_config
    tok = llava.processor.tokenizer
    eos = tc.eos_token_id if tc.eos_token_id is not None else tok.eos_token_id
    eos_ids = tuple(eos) if isinstance(eos, (list, tuple)) else ((eos,) if eos is not None else ())
    gen_eos = getattr(llava.model.generation_config, "eos_token_id", None)
    if isinstance(gen_eos, int) and gen_eos not in eos_ids:
        eos_ids += (gen_eos,)
    head_dim = getattr(tc, "head_dim", None) or tc.hidden_size // tc.num_attention_heads
    return ModelInfo(
        source=llava.source,
        family="llava",
        vision_model_type=vc.model_type,
        text_model_type=tc.model_type,
        vision_hidden_size=vc.hidden_size,
        hidden_size=tc.hidden_size,
        num_layers=tc.num_hidden_layers,
        num_attention_heads=tc.num_attention_heads,
        num_key_value_heads=tc.num_key_value_heads,
        head_dim=head_dim,
        vocab_size=tc.vocab_size,
        max_position_embeddings=tc.max_position_embeddings,
        image_size=vc.image_size,
        patch_size=vc.patch_size,
        bos_token_id=tok.bos_token_id,
        eos_token_ids=eos_ids,
        pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else tc.pad_token_id,
        image_token_id=cfg.image_token_id,
        sliding_window=getattr(tc, "sliding_window", None) if getattr(tc, "use_sliding_window", True) else None,
        # towers without a feature layer (SmolVLM) run every layer
        vision_layers=layers_to_feature(cfg.vision_feature_layer, vc.num_hidden_layers)
        if isinstance(getattr(cfg, "vision_feature_layer", None), int) else vc.num_hidden_layers,
        vision_intermediate_size=vc.intermediate_size,
        intermediate_size=tc.intermediate_size,
    )


def _pair(value, default: int) -> tuple[int, int]:
    if value is None:
        return (default, default)
    if isinstance(value, int):
        return (value, value)
    get = value.get if isinstance(value, dict) else (lambda key: getattr(value, key, None))
    h, w = get("height"), get("width")
    if h is None:
        h = w = get("shortest_edge") or default
    return (int(h), int(w))


def preprocess_info(llava: LoadedCheckpoint) -> PreprocessInfo:
    ip = llava.processor.image_processor
    size = getattr(ip, "size", None)
    get = size.get if isinstance(size, dict) else (lambda key: getattr(size, key, None))
    shortest = get("shortest_edge") if size is not None else None
    image_size = llava.model.config.vision_config.image_size
    crop = _pair(getattr(ip, "crop_size", None), image_size) if getattr(ip, "do_center_crop", False) else None
    fixed = None if shortest else _pair(size, image_size)
    resample = getattr(ip, "resample", 3)
    return PreprocessInfo(
        do_convert_rgb=bool(getattr(ip, "do_convert_rgb", True)),
        do_resize=bool(getattr(ip, "do_resize", True)),
        resize_shortest_edge=int(shortest) if shortest else None,
        resize_size=fixed,
        resample=int(getattr(resample, "value", resample)),
        do_center_crop=bool(getattr(ip, "do_center_crop", False)),
        crop_size=crop or fixed or (image_size, image_size),
        do_rescale=bool(getattr(ip, "do_rescale", True)),
        rescale_factor=float(getattr(ip, "rescale_factor", 1 / 255)),
        do_normalize=bool(getattr(ip, "do_normalize", True)),
        image_mean=tuple(float(v) for v in ip.image_mean),
        image_std=tuple(float(v) for v in ip.image_std),
    )


def square_view_preprocess(ip, side: int, resample: int) -> PreprocessInfo:
    """The preprocess record of families whose layout resizes every view to side x side itself (no
    shortest-edge resize, no crop): the image processor's RGB, rescale and normalisation, its
    resample filter (`resample` when it names none)."""
    chosen = getattr(ip, "resample", resample)
    return PreprocessInfo(
        do_convert_rgb=bool(getattr(ip, "do_convert_rgb", True)), do_resize=True, resize_shortest_edge=None,
        resize_size=(side, side), resample=int(getattr(chosen, "value", chosen)), do_center_crop=False,
        crop_size=(side, side), do_rescale=bool(ip.do_rescale), rescale_factor=float(ip.rescale_factor),
        do_normalize=bool(ip.do_normalize), image_mean=tuple(float(v) for v in ip.image_mean),
        image_std=tuple(float(v) for v in ip.image_std))


def prompt_info(llava: LoadedCheckpoint, visual_tokens: int) -> PromptInfo:
    proc = llava.processor
    template = getattr(proc, "chat_template", None) or getattr(proc.tokenizer, "chat_template", None)
    image_token = getattr(proc, "image_token", None) or "<image>"
    return PromptInfo(
        tokenizer_file="tokenizer.json",
        chat_template=template if isinstance(template, str) else None,
        image_token=image_token,
        image_token_id=llava.model.config.image_token_id,
        visual_tokens=visual_tokens,
        special_tokens={k: v for k, v in proc.tokenizer.special_tokens_map.items() if isinstance(v, str)},
    )


# --- transformers-side reference -----------------------------------------------------------------


def render_prompt(llava: LoadedCheckpoint, question: str) -> str:
    proc = llava.processor
    conversation = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    if getattr(proc, "chat_template", None):
        return proc.apply_chat_template(conversation, add_generation_prompt=True)
    return f"USER: {getattr(proc, 'image_token', '<image>')}\n{question} ASSISTANT:"


def tokenize(llava: LoadedCheckpoint, prompts: list[str], visual_tokens: int) -> tuple[np.ndarray, np.ndarray]:
    """Expand each image placeholder to `visual_tokens` copies and tokenize, left-padded."""
    tok = llava.processor.tokenizer
    image_token = getattr(llava.processor, "image_token", None) or "<image>"
    texts = [p.replace(image_token, image_token * visual_tokens) for p in prompts]
    previous = tok.padding_side
    tok.padding_side = "left"
    try:
        enc = tok(texts, padding=True, return_tensors="np")
    finally:
        tok.padding_side = previous
    return enc["input_ids"].astype(np.int64), enc["attention_mask"].astype(np.int64)


def pixel_values_for(llava: LoadedCheckpoint, images) -> np.ndarray:
    return llava.processor.image_processor(images, return_tensors="np")["pixel_values"].astype(np.float32)


def embed_prompt(llava: LoadedCheckpoint, input_ids: torch.Tensor, image_features: torch.Tensor) -> torch.Tensor:
    """transformers' token embeddings with the image features in the placeholder positions."""
    model = llava.model
    embeds = model.get_input_embeddings()(input_ids)
    mask = (input_ids == model.config.image_token_id).unsqueeze(-1)
    return embeds.masked_scatter(mask, image_features.to(embeds.dtype))


def eager_tower_outputs(tower, pixel_values):
    """transformers' vision tower on `pixel_values` with every hidden state and its attention
    probabilities (eager attention for this call, the tower's setting restored after)."""
    previous = tower.config._attn_implementation
    tower.set_attn_implementation("eager")
    try:
        return tower(pixel_values, output_hidden_states=True, output_attentions=True, return_dict=True)
    finally:
        tower.set_attn_implementation(previous)


@torch.no_grad()
def reference_image_features(llava: LoadedCheckpoint, method: Method, pixel_values: torch.Tensor, k: int,
                             options: dict | None = None, instruction=None):
    """Image features for parity checks: [b, k, hidden].

    Pre-LLM methods: transformers' own vision tower (eager attention, so scores come from
    transformers, not from tokedge), the feature layer's keys from its k_proj, the method's
    selection, transformers' projector. In-ViT methods change the tower itself, so their reference
    is tokedge's torch tower (the export check then covers the tracing).
    """
    options = options or {}
    model = llava.model
    cfg = model.config
    if method.merges_in_vit:
        return VisionGraph(llava, method, k, options).eval()(pixel_values.to(next(model.parameters()).dtype)).float()
    tower = model.model.vision_tower
    out = eager_tower_outputs(tower, pixel_values)
    layer = cfg.vision_feature_layer
    feats = out.hidden_states[layer]
    has_cls = cfg.vision_config.model_type == "clip_vision_model"
    drop = has_cls and cfg.vision_feature_select_strategy == "default"
    start = 1 if has_cls else 0
    produced_by = layers_to_feature(layer, len(out.attentions)) - 1
    vf = VisionFeatures(features=feats[:, 1:] if drop else feats, project=model.model.multi_modal_projector,
                        instruction=instruction)
    if "cls_attention" in method.needs:
        vf.cls_attention = out.attentions[produced_by][:, :, 0, start:].float().mean(dim=1)
    if "cls_token" in method.needs:
        vf.cls_token = feats[:, :1]
    if "received_attention" in method.needs:  # the attention each patch receives: mean over heads and queries
        vf.received_attention = out.attentions[produced_by][:, :, :, start:].float().mean(dim=1).mean(dim=1)
    if "object_attention" in method.needs:
        at = method.object_layer(options, produced_by + 1, has_cls)
        vf.object_attention = out.attentions[at][:, :, :, start:].float().mean(dim=1).mean(dim=1)
    if "keys" in method.needs:
        enc_layer = getattr(tower, "vision_model", tower).encoder.layers[produced_by]
        keys = enc_layer.self_attn.k_proj(enc_layer.layer_norm1(out.hidden_states[produced_by]))
        heads = cfg.vision_config.num_attention_heads
        vf.keys = keys.view(keys.shape[0], keys.shape[1], heads, -1).mean(dim=2)[:, start:]
    return method.reduce(vf, k, options)


@torch.no_grad()
def reference_logits(llava: LoadedCheckpoint, input_ids, attention_mask, image_features, steps: int = 1,
                     prefill_kwargs: dict | None = None):
    """Run transformers' language model on the spliced embeddings: prefill logits at the last
    position, then `steps` greedy decode steps with its own KV cache, through the shared
    `decode_loop`. Returns (prefill_logits [b, vocab], tokens [b, steps+1], step_logits list of
    [b, vocab]). `prefill_kwargs`: more arguments of the prompt pass (Gemma 3's token_type_ids)."""
    from tokedge.runtime.generate import SamplingConfig, decode_loop

    model = llava.model
    embeds = embed_prompt(llava, input_ids, image_features)
    position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
    out = model(inputs_embeds=embeds, attention_mask=attention_mask, position_ids=position_ids, use_cache=True,
                **(prefill_kwargs or {}))
    prefill = out.logits[:, -1].float()
    state = {"past": out.past_key_values, "mask": attention_mask, "pos": position_ids[:, -1:]}

    def step(ids):
        state["mask"] = torch.cat([state["mask"], torch.ones_like(state["mask"][:, :1])], dim=1)
        state["pos"] = state["pos"] + 1
        o = model(input_ids=torch.from_numpy(ids)[:, None], attention_mask=state["mask"], position_ids=state["pos"],
                  past_key_values=state["past"], use_cache=True)
        state["past"] = o.past_key_values
        return o.logits[:, -1].float().numpy()

    decoded = decode_loop(prefill.numpy(), step, SamplingConfig(max_new_tokens=steps + 1), stop_at_eos=False,
                          keep_logits=True)
    tokens = torch.tensor(decoded.tokens, dtype=torch.int64).reshape(input_ids.shape[0], -1)
    return prefill, tokens, [torch.from_numpy(x) for x in decoded.step_logits]


# --- the family ------------------------------------------------------------------------------------


class LlavaFamily(FamilyBase):
    """`LlavaForConditionalGeneration`: one image, one fixed-size view, one block of visual tokens."""

    name = "llava"
    model_types = ("llava",)
    architectures = SUPPORTED_ARCHITECTURES

    def inspect(self, config: dict) -> CheckpointSpec:
        return inspect_config(config)

    def load(self, source: str, local: Path | None, *, trust_remote_code: bool = False,
             allow_pickle: bool = False) -> LoadedCheckpoint:
        return load_llava(source, local, trust_remote_code=trust_remote_code, allow_pickle=allow_pickle)

    def check_method(self, method: Method) -> None:
        """Every registered method exports for LLaVA-1.5 but those built for a thumbnail plus tiles."""
        if method.needs_tiles:
            raise UsageError(f"--method {method.name} shares each image's budget between a thumbnail and its tiles, "
                             "and LLaVA-1.5 sees one view; use it on LLaVA-NeXT, or cls-attn / visionzip here")

    def modules(self, loaded: LoadedCheckpoint, method: Method, k: int, options: dict, plan=None) -> dict[str, nn.Module]:
        return build_graph_modules(loaded, method, k, options, plan)

    def vision_trace_spec(self, loaded: LoadedCheckpoint, dtype, vision=None):
        """The default (pixel_values [b, 3, H, W] of the single crop), plus `instruction` [b, hidden]
        for methods that score with the prompt's text."""
        if vision is None or not vision.method.takes_instruction:
            return None
        from tokedge.export.onnx_export import BATCH, TraceSpec

        hidden = int(loaded.model.config.text_config.hidden_size)
        size = int(loaded.model.config.vision_config.image_size)
        return TraceSpec(
            inputs=("pixel_values", "instruction"), outputs=("image_embeds",),
            example=(torch.rand(2, 3, size, size), torch.randn(2, hidden, dtype=dtype)),
            dynamic_axes={"pixel_values": {0: BATCH}, "instruction": {0: BATCH}, "image_embeds": {0: BATCH}},
            output_shapes={"image_embeds": (BATCH, vision.k, hidden)},
        )

    def model_info(self, loaded: LoadedCheckpoint) -> ModelInfo:
        return model_info(loaded)

    def preprocess(self, loaded: LoadedCheckpoint) -> PreprocessInfo:
        return preprocess_info(loaded)

    def layout(self, loaded: LoadedCheckpoint) -> VisualLayout:
        return loaded.spec.layout

    def prompt(self, loaded: LoadedCheckpoint, visual_tokens: int) -> PromptInfo:
        return prompt_info(loaded, visual_tokens)

    def render_prompt(self, loaded: LoadedCheckpoint, question: str) -> str:
        return render_prompt(loaded, question)

    def pixel_values(self, loaded: LoadedCheckpoint, images: list) -> np.ndarray:
        return pixel_values_for(loaded, images)

    def tokenize(self, loaded: LoadedCheckpoint, prompts: list[str], visual_tokens: int) -> tuple[np.ndarray, np.ndarray]:
        return tokenize(loaded, prompts, visual_tokens)

    def reference_features(self, loaded: LoadedCheckpoint, method: Method, pixel_values, k: int,
                           options: dict | None = None, instruction=None):
        return reference_image_features(loaded, method, pixel_values, k, options, instruction)

    def reference_logits(self, loaded: LoadedCheckpoint, input_ids, attention_mask, image_features, steps: int = 1,
                         images: list | None = None):
        return reference_logits(loaded, input_ids, attention_mask, image_features, steps)  # 1-D positions: no images

    def embed_prompt(self, loaded: LoadedCheckpoint, input_ids, image_features):
        return embed_prompt(loaded, input_ids, image_features)

    def image_token_id(self, loaded: LoadedCheckpoint) -> int:
        return int(loaded.model.config.image_token_id)


FAMILY = register(LlavaFamily())
