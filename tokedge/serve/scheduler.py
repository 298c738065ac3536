"""The scheduler: a bounded queue in front of the one loaded artifact, and a worker thread that
takes up to `max_batch` waiting requests and decodes them as one left-padded batch
(`runtime.stepwise.BatchDecoder`), streaming each row's text as it grows.

Static batching per step: a batch runs until all its rows finish; requests that arrive meanwhile
wait for the next batch. Rows finish on EOS, their own `max_tokens`, a stop string, or when their
client goes away (`Job.cancel`), which stops their work at the next step.
"""

from __future__ import annotations

import collections
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from tokedge.layouts import ImageBatch
from tokedge.runtime.generate import SamplingConfig
from tokedge.runtime.graphs import ArtifactGraphs
from tokedge.runtime.stepwise import BatchDecoder
from tokedge.serve.metrics import Metrics


@dataclass(frozen=True)
class Delta:
    text: str


@dataclass(frozen=True)
class Done:
    text: str  # the whole answer (the deltas joined)
    finish_reason: str  # eos | length | stop
    prompt_tokens: int
    completion_tokens: int
    visual_tokens: int
    ttft_s: float = 0.0  # request arrival (body received) to its first token

    def usage(self) -> dict[str, int]:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                "total_tokens": self.prompt_tokens + self.completion_tokens, "visual_tokens": self.visual_tokens}


@dataclass(frozen=True)
class Failed:
    message: str


Event = Delta | Done | Failed


class QueueFull(Exception):
    pass


@dataclass
class Job:
    """One request's inputs, ready for a batch, and where its events go (called from the worker)."""

    pixel_values: Any  # the request's images in message order, as its layout prepared them (`layouts.ImageBatch`)
    input_ids: np.ndarray  # [t] int64, no padding
    sampling: SamplingConfig
    stop: tuple[str, ...]
    sink: Callable[[Event], None]
    created: float = field(default_factory=time.perf_counter)
    cancelled: threading.Event = field(default_factory=threading.Event)
    finished: bool = False
    started: bool = False  # some of its text was sent: it cannot be run again
    video: Any = None  # a video request's (`VideoInputs`, `VideoPlan`); such a job runs alone

    def cancel(self) -> None:
        self.cancelled.set()

    @property
    def text_only(self) -> bool:
        """No image: such prompts run in batches of their own (no vision graph, no splice)."""
        return self.video is None and not any(self.pixel_values.images_per_row)

    @property
    def kind(self) -> str:
        """What a batch must share: text-only and image prompts batch apart; a video runs alone."""
        return "video" if self.video is not None else "text" if self.text_only else "image"


def _borders(s: str) -> list[int]:
    """KMP failure function: b[i] = length of the longest proper prefix of s[:i+1] that is also its suffix."""
    b = [0] * len(s)
    k = 0
    for i in range(1, len(s)):
        while k and s[i] != s[k]:
            k = b[k - 1]
        if s[i] == s[k]:
            k += 1
        b[i] = k
    return b


def _overlap(text: str, s: str, borders: list[int]) -> int:
    """The longest k < len(s) with text.endswith(s[:k]): a KMP scan of text's last len(s)-1
    characters, O(len(s)) (no prefix longer than that can end the text without containing s)."""
    k = 0
    for ch in text[max(0, len(text) - len(s) + 1):] if len(s) > 1 else "":
        while k and (k == len(s) or ch != s[k]):
            k = borders[k - 1]
        if ch == s[k]:
            k += 1
    return k if k < len(s) else borders[k - 1]


class TextTracker:
    """Turns a row's growing token list into text deltas: cuts at the first stop string, holds back
    text that may be the start of a stop string or an incomplete UTF-8 sequence, and only ever
    emits text that extends what was sent (so the deltas join to the final text)."""

    def __init__(self, decode: Callable[[list[int]], str], stop: tuple[str, ...]):
        self.decode, self.stop, self.sent = decode, stop, ""
        self._borders = [_borders(s) for s in stop]

    def _cut(self, text: str) -> tuple[str, bool]:
        hits = [i for i in (text.find(s) for s in self.stop) if i >= 0]
        return (text[: min(hits)], True) if hits else (text, False)

    def update(self, ids: list[int]) -> tuple[str, bool]:
        """-> (new text to send, whether a stop string was reached)."""
        text, hit = self._cut(self.decode(ids))
        if not hit:
            if text.endswith("\ufffd"):
                return "", False
            hold = max((_overlap(text, s, b) for s, b in zip(self.stop, self._borders)), default=0)
            text = text[: len(text) - hold]
        return self._extend(text), hit

    def final(self, ids: list[int]) -> str:
        return self._extend(self._cut(self.decode(ids))[0])

    def _extend(self, text: str) -> str:
        if len(text) > len(self.sent) and text.startswith(self.sent):
            delta, self.sent = text[len(self.sent):], text
            return delta
        return ""


