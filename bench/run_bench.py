"""Reproduce the README's performance table on this machine.

Builds a ~150M-parameter LLaVA-geometry checkpoint (random weights; CLIP-style tower at 336 px,
patch 14, 576 visual tokens; Llama-style decoder with a 32000-token head), exports it with
`cls-attn` and a runtime budget (16..576), and runs `tokedge profile` at budgets 576, 192 and 64
against transformers (its default SDPA attention) at all 576 tokens, same image and prompt, same process.

    python bench/run_bench.py            # writes bench/results/{report.json,report.md,*.png} and RESULTS.md
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from tokedge.export.presets import TinyLlavaConfig, build_tiny_llava  # noqa: E402

BENCH_MODEL = TinyLlavaConfig(
    vision_hidden=384, vision_layers=6, vision_heads=6,
    text_hidden=768, text_layers=12, text_heads=12, text_kv_heads=12, text_intermediate=2048,
    vocab_size=32000, seed=0,
)


def params(ckpt: Path) -> int:
    from safetensors import safe_open

    total = 0
    for f in ckpt.glob("*.safetensors"):
        with safe_open(f, "np") as fh:
            for key in fh.keys():
                total += math.prod(fh.get_slice(key).get_shape())
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=HERE / ".work")
    parser.add_argument("--out", type=Path, default=HERE / "results")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--max-new-tokens", type=int, default=16)
    args = parser.parse_args()

    from tokedge.cli import main as tokedge
    from tokedge.demo import demo_image

    ckpt = args.work / "llava-150m"
    if not (ckpt / "config.json").is_file():
        build_tiny_llava(ckpt, BENCH_MODEL, force=True)
    n_params = params(ckpt)
    print(f"checkpoint {ckpt}: {n_params / 1e6:.0f}M parameters", flush=True)
    artifact = args.work / "llava-150m-cls-attn"
    if not (artifact / "tokedge.json").is_file():
        rc = tokedge(["export", str(ckpt), "--method", "cls-attn", "--budget", "64", "--dynamic-budget", "16:576",
                      "--out", str(artifact), "--force"])
        if rc:
            sys.exit(rc)
    image = demo_image(args.work / "bench.png")
    rc = tokedge(["profile", str(artifact), "--image", str(image), "--prompt", "Describe this image in detail.",
                  "--budgets", "576,192,64", "--runs", str(args.runs), "--warmup", "1",
                  "--max-new-tokens", str(args.max_new_tokens), "--baseline", str(ckpt), "--out", str(args.out),
                  "--force"])
    if rc:
        sys.exit(rc)
    report = json.loads((args.out / "report.json").read_text())
    base = report["baseline"]
    attention = base.get("attention", "eager")  # transformers' attention the baseline ran with
    m = report["machine"]
    lines = [
        f"Measured on {m['cpu']} ({m['cores']} cores, {m['memory_gb']} GiB), ONNX Runtime "
        f"{m['versions'].get('onnxruntime')} CPU vs torch {m['versions'].get('torch')} / transformers "
        f"{m['versions'].get('transformers')} ({attention} attention); {n_params / 1e6:.0f}M-parameter LLaVA-geometry model, "
        f"one 480x360 image, {args.max_new_tokens} new tokens, median of {args.runs} runs.",
        "",
        "| engine | visual tokens | TTFT ms | prefill ms | decode ms/token | TTFT speed-up | decode speed-up |",
        "|---|---|---|---|---|---|---|",
        f"| transformers ({attention}) | {base['visual_tokens']} | {base['ttft_ms']:.0f} | {base['prefill_ms']:.0f} "
        f"| {base['decode_ms_per_token']:.1f} | 1.00x | 1.00x |",
    ]
    for r in report["results"]:
        lines.append(f"| tokedge cls-attn (ONNX Runtime) | {r['budget']} | {r['ttft_ms']:.0f} | {r['prefill_ms']:.0f} "
                     f"| {r['decode_ms_per_token']:.1f} | {r['speedup_vs_baseline']['ttft']:.2f}x "
                     f"| {r['speedup_vs_baseline']['decode']:.2f}x |")
    table = "\n".join(lines) + "\n"
    (HERE / "RESULTS.md").write_text(table)
    print(table)


if __name__ == "__main__":
    main()
