"""Shared torch primitives for the export modules: plain attention written so that it traces to
MatMul / Softmax (which TensorRT and ONNX Runtime fuse), with scores and softmax in fp32."""

from __future__ import annotations

import torch


def split_heads(x: torch.Tensor, head_dim: int) -> torch.Tensor:
    """[b, n, h*d] -> [b, h, n, d]"""
    b, n = x.shape[0], x.shape[1]
    return x.reshape(b, n, -1, head_dim).transpose(1, 2)


def merge_heads(x: torch.Tensor) -> torch.Tensor:
    """[b, h, n, d] -> [b, n, h*d]"""
    b, n = x.shape[0], x.shape[2]
    return x.transpose(1, 2).reshape(b, n, -1)


def attention(q, k, v, scale: float, bias: torch.Tensor | None = None) -> torch.Tensor:
    """softmax(q k^T * scale + bias) v. q: [b, h, s, d], k/v: [b, h, t, d], bias broadcast to
    [b, h, s, t]. Scores and softmax run in fp32 whatever the activation dtype."""
    scores = torch.matmul(q.float(), k.float().transpose(-1, -2)) * scale
    if bias is not None:
        scores = scores + bias
    probs = torch.softmax(scores, dim=-1)
    return torch.matmul(probs.to(v.dtype), v)


def grouped_attention(q, k, v, scale: float, bias: torch.Tensor | None, kv_heads: int, groups: int,
                      head_dim: int) -> torch.Tensor:
    """Grouped-query attention without repeating K and V: q [b, H, s, d] with H = kv_heads * g (head h
    reads kv head h // g, as transformers' `repeat_kv` pairs them), k/v [b, kv_heads, t, d], bias
    [b, 1, s, t]. The g query heads of a kv head become g*s rows of one product, so the cache is read
    once per kv head instead of copied g times every step; each score is the same dot product.
    -> [b, H, s, d]"""
    d = head_dim  # sizes as Python ints: the traced Reshapes take constants (and 0 = "this dimension")
    rows = q.reshape(q.shape[0], kv_heads, -1, d)  # [b, kv, g*s, d]: row j*s + i is head kv*g + j, token i
    scores = torch.matmul(rows.float(), k.float().transpose(-1, -2)) * scale
    if bias is not None:
        scores = scores + bias.repeat(1, 1, groups, 1)  # [b, 1, g*s, t]: every head's rows see their token's mask
    probs = torch.softmax(scores, dim=-1)
    out = torch.matmul(probs.to(v.dtype), v)  # [b, kv, g*s, d]
    return out.reshape(out.shape[0], kv_heads * groups, -1, d)


def attention_row(q_row, k, scale: float) -> torch.Tensor:
    """One query's attention probabilities: q_row [b, h, 1, d], k [b, h, t, d] -> [b, h, t] (fp32).
    Used for scores (CLS in the ViT, last prompt token in the LLM) without eager attention."""
    scores = torch.matmul(q_row.float(), k.float().transpose(-1, -2)) * scale
    return torch.softmax(scores, dim=-1)[:, :, 0]  # indexing, not squeeze: squeeze exports as an If


def repeat_kv(x: torch.Tensor, groups: int) -> torch.Tensor:
    """[b, kv_heads, t, d] -> [b, kv_heads * groups, t, d] for grouped-query attention."""
    if groups == 1:
        return x
    b, h, t, d = x.shape
    return x[:, :, None, :, :].expand(b, h, groups, t, d).reshape(b, h * groups, t, d)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [b, h, s, d]; cos/sin: [b, s, d] (as transformers' rotary modules return them)."""
    return x * cos.unsqueeze(1) + rotate_half(x) * sin.unsqueeze(1)
