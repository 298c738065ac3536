"""Reproduce the README's performance table on this machine: tokedge vs transformers, side by side.

Builds a ~150M-parameter LLaVA-geometry checkpoint (random weights; CLIP-style tower at 336 px,
patch 14, 576 visual tokens; Llama-style decoder with a 32000-token head), exports it
(`cls-attn` with a runtime budget 16..576, and `tome` with `--option schedule=early` at 64),
quantizes the decoder (int8, int4; MatMulNBits with int8 compute) and, in the fastest
configuration, the vision tower (int8) and lm_head too. Then, in one process and interleaved
over several rounds so that load from other jobs hits every row alike, it times transformers
(its default attention: SDPA, all 576 visual tokens) and every tokedge configuration on the same
image and prompt: median and spread (p10..p90) of TTFT and decode ms/token.

Also recorded: the machine (lscpu model name), the int4 decoder's weight bytes against fp32, its
first 16 greedy tokens against the fp32 artifact's (and the top-1 agreement of every
configuration with its fp32 counterpart, teacher-forced over several prompts), and the memory
plan's predicted artifact bytes against the measured ones.

    python bench/run_bench.py                 # writes bench/results/bench.json and bench/RESULTS.md
    python bench/run_bench.py --rounds 5      # more rounds when the machine is busy
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from tokedge.export.presets import TinyLlavaConfig, build_tiny_llava

BENCH_MODEL = TinyLlavaConfig(
    vision_hidden=384, vision_layers=6, vision_heads=6,
    text_hidden=768, text_layers=12, text_heads=12, text_kv_heads=12, text_intermediate=2048,
    vocab_size=32000, seed=0,
)
PROMPT = "Describe this image in detail."
AGREEMENT_PROMPTS = (PROMPT, "What is in the picture?", "List the colours you see.", "Is there any text?",
                     "Where could this photo have been taken?")


@dataclass(frozen=True)
class Config:
    name: str  # the README's row label
    artifact: str  # key into the artifacts built below
    budget: int
    reference: str  # fp32 artifact key whose tokens this row is compared with


CONFIGS = (
    Config("fp32 cls-attn", "cls", 576, "cls"),
    Config("fp32 cls-attn", "cls", 64, "cls"),
    Config("int8 decoder, cls-attn", "cls-int8", 64, "cls"),
    Config("int4 decoder, cls-attn", "cls-int4", 576, "cls"),
    Config("int4 decoder, cls-attn", "cls-int4", 64, "cls"),
    Config("fp32 tome early", "tome", 64, "tome"),
    Config("int8 decoder + vision, tome early", "tome-int8", 64, "tome"),
    Config("int8 decoder + lm_head + vision, tome early", "tome-int8h", 64, "tome"),
    Config("int4 decoder, tome early", "tome-int4", 64, "tome"),
    Config("int4 decoder + lm_head, int8 vision, tome early", "tome-fast", 64, "tome"),
)


def params(ckpt: Path) -> int:
    from safetensors import safe_open

    total = 0
    for f in ckpt.glob("*.safetensors"):
        with safe_open(f, "np") as fh:
            for key in fh.keys():
                total += math.prod(fh.get_slice(key).get_shape())
    return total


def cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except (OSError, subprocess.CalledProcessError):
        pass
    return platform.processor() or platform.machine()


def tokedge(args: list[str]) -> None:
    from tokedge.cli import main as cli

    rc = cli(args)
    if rc:
        sys.exit(rc)


def build_artifacts(work: Path, ckpt: Path) -> dict[str, Path]:
    arts = {"cls": work / "llava-150m-cls-attn", "tome": work / "llava-150m-tome-early"}
    if not (arts["cls"] / "tokedge.json").is_file():
        tokedge(["export", str(ckpt), "--method", "cls-attn", "--budget", "64", "--dynamic-budget", "16:576",
                 "--out", str(arts["cls"]), "--force"])
    if not (arts["tome"] / "tokedge.json").is_file():
        tokedge(["export", str(ckpt), "--method", "tome", "--budget", "64", "--option", "schedule=early",
                 "--out", str(arts["tome"]), "--force"])
    # int4 RTN moves this random-weight model's logits beyond the int4 tolerance at small budgets
    # (see RESULTS.md: fidelity is measured below instead), so these are written unvalidated
    variants = {
        "cls-int8": ("cls", ["--scheme", "int8"]),
        "cls-int4": ("cls", ["--scheme", "int4", "--no-validate"]),
        "tome-int8": ("tome", ["--scheme", "int8", "--quant-graphs", "decoder,vision"]),
        "tome-int8h": ("tome", ["--scheme", "int8", "--quant-graphs", "decoder,vision", "--quantize-lm-head"]),
        "tome-int4": ("tome", ["--scheme", "int4", "--no-validate"]),
        "tome-fast": ("tome", ["--scheme", "int4", "--quantize-lm-head", "--quant-graphs", "decoder", "--no-validate"]),
    }
    for key, (base, args) in variants.items():
        arts[key] = work / f"{arts[base].name}-{key.split('-', 1)[1]}"
        if not (arts[key] / "tokedge.json").is_file():
            tokedge(["quantize", str(arts[base]), "--out", str(arts[key]), "--force", *args])
    fast_vision = work / "llava-150m-tome-early-fast-v8"
    if not (fast_vision / "tokedge.json").is_file():  # int8 vision on top of the int4 decoder + lm_head
        vision_int8(arts["tome-fast"], fast_vision)
    arts["tome-fast"] = fast_vision
    return arts


def vision_int8(src: Path, out: Path) -> None:
    """Add int8 vision weights to an already quantized artifact (the decoder keeps its int4)."""
    import dataclasses
    import shutil

    import onnx
    import onnx_ir as ir

    from tokedge.artifact import hash_tree, load_artifact, staged_directory, write_manifest
    from tokedge.export.onnx_export import graph_spec, save_graph
    from tokedge.export.quantize import QuantConfig, quantize_model

    manifest = load_artifact(src)
    with staged_directory(out, force=True) as stage:
        for rel in manifest.files:
            shutil.copy2(src / rel, stage / rel)
        spec = manifest.graphs["vision"]
        model, count = quantize_model(onnx.load(str(stage / spec.file)), QuantConfig(scheme="int8", graphs=("vision",)),
                                      manifest.model.vocab_size, "vision")
        (stage / spec.file).unlink()
        graph = ir.from_proto(model)
        file, data = save_graph(graph, stage, "vision", 1 << 30)
        q = manifest.quantization
        q = dataclasses.replace(q, graphs=(*q.graphs, "vision"), quantized={**q.quantized, "vision": count})
        graphs = {**manifest.graphs, "vision": graph_spec(graph, file, data)}
        write_manifest(stage, dataclasses.replace(manifest, graphs=graphs, quantization=q, files=hash_tree(stage)))


def spread(values: list[float]) -> dict[str, float]:
    ordered = sorted(values)

    def q(p: float) -> float:
        return ordered[min(len(ordered) - 1, max(0, round(p * (len(ordered) - 1))))]

    med = statistics.median(ordered)
    return {"median": med, "p10": q(0.1), "p90": q(0.9), "spread": (q(0.9) - q(0.1)) / med if med else 0.0,
            "n": len(ordered)}


def greedy_tokens(pipe, image, prompt: str, budget: int, n: int) -> list[int]:
    res = pipe.generate(image, prompt, max_new_tokens=n, budget=budget if pipe.manifest.reduction.budget_range else None)
    return res.token_ids[0]


def top1_agreement(ref_pipe, pipe, image, prompts, budget: int, n: int) -> float:
    """Teacher-forced: follow the reference's greedy tokens and count the steps where `pipe`'s
    argmax equals the reference's (prefill and each decode step)."""
    import numpy as np

    from tokedge.runtime.graphs import splice_image_embeds
    from tokedge.runtime.preprocess import preprocess_batch

    agree = total = 0
    for prompt in prompts:
        ref = greedy_tokens(ref_pipe, image, prompt, budget, n)
        pv = preprocess_batch([image], pipe.manifest.preprocess)
        k = pipe.visual_tokens_for(budget if pipe.manifest.reduction.budget_range else None)
        enc = pipe.encoder.encode([prompt], k)
        g = pipe.graphs
        img = g.vision(pv, budget if pipe.manifest.reduction.budget_range else None)
        embeds = splice_image_embeds(g.embed(enc.input_ids), enc.input_ids, pipe.manifest.model.image_token_id, img)
        logits, state = g.prefill(embeds, enc.attention_mask, enc.input_ids, room=len(ref))
        for i, token in enumerate(ref):
            agree += int(int(np.argmax(logits[0])) == token)
            total += 1
            if i + 1 < len(ref):
                logits = g.step(g.embed(np.array([[token]], dtype=np.int64)), state)
    return agree / total if total else 0.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=HERE / ".work")
    parser.add_argument("--out", type=Path, default=HERE / "results")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (baseline, then every config)")
    parser.add_argument("--runs", type=int, default=3, help="timed runs per round and row")
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--threads", type=int, default=0, help="ONNX Runtime intra-op threads (0 = automatic)")
    args = parser.parse_args()

    from tokedge.artifact import load_artifact
    from tokedge.demo import demo_image
    from tokedge.memory import check_artifact_size
    from tokedge.report.baseline import transformers_baseline
    from tokedge.report.machine import describe, gemm_peak_gflops
    from tokedge.runtime.ort_backend import OrtOptions
    from tokedge.runtime.pipeline import Pipeline
    from tokedge.runtime.preprocess import load_image

    args.work.mkdir(parents=True, exist_ok=True)
    ckpt = args.work / "llava-150m"
    if not (ckpt / "config.json").is_file():
        build_tiny_llava(ckpt, BENCH_MODEL, force=True)
    n_params = params(ckpt)
    print(f"checkpoint {ckpt}: {n_params / 1e6:.0f}M parameters", flush=True)
    arts = build_artifacts(args.work, ckpt)
    image_path = demo_image(args.work / "bench.png")
    image = load_image(image_path)

    load_before = os.getloadavg()
    pipes = {key: Pipeline.load(path, options=OrtOptions(intra_op_threads=args.threads)) for key, path in arts.items()}
    samples: dict[int, dict[str, list[float]]] = {i: {"ttft": [], "decode": [], "vision": [], "prefill": []}
                                                  for i in range(len(CONFIGS))}
    base_ttft: list[float] = []
    base_decode: list[float] = []
    base = None
    for cfg in CONFIGS:  # warm-up every session once
        greedy_tokens(pipes[cfg.artifact], image, PROMPT, cfg.budget, args.max_new_tokens)
    for rnd in range(args.rounds):
        base = transformers_baseline(str(ckpt), [image], PROMPT, args.runs, 1, args.max_new_tokens, attention="default")
        base_ttft += base.ttft_samples_ms
        base_decode += base.decode_samples_ms
        for i, cfg in enumerate(CONFIGS):
            pipe = pipes[cfg.artifact]
            for _ in range(args.runs):
                res = pipe.generate(image, PROMPT, max_new_tokens=args.max_new_tokens,
                                    budget=cfg.budget if pipe.manifest.reduction.budget_range else None)
                t = res.timings
                samples[i]["ttft"].append(t.ttft_ms)
                samples[i]["decode"].append(t.decode_ms_per_token)
                samples[i]["vision"].append(t.vision_ms)
                samples[i]["prefill"].append(t.prefill_ms)
        print(f"round {rnd + 1}/{args.rounds} done", flush=True)
    assert base is not None

    b_ttft, b_decode = spread(base_ttft), spread(base_decode)
    rows = []
    for i, cfg in enumerate(CONFIGS):
        s = {k: spread(v) for k, v in samples[i].items()}
        pipe, ref = pipes[cfg.artifact], pipes[cfg.reference]
        tokens = greedy_tokens(pipe, image, PROMPT, cfg.budget, args.max_new_tokens)
        ref_tokens = greedy_tokens(ref, image, PROMPT, cfg.budget, args.max_new_tokens)
        rows.append({
            "config": cfg.name, "artifact": str(arts[cfg.artifact]), "visual_tokens": cfg.budget,
            "quantization": (pipe.manifest.quantization.scheme + " " + ",".join(pipe.manifest.quantization.graphs)
                             if pipe.manifest.quantization else "fp32"),
            **{f"{k}_ms": v for k, v in s.items()},
            "speedup": {"ttft": b_ttft["median"] / s["ttft"]["median"], "decode": b_decode["median"] / s["decode"]["median"]},
            "tokens": tokens,
            "tokens_equal_fp32": tokens == ref_tokens,
            "validated": bool(pipe.manifest.reference.get("parity_at_export", {}).get("ok")),
            "top1_agreement_vs_fp32": (None if cfg.artifact == cfg.reference else
                                       top1_agreement(ref, pipe, image, AGREEMENT_PROMPTS, cfg.budget, args.max_new_tokens)),
        })
    for pipe in pipes.values():
        pipe.close()

    fp32 = load_artifact(arts["cls"])
    int4 = load_artifact(arts["cls-int4"])
    sizes = {key: check_artifact_size(path, load_artifact(path)) for key, path in arts.items()}
    decoder_ratio = sizes["cls-int4"].measured["decoder"] / sizes["cls"].measured["decoder"]
    # the best configuration is chosen among artifacts that passed their validation against the fp32
    # transformers reference (the int4 rows of this random-weight model do not, see the fidelity columns)
    best = max((r for r in rows if r["visual_tokens"] == 64 and r["validated"]),
               key=lambda r: r["speedup"]["ttft"] * r["speedup"]["decode"])
    result = {
        "machine": {"cpu_model": cpu_model(), **describe(), "gemm_peak_gflops_per_s": round(gemm_peak_gflops(), 1)},
        "checkpoint": {"path": str(ckpt), "parameters": n_params},
        "baseline": {"engine": f"transformers {describe()['versions'].get('transformers')} ({base.attention} attention, "
                               "the default), torch CPU", "visual_tokens": base.visual_tokens,
                     "ttft_ms": b_ttft, "decode_ms": b_decode, "tokens": base.token_ids[0]},
        "rounds": args.rounds, "runs_per_round": args.runs, "max_new_tokens": args.max_new_tokens,
        "threads": args.threads, "prompt": PROMPT, "image": str(image_path),
        "rows": rows, "best": best["config"],
        "int4": {"decoder_bytes_vs_fp32": round(decoder_ratio, 4),
                 "decoder_bytes": sizes["cls-int4"].measured["decoder"], "fp32_decoder_bytes": sizes["cls"].measured["decoder"],
                 "scheme": int4.quantization.scheme, "group_size": int4.quantization.group_size},
        "memory_plan": {key: {"predicted": sum(c.predicted.values()), "measured": sum(c.measured.values()),
                              "ratio": round(c.ratio, 4)} for key, c in sizes.items()},
        "fp32_manifest_dtype": fp32.dtype,
        "measured_at": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "load_average": {"before": [round(x, 2) for x in load_before], "after": [round(x, 2) for x in os.getloadavg()]},
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "bench.json").write_text(json.dumps(result, indent=2) + "\n")
    table = render(result)
    (HERE / "RESULTS.md").write_text(table)
    print(table)


