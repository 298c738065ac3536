"""Tracing the graph modules to ONNX with the documented names and dynamic axes.

We use torch's TorchScript-based exporter (opset 17): it traces these explicit-tensor modules
quickly and deterministically, and opset 17 is inside what TensorRT 10.3 (JetPack 6) parses. The
traced file is then post-processed with onnx-ir (passes, one external-data file per graph).
"""

from __future__ import annotations

import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

import onnx_ir as ir
import torch
from onnx_ir.passes.common import RemoveUnusedNodesPass

from tokedge.artifact import GraphSpec, ModelInfo, TensorSpec

OPSET = 17
BATCH, SEQ, PAST, TOTAL, TOKENS = "batch", "sequence", "past_sequence", "total_sequence", "visual_tokens"
IMAGE_TOKENS = "image_tokens"  # the prefill's image positions: every image token of a prompt
TRACE_IMAGE_TOKENS = 576  # the most image tokens an in-LLM prefill is traced with (LLaVA-1.5's count)


@dataclass(frozen=True)
class TraceSpec:
    """Names, example inputs and dynamic axes of one graph."""

    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    example: tuple[torch.Tensor, ...]
    dynamic_axes: dict[str, dict[int, str]]
    output_shapes: dict[str, tuple[int | str, ...]]  # the contract's shapes, stamped on the outputs


def kv_names(n_layers: int, prefix: str) -> list[str]:
    return [f"{prefix}.{i}.{kind}" for i in range(n_layers) for kind in ("key", "value")]


def mask_name(group: int) -> str:
    return "attention_mask" if group == 0 else f"attention_mask.{group}"


def axis(base: str, group: int) -> str:
    return base if group == 0 else f"{base}.{group}"


def _positions(example: torch.Tensor, rows: int) -> tuple[torch.Tensor, dict[int, str]]:
    """Position ids [b, s], or [rows, b, s] (M-RoPE: every row equal in the example), and their axes."""
    if rows == 1:
        return example, {0: BATCH, 1: SEQ}
    return example.expand(rows, *example.shape).contiguous(), {1: BATCH, 2: SEQ}


def trace_specs(info: ModelInfo, crop: tuple[int, int], dtype: torch.dtype, visual_tokens: int | str,
                plan=None, full_tokens: int = 0, position_rows: int = 1,
                deepstack_levels: int = 0, token_blocks: bool = False) -> dict[str, TraceSpec]:
    """visual_tokens: the fixed count of image_embeds, or TOKENS when the budget is a runtime input.
    plan: the in-LLM pruning plan (adds the prefill graph and per-group masks / past axes).
    position_rows: 3 for M-RoPE layouts (`position_ids [3, b, s]`), else 1 (`[b, s]`).
    deepstack_levels: DeepStack planes packed after each embedding row (Qwen3-VL): image_embeds and
    inputs_embeds rows are (1 + levels) * hidden wide.
    token_blocks: the decoder (and prefill) take `token_blocks` [b, s] after `position_ids`: the image
    each token belongs to, -1 for text (Gemma 3's bidirectional attention among an image's tokens)."""
    width = (1 + deepstack_levels) * info.hidden_size
    b, s, p = 2, 3, 4
    groups = [plan.group_of(i) if plan else 0 for i in range(info.num_layers)]
    n_groups = max(groups) + 1
    kv = (info.num_key_value_heads, info.head_dim)
    past = [torch.zeros(b, kv[0], p + g, kv[1], dtype=dtype) for g in groups for _ in range(2)]
    past_in, present_out = kv_names(info.num_layers, "past_key_values"), kv_names(info.num_layers, "present")
    layer_of = [i for i in range(info.num_layers) for _ in range(2)]
    masks = [mask_name(g) for g in range(n_groups)]
    decoder_positions, position_axes = _positions(torch.arange(p, p + s).expand(b, s).contiguous(), position_rows)
    decoder_axes = {"inputs_embeds": {0: BATCH, 1: SEQ}, "position_ids": position_axes, "logits": {0: BATCH}}
    blocks_in = ("token_blocks",) if token_blocks else ()
    if token_blocks:
        decoder_axes["token_blocks"] = {0: BATCH, 1: SEQ}
    decoder_axes.update({m: {0: BATCH, 1: axis(TOTAL, g)} for g, m in enumerate(masks)})
    decoder_axes.update({n: {0: BATCH, 2: axis(PAST, groups[layer_of[j]])} for j, n in enumerate(past_in)})
    decoder_axes.update({n: {0: BATCH, 2: axis(TOTAL, groups[layer_of[j]])} for j, n in enumerate(present_out)})
    specs = {
        "vision": TraceSpec(
            inputs=("pixel_values",),
            outputs=("image_embeds",),
            example=(torch.rand(b, 3, *crop),),
            dynamic_axes={"pixel_values": {0: BATCH}, "image_embeds": {0: BATCH}},
            output_shapes={"image_embeds": (BATCH, visual_tokens, width)},
        ),
        "embed": TraceSpec(
            inputs=("input_ids",),
            outputs=("inputs_embeds",),
            example=(torch.ones(b, 5, dtype=torch.int64),),
            dynamic_axes={"input_ids": {0: BATCH, 1: SEQ}, "inputs_embeds": {0: BATCH, 1: SEQ}},
            output_shapes={"inputs_embeds": (BATCH, SEQ, width)},
        ),
        "decoder": TraceSpec(
            inputs=("inputs_embeds", *masks, "position_ids", *blocks_in, *past_in),
            outputs=("logits", *present_out),
            example=(
                torch.randn(b, s, width, dtype=dtype),
                *[torch.ones(b, p + g + s, dtype=torch.int64) for g in range(n_groups)],
                decoder_positions,
                *([torch.tensor([[0, 0, -1], [-1, 1, 1]], dtype=torch.int64)] if token_blocks else []),
                *past,
            ),
            dynamic_axes=decoder_axes,
            output_shapes={
                "logits": (BATCH, 1, info.vocab_size),
                **{n: (BATCH, kv[0], axis(TOTAL, groups[layer_of[j]]), kv[1]) for j, n in enumerate(present_out)},
            },
        ),
    }
    if plan is not None:
        # the prefill is traced on a short prompt: its image-token and sequence axes are dynamic, and
        # tracing at a tiled model's full count (8,829 image tokens for OneVision) ran eager attention
        # over [batch, heads, 8838, 8838] scores (6 GB for the tiny preset); enough image tokens for
        # every stage's keep, as validation then checks at the real counts
        full_tokens = min(full_tokens, max(TRACE_IMAGE_TOKENS, 2 * max(st.keep for st in plan.stages)))
        t = full_tokens + 9
        group_masks = masks[1:]
        mask_example = torch.ones(b, t, dtype=torch.int64)
        mask_example[1, :2] = 0
        prefill_positions, prefill_position_axes = _positions((mask_example.cumsum(-1) - 1).clamp(min=0), position_rows)
        prefill_axes = {"inputs_embeds": {0: BATCH, 1: SEQ}, "attention_mask": {0: BATCH, 1: SEQ},
                        "position_ids": prefill_position_axes, "image_positions": {0: BATCH, 1: IMAGE_TOKENS},
                        "logits": {0: BATCH}}
        prefill_axes.update({n: {0: BATCH, 2: axis(SEQ, groups[layer_of[j]])} for j, n in enumerate(present_out)})
        prefill_axes.update({m: {0: BATCH, 1: axis(SEQ, g + 1)} for g, m in enumerate(group_masks)})
        if token_blocks:
            prefill_axes["token_blocks"] = {0: BATCH, 1: SEQ}
        blocks_example = torch.full((b, t), -1, dtype=torch.int64)
        blocks_example[:, 4:4 + full_tokens] = 0  # the example's image tokens: one image
        specs["prefill"] = TraceSpec(
            inputs=("inputs_embeds", "attention_mask", "position_ids", "image_positions", "image_keep", *blocks_in),
            outputs=("logits", *present_out, *group_masks),
            example=(
                torch.randn(b, t, width, dtype=dtype),
                mask_example,
                prefill_positions,
                torch.arange(4, 4 + full_tokens).expand(b, full_tokens).contiguous(),
                torch.tensor([s.keep for s in plan.stages], dtype=torch.int64),
                *([blocks_example] if token_blocks else []),
            ),
            dynamic_axes=prefill_axes,
            output_shapes={
                "logits": (BATCH, 1, info.vocab_size),
                **{n: (BATCH, kv[0], axis(SEQ, groups[layer_of[j]]), kv[1]) for j, n in enumerate(present_out)},
                **{m: (BATCH, axis(SEQ, g + 1)) for g, m in enumerate(group_masks)},
            },
        )
    return specs


