"""`tokedge verify`: re-check an artifact's file hashes and its graphs' numerical agreement with
the reference recorded at export, or with a fresh transformers reference from the checkpoint."""

from __future__ import annotations

from pathlib import Path

from tokedge.artifact import open_artifact
from tokedge.export.validate import ParityReport, Tolerance, load_reference, run_cases
from tokedge.runtime.graphs import ArtifactGraphs
from tokedge.runtime.ort_backend import OrtOptions


def verify(artifact: Path | str, checkpoint: str | None = None, options: OrtOptions = OrtOptions()) -> ParityReport:
    root = Path(artifact)
    verified = open_artifact(root)  # schema, format version, hashes, confined paths: and the bytes
    manifest = verified.manifest
    ref = manifest.reference
    pixel_values, cases = load_reference(verified.read(ref["file"]))
    tol = Tolerance(**ref["tolerance"])
    if checkpoint is not None:
        cases = _recompute(manifest, checkpoint, pixel_values, cases)
    with ArtifactGraphs(root, manifest, options=options, verified=verified) as graphs:
        return run_cases(graphs, pixel_values, cases, tol)


def _recompute(manifest, checkpoint: str, pixel_values, cases):
    """Replace the recorded expected outputs with transformers' outputs from `checkpoint`."""
    from tokedge.errors import require

    require("torch", "export")
    from tokedge.export.families.llava import load_llava
    from tokedge.export.pipeline import resolve_model
    from tokedge.export.reference import reference_from_ids
    from tokedge.reduce import get_method

    loaded = load_llava(checkpoint, resolve_model(checkpoint))
    method = get_method(manifest.reduction.method)
    return [
        reference_from_ids(loaded, method, pixel_values, c["input_ids"], c["attention_mask"], int(c["budget"]),
                           c["step_logits"].shape[1], manifest.reduction.options)
        for c in cases
    ]
