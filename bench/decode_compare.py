"""Decode step of several artifacts side by side: one process, interleaved round by round, wall clock
around whole steps, medians and spread, the machine named.

    python bench/decode_compare.py LABEL=ARTIFACT [LABEL=ARTIFACT ...] [--rounds 7] [--json out.json]

Each artifact reads the same text-only prompt (the first tokens of the built-in evaluation text,
`tokedge.fidelity`), then per round: a prefill of `--prompt` tokens, 8 warm-up steps and 32 timed
steps through `tokedge.runtime.driver` (the path `tokedge run` takes; the KV cache bound in ONNX
Runtime between steps). Reports ms/token (median, p10, p90 over rounds), how much of a step is the
decoder's `session.run` and how much the rest (embedding the token, IO binding, Python), the decoder
graph's node count and weight bytes, so a change to the graph (bench/DECODE.md) is measured against the artifact
it replaces: export one artifact with each version and name both here.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))


def machine() -> str:
    name = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{name}, {os.cpu_count()} cores"


def decoder_nodes(art: Path) -> int:
    import onnx

    from tokedge.artifact import read_manifest

    spec = read_manifest(art).graphs["decoder"]
    return sum(1 for n in onnx.load(str(art / spec.file), load_external_data=False).graph.node
               if n.op_type != "Constant")


def runner(art: Path, prompt: int, threads: int):
    from tokedge import fidelity
    from tokedge.artifact import open_artifact
    from tokedge.runtime.driver import prefill, prepare_text, stepper
    from tokedge.runtime.graphs import ArtifactGraphs
    from tokedge.runtime.ort_backend import OrtOptions

    verified = open_artifact(art)
    ids = fidelity.text_ids(verified.read("tokenizer.json").decode(), fidelity.TextPlan(rows=1, context=prompt, steps=40))
    graphs = ArtifactGraphs(art, verified.manifest, verified=verified,
                            options=OrtOptions(intra_op_threads=threads)).__enter__()

    decoder = graphs.runners["decoder"]

    def run() -> tuple[float, float]:
        """-> (ms per step, of which inside the decoder's session.run)"""
        _, state = prefill(graphs, prepare_text(graphs, ids[:1, :prompt]), room=48)
        step = stepper(graphs, state)
        for t in range(8):
            step(ids[:1, prompt + t])
        inside = 0.0
        start = time.perf_counter()
        for t in range(32):
            step(ids[:1, prompt + 8 + t])
            inside += decoder.last_inference_time
        return (time.perf_counter() - start) * 1e3 / 32, inside * 1e3 / 32

    return graphs, run


def main() -> None:
    from tokedge.report.stats import p10, p90

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("artifacts", nargs="+", help="LABEL=ARTIFACT_DIR")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--prompt", type=int, default=16, help="prompt tokens before the timed steps")
    parser.add_argument("--threads", type=int, default=0, help="intra-op threads (0: ONNX Runtime decides)")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    arts = dict(a.split("=", 1) for a in args.artifacts)
    runs = {label: runner(Path(path), args.prompt, args.threads) for label, path in arts.items()}
    times: dict[str, list[float]] = {label: [] for label in runs}
    inside: dict[str, list[float]] = {label: [] for label in runs}
    for _ in range(args.rounds):  # interleaved: every artifact once per round
        for label, (_, run) in runs.items():
            total, session = run()
            times[label].append(total)
            inside[label].append(session)
    for graphs, _ in runs.values():
        graphs.__exit__(None, None, None)
    rows = []
    for label, path in arts.items():
        from tokedge.artifact import read_manifest

        q = read_manifest(path).quantization
        row = {"label": label, "artifact": str(path), "decoder_nodes": decoder_nodes(Path(path)),
               "decoder_bytes": q.weight_bytes["decoder"]["after"] if q else None,
               "ms_per_token": {"median": round(statistics.median(times[label]), 2),
                                "p10": round(p10(times[label]), 2), "p90": round(p90(times[label]), 2)},
               # the rest of a step: embedding the token, binding inputs, Python (median over rounds)
               "session_run_ms": round(statistics.median(inside[label]), 2),
               "overhead_ms": round(statistics.median(t - s for t, s in zip(times[label], inside[label])), 2)}
        rows.append(row)
        ms = row["ms_per_token"]
        print(f"{label:40s} {ms['median']:7.2f} ms/token ({ms['p10']:.2f}-{ms['p90']:.2f}), in session.run "
              f"{row['session_run_ms']:.2f}, overhead {row['overhead_ms']:.2f}; decoder nodes {row['decoder_nodes']}",
              flush=True)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"machine": machine(), "rounds": args.rounds, "prompt": args.prompt,
                                         "threads": args.threads,
                                         "measured": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                                         "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
