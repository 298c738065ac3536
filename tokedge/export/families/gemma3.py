"""Gemma 3 family (`Gemma3ForConditionalGeneration`), read top to bottom: the config, loading, the
vision graph (SigLIP with its post-layernorm on one square view per image, the projector's average
pooling to `mm_tokens_per_image`, RMSNorm and projection: [n, 3, S, S] -> [n, k, hidden]), the
decoder (Gemma 3's layers: four RMSNorms (1 + w), q/k norms, attention scaled by
query_pre_attn_scalar^-0.5, sliding-window layers with their own rotary table, scaled token
embeddings) whose prompt pass lets an image's tokens attend to each other in both directions
(`token_blocks`, docs/artifact.md), and the manifest's "framed_view" layout (one view per image, its
run framed by `\\n\\n<start_of_image>` ... `<end_of_image>\\n\\n`). Pan-and-scan crops are refused.
Methods: none; divprune, pool, random on the pooled tokens (no CLS); in-LLM fastv, pdrop, dart, whose
kept image tokens stay one bidirectional block.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import torch
from torch import nn

from tokedge.artifact import ModelInfo, PreprocessInfo, PromptInfo, VisualLayout
from tokedge.errors import InputError, UnsupportedModelError
from tokedge.export.decoder import KVDecoder, PruningPrefill, TokenEmbedder, causal_bias
from tokedge.export.families import CheckpointSpec, LoadedCheckpoint, register
from tokedge.export.families.llava import (
    LlavaFamily,
    embed_prompt,
    load_hf_checkpoint,
    square_view_preprocess,
)
from tokedge.export.families.llava import model_info as llava_model_info
from tokedge.export.families.llava import prompt_info as llava_prompt_info
from tokedge.export.families.llava import reference_logits as llava_reference_logits
from tokedge.export.families.smolvlm import check_view_method
from tokedge.export.primitives import grouped_attention, merge_heads
from tokedge.export.towers import VisionTower
from tokedge.reduce.base import Method, Signal, VisionFeatures, VisionGeometry

SUPPORTED_ARCHITECTURES = ("Gemma3ForConditionalGeneration",)
MODEL_TYPES = ("gemma3",)
FRAME_BEFORE, FRAME_AFTER = "\n\n", "\n\n"  # around `<start_of_image>` run `<end_of_image>` (Gemma3Processor)


# --- the config (no weights) ---------------------------------------------------------------------


def _sizes(cfg: dict) -> tuple[int, int, int]:
    """(view side S, patch size, tokens per image) from config.json (transformers' defaults where absent)."""
    vc = cfg.get("vision_config") or {}
    return int(vc.get("image_size", 224)), int(vc.get("patch_size", 14)), int(cfg.get("mm_tokens_per_image", 256))


def check_supported(cfg: dict) -> None:
    archs = cfg.get("architectures") or []
    if archs and not set(archs) & set(SUPPORTED_ARCHITECTURES):
        raise UnsupportedModelError(f"architecture {archs[0]} is not Gemma 3's ({', '.join(SUPPORTED_ARCHITECTURES)})")
    tc = cfg.get("text_config") or {}
    for key in ("attn_logit_softcapping", "final_logit_softcapping"):
        if tc.get(key) is not None:
            raise UnsupportedModelError(f"Gemma 3 with {key} {tc[key]} is not supported (Gemma 3 checkpoints have none)")
    if tc.get("use_bidirectional_attention"):
        raise UnsupportedModelError("a bidirectional Gemma 3 text model (an embedding model) is not a generator")
    side, patch, tokens = _sizes(cfg)
    grid, per_side = side // patch, round(tokens**0.5)
    if side % patch or per_side * per_side != tokens or grid % per_side:
        raise UnsupportedModelError(f"mm_tokens_per_image {tokens} does not pool the {grid} x {grid} patch grid evenly")


def layout_record(cfg: dict, boi: str, eoi: str, soft: str) -> VisualLayout:
    side, patch, tokens = _sizes(cfg)
    return VisualLayout(kind="framed_view", tile=side, patch_size=patch, view_tokens=tokens,
                        frame_before=FRAME_BEFORE + boi, frame_after=eoi + FRAME_AFTER, run_token=soft)


def inspect_config(cfg: dict) -> CheckpointSpec:
    check_supported(cfg)
    side, patch, tokens = _sizes(cfg)
    vc = cfg.get("vision_config") or {}
    layers = (cfg.get("text_config") or {}).get("num_hidden_layers")
    per_side = round(tokens**0.5)
    geometry = VisionGeometry(patch_tokens=tokens, layers=int(vc.get("num_hidden_layers", 27)), has_cls=False)
    return CheckpointSpec(family="gemma3", full_tokens=tokens, geometry=geometry,
                          text_layers=int(layers) if layers is not None else None,
                          layout=VisualLayout(kind="framed_view", tile=side, patch_size=patch,
                                              view_tokens=per_side * per_side, run_token="<image_soft_token>"))


WORKING = "divprune, pool, random, fastv, pdrop, dart or none"


def check_method(method: Method) -> None:
    """`none`; the in-LLM methods; pre-LLM methods that score with the pooled tokens alone."""
    check_view_method(method, "Gemma 3's pooling needs the full patch grid",
                      "Gemma 3's pooled tokens do not supply (SigLIP has no CLS; patch attention is pooled 4 x 4 "
                      "away)", WORKING)


def load_gemma3(source: str, local: Path | None, *, trust_remote_code: bool = False,
                allow_pickle: bool = False) -> LoadedCheckpoint:
    from tokedge.export.families import read_config

    cfg = read_config(source, local, trust_remote_code)
    spec = inspect_config(cfg)
    model, processor = load_hf_checkpoint("Gemma3ForConditionalGeneration", source, local,
                                          trust_remote_code=trust_remote_code, allow_pickle=allow_pickle)
    ip, tok = processor.image_processor, processor.tokenizer
    if getattr(ip, "do_pan_and_scan", False):
        raise UnsupportedModelError("the image processor has do_pan_and_scan on: pan-and-scan crops are not supported "
                                    "yet; set it to false in preprocessor_config.json (Gemma 3's default)")
    side = _sizes(model.config.to_dict())[0]
    size = getattr(ip, "size", None)
    get = size.get if isinstance(size, dict) else (lambda key: getattr(size, key, None))
    if (get("height"), get("width")) != (side, side):
        raise UnsupportedModelError(f"the image processor's size {get('height')}x{get('width')} is not the vision "
                                    f"image_size {side}")
    if int(getattr(processor, "image_seq_length", spec.full_tokens)) != spec.full_tokens:
        raise InputError(f"the processor's image_seq_length {processor.image_seq_length} is not the model's "
                         f"mm_tokens_per_image {spec.full_tokens}")
    layout = layout_record(model.config.to_dict(), tok.boi_token, tok.eoi_token, tok.image_token)
    if tok.convert_tokens_to_ids(tok.image_token) != model.config.image_token_id:
        raise InputError(f"the tokenizer's image token {tok.image_token!r} is not the model's image_token_id "
                         f"{model.config.image_token_id}")
    spec = replace(spec, layout=layout, text_layers=int(model.config.text_config.num_hidden_layers))
    return LoadedCheckpoint(family=FAMILY, source=source, model=model, processor=processor, path=local, spec=spec)


# --- the graph modules ----------------------------------------------------------------------------


def pooled_features(feats, proj) -> torch.Tensor:
    """SigLIP's post-layernorm output [n, P, d] -> the projector's pooled tokens [n, k, d] (before its
    RMSNorm and projection): the P patches as a square grid, average-pooled to sqrt(k) per side."""
    n, _, d = feats.shape
    grid = feats.transpose(1, 2).reshape(n, d, proj.patches_per_image, proj.patches_per_image)
    return proj.avg_pool(grid).flatten(2).transpose(1, 2)


def project(proj, tokens):
    """The projector after pooling: RMSNorm (1 + w) on the vision width, then the projection matrix."""
    return torch.matmul(proj.mm_soft_emb_norm(tokens), proj.mm_input_projection_weight)


def view_features(method: Method | None, pooled, proj) -> VisionFeatures:
    if method is not None and Signal.EMBEDDINGS in method.scores_with:
        return VisionFeatures(features=project(proj, pooled), project=lambda t: t)
    return VisionFeatures(features=pooled, project=lambda t: project(proj, t))


class ViewVisionGraph(nn.Module):
    """pixel_values [n, 3, S, S] -> image_embeds [n, k, hidden]: every pooled token, or a pre-LLM
    method's `k` of them."""

    schedule = None

    def __init__(self, loaded: LoadedCheckpoint, method: Method | None = None, k: int | None = None,
                 options: dict | None = None):
        super().__init__()
        inner = loaded.model.model
        self.tower = VisionTower(inner.vision_tower, -1, drop_cls=False, needs=frozenset())
        tower = inner.vision_tower
        self.post_norm = getattr(tower, "vision_model", tower).post_layernorm  # transformers 4.x nests it
        self.proj = inner.multi_modal_projector
        reduces = method is not None and method.reduces_in_vision
        self.method, self.k, self.options = (method, k, options or {}) if reduces else (None, None, {})

    def forward(self, pixel_values):
        pooled = pooled_features(self.post_norm(self.tower(pixel_values).features), self.proj)
        if self.method is None:
            return project(self.proj, pooled)
        return self.method.reduce(view_features(self.method, pooled, self.proj), self.k, self.options)


class GemmaLayers:
    """Gemma 3's layers for `tokedge.export.decoder`: the attention scale, a rotary table and a mask
    per layer type (sliding-window layers see the last `sliding_window` keys), the image blocks in the
    prompt pass, and the four norms around attention and MLP."""

    blocks = True

    def gemma(self, language_model: nn.Module):
        cfg = language_model.config
        self.scale = float(cfg.query_pre_attn_scalar) ** -0.5
        self.kinds = list(cfg.layer_types)
        self.window = int(cfg.sliding_window)

    def rope(self, x, position_ids):
        return {kind: self.rotary(x, position_ids, kind) for kind in sorted(set(self.kinds))}

    def rope_of(self, rope, i: int):
        return rope[self.kinds[i]]

    def bias(self, mask, seq: int, blocks=None):
        return {"full_attention": causal_bias(mask, seq, blocks),
                "sliding_attention": causal_bias(mask, seq, blocks, self.window)}

    def bias_of(self, bias, i: int):
        return bias[self.kinds[i]]

    def run_layer(self, layer, x, q, k, v, bias):
        o = grouped_attention(q, k, v, self.scale, bias, self.n_kv, self.n_heads // self.n_kv, self.head_dim)
        x = x + layer.post_attention_layernorm(layer.self_attn.o_proj(merge_heads(o)))
        return x + layer.post_feedforward_layernorm(layer.mlp(layer.pre_feedforward_layernorm(x)))


class GemmaDecoder(GemmaLayers, KVDecoder):
    def __init__(self, language_model: nn.Module, lm_head: nn.Module, plan=None):
        super().__init__(language_model, lm_head, plan)
        self.gemma(language_model)


class GemmaPrefill(GemmaLayers, PruningPrefill):
    def __init__(self, language_model: nn.Module, lm_head: nn.Module, plan):
        super().__init__(language_model, lm_head, plan)
        self.gemma(language_model)


def vision_trace_spec(loaded: LoadedCheckpoint, k: int, dtype=torch.float32):
    from tokedge.export.onnx_export import BATCH, TraceSpec

    side = _sizes(loaded.model.config.to_dict())[0]
    hidden = int(loaded.model.config.text_config.hidden_size)
    return TraceSpec(inputs=("pixel_values",), outputs=("image_embeds",), example=(torch.rand(2, 3, side, side),),
                     dynamic_axes={"pixel_values": {0: BATCH}, "image_embeds": {0: BATCH}},
                     output_shapes={"image_embeds": (BATCH, k, hidden)})


# --- transformers-side reference -----------------------------------------------------------------


@torch.no_grad()
def reference_image_features(loaded: LoadedCheckpoint, pixel_values, method: Method | None = None,
                             k: int | None = None, options: dict | None = None) -> torch.Tensor:
    """transformers' `get_image_features` -> [n, 256, hidden]; with a pre-LLM method, transformers'
    tower (last_hidden_state: post-layernorm included), the projector's own pooling, then the method's
    `reduce` -> [n, k, hidden]."""
    inner = loaded.model.model
    if method is not None and method.reduces_in_vision:
        hidden = inner.vision_tower(pixel_values=pixel_values).last_hidden_state
        pooled = pooled_features(hidden, inner.multi_modal_projector)
        return method.reduce(view_features(method, pooled, inner.multi_modal_projector), k, options or {})
    out = inner.get_image_features(pixel_values)
    return out.pooler_output if hasattr(out, "pooler_output") else out


# --- the family ------------------------------------------------------------------------------------


class Gemma3Family(LlavaFamily):
    """Gemma 3: one square view per image, its tokens framed and bidirectional in the prompt pass."""

    name = "gemma3"
    model_types = MODEL_TYPES
    architectures = SUPPORTED_ARCHITECTURES
    tower_has_cls = False
    image_blocks = True
    fp16_refusal = ("Gemma 3's activations overflow float16 (transformers issue 36822: inf/NaN on real checkpoints); "
                    "export fp32 (and --quantize int8/int4 for smaller weights)")

    def inspect(self, config: dict) -> CheckpointSpec:
        return inspect_config(config)

    def load(self, source: str, local: Path | None, *, trust_remote_code: bool = False,
             allow_pickle: bool = False) -> LoadedCheckpoint:
        return load_gemma3(source, local, trust_remote_code=trust_remote_code, allow_pickle=allow_pickle)

    def check_method(self, method: Method) -> None:
        check_method(method)

    def modules(self, loaded: LoadedCheckpoint, method: Method, k: int, options: dict, plan=None) -> dict[str, nn.Module]:
        check_method(method)
        lm = loaded.model.model.language_model
        modules = {"vision": ViewVisionGraph(loaded, method, k, options).eval(),
                   "embed": TokenEmbedder(lm.embed_tokens).eval()}
        if plan is not None:
            modules["prefill"] = GemmaPrefill(lm, loaded.model.lm_head, plan).eval()
        modules["decoder"] = GemmaDecoder(lm, loaded.model.lm_head, plan).eval()
        return modules

    def vision_trace_spec(self, loaded: LoadedCheckpoint, dtype=torch.float32, vision=None):
        k = vision.k if vision is not None and vision.k is not None else loaded.spec.full_tokens
        return vision_trace_spec(loaded, int(k), dtype)

    def model_info(self, loaded: LoadedCheckpoint) -> ModelInfo:
        # the sliding windows run inside the decoder graph: the context is not capped at the window
        return replace(llava_model_info(loaded), family=self.name, sliding_window=None)

    def preprocess(self, loaded: LoadedCheckpoint) -> PreprocessInfo:
        return square_view_preprocess(loaded.processor.image_processor, _sizes(loaded.model.config.to_dict())[0], 2)

    def prompt(self, loaded: LoadedCheckpoint, visual_tokens: int) -> PromptInfo:
        return replace(llava_prompt_info(loaded, visual_tokens), image_token=loaded.processor.tokenizer.boi_token)

    def tokenize(self, loaded: LoadedCheckpoint, prompts: list[str], visual_tokens):
        """Each `<start_of_image>` placeholder -> the framed run of `visual_tokens` image tokens."""
        import numpy as np

        tok, lay = loaded.processor.tokenizer, loaded.spec.layout
        text = f"{lay.frame_before}{lay.run_token * int(visual_tokens)}{lay.frame_after}"
        previous = tok.padding_side
        tok.padding_side = "left"
        try:
            enc = tok([p.replace(tok.boi_token, text) for p in prompts], padding=True, return_tensors="np")
        finally:
            tok.padding_side = previous
        return enc["input_ids"].astype(np.int64), enc["attention_mask"].astype(np.int64)

    def reference_features(self, loaded: LoadedCheckpoint, method: Method, pixel_values, k: int,
                           options: dict | None = None, instruction=None):
        return reference_image_features(loaded, pixel_values, method, k, options)

    def reference_logits(self, loaded: LoadedCheckpoint, input_ids, attention_mask, image_features, steps: int = 1,
                         images: list | None = None):
        """transformers' prompt pass with `token_type_ids` (its bidirectional image blocks), then its decode."""
        types = (input_ids == loaded.model.config.image_token_id).long()
        return llava_reference_logits(loaded, input_ids, attention_mask, image_features, steps,
                                      prefill_kwargs={"token_type_ids": types})

    def embed_prompt(self, loaded: LoadedCheckpoint, input_ids, image_features):
        return embed_prompt(loaded, input_ids, image_features)


FAMILY = register(Gemma3Family())