def render(r: dict) -> str:
    m, b = r["machine"], r["baseline"]

    def cell(s: dict) -> str:
        return f"{s['median']:.0f} ({s['p10']:.0f}..{s['p90']:.0f})"

    def dcell(s: dict) -> str:
        return f"{s['median']:.1f} ({s['p10']:.1f}..{s['p90']:.1f})"

    lines = [
        (f"Measured {r['measured_at']} on {m['cpu_model']} ({m['cores']} cores, {m['memory_gb']} GiB, measured fp32 "
        f"GEMM peak {m['gemm_peak_gflops_per_s']:.0f} GFLOP/s), ONNX Runtime {m['versions'].get('onnxruntime')} CPU "
        f"vs {b['engine']}; {r['checkpoint']['parameters'] / 1e6:.0f}M-parameter LLaVA-geometry model (random weights), "
        f"one 480x360 image, prompt \"{r['prompt']}\", {r['max_new_tokens']} new tokens. Side by side in one process, "
        f"{r['rounds']} interleaved rounds x {r['runs_per_round']} runs: median (p10..p90) in ms. The machine is shared "
        f"(1-minute load average {r['load_average']['before'][0]:g} before, {r['load_average']['after'][0]:g} after, "
        "on 2 cores), so absolute times move with its load; the ratios are measured under the same load, but "
        "torch slows down more than ONNX Runtime when other jobs compete for the cores."),
        "",
        ("| engine | weights | visual tokens | TTFT ms | decode ms/token | TTFT speed-up | decode speed-up "
         "| validated | 16 tokens = fp32 | top-1 vs fp32 |"),
        "|---|---|---|---|---|---|---|---|---|---|",
        (f"| transformers ({b['engine'].split('(')[1].split(',')[0]}) | fp32 | {b['visual_tokens']} | "
         f"{cell(b['ttft_ms'])} | {dcell(b['decode_ms'])} | 1.00x | 1.00x | | | |"),
    ]
    for row in r["rows"]:
        agree = "" if row["top1_agreement_vs_fp32"] is None else f"{row['top1_agreement_vs_fp32']:.0%}"
        same = "" if row["quantization"] == "fp32" else ("yes" if row["tokens_equal_fp32"] else "no")
        lines.append(
            f"| tokedge {row['config']} | {row['quantization']} | {row['visual_tokens']} | {cell(row['ttft_ms'])} "
            f"| {dcell(row['decode_ms'])} | {row['speedup']['ttft']:.2f}x | {row['speedup']['decode']:.2f}x "
            f"| {'yes' if row['validated'] else 'no'} | {same} | {agree} |")
    i4 = r["int4"]
    lines += [
        "",
        (f"Best at 64 visual tokens among artifacts that passed validation against the fp32 transformers reference: "
        f"**tokedge {r['best']}**. \"validated\": the export / quantize check with the scheme's tolerance passed "
        "(int4 rows are written with --no-validate: int4 round-to-nearest moves this random-weight model's logits "
        "beyond the int4 tolerance at 64 tokens). "
        f"int4 decoder weights: {i4['decoder_bytes'] / 2**20:.0f} MiB "
        f"vs {i4['fp32_decoder_bytes'] / 2**20:.0f} MiB fp32 ({i4['decoder_bytes_vs_fp32']:.2f}x, lm_head kept fp32). "
        "\"top-1 vs fp32\": teacher-forced agreement of the row's argmax with its fp32 artifact's greedy tokens over "
        f"{len(AGREEMENT_PROMPTS)} prompts x {r['max_new_tokens']} steps."),
        "",
        ("Memory plan, predicted / measured artifact bytes: "
         + ", ".join(f"{k} {v['ratio']:.3f}" for k, v in r["memory_plan"].items()) + "."),
    ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
