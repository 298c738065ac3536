"""The original model in transformers (all visual tokens, transformers' default attention unless
told otherwise) on the same images and prompt: the baseline of `tokedge profile --baseline` and
of bench/. Every image is run, so fidelity compares like with like; decoding goes through the
shared `decode_loop` with the model's EOS ids, as `tokedge run` does."""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field

from tokedge.report.stats import p90


@dataclass
class BaselineResult:
    checkpoint: str
    attention: str  # transformers attn_implementation the timings were taken with ("sdpa", "eager")
    visual_tokens: int
    preprocess_ms: float
    prefill_ms: float
    ttft_ms: float
    decode_ms_per_token: float
    ttft_p90_ms: float
    decode_p90_ms: float = 0.0
    samples: dict[str, list[float]] = field(default_factory=dict)  # every timed run, per stage
    token_ids: list[list[int]] = field(default_factory=list)  # one greedy answer per image

    @property
    def ttft_samples_ms(self) -> list[float]:
        return self.samples.get("ttft_ms", [])

    @property
    def decode_samples_ms(self) -> list[float]:
        return self.samples.get("decode_ms_per_token", [])


def eos_ids(config, generation_config=None) -> frozenset[int]:
    """EOS ids from a text config and generation config, each an int, a list of ints, or None."""
    out: set[int] = set()
    for source in (config, generation_config):
        value = getattr(source, "eos_token_id", None) if source is not None else None
        if isinstance(value, int):
            out.add(value)
        elif isinstance(value, (list, tuple)):
            out.update(int(v) for v in value)
    return frozenset(out)


def transformers_baseline(checkpoint: str, images: list, prompt: str, runs: int, warmup: int,
                          max_new_tokens: int, attention: str | None = None) -> BaselineResult:
    """attention: None or "default" for transformers' own default (SDPA for LLaVA), or "eager"."""
    import torch

    from tokedge.export.families import load_checkpoint
    from tokedge.export.pipeline import resolve_model
    from tokedge.export.reference import render_prompt
    from tokedge.runtime.generate import SamplingConfig, decode_loop

    loaded = load_checkpoint(checkpoint, resolve_model(checkpoint))
    model, processor = loaded.model, loaded.processor
    if attention and attention != "default":
        model.set_attn_implementation(attention)
    used = model.config.text_config._attn_implementation or "sdpa"
    eos = eos_ids(model.config.text_config, model.generation_config)
    pad = processor.tokenizer.pad_token_id or 0
    text = render_prompt(loaded, prompt)
    cfg = SamplingConfig(max_new_tokens=max_new_tokens)
    samples: dict[str, list[float]] = {"preprocess_ms": [], "prefill_ms": [], "ttft_ms": [], "decode_ms_per_token": []}
    tokens: list[list[int]] = [[] for _ in images]
    visual = 0  # image tokens of the largest image (its own count for tiled layouts)
    image_token = loaded.family.image_token_id(loaded)
    with torch.inference_mode():
        for i in range(warmup + runs):
            for j, image in enumerate(images):
                start = time.perf_counter()
                inputs = processor(images=[image], text=[text], return_tensors="pt")
                visual = max(visual, int((inputs["input_ids"] == image_token).sum()))
                t_pre = time.perf_counter()
                out = model(**inputs, use_cache=True)
                first = out.logits[:, -1].float().numpy()
                t_first = time.perf_counter()
                state = {"past": out.past_key_values, "mask": inputs["attention_mask"]}

                def step(ids, state=state):
                    state["mask"] = torch.cat([state["mask"], torch.ones_like(state["mask"][:, :1])], dim=1)
                    o = model(input_ids=torch.from_numpy(ids)[:, None], attention_mask=state["mask"],
                              past_key_values=state["past"], use_cache=True)
                    state["past"] = o.past_key_values
                    return o.logits[:, -1].float().numpy()

                decoded = decode_loop(first, step, cfg, eos=eos, pad=pad)
                end = time.perf_counter()
                if i < warmup:
                    continue
                samples["preprocess_ms"].append((t_pre - start) * 1e3)
                samples["prefill_ms"].append((t_first - t_pre) * 1e3)
                samples["ttft_ms"].append((t_first - start) * 1e3)
                if decoded.steps:
                    samples["decode_ms_per_token"].append((end - t_first) * 1e3 / decoded.steps)
                if i == warmup:
                    tokens[j] = decoded.tokens[0]
    decode = samples["decode_ms_per_token"] or [0.0]
    return BaselineResult(
        checkpoint=checkpoint, attention=used, visual_tokens=visual,
        preprocess_ms=statistics.median(samples["preprocess_ms"]), prefill_ms=statistics.median(samples["prefill_ms"]),
        ttft_ms=statistics.median(samples["ttft_ms"]), decode_ms_per_token=statistics.median(decode),
        ttft_p90_ms=p90(samples["ttft_ms"]), decode_p90_ms=p90(decode), samples=samples, token_ids=tokens,
    )
