"""Vision towers (CLIP, SigLIP) re-run from their transformers modules up to the feature layer,
producing the feature-layer tokens and, when a method asks, the CLS attention row, the CLS token
and the head-mean keys of that layer, the first layer's CLS attention row and the CLS logits of the
layer reading the features; in-ViT merging
(ToMe) runs inside the layers."""

from __future__ import annotations

import torch
from torch import nn

from tokedge.export.primitives import attention, attention_row, merge_heads, split_heads
from tokedge.reduce.base import VisionFeatures
from tokedge.reduce.tome import merge_weighted


def layers_to_feature(feature_layer: int, n_layers: int) -> int:
    """Encoder layers that run to produce transformers' hidden_states[feature_layer] (hidden_states[0]
    is the embeddings, so hidden_states[i] is the output of layer i-1; negative counts from the end)."""
    index = feature_layer if feature_layer >= 0 else n_layers + 1 + feature_layer
    if not 1 <= index <= n_layers:
        raise ValueError(f"vision_feature_layer {feature_layer} is outside 1..{n_layers}")
    return index


class VisionTower(nn.Module):
    """Runs `vision_tower` (CLIPVisionModel / SiglipVisionModel) up to LLaVA's feature layer.

    feature_layer follows transformers' `hidden_states` indexing: hidden_states[i] is the output of
    encoder layer i-1 (hidden_states[0] is the embeddings), negative values count from the end.
    merge_schedule: ToMe merges per layer (None: no merging).
    """

    def __init__(self, vision_tower: nn.Module, feature_layer: int, drop_cls: bool, needs: frozenset[str],
                 merge_schedule: list[int] | None = None, object_layer: int | None = None):
        super().__init__()
        vm = getattr(vision_tower, "vision_model", vision_tower)  # transformers 4.x nests it
        self.embeddings = vm.embeddings
        self.pre_norm = getattr(vm, "pre_layrnorm", None)  # CLIP only
        run = layers_to_feature(feature_layer, len(vm.encoder.layers))
        self.layers = nn.ModuleList(vm.encoder.layers[:run])
        # `cls_logits` are read in the layer that takes the feature layer's output as its input (the
        # last layer for LLaVA's -2, as GlobalCom2's `attn_maps[-1]`); features from the last layer: in it
        self.reader = vm.encoder.layers[run] if run < len(vm.encoder.layers) and "cls_logits" in needs else None
        cfg = vision_tower.config
        self.head_dim = cfg.hidden_size // cfg.num_attention_heads
        self.scale = self.head_dim**-0.5
        self.has_cls = self.pre_norm is not None
        self.drop_cls = drop_cls and self.has_cls
        self.needs = needs
        self.merge_schedule = merge_schedule
        self.object_layer = object_layer  # 0-based layer whose received attention is `object_attention`

    def _received(self, q, k):
        """Every query's attention row [b, h, t, t] -> [b, t]: mean over heads and queries (fp32)."""
        probs = torch.softmax(torch.matmul(q.float(), k.float().transpose(-1, -2)) * self.scale, dim=-1)
        return probs.mean(dim=1).mean(dim=1)

    def _cls_logits(self, q, k):
        """q, k [b, h, t, d] -> [b, t]: the CLS query's logits q.k * scale before softmax, mean over heads (fp32)."""
        return (torch.matmul(q[:, :, :1].float(), k.float().transpose(-1, -2)) * self.scale).mean(dim=1)[:, 0]

    def _layer(self, layer: nn.Module, x, size, first: bool, last: bool, r: int, index: int = -1):
        h = layer.layer_norm1(x)
        attn = layer.self_attn
        q = split_heads(attn.q_proj(h), self.head_dim)
        k = split_heads(attn.k_proj(h), self.head_dim)
        v = split_heads(attn.v_proj(h), self.head_dim)
        bias = None if size is None else torch.log(size.float()).transpose(1, 2)[:, None]  # proportional attention
        o = attention(q, k, v, self.scale, bias)
        x = x + attn.out_proj(merge_heads(o))
        extras = {}
        if first and "early_cls_attention" in self.needs:
            extras["early_cls_attention"] = attention_row(q[:, :, :1], k, self.scale).mean(dim=1)
        if last and "cls_attention" in self.needs:
            extras["cls_attention"] = attention_row(q[:, :, :1], k, self.scale).mean(dim=1)
        if last and "received_attention" in self.needs:
            extras["received_attention"] = self._received(q, k)
        if index == self.object_layer and "object_attention" in self.needs:
            extras["object_attention"] = self._received(q, k)
        if last and "cls_logits" in self.needs and self.reader is None:
            extras["cls_logits"] = self._cls_logits(q, k)
        if last and "keys" in self.needs:
            extras["keys"] = k.mean(dim=1)
        if r > 0:
            if size is None:
                size = torch.ones_like(x[..., :1])
            x, size = merge_weighted(x, size, k.mean(dim=1), r, class_token=self.has_cls)
        x = x + layer.mlp(layer.layer_norm2(x))
        return x, size, extras

    def forward(self, pixel_values: torch.Tensor) -> VisionFeatures:
        x = self.embeddings(pixel_values.to(self.embeddings.patch_embedding.weight.dtype))
        if self.pre_norm is not None:
            x = self.pre_norm(x)
        size = None
        extras: dict = {}
        last = len(self.layers) - 1
        for i, layer in enumerate(self.layers):
            r = self.merge_schedule[i] if self.merge_schedule else 0
            x, size, got = self._layer(layer, x, size, i == 0, i == last, r, i)
            extras.update(got)
        if self.reader is not None:  # the next layer's CLS query and keys, from the features
            h = self.reader.layer_norm1(x)
            attn = self.reader.self_attn
            extras["cls_logits"] = self._cls_logits(split_heads(attn.q_proj(h[:, :1]), self.head_dim),
                                                    split_heads(attn.k_proj(h), self.head_dim))
        start = 1 if self.has_cls else 0
        vf = VisionFeatures(features=x[:, 1:] if self.drop_cls else x, project=lambda t: t)
        if "cls_attention" in extras:
            vf.cls_attention = extras["cls_attention"][:, start:]  # softmax over all keys, then slice
        if "keys" in extras:
            vf.keys = extras["keys"][:, start:]
        if "early_cls_attention" in extras:
            vf.early_cls_attention = extras["early_cls_attention"][:, start:]
        if "received_attention" in extras:
            vf.received_attention = extras["received_attention"][:, start:]
        if "cls_logits" in extras:
            vf.cls_logits = extras["cls_logits"][:, start:]
        if "object_attention" in extras:
            vf.object_attention = extras["object_attention"][:, start:]
        if "cls_token" in self.needs and self.has_cls:
            vf.cls_token = x[:, :1]
        return vf
