"""The original model in transformers (eager attention, all visual tokens) on the same image and
prompt: the baseline of `tokedge profile --baseline` and of bench/."""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field


@dataclass
class BaselineResult:
    checkpoint: str
    visual_tokens: int
    preprocess_ms: float
    prefill_ms: float
    ttft_ms: float
    decode_ms_per_token: float
    ttft_p90_ms: float
    token_ids: list[list[int]] = field(default_factory=list)
    attention: str = "eager"  # the attention implementation that ran
    ttft_samples_ms: list[float] = field(default_factory=list)
    decode_samples_ms: list[float] = field(default_factory=list)


def _p90(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(0.9 * (len(ordered) - 1))))]


def transformers_baseline(checkpoint: str, images: list, prompt: str, runs: int, warmup: int,
                          max_new_tokens: int, attention: str = "eager") -> BaselineResult:
    """attention: "eager", or "default" for transformers' own default (SDPA for LLaVA)."""
    import torch

    from tokedge.export.families.llava import load_llava
    from tokedge.export.pipeline import resolve_model
    from tokedge.export.reference import render_prompt

    loaded = load_llava(checkpoint, resolve_model(checkpoint))
    model, processor = loaded.model, loaded.processor
    if attention != "default":
        model.set_attn_implementation(attention)
    text = render_prompt(loaded, prompt)
    pre, prefill, ttft, decode = [], [], [], []
    tokens: list[list[int]] = []
    with torch.inference_mode():
        for i in range(warmup + runs):
            start = time.perf_counter()
            inputs = processor(images=images[:1], text=[text], return_tensors="pt")
            t_pre = time.perf_counter()
            out = model(**inputs, use_cache=True)
            nxt = out.logits[:, -1].argmax(-1)
            t_first = time.perf_counter()
            ids = [int(nxt)]
            mask, past = inputs["attention_mask"], out.past_key_values
            steps_start = time.perf_counter()
            for _ in range(max_new_tokens - 1):
                mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
                out = model(input_ids=nxt[:, None], attention_mask=mask, past_key_values=past, use_cache=True)
                past, nxt = out.past_key_values, out.logits[:, -1].argmax(-1)
                ids.append(int(nxt))
            end = time.perf_counter()
            if i >= warmup:
                pre.append((t_pre - start) * 1e3)
                prefill.append((t_first - t_pre) * 1e3)
                ttft.append((t_first - start) * 1e3)
                decode.append((end - steps_start) * 1e3 / max(1, max_new_tokens - 1))
                tokens = [ids]
    eos = set(loaded.processor.tokenizer.all_special_ids) & {model.config.text_config.eos_token_id}
    trimmed = []
    for t in tokens[0]:
        if t in eos:
            break
        trimmed.append(t)
    return BaselineResult(
        checkpoint=checkpoint, visual_tokens=loaded.full_tokens, preprocess_ms=statistics.median(pre),
        prefill_ms=statistics.median(prefill), ttft_ms=statistics.median(ttft),
        decode_ms_per_token=statistics.median(decode), ttft_p90_ms=_p90(ttft), token_ids=[trimmed],
        attention=model.config.text_config._attn_implementation or "eager", ttft_samples_ms=ttft,
        decode_samples_ms=decode,
    )
