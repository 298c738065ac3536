"""The per-video stage registry and divprune's numpy selection pieces (cheap, no model)."""

from __future__ import annotations

import numpy as np
import pytest


def test_second_smallest_equals_a_full_partition_with_ties_and_duplicates():
    from tokedge.reduce.video import _second_smallest

    rng = np.random.default_rng(4)
    d = rng.standard_normal((64, 64)).astype(np.float32)
    d[5] = d[9]  # duplicate rows
    d[3, 3] = 10.0  # a row whose own value is its largest
    d[7, 7] = d[7].min() - 1  # ... and one whose own value is its smallest
    d[11, :] = 0.5  # every value tied
    copy = d.copy()
    np.testing.assert_array_equal(_second_smallest(d), np.partition(copy, 1, axis=-1)[:, 1])
    np.testing.assert_array_equal(d, copy)  # the diagonal is restored


def test_divprune_stage_picks_diverse_tokens_in_frame_order():
    """Two frames of 4 tokens: three identical tokens and distinct directions; keeping 3 takes no
    duplicate (a picked token is excluded) and returns sorted flat indices."""
    from tokedge.reduce.video import STAGES, select_divprune, stage_for

    assert stage_for("divprune") is STAGES["divprune"] and stage_for("no-such-method") is None
    e = np.eye(4, dtype=np.float32)
    tokens = np.stack([np.stack([e[0], e[0], e[0], e[1]]), np.stack([e[2], e[0], e[3], e[3] + e[2] * 0.01])])
    picks = select_divprune(tokens, 3, {})
    assert picks.dtype == np.int64 and list(picks) == sorted(picks) and len(set(picks.tolist())) == 3
    chosen = tokens.reshape(-1, 4)[picks]
    assert len({tuple(np.round(c, 3)) for c in chosen}) == 3  # three different directions
    np.testing.assert_array_equal(select_divprune(tokens, 8, {}), np.arange(8))
    with pytest.raises(ValueError, match="registered twice"):
        from tokedge.reduce.video import VideoStage, register

        register(VideoStage("divprune", select_divprune, "again"))
