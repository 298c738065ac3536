"""The generation loop, written once (`decode_loop`) and driven here through the runner protocol
(`ArtifactGraphs`): prefill, then decode with the KV cache; greedy or temperature / top-k / top-p
sampling with a seed; stop on EOS or the token limit; several image+prompt pairs in one batch.
The transformers references, the profile baseline and parity checks call the same `decode_loop`."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import numpy as np

from tokedge.errors import InputError
from tokedge.runtime.deadline import Deadline
from tokedge.runtime.graphs import ArtifactGraphs


@dataclass(frozen=True)
class SamplingConfig:
    max_new_tokens: int = 64
    temperature: float = 0.0  # 0 = greedy
    top_k: int = 0  # 0 = no top-k filter
    top_p: float = 1.0  # 1 = no nucleus filter
    seed: int | None = None  # sampling is reproducible for a fixed seed

    def check(self) -> None:
        if self.max_new_tokens < 1:
            raise InputError(f"--max-new-tokens must be at least 1 (got {self.max_new_tokens})")
        if not math.isfinite(self.temperature) or self.temperature < 0:
            raise InputError(f"--temperature must be a finite number >= 0 (got {self.temperature}); 0 means greedy")
        if self.top_k < 0:
            raise InputError(f"--top-k must be >= 0 (got {self.top_k}); 0 turns it off")
        if not math.isfinite(self.top_p) or not 0 < self.top_p <= 1:
            raise InputError(f"--top-p must be in (0, 1] (got {self.top_p})")
        if self.seed is not None and not 0 <= self.seed < 2**63:
            raise InputError(f"--seed must be an integer from 0 to 2**63-1 (got {self.seed})")


@dataclass
class Timings:
    preprocess_ms: float = 0.0
    vision_ms: float = 0.0
    prefill_ms: float = 0.0
    ttft_ms: float = 0.0
    decode_ms_per_token: float = 0.0
    decode_tokens: int = 0
    total_ms: float = 0.0

    def to_dict(self) -> dict:
        return {k: round(v, 3) if isinstance(v, float) else v for k, v in asdict(self).items()}


@dataclass
class Generation:
    token_ids: list[list[int]]
    visual_tokens: int  # image tokens the last decoder layer attends to (after in-LLM pruning)
    timings: Timings = field(default_factory=Timings)
    image_embeds: np.ndarray | None = None  # [b, k, hidden] from the vision graph
    prefill_logits: np.ndarray | None = None  # [b, vocab]
    step_logits: list[np.ndarray] = field(default_factory=list)  # with keep_logits: [b, vocab] per step


def sample_next(logits: np.ndarray, cfg: SamplingConfig, rng: np.random.Generator) -> np.ndarray:
    """logits [b, vocab] -> next token ids [b] (int64)."""
    if cfg.temperature <= 0:
        return logits.argmax(-1).astype(np.int64)
    # shift before dividing: (x - max) <= 0, so a tiny temperature (1e-320) gives -inf, never inf - inf = NaN
    shifted = logits.astype(np.float64) - logits.max(-1, keepdims=True)
    with np.errstate(over="ignore", divide="ignore", invalid="ignore"):
        scaled = shifted / cfg.temperature
    if cfg.top_k and cfg.top_k < scaled.shape[-1]:
        kth = np.partition(scaled, -cfg.top_k, axis=-1)[:, -cfg.top_k][:, None]
        scaled = np.where(scaled < kth, -np.inf, scaled)
    probs = np.exp(scaled - scaled.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    if cfg.top_p < 1.0:
        order = np.argsort(-probs, axis=-1, kind="stable")
        sorted_p = np.take_along_axis(probs, order, -1)
        keep_sorted = (np.cumsum(sorted_p, -1) - sorted_p) < cfg.top_p  # the first token always stays
        keep = np.zeros_like(keep_sorted)
        np.put_along_axis(keep, order, keep_sorted, -1)
        probs = np.where(keep, probs, 0.0)
        probs /= probs.sum(-1, keepdims=True)
    draws = rng.random(probs.shape[0])
    return np.minimum((np.cumsum(probs, -1) < draws[:, None]).sum(-1), probs.shape[-1] - 1).astype(np.int64)


@dataclass
class DecodeRow:
    cfg: SamplingConfig
    rng: np.random.Generator
    tokens: list[int] = field(default_factory=list)
    finish_reason: str | None = None  # "eos", "length", or whatever a caller passed to `finish`


class DecodeRows:
    """The state of THE decode loop: for each row its sampling settings and generator (a row
    samples exactly as it would alone, whatever shares the batch), the tokens picked so far, and
    why it finished: EOS (when `stop_at_eos`), its `max_new_tokens`, or a caller's `finish` (a
    stop string, a client gone). `decode_loop` drives it to the end; `stepwise.BatchDecoder`
    (the server) one step at a time."""

    def __init__(self, configs: list[SamplingConfig], *, eos: frozenset[int] | set[int] = frozenset(),
                 pad: int = 0, stop_at_eos: bool = True):
        for cfg in configs:
            cfg.check()
        self.rows = [DecodeRow(cfg, np.random.default_rng(cfg.seed)) for cfg in configs]
        self.eos, self.pad, self.stop_at_eos = frozenset(eos), pad, stop_at_eos
        self.last = np.full(len(configs), pad, dtype=np.int64)

    @property
    def tokens(self) -> list[list[int]]:
        return [row.tokens for row in self.rows]

    @property
    def active(self) -> bool:
        return any(row.finish_reason is None for row in self.rows)

    def finish(self, row: int, reason: str) -> None:
        if self.rows[row].finish_reason is None:
            self.rows[row].finish_reason = reason

    def feed(self) -> np.ndarray:
        """Next input id of each row [b] int64: its last token, or `pad` once it finished."""
        return np.where([row.finish_reason is not None for row in self.rows], self.pad, self.last).astype(np.int64)

    def take(self, logits: np.ndarray) -> list[int | None]:
        """Pick each live row's next token from its logits [b, vocab]; None for finished rows."""
        logits = np.asarray(logits, dtype=np.float32)
        picked: list[int | None] = []
        for r, row in enumerate(self.rows):
            if row.finish_reason is not None:
                picked.append(None)
                continue
            token = int(sample_next(logits[r:r + 1], row.cfg, row.rng)[0])
            self.last[r] = token
            if self.stop_at_eos and token in self.eos:
                row.finish_reason = "eos"
                picked.append(None)
                continue
            row.tokens.append(token)
            if len(row.tokens) >= row.cfg.max_new_tokens:
                row.finish_reason = "length"
            picked.append(token)
        return picked


