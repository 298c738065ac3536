"""LLaVA family (llava-hf layout: `LlavaForConditionalGeneration` + `LlavaProcessor`).

Read top to bottom: what is supported, how a checkpoint is loaded and checked, the three graph
modules (vision + reduction + projector, token embedding, KV decoder), and the transformers-side
reference the exported graphs are validated against.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from tokedge.artifact import ModelInfo, PreprocessInfo, PromptInfo
from tokedge.errors import InputError, UnsupportedModelError
from tokedge.export.decoder import KVDecoder, PruningPrefill, TokenEmbedder
from tokedge.export.towers import VisionTower, layers_to_feature
from tokedge.reduce.base import Method, VisionFeatures, VisionGeometry

SUPPORTED_VISION = ("clip_vision_model", "siglip_vision_model")
SUPPORTED_TEXT = ("llama", "mistral", "qwen2")
SUPPORTED_ARCHITECTURES = ("LlavaForConditionalGeneration",)

log = logging.getLogger("tokedge")


@dataclass
class LoadedLlava:
    source: str
    model: Any  # LlavaForConditionalGeneration, eval mode, fp32
    processor: Any  # LlavaProcessor
    path: Path | None  # local directory, when there is one

    @property
    def config(self):
        return self.model.config

    @property
    def full_tokens(self) -> int:
        return full_tokens_from_config(self.config.to_dict())


# --- loading ------------------------------------------------------------------------------------


def _read_config(source: str, local: Path | None, trust_remote_code: bool) -> dict:
    if local is not None:
        cfg_path = local / "config.json"
        if not cfg_path.is_file():
            raise InputError(f"'{local}' has no config.json; pass a llava-hf checkpoint directory or a hub id")
        try:
            return json.loads(cfg_path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as exc:
            raise InputError(f"{cfg_path} is not valid JSON ({exc})") from exc
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(source, trust_remote_code=trust_remote_code).to_dict()
    except OSError as exc:
        raise InputError(
            f"cannot load '{source}': not a local directory and not reachable on the hub ({exc.__class__.__name__}); "
            "check the id or download the checkpoint and pass its directory"
        ) from exc


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


def inspect_checkpoint(source: str, local: Path | None, trust_remote_code: bool = False) -> dict:
    """Read and check the config without loading weights (cheap; errors come before the slow part)."""
    cfg = _read_config(source, local, trust_remote_code)
    check_supported(cfg)
    return cfg


def check_supported(cfg: dict) -> None:
    archs = cfg.get("architectures") or []
    model_type = cfg.get("model_type")
    if model_type != "llava" or (archs and not set(archs) & set(SUPPORTED_ARCHITECTURES)):
        raise UnsupportedModelError(
            f"unsupported architecture {archs or model_type!r}; tokedge exports "
            f"{', '.join(SUPPORTED_ARCHITECTURES)} (model_type 'llava') checkpoints"
        )
    vision = (cfg.get("vision_config") or {}).get("model_type", "clip_vision_model")
    text = (cfg.get("text_config") or {}).get("model_type", "llama")
    if vision not in SUPPORTED_VISION:
        raise UnsupportedModelError(
            f"unsupported vision tower '{vision}'; supported: {', '.join(SUPPORTED_VISION)}"
        )
    if text not in SUPPORTED_TEXT:
        raise UnsupportedModelError(f"unsupported language model '{text}'; supported: {', '.join(SUPPORTED_TEXT)}")


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


def load_llava(
    source: str,
    local: Path | None,
    *,
    trust_remote_code: bool = False,
    allow_pickle: bool = False,
) -> LoadedLlava:
    """Load model and processor from a llava-hf directory or hub id, refusing what we cannot export."""
    inspect_checkpoint(source, local, trust_remote_code)
    if local is not None:
        _check_weights(local, allow_pickle)
        for name in ("tokenizer.json", "tokenizer_config.json"):
            if not (local / name).is_file():
                raise InputError(
                    f"'{local}' has no {name}; save the processor with the model (processor.save_pretrained)"
                )
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    from tokedge.export.hf import quiet_transformers

    quiet_transformers()
    where = str(local) if local is not None else source
    try:
        model = LlavaForConditionalGeneration.from_pretrained(
            where,
            dtype=torch.float32,
            use_safetensors=not allow_pickle,
            trust_remote_code=trust_remote_code,
        ).eval()
        processor = AutoProcessor.from_pretrained(where, trust_remote_code=trust_remote_code)
    except Exception as exc:  # the loading boundary: unpickling refusals, shape mismatches, missing files
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise InputError(f"cannot load the checkpoint at '{where}': {first}") from exc
    if getattr(processor, "image_processor", None) is None or getattr(processor, "tokenizer", None) is None:
        raise InputError(f"'{where}' has no image processor and tokenizer (processor files are missing)")
    if getattr(processor.tokenizer, "backend_tokenizer", None) is None:
        raise InputError(f"'{where}' has no fast tokenizer (tokenizer.json); tokedge's runtime needs one")
    text_cfg = model.config.text_config
    if getattr(model.model.language_model.layers[0].self_attn, "q_norm", None) is not None:
        raise UnsupportedModelError("language models with per-head q/k norms (Qwen3-style) are not supported yet")
    del text_cfg
    return LoadedLlava(source=source, model=model, processor=processor, path=local)


# --- the three graph modules --------------------------------------------------------------------


class VisionGraph(nn.Module):
    """pixel_values [b, 3, H, W] -> image_embeds [b, k, hidden]: tower, reduction, projector."""

    def __init__(self, llava: LoadedLlava, method: Method, k: int, options: dict):
        super().__init__()
        cfg = llava.config
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
        self.tower = VisionTower(tower, cfg.vision_feature_layer, drop_cls, method.needs, schedule)
        self.projector = llava.model.model.multi_modal_projector
        self.method = method
        self.k = k
        self.options = options

    def forward(self, pixel_values):
        vf = self.tower(pixel_values)
        vf.project = self.projector
        return self.method.reduce(vf, self.k, self.options)


def build_graph_modules(llava: LoadedLlava, method: Method, k: int, options: dict, plan=None) -> dict[str, nn.Module]:
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


def model_info(llava: LoadedLlava) -> ModelInfo:
    cfg = llava.config
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
        vision_layers=layers_to_feature(cfg.vision_feature_layer, vc.num_hidden_layers)
        if isinstance(cfg.vision_feature_layer, int) else vc.num_hidden_layers,
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


def preprocess_info(llava: LoadedLlava) -> PreprocessInfo:
    ip = llava.processor.image_processor
    size = getattr(ip, "size", None)
    get = size.get if isinstance(size, dict) else (lambda key: getattr(size, key, None))
    shortest = get("shortest_edge") if size is not None else None
    image_size = llava.config.vision_config.image_size
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


def prompt_info(llava: LoadedLlava, visual_tokens: int) -> PromptInfo:
    proc = llava.processor
    template = getattr(proc, "chat_template", None) or getattr(proc.tokenizer, "chat_template", None)
    image_token = getattr(proc, "image_token", None) or "<image>"
    return PromptInfo(
        tokenizer_file="tokenizer.json",
        chat_template=template if isinstance(template, str) else None,
        image_token=image_token,
        image_token_id=llava.config.image_token_id,
        visual_tokens=visual_tokens,
        special_tokens={k: v for k, v in proc.tokenizer.special_tokens_map.items() if isinstance(v, str)},
    )


# --- transformers-side reference -----------------------------------------------------------------


@torch.no_grad()
def reference_image_features(llava: LoadedLlava, method: Method, pixel_values: torch.Tensor, k: int,
                             options: dict | None = None):
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
    previous = tower.config._attn_implementation
    tower.set_attn_implementation("eager")
    try:
        out = tower(pixel_values, output_hidden_states=True, output_attentions=True, return_dict=True)
    finally:
        tower.set_attn_implementation(previous)
    layer = cfg.vision_feature_layer
    feats = out.hidden_states[layer]
    has_cls = cfg.vision_config.model_type == "clip_vision_model"
    drop = has_cls and cfg.vision_feature_select_strategy == "default"
    start = 1 if has_cls else 0
    produced_by = layers_to_feature(layer, len(out.attentions)) - 1
    vf = VisionFeatures(features=feats[:, 1:] if drop else feats, project=model.model.multi_modal_projector)
    if "cls_attention" in method.needs:
        vf.cls_attention = out.attentions[produced_by][:, :, 0, start:].float().mean(dim=1)
    if "cls_token" in method.needs:
        vf.cls_token = feats[:, :1]
    if "keys" in method.needs:
        enc_layer = getattr(tower, "vision_model", tower).encoder.layers[produced_by]
        keys = enc_layer.self_attn.k_proj(enc_layer.layer_norm1(out.hidden_states[produced_by]))
        heads = cfg.vision_config.num_attention_heads
        vf.keys = keys.view(keys.shape[0], keys.shape[1], heads, -1).mean(dim=2)[:, start:]
    return method.reduce(vf, k, options)


@torch.no_grad()
def reference_logits(llava: LoadedLlava, input_ids, attention_mask, image_features, steps: int = 1):
    """Run transformers' language model on the spliced embeddings: prefill logits at the last
    position, then `steps` greedy decode steps with its own KV cache, through the shared
    `decode_loop`. Returns (prefill_logits [b, vocab], tokens [b, steps+1], step_logits list of
    [b, vocab])."""
    from tokedge.runtime.generate import SamplingConfig, decode_loop

    model = llava.model
    embeds = model.get_input_embeddings()(input_ids)
    mask = (input_ids == model.config.image_token_id).unsqueeze(-1)
    embeds = embeds.masked_scatter(mask, image_features.to(embeds.dtype))
    position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
    out = model(inputs_embeds=embeds, attention_mask=attention_mask, position_ids=position_ids, use_cache=True)
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
