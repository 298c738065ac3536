"""`tokedge verify`: re-check an artifact's file hashes and its graphs' numerical agreement with
the reference recorded at export, or with a fresh transformers reference from the checkpoint."""

from __future__ import annotations

from pathlib import Path

from tokedge.artifact import open_artifact
from tokedge.export.validate import ParityReport, Tolerance, load_reference, run_cases
from tokedge.runtime.graphs import ArtifactGraphs
from tokedge.runtime.ort_backend import OrtOptions


def verify(artifact: Path | str, checkpoint: str | None = None, options: OrtOptions = OrtOptions(),
           backend=None) -> ParityReport:
    """`backend`: a `tokedge.runtime.backends.Backend` (ONNX Runtime's CPU or GPU providers) the
    parity runs on; None: the CPU."""
    if backend is not None:
        from tokedge.errors import UsageError

        if backend.name == "tensorrt":
            raise UsageError("verify runs the graphs on ONNX Runtime: use --backend onnxruntime, ort-cuda or "
                             "ort-tensorrt (engines are checked against their artifact when `run` loads them)")
        backend.check()
    root = Path(artifact)
    verified = open_artifact(root)  # schema, format version, hashes, confined paths: and the bytes
    manifest = verified.manifest
    ref = manifest.reference
    pixel_values, cases = load_reference(verified.read(ref["file"]))
    if not cases:  # e.g. in-LLM methods on anyres layouts: a parity "pass" over nothing would mislead
        from tokedge.errors import UsageError

        raise UsageError(f"'{root}' passed its hash checks but records no reference cases to compare "
                         f"(layout '{manifest.layout.kind}', --method {manifest.reduction.method}: export-time "
                         "validation is not implemented for it yet)")
    check_tokenizer(verified)
    tol = Tolerance(**ref["tolerance"])
    if checkpoint is not None:
        cases = _recompute(manifest, checkpoint, pixel_values, cases)
    if backend is not None:
        import dataclasses

        chosen = backend.ort_options(manifest, root)
        options = dataclasses.replace(options, backend=chosen.backend, gpu=chosen.gpu)
    with ArtifactGraphs(root, manifest, options=options, verified=verified) as graphs:
        report = run_cases(graphs, pixel_values, cases, tol)
        if "text" in ref:  # quantized: the text measure against the fp32 side recorded at quantization
            from dataclasses import replace

            from tokedge.fidelity import TextReference, measure

            text = TextReference.load(verified.read(ref["text"]["file"]))
            report = replace(report, text=measure(graphs, text).to_dict())
        return report


def _recompute(manifest, checkpoint: str, pixel_values, cases):
    """Replace the recorded expected outputs with fresh ones from `checkpoint`: transformers'
    outputs for vision-side methods; for in-LLM methods transformers' tower and projector, then
    the pruning prefill rebuilt from the checkpoint with the manifest's plan (as at export)."""
    from tokedge.errors import require

    require("torch", "export")
    from tokedge.errors import InputError
    from tokedge.export.families import load_checkpoint
    from tokedge.export.pipeline import resolve_model
    from tokedge.export.reference import reference_from_ids, reference_pruned_from_ids
    from tokedge.reduce import get_method

    red = manifest.reduction
    loaded = load_checkpoint(checkpoint, resolve_model(checkpoint))
    if loaded.family.name != manifest.model.family:
        raise InputError(f"--checkpoint '{checkpoint}' is a {loaded.family.name} checkpoint, the artifact was "
                         f"exported from a {manifest.model.family} one; pass the checkpoint it was exported from")
    from tokedge.layouts import layout_of

    layout = layout_of(manifest)
    if layout.pixel_limit() is not None:  # images resized to a pixel budget: the artifact's --max-pixels
        loaded = loaded.family.with_max_pixels(loaded, layout.pixel_limit())
    method = get_method(red.method)
    if method.reduces_over_time:  # temporal methods reduce videos only: the image cases keep every token
        method = get_method("none")
    if method.prunes_in_llm:
        from tokedge.reduce.in_llm import plan_for

        plan = plan_for(method, red.budget, red.full_tokens, loaded.spec.text_layers or 0, dict(red.options))
        modules = loaded.family.modules(loaded, method, red.full_tokens, dict(red.options), plan)
        per_image = layout.prefill_budget()  # per-image counts where images differ, as at export
        return [reference_pruned_from_ids(loaded, modules, pixel_values, c["input_ids"], c["attention_mask"],
                                          int(c["budget"]), c["step_logits"].shape[1],
                                          image=_case_image(c), per_image=per_image) for c in cases]
    if any("image" in c for c in cases):  # tiled layouts: each case holds its own image
        from tokedge.export.reference import reference_image_from_ids

        return [reference_image_from_ids(loaded, method, _case_image(c), c["input_ids"],
                                         c["attention_mask"], int(c["budget"]), c["step_logits"].shape[1],
                                         dict(red.options)) for c in cases]
    return [
        reference_from_ids(loaded, method, pixel_values, c["input_ids"], c["attention_mask"], int(c["budget"]),
                           c["step_logits"].shape[1], red.options)
        for c in cases
    ]


def _case_image(case: dict):
    """The image a tiled layout's reference case recorded (None for single-view cases)."""
    if "image" not in case:
        return None
    from PIL import Image

    return Image.fromarray(case["image"], "RGB")


def check_tokenizer(verified) -> None:
    """Load the tokenizer from its verified bytes (never the path again) and check that it is the
    artifact's: it parses, keeps the image placeholder whole as `prompt.image_token_id`, and a
    rendered probe prompt encodes to ids the model's vocabulary has. A foreign tokenizer.json whose
    hash was recomputed fails here rather than passing as "hashes ok"."""
    from tokedge.errors import ArtifactError, TokedgeError
    from tokedge.runtime.prompt import PromptEncoder
    from tokedge.safeio import printable

    manifest = verified.manifest
    info = manifest.prompt
    encoder = PromptEncoder(verified.root, info, manifest.model.pad_token_id, info.special_tokens,
                            tokenizer_json=verified.read(info.tokenizer_file))
    where = f"the artifact's tokenizer ({printable(info.tokenizer_file)})"
    from tokedge.layouts import layout_of

    run = layout_of(manifest).run_token()  # the placeholder, or the token of a framed run (Gemma 3)
    if encoder.tokenizer.token_to_id(run) != info.image_token_id:
        raise ArtifactError(f"{where} does not map the image token '{printable(run)}' to "
                            f"prompt.image_token_id {info.image_token_id}; it is not this artifact's tokenizer")
    if encoder.tokenizer.token_to_id(info.image_token) is None:
        raise ArtifactError(f"{where} does not keep the image placeholder '{printable(info.image_token)}' whole; "
                            "it is not this artifact's tokenizer")
    try:
        ids = encoder.encode(["Describe the image."], [[layout_of(manifest).placeholder(1)]]).input_ids
    except TokedgeError as exc:
        raise ArtifactError(f"{where} cannot encode a probe prompt ({exc}); it is not this artifact's tokenizer") from None
    if ids.size and (int(ids.max()) >= manifest.model.vocab_size or int(ids.min()) < 0):
        raise ArtifactError(f"{where} gives token id {int(ids.max())}, outside the model's vocabulary of "
                            f"{manifest.model.vocab_size}; it is not this artifact's tokenizer")
