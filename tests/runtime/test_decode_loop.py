"""The one decode loop: EOS handling per row, padding of finished rows, fixed-length parity mode,
and in-LLM kept counts read from the cache rather than from the manifest."""

from __future__ import annotations

import numpy as np

from tokedge.runtime.generate import SamplingConfig, decode_loop


def _script(rows: list[list[int]], vocab: int = 10):
    """A fake model that emits scripted tokens per row and records what it was fed."""
    fed: list[list[int]] = []
    step_no = {"i": 0}

    def logits_for(i):
        out = np.full((len(rows), vocab), -1.0, dtype=np.float32)
        for r, seq in enumerate(rows):
            out[r, seq[min(i, len(seq) - 1)]] = 1.0
        return out

    def step(ids):
        fed.append(ids.tolist())
        step_no["i"] += 1
        return logits_for(step_no["i"])

    return logits_for(0), step, fed


def test_rows_stop_at_their_own_eos_and_are_fed_pad():
    first, step, fed = _script([[3, 4, 9, 5], [6, 9, 7, 7]])
    out = decode_loop(first, step, SamplingConfig(max_new_tokens=4), eos=frozenset({9}), pad=0)
    assert out.tokens == [[3, 4], [6]]
    assert fed == [[3, 6], [4, 0]]  # row 1 finished after its EOS: fed pad; the loop stops once both are done
    assert out.steps == 2


def test_parity_mode_keeps_eos_and_logits():
    first, step, _ = _script([[3, 9, 5]])
    out = decode_loop(first, step, SamplingConfig(max_new_tokens=3), eos=frozenset({9}), stop_at_eos=False,
                      keep_logits=True)
    assert out.tokens == [[3, 9, 5]] and out.steps == 2 and len(out.step_logits) == 2
    assert int(out.step_logits[0].argmax()) == 9


def test_in_llm_visual_tokens_come_from_cache_lengths():
    from tokedge.runtime.graphs import DecodeState

    state = DecodeState(past={}, buffers={}, lengths={"attention_mask": 600, "attention_mask.1": 88},
                        last_position=np.zeros((1, 1), dtype=np.int64))
    assert state.visual_tokens(576) == 64
    plain = DecodeState(past={}, buffers={}, lengths={"attention_mask": 600}, last_position=state.last_position)
    assert plain.visual_tokens(64) == 64
