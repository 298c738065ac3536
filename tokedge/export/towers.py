"""Vision towers (CLIP, SigLIP) re-run from their transformers modules up to the feature layer,
producing the feature-layer tokens and, when a method asks, the CLS attention row of that layer."""

from __future__ import annotations

import torch
from torch import nn

from tokedge.export.primitives import attention, attention_row, merge_heads, split_heads
from tokedge.reduce.base import VisionFeatures


class VisionTower(nn.Module):
    """Runs `vision_tower` (CLIPVisionModel / SiglipVisionModel) up to LLaVA's feature layer.

    feature_layer follows transformers' `hidden_states` indexing: hidden_states[i] is the output of
    encoder layer i-1 (hidden_states[0] is the embeddings), negative values count from the end.
    """

    def __init__(self, vision_tower: nn.Module, feature_layer: int, drop_cls: bool, needs: frozenset[str]):
        super().__init__()
        vm = getattr(vision_tower, "vision_model", vision_tower)  # transformers 4.x nests it
        self.embeddings = vm.embeddings
        self.pre_norm = getattr(vm, "pre_layrnorm", None)  # CLIP only
        n_layers = len(vm.encoder.layers)
        index = feature_layer if feature_layer >= 0 else n_layers + 1 + feature_layer
        if not 1 <= index <= n_layers:
            raise ValueError(f"vision_feature_layer {feature_layer} is outside 1..{n_layers}")
        self.layers = nn.ModuleList(vm.encoder.layers[:index])
        cfg = vision_tower.config
        self.head_dim = cfg.hidden_size // cfg.num_attention_heads
        self.scale = self.head_dim**-0.5
        self.has_cls = self.pre_norm is not None
        self.drop_cls = drop_cls and self.has_cls
        self.needs = needs

    def _layer(self, layer: nn.Module, x: torch.Tensor, want_cls_row: bool):
        h = layer.layer_norm1(x)
        attn = layer.self_attn
        q = split_heads(attn.q_proj(h), self.head_dim)
        k = split_heads(attn.k_proj(h), self.head_dim)
        v = split_heads(attn.v_proj(h), self.head_dim)
        o = attention(q, k, v, self.scale)
        x = x + attn.out_proj(merge_heads(o))
        x = x + layer.mlp(layer.layer_norm2(x))
        cls_row = attention_row(q[:, :, :1], k, self.scale).mean(dim=1) if want_cls_row else None
        return x, cls_row

    def forward(self, pixel_values: torch.Tensor) -> VisionFeatures:
        x = self.embeddings(pixel_values.to(self.embeddings.patch_embedding.weight.dtype))
        if self.pre_norm is not None:
            x = self.pre_norm(x)
        cls_row = None
        last = len(self.layers) - 1
        for i, layer in enumerate(self.layers):
            x, row = self._layer(layer, x, want_cls_row=(i == last and "cls_attention" in self.needs))
            cls_row = row if row is not None else cls_row
        features = x[:, 1:] if self.drop_cls else x
        if cls_row is not None:
            cls_row = cls_row[:, 1:]  # CLS -> patches, softmax taken over all keys first
        return VisionFeatures(features=features, cls_attention=cls_row)
