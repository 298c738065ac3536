"""SmolVLM family (Idefics3 lineage: `Idefics3ForConditionalGeneration`, which SmolVLM-256M/500M/2.2B
use, and `SmolVLMForConditionalGeneration` of SmolVLM2), read top to bottom: the config, loading,
the vision graph (a SigLIP-like tower on each view, post-layernorm, pixel shuffle by
`scale_factor`, the connector's linear projection: [views, 3, S, S] -> [1, views * view_tokens,
hidden]), and the manifest's "split_tiles" layout (tokedge.layouts.split_tiles: tiles plus a
global view, text markers between the views' token runs). The language model is Llama, exported
as for LLaVA. Methods: none; in-LLM fastv, pdrop, dart over every view's token run; pre-LLM methods
that need only the view's tokens (divprune, pool, random) keep `--budget` tokens of every view.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch import nn

from tokedge.artifact import ModelInfo, PreprocessInfo, VisualLayout
from tokedge.errors import InputError, UnsupportedModelError, UsageError
from tokedge.export.decoder import KVDecoder, PruningPrefill, TokenEmbedder
from tokedge.export.families import CheckpointSpec, LoadedCheckpoint, register
from tokedge.export.families.llava import LlavaFamily, load_hf_checkpoint, square_view_preprocess
from tokedge.export.families.llava import model_info as llava_model_info
from tokedge.export.families.llava_onevision import ProcessorParts
from tokedge.export.towers import VisionTower
from tokedge.reduce.base import Method, Signal, Stage, VisionFeatures, VisionGeometry

SUPPORTED_ARCHITECTURES = ("Idefics3ForConditionalGeneration", "SmolVLMForConditionalGeneration")
MODEL_TYPES = ("idefics3", "smolvlm")
SUPPORTED_TEXT = ("llama",)


# --- the config (no weights) ---------------------------------------------------------------------


def _sizes(cfg: dict) -> tuple[int, int, int]:
    """(view side S, patch size, scale_factor) from config.json (transformers' defaults where absent)."""
    vc = cfg.get("vision_config") or {}
    return int(vc.get("image_size", 224)), int(vc.get("patch_size", 32)), int(cfg.get("scale_factor", 2))


def check_supported(cfg: dict) -> None:
    archs = cfg.get("architectures") or []
    if archs and not set(archs) & set(SUPPORTED_ARCHITECTURES):
        raise UnsupportedModelError(f"architecture {archs[0]} is not a SmolVLM one ({', '.join(SUPPORTED_ARCHITECTURES)})")
    text = (cfg.get("text_config") or {}).get("model_type", "llama")
    if text not in SUPPORTED_TEXT:
        raise UnsupportedModelError(f"SmolVLM with a {text} language model is not supported yet (llama is)")
    side, patch, scale = _sizes(cfg)
    if side % patch or (side // patch) % scale:
        raise UnsupportedModelError(f"vision image_size {side} / patch_size {patch} is not a multiple of "
                                    f"scale_factor {scale}")


def view_tokens(cfg: dict) -> int:
    side, patch, scale = _sizes(cfg)
    return (side // patch) ** 2 // (scale * scale)


def layout_record(cfg: dict, longest_edge: int, split: bool = True) -> VisualLayout:
    side, patch, scale = _sizes(cfg)
    return VisualLayout(kind="split_tiles", tile=side, patch_size=patch, merge_size=scale, longest_edge=longest_edge,
                        view_tokens=view_tokens(cfg), split_image=split)


def inspect_config(cfg: dict, longest_edge: int | None = None) -> CheckpointSpec:
    """`full_tokens`: the most one image gives (every tile of a square image plus the global view).
    The longest edge is the image processor's (read at load; 4 tiles per side until then, the hub
    checkpoints' 2048 / 512)."""
    check_supported(cfg)
    side, patch, _ = _sizes(cfg)
    longest = longest_edge or 4 * side
    per_side = -(-longest // side)
    vc = cfg.get("vision_config") or {}
    layers = (cfg.get("text_config") or {}).get("num_hidden_layers")
    geometry = VisionGeometry(patch_tokens=(side // patch) ** 2, layers=int(vc.get("num_hidden_layers", 12)),
                              has_cls=False)
    return CheckpointSpec(family="smolvlm", full_tokens=(per_side * per_side + 1) * view_tokens(cfg), geometry=geometry,
                          text_layers=int(layers) if layers is not None else None,
                          layout=layout_record(cfg, longest))


# what one view supplies to a pre-LLM method: its tokens after the pixel shuffle (features, or projected
# embeddings) on their square grid; no CLS token (SigLIP) and no attention signals yet
VIEW_SIGNALS = frozenset({Signal.FEATURES, Signal.EMBEDDINGS, Signal.POSITIONS})
WORKING = "divprune, pool, random (per view), fastv, pdrop, dart or none"


def check_view_method(method: Method, merging: str, lacking: str, working: str) -> None:
    """The rule of the families whose pre-LLM methods see only view tokens (SmolVLM, InternVL, Gemma 3):
    `none` and the in-LLM methods pass; pre-LLM methods that score with features, embeddings or
    positions alone pass; in-ViT merging is refused (`merging`: why the tower needs its full grid)
    and so is every other signal (`lacking`: why the view tokens lack it), in one line naming `working`."""
    if method.keeps_all or method.prunes_in_llm:
        return
    if method.merges_in_vit:
        raise UsageError(f"--method {method.name} merges inside the vision tower and {merging}; use --method {working}")
    missing = [s.value for s in method.scores_with if s not in VIEW_SIGNALS]
    if method.stage is not Stage.PRE_LLM or missing:
        raise UsageError(f"--method {method.name} scores with {', '.join(missing) or method.stage.value}, which "
                         f"{lacking}; use --method {working}")


def check_method(method: Method) -> None:
    """`none`; the in-LLM methods (they prune every image-token run of the prompt in the prefill);
    pre-LLM methods that score with what a view supplies keep `--budget` tokens of every view (tile
    or global view), so each view's run in the prompt has that many; the rest are refused in one line."""
    check_view_method(method, "SmolVLM's pixel shuffle needs the full patch grid of every view",
                      "SmolVLM's views do not supply yet (no CLS token, no attention signals)", WORKING)


@dataclass
class SmolVLMParts(ProcessorParts):
    """What tokedge needs of SmolVLM2's `SmolVLMProcessor` (whose construction needs torchvision for its
    video processor and num2words for its video prompts): the image processor, the fast tokenizer,
    the chat template and the image fields, as the processor reads them from the tokenizer."""

    image_seq_len: int
    image_token: str = "<image>"


def load_smolvlm2_parts(where: str, trust_remote_code: bool = False) -> SmolVLMParts:
    from tokedge.export.families.llava_onevision import processor_parts
    from tokedge.runtime.idefics3 import FAKE_TOKEN, GLOBAL_TOKEN

    image_processor, tokenizer, fields, template = processor_parts(where, trust_remote_code)
    fake, glob = getattr(tokenizer, "fake_image_token", FAKE_TOKEN), getattr(tokenizer, "global_image_token", GLOBAL_TOKEN)
    if (fake, glob) != (FAKE_TOKEN, GLOBAL_TOKEN):
        raise UnsupportedModelError(f"the tokenizer's image markers are {fake!r} / {glob!r}, not SmolVLM's "
                                    f"{FAKE_TOKEN!r} / {GLOBAL_TOKEN!r}")
    return SmolVLMParts(image_processor=image_processor, tokenizer=tokenizer, chat_template=template,
                        image_seq_len=int(fields.get("image_seq_len", 169)),
                        image_token=getattr(tokenizer, "image_token", None) or "<image>")


def load_smolvlm(source: str, local: Path | None, *, trust_remote_code: bool = False,
                 allow_pickle: bool = False) -> LoadedCheckpoint:
    from tokedge.export.families import read_config

    cfg = read_config(source, local, trust_remote_code)
    inspect_config(cfg)
    archs = cfg.get("architectures") or ["Idefics3ForConditionalGeneration"]
    model_class = next(a for a in archs if a in SUPPORTED_ARCHITECTURES)
    # SmolVLM2's processor class needs torchvision and num2words: its parts are read instead
    parts = load_smolvlm2_parts if model_class == "SmolVLMForConditionalGeneration" else None
    model, processor = load_hf_checkpoint(model_class, source, local, trust_remote_code=trust_remote_code,
                                          allow_pickle=allow_pickle, load_processor=parts)
    ip = processor.image_processor
    longest = (getattr(ip, "size", None) or {}).get("longest_edge")
    tile = (getattr(ip, "max_image_size", None) or {}).get("longest_edge")
    full = model.config.to_dict()
    side, _, _ = _sizes(full)
    if tile != side or not longest:
        raise UnsupportedModelError(f"the image processor's max_image_size {tile} is not the vision image_size {side}")
    if getattr(processor, "image_seq_len", view_tokens(full)) != view_tokens(full):
        raise InputError(f"the processor's image_seq_len {processor.image_seq_len} is not the model's "
                         f"{view_tokens(full)} tokens per view")
    spec = inspect_config(full, int(longest))
    spec = replace(spec, layout=replace(spec.layout, split_image=bool(getattr(ip, "do_image_splitting", True))),
                   text_layers=int(model.config.text_config.num_hidden_layers))
    return LoadedCheckpoint(family=FAMILY, source=source, model=model, processor=processor, path=local, spec=spec)


# --- the graph modules ----------------------------------------------------------------------------


class FullViewEmbeddings(nn.Module):
    """transformers' vision embeddings for views without padding: the patch convolution and the
    position table in raster order (with every patch real, its fractional bucketing is the identity)."""

    def __init__(self, embeddings: nn.Module):
        super().__init__()
        self.patch_embedding = embeddings.patch_embedding
        self.position_embedding = embeddings.position_embedding

    def forward(self, pixel_values):
        x = self.patch_embedding(pixel_values.to(self.patch_embedding.weight.dtype)).flatten(2).transpose(1, 2)
        return x + self.position_embedding.weight[None, : x.shape[1]]


def pixel_shuffle(x, scale: int):
    """[v, n, d] -> [v, n / s^2, d s^2]: transformers' Idefics3 connector shuffle (s x s patches per token,
    row-major tokens, each token's features the s rows of s patches, row outer)."""
    v, n, d = x.shape
    side = int(n**0.5)
    x = x.reshape(v, side // scale, scale, side // scale, scale, d)  # [v, i', di, j', dj, d]
    return x.permute(0, 1, 3, 2, 4, 5).reshape(v, (side // scale) ** 2, scale * scale * d)


def view_features(method: Method | None, feats, proj) -> VisionFeatures:
    """One image's shuffled view tokens [v, t, d s^2] as a method sees them: features with the projection
    to apply after selection, or (EMBEDDINGS methods) the projected tokens themselves."""
    if method is not None and Signal.EMBEDDINGS in method.scores_with:
        return VisionFeatures(features=proj(feats), project=lambda t: t)
    return VisionFeatures(features=feats, project=proj)


class SplitVisionGraph(nn.Module):
    """pixel_values [views, 3, S, S] -> image_embeds [1, views * k, hidden] in prompt order: every view's
    view_tokens, or with a pre-LLM method its `k` kept tokens (the method's `reduce` on each view)."""

    schedule = None  # no in-ViT merging

    def __init__(self, loaded: LoadedCheckpoint, method: Method | None = None, k: int | None = None,
                 options: dict | None = None):
        super().__init__()
        inner = loaded.model.model
        self.tower = VisionTower(inner.vision_model, -1, drop_cls=False, needs=frozenset())
        self.tower.embeddings = FullViewEmbeddings(inner.vision_model.embeddings)
        self.post_norm = inner.vision_model.post_layernorm
        self.proj = inner.connector.modality_projection.proj
        self.scale = int(loaded.model.config.scale_factor)
        reduces = method is not None and method.reduces_in_vision
        self.method, self.k, self.options = (method, k, options or {}) if reduces else (None, None, {})

    def forward(self, pixel_values):
        feats = pixel_shuffle(self.post_norm(self.tower(pixel_values).features), self.scale)  # [v, t, d s^2]
        if self.method is None:
            tokens = self.proj(feats)
        else:
            tokens = self.method.reduce(view_features(self.method, feats, self.proj), self.k, self.options)
        return tokens.reshape(1, -1, tokens.shape[-1])


def vision_trace_spec(loaded: LoadedCheckpoint, dtype=torch.float32):
    from tokedge.export.families.llava_next import PARTITIONS
    from tokedge.export.onnx_export import TOKENS, TraceSpec

    side = int(loaded.model.config.vision_config.image_size)
    hidden = int(loaded.model.config.text_config.hidden_size)
    return TraceSpec(inputs=("pixel_values",), outputs=("image_embeds",), example=(torch.rand(3, 3, side, side),),
                     dynamic_axes={"pixel_values": {0: PARTITIONS}, "image_embeds": {1: TOKENS}},
                     output_shapes={"image_embeds": (1, TOKENS, hidden)})


# --- transformers-side reference -----------------------------------------------------------------


@torch.no_grad()
def reference_image_features(loaded: LoadedCheckpoint, image, method: Method | None = None, k: int | None = None,
                             options: dict | None = None) -> torch.Tensor:
    """transformers' own processor and `get_image_features` on one image -> [1, T, hidden]; with a
    pre-LLM method, transformers' tower, post-layernorm and connector shuffle (`pixel_shuffle`),
    then the method's `reduce` on every view -> [1, views * k, hidden]."""
    batch = loaded.processor.image_processor([[image]], return_tensors="pt")
    inner = loaded.model.model
    if method is not None and method.reduces_in_vision:
        hidden = inner.vision_model(batch["pixel_values"][0].float()).last_hidden_state
        feats = inner.connector.pixel_shuffle(hidden, inner.connector.scale_factor)
        tokens = method.reduce(view_features(method, feats, inner.connector.modality_projection.proj), k, options or {})
        return tokens.reshape(1, -1, tokens.shape[-1])
    out = inner.get_image_features(batch["pixel_values"].float(), batch["pixel_attention_mask"])
    feats = out.pooler_output if hasattr(out, "pooler_output") else out
    if isinstance(feats, (list, tuple)):
        feats = torch.cat(list(feats))
    return feats.reshape(1, -1, feats.shape[-1])


def image_placeholders(loaded: LoadedCheckpoint, image, count: int):
    """One image's placeholder count with its prompt text (layouts.Placeholders), from the processor's
    rows/cols: its `count` visual tokens split evenly over its views."""
    from tokedge.layouts import Placeholders
    from tokedge.runtime.idefics3 import prompt_text

    batch = loaded.processor.image_processor([[image]], return_tensors="np", return_row_col_info=True)
    rows, cols = int(batch["rows"][0][0]), int(batch["cols"][0][0])
    views = rows * cols + 1 if rows else 1
    per_view = count // views
    return Placeholders(views * per_view, prompt_text(rows, cols, per_view, loaded.processor.image_token))


# --- the family ------------------------------------------------------------------------------------


class SmolVLMFamily(LlavaFamily):
    """Idefics3 / SmolVLM: tiles and a global view per image, text markers between their token runs."""

    name = "smolvlm"
    model_types = MODEL_TYPES
    architectures = SUPPORTED_ARCHITECTURES
    tower_has_cls = False

    def inspect(self, config: dict) -> CheckpointSpec:
        return inspect_config(config)

    def load(self, source: str, local: Path | None, *, trust_remote_code: bool = False,
             allow_pickle: bool = False) -> LoadedCheckpoint:
        return load_smolvlm(source, local, trust_remote_code=trust_remote_code, allow_pickle=allow_pickle)

    def check_method(self, method: Method) -> None:
        check_method(method)

    def modules(self, loaded: LoadedCheckpoint, method: Method, k: int, options: dict, plan=None) -> dict[str, nn.Module]:
        check_method(method)
        per_view = loaded.spec.layout.view_tokens
        if method.reduces_in_vision and not 1 <= k <= per_view:
            raise UsageError(f"--budget is visual tokens per view on SmolVLM (each tile and the global view): "
                             f"use 1..{per_view}")
        lm = loaded.model.model.text_model
        modules = {"vision": SplitVisionGraph(loaded, method, k, options).eval(),
                   "embed": TokenEmbedder(lm.embed_tokens).eval()}
        if plan is not None:  # in-LLM methods: the pruning prefill over every image-token position
            modules["prefill"] = PruningPrefill(lm, loaded.model.lm_head, plan).eval()
        modules["decoder"] = KVDecoder(lm, loaded.model.lm_head, plan).eval()
        return modules

    def vision_trace_spec(self, loaded: LoadedCheckpoint, dtype=torch.float32, vision=None):
        return vision_trace_spec(loaded, dtype)

    def model_info(self, loaded: LoadedCheckpoint) -> ModelInfo:
        return replace(llava_model_info(loaded), family=self.name)

    def preprocess(self, loaded: LoadedCheckpoint) -> PreprocessInfo:
        return square_view_preprocess(loaded.processor.image_processor, int(loaded.model.config.vision_config.image_size), 1)

    def tokenize(self, loaded: LoadedCheckpoint, prompts: list[str], visual_tokens):
        """Each image placeholder -> the image's prompt text (`visual_tokens`: its Placeholders)."""
        import numpy as np

        tok = loaded.processor.tokenizer
        token = loaded.processor.image_token
        text = getattr(visual_tokens, "text", None) or token * int(visual_tokens)
        previous = tok.padding_side
        tok.padding_side = "left"
        try:
            enc = tok([p.replace(token, text) for p in prompts], padding=True, return_tensors="np")
        finally:
            tok.padding_side = previous
        return enc["input_ids"].astype(np.int64), enc["attention_mask"].astype(np.int64)

    def image_placeholders(self, loaded: LoadedCheckpoint, image, count: int):
        return image_placeholders(loaded, image, count)

    def reference_features(self, loaded: LoadedCheckpoint, method: Method, images, k: int,
                           options: dict | None = None, instruction=None):
        if len(images) != 1:
            raise UnsupportedModelError("SmolVLM references take one image at a time (token counts differ)")
        return reference_image_features(loaded, images[0], method, k, options)


FAMILY = register(SmolVLMFamily())