@dataclass
class Decoded:
    """What `decode_loop` produced: per-row tokens (EOS excluded when it stops there), the logits of
    every decode step when asked ([b, vocab] each), and how many decoder calls it made."""

    tokens: list[list[int]]
    step_logits: list[np.ndarray]
    steps: int


def decode_loop(
    first_logits: np.ndarray,
    step: Callable[[np.ndarray], np.ndarray],
    cfg: SamplingConfig,
    *,
    eos: frozenset[int] | set[int] = frozenset(),
    pad: int = 0,
    stop_at_eos: bool = True,
    keep_logits: bool = False,
    on_step: Callable[[list[list[int]]], bool | None] | None = None,
) -> Decoded:
    """THE decode loop, shared by `tokedge run`, export validation, the transformers references,
    the profile baseline and `verify` (and, step by step, `tokedge serve`): pick a token from
    `first_logits` [b, vocab] (the prefill's), then call `step(next_ids [b] int64) -> logits
    [b, vocab]` until every row hit EOS (when `stop_at_eos`) or `cfg.max_new_tokens` tokens were
    picked. Rows that finished are fed `pad`. `on_step(tokens so far)` runs after every pick; when
    it returns True the loop ends there (the server: a stop string, a client gone)."""
    rows = DecodeRows([cfg] * np.asarray(first_logits).shape[0], eos=eos, pad=pad, stop_at_eos=stop_at_eos)
    rows.take(first_logits)
    kept: list[np.ndarray] = []
    steps = 0
    halt = on_step is not None and bool(on_step(rows.tokens))
    while rows.active and not halt:
        logits = np.asarray(step(rows.feed()), dtype=np.float32)
        steps += 1
        if keep_logits:
            kept.append(logits)
        rows.take(logits)
        halt = on_step is not None and bool(on_step(rows.tokens))
    return Decoded(tokens=rows.tokens, step_logits=kept, steps=steps)


