"""DART with per-image-span quotas (TensorRT Edge-LLM 0.11's rule, docs/research/qwen-vl.md 8.2)
against a loop reference written from that description, and the quota arithmetic against
Edge-LLM's `clamp(ceil(n * (1 - r)), 1, n)` with its 16-token skip guard."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from tokedge.reduce.in_llm import dart_span_select
from tokedge.reduce.quota import TokenBudget, dart_quotas


def edge_loop(e: np.ndarray, is_img: np.ndarray, quotas: list[int], piv_img: int = 4, piv_txt: int = 4,
              pivot_score: np.ndarray | None = None) -> list[int]:
    """Kept image positions, one span at a time, one pivot at a time, plain Python lists. Pivots by
    the L1 norm of `e` (Edge-LLM) or by `pivot_score` (in-LLM: the scoring layer's key norms)."""
    e = e.astype(np.float32)
    l1 = [float(np.abs(row).sum()) for row in e] if pivot_score is None else [float(v) for v in pivot_score]
    l2 = [math.sqrt(float(row @ row)) for row in e]

    def best(pos, score, k):  # descending score, ties to the lower position
        return sorted(pos, key=lambda p: (-score[p], p))[:max(k, 0)]

    text = [i for i in range(len(e)) if not is_img[i]]
    text_piv = best(text, l1, piv_txt)
    spans, i = [], 0
    while i < len(e):
        if is_img[i]:
            j = i
            while j < len(e) and is_img[j]:
                j += 1
            spans.append(list(range(i, j)))
            i = j
        else:
            i += 1
    kept = []
    for span, quota in zip(spans, quotas):
        got = best(span, l1, min(piv_img, quota))
        pivots = list(got) + text_piv
        cand = [c for c in span if c not in got]
        for k, p in enumerate(pivots):
            remaining = quota - len(got)
            if remaining <= 0 or not cand:
                break
            per = math.ceil(remaining / (len(pivots) - k))
            score = {c: -float(e[p] @ e[c]) / max(l2[p] * l2[c], 1e-8) for c in cand}
            picked = best(cand, score, per)
            got += picked
            cand = [c for c in cand if c not in picked]
        kept += got
    return sorted(kept)


def _prompt(spans: list[int], seed: int, d: int = 24):
    """Text, then each image span between vision markers, then more text; random embeddings."""
    rng = np.random.default_rng(seed)
    is_img = [False] * 5
    for n in spans:
        is_img += [False] + [True] * n + [False]
    is_img += [False] * 6
    is_img = np.asarray(is_img)
    return rng.standard_normal((len(is_img), d)).astype(np.float32), is_img


def _select(e, is_img, quotas):
    img = np.flatnonzero(is_img)
    span_id = np.cumsum(np.concatenate([[0], np.diff(img) > 1]))
    quota = np.asarray(quotas)[span_id]
    t = torch.from_numpy(e)[None]
    return dart_span_select(t.abs().sum(-1), t, torch.from_numpy(img)[None], torch.from_numpy(span_id)[None],
                            torch.from_numpy(quota)[None], torch.ones(1, len(e), dtype=torch.int64),
                            int(sum(quotas)))[0].tolist()


@pytest.mark.parametrize("keep", [0.75, 0.5])
@pytest.mark.parametrize("spans", [[16, 14], [49], [30, 3, 20]], ids=["16+14", "49", "30+3+20"])
def test_matches_edge_llm_loop(spans, keep):
    e, is_img = _prompt(spans, seed=sum(spans))
    quotas = dart_quotas(spans, TokenBudget(keep=keep))
    got = _select(e, is_img, quotas)
    assert got == edge_loop(e, is_img, quotas)
    img = np.flatnonzero(is_img)
    starts = np.cumsum([0] + spans)
    per_span = [sum(1 for p in got if p in set(img[a:b])) for a, b in itertools.pairwise(starts)]
    assert per_span == quotas  # every image keeps its own quota


def test_quotas_follow_edge_llm_ratio():
    # Edge-LLM: clamp(ceil(n * (1.0 - r)), 1, n) with r a float32; tokedge --keep 1-r
    for r in (0.25, 0.5):
        edge_keep = 1.0 - float(np.float32(r))
        for n in range(1, 3000):
            assert TokenBudget(keep=1 - r).per_image(n) == max(1, min(n, math.ceil(n * edge_keep)))
    assert dart_quotas([16, 14], TokenBudget(keep=0.75)) == [12, 11]
    assert dart_quotas([16, 14], TokenBudget(keep=0.5)) == [8, 7]
    assert dart_quotas([10], TokenBudget(keep=0.5)) == [10]  # under 16 visual tokens: Edge-LLM skips
    assert TokenBudget(count=20).counts([49, 12]) == [20, 12]


def test_budget_refusals_are_one_line():
    from tokedge.errors import UsageError

    for kwargs in ({"keep": 0.0}, {"keep": 1.5}, {"count": 0}, {}, {"count": 4, "keep": 0.5}):
        with pytest.raises(UsageError) as err:
            TokenBudget(**kwargs)
        assert "\n" not in str(err.value)


def test_exported_graph_selects_the_same_tokens(tmp_path):
    """Through ONNX Runtime with the span layout and total as inputs: one graph, two prompts."""
    import onnxruntime as ort

    class Graph(torch.nn.Module):
        def forward(self, e, img, span, quota, mask, k):
            return dart_span_select(e.abs().sum(-1), e, img, span, quota, mask, k)

    e, is_img = _prompt([16, 14], seed=3)
    img = np.flatnonzero(is_img)
    span = (img > img[15]).astype(np.int64)
    quota = np.where(span == 0, 12, 11)
    args = (torch.from_numpy(e)[None], torch.from_numpy(img)[None], torch.from_numpy(span)[None],
            torch.from_numpy(quota)[None], torch.ones(1, len(e), dtype=torch.int64), torch.tensor(23))
    path = tmp_path / "dart.onnx"
    names = ["e", "img", "span", "quota", "mask", "k"]
    torch.onnx.export(Graph(), args, str(path), input_names=names, output_names=["kept"], opset_version=17,
                      dynamo=False, dynamic_axes={"e": {1: "t"}, "img": {1: "n"}, "span": {1: "n"},
                                                  "quota": {1: "n"}, "mask": {1: "t"}})
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for spans, seed in (([16, 14], 3), ([30, 3, 20], 4)):
        e, is_img = _prompt(spans, seed=seed)
        quotas = dart_quotas(spans, TokenBudget(keep=0.5))
        img = np.flatnonzero(is_img)
        span = np.cumsum(np.concatenate([[0], np.diff(img) > 1])).astype(np.int64)
        feed = {"e": e[None], "img": img[None].astype(np.int64), "span": span[None],
                "quota": np.asarray(quotas, np.int64)[span][None], "mask": np.ones((1, len(e)), np.int64),
                "k": np.array(sum(quotas), np.int64)}
        (kept,) = sess.run(None, feed)
        assert kept[0].tolist() == edge_loop(e, is_img, quotas)


def test_prefill_inputs_per_image():
    """What the runtime feeds the prefill: fixed layouts keep `keep` x images; dynamic ones the sum
    of each image's count; DART also each image's quota (all tokens under 16 visual tokens)."""
    from tokedge.reduce.quota import image_spans, prefill_budget

    assert image_spans([5, 6, 7, 10, 11]) == [3, 2]
    assert image_spans([]) == []
    assert prefill_budget([8], None, [576, 576], 2, False) == ([16], None)
    assert prefill_budget([100], TokenBudget(count=100), [154, 64], 2, False) == ([164], None)
    assert prefill_budget([1], TokenBudget(keep=0.5), [154, 256], 2, False) == ([205], None)
    assert prefill_budget([1], TokenBudget(keep=0.75), [154, 256], 2, True) == ([116 + 192], [116, 192])
    assert prefill_budget([1], TokenBudget(keep=0.5), [6, 9], 2, True) == ([15], [6, 9])  # Edge-LLM's skip guard