def trace_to_ir(module: torch.nn.Module, spec: TraceSpec) -> ir.Model:
    """Trace `module` with torch.onnx (TorchScript exporter) and load the result as an ir.Model."""
    with tempfile.TemporaryDirectory(prefix="tokedge-trace-") as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        path = Path(tmp) / "graph.onnx"
        with torch.no_grad():
            torch.onnx.export(
                module,
                spec.example,
                str(path),
                dynamo=False,
                input_names=list(spec.inputs),
                output_names=list(spec.outputs),
                dynamic_axes=spec.dynamic_axes,
                opset_version=OPSET,
                do_constant_folding=True,
            )
        model = ir.load(path)
        for out in model.graph.outputs:
            out.shape = ir.Shape(spec.output_shapes[out.name])
        # Bring external tensors (torch writes them for >2 GB models) into memory before tmp goes.
        for value in model.graph.initializers.values():
            if isinstance(value.const_value, ir.ExternalTensor):
                value.const_value = ir.tensor(value.const_value.numpy(), name=value.name)
    return model


def finish(model: ir.Model) -> None:
    """Clean-up every graph gets: drop nodes whose outputs nobody reads."""
    RemoveUnusedNodesPass()(model)


def initializer_bytes(model: ir.Model) -> int:
    return sum(v.const_value.nbytes for v in model.graph.initializers.values() if v.const_value is not None)


def save_graph(model: ir.Model, out_dir: Path, name: str, external_threshold: int) -> tuple[str, str | None]:
    """Write `<name>.onnx` (and `<name>.onnx.data` when weights exceed the threshold); returns paths."""
    file = f"{name}.onnx"
    if initializer_bytes(model) > external_threshold:
        data = f"{name}.onnx.data"
        ir.save(model, out_dir / file, external_data=data, size_threshold_bytes=1024)
        return file, data
    ir.save(model, out_dir / file)
    return file, None


_NP_DTYPES = {
    ir.DataType.FLOAT: "float32",
    ir.DataType.FLOAT16: "float16",
    ir.DataType.INT64: "int64",
    ir.DataType.INT32: "int32",
    ir.DataType.BOOL: "bool",
}


def graph_spec(model: ir.Model, file: str, external: str | None) -> GraphSpec:
    def spec(value: ir.Value) -> TensorSpec:
        dims = tuple(d if isinstance(d, int) else str(d) for d in (value.shape or ()))
        return TensorSpec(name=value.name, dtype=_NP_DTYPES[value.dtype], shape=dims)

    return GraphSpec(
        file=file,
        inputs=tuple(spec(v) for v in model.graph.inputs),
        outputs=tuple(spec(v) for v in model.graph.outputs),
        external_data=external,
    )