def generate(
    graphs: ArtifactGraphs,
    pixel_values: np.ndarray,
    input_ids: np.ndarray,
    attention_mask: np.ndarray,
    cfg: SamplingConfig,
    *,
    budget: int | None = None,
    on_step: Callable[[list[list[int]]], None] | None = None,
    timings: Timings | None = None,
    started: float | None = None,
    stop_at_eos: bool = True,
    keep_logits: bool = False,
    deadline: Deadline | None = None,
    images_per_row: list[int] | None = None,
) -> Generation:
    """Vision -> splice -> prefill -> `decode_loop`. `pixel_values` holds every image of the
    batch in prompt order; `images_per_row` says how many belong to each prompt (default: one
    each). `started` (perf_counter) is when the request began, for TTFT; a `deadline` stops the
    generation (between steps, and inside a graph run) when it passes."""
    cfg.check()
    with graphs.limited(deadline):
        return _generate(graphs, pixel_values, input_ids, attention_mask, cfg, budget=budget, on_step=on_step,
                         timings=timings, started=started, stop_at_eos=stop_at_eos, keep_logits=keep_logits,
                         deadline=deadline, images_per_row=images_per_row)


def context_limit(graphs: ArtifactGraphs) -> int:
    """Prompt plus new tokens must fit in this many positions (the sliding window when smaller)."""
    m = graphs.manifest.model
    return m.max_position_embeddings if not m.sliding_window else min(m.max_position_embeddings, m.sliding_window)


def _generate(graphs, pixel_values, input_ids, attention_mask, cfg, *, budget, on_step, timings, started,
              stop_at_eos, keep_logits, deadline, images_per_row=None) -> Generation:
    m = graphs.manifest.model
    timings = timings or Timings()
    started = time.perf_counter() if started is None else started
    prompt_len = input_ids.shape[1]
    from tokedge.layouts import ImageBatch
    from tokedge.runtime.driver import prefill, prepare_images, stepper

    batch = ImageBatch.of(pixel_values, images_per_row or [1] * input_ids.shape[0], budget)
    counts = batch.images_per_row
    n_images = len(batch.inputs)
    if len(counts) != input_ids.shape[0] or sum(counts) != n_images or min(counts) < 1:
        raise InputError(f"{input_ids.shape[0]} prompts with {n_images} images, grouped {list(counts)}: "
                         "give each prompt at least one image, in prompt order")
    limit = context_limit(graphs)
    if prompt_len + cfg.max_new_tokens > limit:
        raise InputError(
            f"prompt ({prompt_len} tokens incl. image) + --max-new-tokens ({cfg.max_new_tokens}) exceeds the model's "
            f"limit of {limit} tokens; shorten the prompt or lower --max-new-tokens"
        )

    t0 = time.perf_counter()
    prompt = prepare_images(graphs, batch, input_ids, attention_mask)
    timings.vision_ms = prompt.vision_ms
    logits, state = prefill(graphs, prompt, room=cfg.max_new_tokens)
    now = time.perf_counter()
    timings.prefill_ms = (now - t0) * 1e3 - prompt.vision_ms
    timings.ttft_ms = (now - started) * 1e3  # the first token is an argmax/sample away

    decode_start = time.perf_counter()
    step = stepper(graphs, state, deadline)

    decoded = decode_loop(
        logits, step, cfg,
        eos=frozenset(m.eos_token_ids), pad=m.pad_token_id if m.pad_token_id is not None else 0,
        stop_at_eos=stop_at_eos, keep_logits=keep_logits, on_step=on_step,
    )
    if decoded.steps:
        timings.decode_ms_per_token = (time.perf_counter() - decode_start) * 1e3 / decoded.steps
    timings.decode_tokens = decoded.steps
    timings.total_ms = (time.perf_counter() - started) * 1e3
    return Generation(token_ids=decoded.tokens, visual_tokens=state.visual_tokens(prompt.visual[0]),
                      timings=timings, image_embeds=prompt.image_embeds, prefill_logits=logits,
                      step_logits=decoded.step_logits)
