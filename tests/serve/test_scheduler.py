"""The pieces under the server: `BatchDecoder` rows against `generate` run alone (its own loop),
and the stop-string / streaming text tracker against plain string truncation."""

from __future__ import annotations

import numpy as np
import pytest

from tokedge.errors import InputError
from tokedge.runtime.generate import SamplingConfig
from tokedge.runtime.pipeline import Pipeline
from tokedge.runtime.preprocess import preprocess
from tokedge.runtime.stepwise import BatchDecoder
from tokedge.serve.scheduler import TextTracker


@pytest.mark.parametrize("method", ["cls-attn", "fastv"])  # pre-LLM, and in-LLM (its own prefill graph)
def test_batch_rows_equal_single_runs(artifacts, test_images, method):
    prompts = ["Hi?", "What is shown in this image?", "Describe the picture in detail, with colours and objects."]
    configs = [SamplingConfig(max_new_tokens=5), SamplingConfig(max_new_tokens=12, temperature=1.3, top_p=0.9, seed=3),
               SamplingConfig(max_new_tokens=9)]
    with Pipeline.load(artifacts(method, 64)) as pipe:
        singles = [pipe.generate(img, p, max_new_tokens=c.max_new_tokens, temperature=c.temperature, top_p=c.top_p,
                                 seed=c.seed).token_ids[0] for img, p, c in zip(test_images, prompts, configs)]
        enc = pipe.encoder.encode(prompts, pipe.visual_tokens_for(None))
        pixels = np.stack([preprocess(img, pipe.manifest.preprocess) for img in test_images])
        dec = BatchDecoder(pipe.graphs, pixels, enc.input_ids, enc.attention_mask, configs)
        steps = [dec.prefill()]
        while dec.active:
            steps.append(dec.step())
    assert [row.tokens for row in dec.rows] == singles
    assert dec.visual_tokens == 64
    for r, row in enumerate(dec.rows):  # each row reported its tokens one step at a time, then None
        reported = [s[r] for s in steps]
        assert [t for t in reported if t is not None] == row.tokens
        assert row.finish_reason == ("length" if len(row.tokens) == configs[r].max_new_tokens else "eos")


def test_finishing_a_row_stops_only_that_row(serve_artifact, test_images):
    with Pipeline.load(serve_artifact) as pipe:
        alone = pipe.generate(test_images[1], "Hi?", max_new_tokens=10).token_ids[0]
        enc = pipe.encoder.encode(["What is this?", "Hi?"], 64)
        pixels = np.stack([preprocess(img, pipe.manifest.preprocess) for img in test_images[:2]])
        dec = BatchDecoder(pipe.graphs, pixels, enc.input_ids, enc.attention_mask,
                           [SamplingConfig(max_new_tokens=10)] * 2)
        dec.prefill()
        dec.finish(0, "cancelled")
        while dec.active:
            dec.step()
        with pytest.raises(InputError, match="limit of 2048"):
            BatchDecoder(pipe.graphs, pixels, enc.input_ids, enc.attention_mask, [SamplingConfig(max_new_tokens=2040)] * 2)
    assert dec.rows[0].finish_reason == "cancelled" and len(dec.rows[0].tokens) == 1
    assert dec.rows[1].tokens == alone


def _run(tracker: TextTracker, pieces: list[str]) -> tuple[list[str], bool]:
    """Feed one piece (token) at a time; -> (deltas sent, stop reached)."""
    ids, sent = [], []
    for i in range(len(pieces)):
        ids.append(i)
        delta, hit = tracker.update(ids)
        sent.append(delta)
        if hit:
            return [d for d in sent if d], True
    sent.append(tracker.final(ids))
    return [d for d in sent if d], False


@pytest.mark.parametrize("pieces,stop", [
    (["He", "llo", " wor", "ld", "!"], ("wor",)),
    (["He", "llo", " wo", "rx", " world"], ("world", "lo w")),
    (["a", "b", "c"], ("abd",)),
    (["x", "y", "zz", "y"], ()),
    (["St", "op", " her", "e", " now"], ("p h", "zzz")),
])
def test_text_tracker_cuts_at_the_first_stop_and_never_leaks_it(pieces, stop):
    tracker = TextTracker(lambda ids: "".join(pieces[i] for i in ids), stop)
    deltas, hit = _run(tracker, pieces)
    full = "".join(pieces)
    cuts = [full.find(s) for s in stop if full.find(s) >= 0]
    expected = full[: min(cuts)] if cuts else full
    assert "".join(deltas) == expected == tracker.sent
    assert hit == bool(cuts)


def test_text_tracker_holds_back_an_incomplete_character():
    pieces = ["ok ", "\ufffd", "é", "!"]  # a byte-fallback token decodes to U+FFFD until completed

    def decode(ids):
        text = "".join(pieces[i] for i in ids)
        return text.replace("\ufffdé", "é")

    deltas, _ = _run(TextTracker(decode, ()), pieces)
    assert deltas == ["ok ", "é", "!"]
