"""The decoder's IO-binding path (KV cache kept as device-resident OrtValues between steps; on
this CPU-only machine the device is the CPU) gives exactly what plain `infer` calls give."""

from __future__ import annotations

import numpy as np

from tokedge.artifact import load_artifact
from tokedge.export.validate import greedy_arrays, load_reference
from tokedge.runtime.graphs import ArtifactGraphs
from tokedge.runtime.ort_backend import OrtRunner


class PlainRunner:
    """Keeps nothing on a device: every step copies the KV cache to the host."""

    def __init__(self, inner: OrtRunner):
        self.inner, self.name, self.last_inference_time = inner, inner.name, 0.0

    def __enter__(self):
        self.inner.__enter__()
        return self

    def __exit__(self, *exc):
        self.inner.__exit__(*exc)

    def infer(self, feed, keep=frozenset()):
        out = self.inner.infer(feed)  # no keep: plain numpy outputs
        assert all(isinstance(v, np.ndarray) for v in feed.values())
        return out


def test_bound_and_plain_decoding_agree(artifacts):
    art = artifacts("cls-attn", 64)
    manifest = load_artifact(art)
    pixel_values, cases = load_reference(art / "reference.npz")
    case = cases[0]
    with ArtifactGraphs(art, manifest) as bound:
        assert bound.runners["decoder"].device == "cpu"
        a = greedy_arrays(bound, pixel_values, case["input_ids"], case["attention_mask"], steps=5)
        _, state = bound.prefill(bound.embed(case["input_ids"][:, :3]), case["attention_mask"][:, :3],
                                 case["input_ids"][:, :3], room=1)
        assert not isinstance(state.past["past_key_values.0.key"], np.ndarray)  # stayed an OrtValue
    plain_runners = {n: PlainRunner(OrtRunner(art / g.file, name=n)) for n, g in manifest.graphs.items()}
    with ArtifactGraphs(art, manifest, runners=plain_runners) as plain:
        b = greedy_arrays(plain, pixel_values, case["input_ids"], case["attention_mask"], steps=5)
    assert a["tokens"].tolist() == b["tokens"].tolist()
    np.testing.assert_array_equal(a["step_logits"], b["step_logits"])