class Scheduler:
    def __init__(self, graphs: ArtifactGraphs, decode: Callable[[list[int]], str], metrics: Metrics, *,
                 max_batch: int, max_queue: int, batch_wait_s: float, context_limit: int, pad_token_id: int):
        self.graphs, self.decode, self.metrics = graphs, decode, metrics
        self.max_batch, self.max_queue, self.batch_wait_s = max_batch, max_queue, batch_wait_s
        self.context_limit, self.pad_token_id = context_limit, pad_token_id
        self._pending: collections.deque[Job] = collections.deque()
        self._cond = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._loop, name="tokedge-scheduler", daemon=True)

    def start(self) -> None:
        self._thread.start()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive() or self._closed

    def submit(self, job: Job) -> None:
        with self._cond:
            if self._closed:
                raise QueueFull("the server is shutting down")
            if len(self._pending) >= self.max_queue:
                raise QueueFull(f"{len(self._pending)} requests are already waiting (--max-queue {self.max_queue})")
            self._pending.append(job)
            self.metrics.set("tokedge_queue_depth", len(self._pending))
            self._cond.notify()

    def close(self, timeout: float | None = None) -> None:
        """Finish what is queued and running, then stop the worker."""
        with self._cond:
            self._closed = True
            self._cond.notify()
        if self._thread.is_alive():
            self._thread.join(timeout)

    # -- worker ------------------------------------------------------------------------------------

    def _loop(self) -> None:
        while True:
            batch = self._take()
            if batch is None:
                return
            if batch:
                self._run(batch)

    def _take(self) -> list[Job] | None:
        """Wait for work, give late arrivals `batch_wait_s` to join, and take what fits one batch."""
        with self._cond:
            while not self._pending and not self._closed:
                self._cond.wait()
            if not self._pending:
                return None
            deadline = time.monotonic() + self.batch_wait_s
            while len(self._pending) < self.max_batch and not self._closed:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._cond.wait(left)
            batch: list[Job] = []
            width = room = 0
            while self._pending and len(batch) < self.max_batch:
                job = self._pending[0]
                if job.cancelled.is_set():
                    self._pending.popleft()
                    self.metrics.inc("tokedge_completions", reason="cancelled")
                    continue
                w, r = max(width, len(job.input_ids)), max(room, job.sampling.max_new_tokens)
                if batch and w + r > self.context_limit:  # would not fit beside the others: next batch
                    break
                if batch and (job.kind != batch[0].kind or job.kind == "video"):  # see Job.kind
                    break
                batch.append(self._pending.popleft())
                width, room = w, r
            self.metrics.set("tokedge_queue_depth", len(self._pending))
            return batch

    def _run(self, jobs: list[Job]) -> None:
        """Decode `jobs` as one batch. A row whose own settings are invalid fails alone before the
        batch starts; if the batch fails anyway, every row that has not sent text yet is run again
        alone, so one bad request fails only itself, not the requests that shared its batch."""
        good = []
        for job in jobs:
            try:
                job.sampling.check()
            except Exception as exc:  # noqa: BLE001 - reported to that row only
                self._fail(job, exc)
            else:
                good.append(job)
        self.metrics.set("tokedge_running_requests", len(good))
        try:
            if good:
                self.metrics.observe("tokedge_batch_size", len(good))
                if good[0].video is not None:
                    self._decode_video(good[0])
                else:
                    self._decode(good)
        except Exception as exc:  # noqa: BLE001 - one failed batch must not take the server down
            retry = [j for j in good if not j.finished and not j.started] if len(good) > 1 else []
            for job in good:
                if not job.finished and job not in retry:
                    self._fail(job, exc)
            for job in retry:
                self._run([job])
        finally:
            self.metrics.set("tokedge_running_requests", 0)

    def _fail(self, job: Job, exc: BaseException) -> None:
        job.finished = True
        self.metrics.inc("tokedge_completions", reason="error")
        job.sink(Failed(f"generation failed: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"))

    def _decode(self, jobs: list[Job]) -> None:
        width = max(len(j.input_ids) for j in jobs)
        ids = np.full((len(jobs), width), self.pad_token_id, dtype=np.int64)
        mask = np.zeros((len(jobs), width), dtype=np.int64)
        for r, job in enumerate(jobs):  # left padding, as PromptEncoder pads a batch
            ids[r, width - len(job.input_ids):] = job.input_ids
            mask[r, width - len(job.input_ids):] = 1
        dec = BatchDecoder(self.graphs, ImageBatch.join([j.pixel_values for j in jobs]), ids, mask,
                           [j.sampling for j in jobs])
        trackers = [TextTracker(self.decode, j.stop) for j in jobs]
        first_token_at: list[float] = [0.0] * len(jobs)
        dec.prefill()
        now = time.perf_counter()
        for r, job in enumerate(jobs):
            first_token_at[r] = now
            self.metrics.observe("tokedge_ttft_seconds", now - job.created)
            self.metrics.observe("tokedge_visual_tokens", dec.visual_tokens_per_row[r])
        while True:
            for r, job in enumerate(jobs):
                if job.finished:
                    continue
                row = dec.rows[r]
                if job.cancelled.is_set():
                    dec.finish(r, "cancelled")
                    job.finished = True
                    self.metrics.inc("tokedge_completions", reason="cancelled")
                    self.metrics.inc("tokedge_completion_tokens", len(row.tokens))
                    continue
                delta, hit = trackers[r].update(row.tokens)
                if hit:
                    dec.finish(r, "stop")
                if row.finish_reason is not None:
                    delta += trackers[r].final(row.tokens)
                if delta:
                    job.started = True
                    job.sink(Delta(delta))
                if row.finish_reason is not None:
                    job.finished = True
                    self._finished(job, row.tokens, row.finish_reason, trackers[r].sent, len(job.input_ids),
                                   dec.visual_tokens_per_row[r], first_token_at[r])
            if not dec.active:
                return
            dec.step()

    def _decode_video(self, job: Job) -> None:
        """One video request through the video path `tokedge run --video` takes (`generate_video`,
        batch 1), its text streamed step by step; a stop string or a client gone ends the loop."""
        from tokedge.runtime.video_pipeline import generate_video

        inputs, plan = job.video
        tracker = TextTracker(self.decode, job.stop)
        first_at: list[float] = []
        halted: list[str] = []

        def on_step(rows: list[list[int]]) -> bool:
            if not first_at:
                first_at.append(time.perf_counter())
                self.metrics.observe("tokedge_ttft_seconds", first_at[0] - job.created)
            if job.cancelled.is_set():
                halted.append("cancelled")
                return True
            delta, hit = tracker.update(rows[0])
            if delta:
                job.started = True
                job.sink(Delta(delta))
            if hit:
                halted.append("stop")
            return hit

        ids = job.input_ids[None, :]
        gen = generate_video(self.graphs, inputs, plan, ids, np.ones_like(ids), job.sampling, on_step=on_step)
        tokens = gen.token_ids[0]
        self.metrics.observe("tokedge_visual_tokens", gen.visual_tokens)
        if halted and halted[0] == "cancelled":
            job.finished = True
            self.metrics.inc("tokedge_completions", reason="cancelled")
            self.metrics.inc("tokedge_completion_tokens", len(tokens))
            return
        if halted:
            reason = "stop"
        else:
            reason = "length" if len(tokens) >= job.sampling.max_new_tokens else "eos"
            delta = tracker.final(tokens)
            if delta:
                job.started = True
                job.sink(Delta(delta))
        job.finished = True
        self._finished(job, tokens, reason, tracker.sent, len(job.input_ids), gen.visual_tokens,
                       first_at[0] if first_at else time.perf_counter())

    def _finished(self, job: Job, tokens: list[int], reason: str, text: str, prompt_tokens: int, visual: int,
                  first_at: float) -> None:
        if len(tokens) > 1:
            self.metrics.observe("tokedge_decode_seconds_per_token",
                                 (time.perf_counter() - first_at) / (len(tokens) - 1))
        self.metrics.inc("tokedge_completions", reason="stop" if reason == "eos" else reason)
        self.metrics.inc("tokedge_prompt_tokens", prompt_tokens)
        self.metrics.inc("tokedge_completion_tokens", len(tokens))
        job.sink(Done(text=text, finish_reason=reason, prompt_tokens=prompt_tokens, completion_tokens=len(tokens),
                      visual_tokens=visual, ttft_s=first_at - job.created))
