"""Prometheus text exposition (format 0.0.4) for the server, written out by hand: counters,
gauges and histograms with labels, thread-safe (the scheduler thread and the event loop both
record)."""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass, field

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
TOKEN_BUCKETS = (16, 32, 64, 128, 192, 256, 384, 576, 1152, 2304, 2880)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32)

Labels = tuple[tuple[str, str], ...]


def _labels(labels: Labels, extra: tuple[tuple[str, str], ...] = ()) -> str:
    items = labels + extra
    if not items:
        return ""
    esc = (lambda v: v.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"'))
    return "{" + ",".join(f'{k}="{esc(v)}"' for k, v in items) + "}"


def _num(v: float) -> str:
    if math.isinf(v):
        return "+Inf" if v > 0 else "-Inf"
    return repr(float(v)) if not float(v).is_integer() else str(int(v)) + ".0"


@dataclass
class _Metric:
    name: str
    help: str
    kind: str  # counter | gauge | histogram
    buckets: tuple[float, ...] = ()
    values: dict[Labels, float] = field(default_factory=dict)
    hist: dict[Labels, list[float]] = field(default_factory=dict)  # bucket counts..., sum, count


class Metrics:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._metrics: dict[str, _Metric] = {}
        c, g, h = self._define, self._define, self._define
        c("tokedge_requests", "HTTP requests answered, by path and status code.", "counter")
        c("tokedge_request_errors", "HTTP requests answered with a 4xx or 5xx status, by path and code.", "counter")
        c("tokedge_completions", "Chat completions finished, by finish reason (stop, length, cancelled, error).",
          "counter")
        c("tokedge_prompt_tokens", "Prompt tokens (image placeholders included) of finished completions.", "counter")
        c("tokedge_completion_tokens", "Tokens generated for finished completions.", "counter")
        g("tokedge_queue_depth", "Requests waiting for a batch.", "gauge")
        g("tokedge_running_requests", "Requests in the batch being decoded.", "gauge")
        g("tokedge_ready", "1 once the artifact is verified and loaded.", "gauge")
        h("tokedge_ttft_seconds", "Time from request arrival to its first generated token.", "histogram",
          LATENCY_BUCKETS)
        h("tokedge_decode_seconds_per_token", "Mean decode step latency per request (after the first token).",
          "histogram", LATENCY_BUCKETS)
        h("tokedge_visual_tokens", "Visual tokens that reached the language model, per request.", "histogram",
          TOKEN_BUCKETS)
        h("tokedge_batch_size", "Requests per batch run.", "histogram", BATCH_BUCKETS)
        for name in ("tokedge_queue_depth", "tokedge_running_requests", "tokedge_ready"):
            self._metrics[name].values[()] = 0.0

    def _define(self, name: str, help: str, kind: str, buckets: tuple[float, ...] = ()) -> None:
        self._metrics[name] = _Metric(name, help, kind, buckets)

    def inc(self, name: str, amount: float = 1.0, **labels: str) -> None:
        key = tuple(sorted(labels.items()))
        with self._lock:
            m = self._metrics[name]
            m.values[key] = m.values.get(key, 0.0) + amount

    def set(self, name: str, value: float) -> None:
        with self._lock:
            self._metrics[name].values[()] = float(value)

    def observe(self, name: str, value: float, **labels: str) -> None:
        key = tuple(sorted(labels.items()))
        with self._lock:
            m = self._metrics[name]
            row = m.hist.setdefault(key, [0.0] * (len(m.buckets) + 2))
            for i, bound in enumerate(m.buckets):
                if value <= bound:
                    row[i] += 1
            row[-2] += value
            row[-1] += 1

    def render(self) -> str:
        lines: list[str] = []
        with self._lock:
            for m in self._metrics.values():
                family = f"{m.name}_total" if m.kind == "counter" else m.name  # as prometheus_client writes it
                lines += [f"# HELP {family} {m.help}", f"# TYPE {family} {m.kind}"]
                if m.kind == "counter":
                    lines += [f"{m.name}_total{_labels(k)} {_num(v)}" for k, v in sorted(m.values.items())]
                elif m.kind == "gauge":
                    lines += [f"{m.name}{_labels(k)} {_num(v)}" for k, v in sorted(m.values.items())]
                else:
                    for key, row in sorted(m.hist.items()):
                        for bound, count in zip(m.buckets, row):
                            lines.append(f"{m.name}_bucket{_labels(key, (('le', _num(bound)),))} {_num(count)}")
                        lines.append(f"{m.name}_bucket{_labels(key, (('le', '+Inf'),))} {_num(row[-1])}")
                        lines.append(f"{m.name}_sum{_labels(key)} {_num(row[-2])}")
                        lines.append(f"{m.name}_count{_labels(key)} {_num(row[-1])}")
        return "\n".join(lines) + "\n"
