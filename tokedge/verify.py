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
    """Replace the recorded expected outputs with fresh ones from `checkpoint`: transformers'
    outputs for vision-side methods; for in-LLM methods transformers' tower and projector, then
    the pruning prefill rebuilt from the checkpoint with the manifest's plan (as at export)."""
    from tokedge.errors import require

    require("torch", "export")
    from tokedge.export.families.llava import build_graph_modules, load_llava
    from tokedge.export.pipeline import resolve_model
    from tokedge.export.reference import reference_from_ids, reference_pruned_from_ids
    from tokedge.reduce import get_method

    red = manifest.reduction
    loaded = load_llava(checkpoint, resolve_model(checkpoint))
    method = get_method(red.method)
    if method.prunes_in_llm:
        from tokedge.reduce.in_llm import plan_for

        plan = plan_for(method, red.budget, red.full_tokens, loaded.config.text_config.num_hidden_layers,
                        dict(red.options))
        modules = build_graph_modules(loaded, method, red.full_tokens, dict(red.options), plan)
        return [reference_pruned_from_ids(loaded, modules, pixel_values, c["input_ids"], c["attention_mask"],
                                          int(c["budget"]), c["step_logits"].shape[1]) for c in cases]
    return [
        reference_from_ids(loaded, method, pixel_values, c["input_ids"], c["attention_mask"], int(c["budget"]),
                           c["step_logits"].shape[1], red.options)
        for c in cases
    ]
