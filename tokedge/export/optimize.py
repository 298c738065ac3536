"""`tokedge optimize`: run graph passes over an existing artifact and write a new one.

Torch-free (onnx-ir and onnxscript only). The new artifact is staged and renamed into place, its
hashes recomputed, the passes recorded in the manifest, and its graphs re-checked against the
reference recorded at export: a pass that changes the numbers beyond tolerance fails the command.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from tokedge.artifact import hash_tree, open_artifact, staged_directory, write_manifest
from tokedge.errors import UsageError


@dataclass
class OptimizeResult:
    out: Path
    counts: dict[str, dict[str, int]]  # graph -> pass -> fired
    parity: dict
    earlier: dict[str, dict[str, int]] = dataclasses.field(default_factory=dict)  # already applied: graph -> pass -> fired
    ort_ops: dict[str, dict[str, int]] = dataclasses.field(default_factory=dict)  # graph -> com.microsoft op -> nodes after

    def describe(self, graph: str) -> str:
        """One line per graph: what each pass did now, and when it had already run before."""
        parts = []
        for name, fired in self.counts[graph].items():
            before = self.earlier.get(graph, {}).get(name)
            if before is not None and fired == 0:
                parts.append(f"{name} had already run (at export or an earlier optimize, fired {before}x then): nothing left")
            else:
                ops = self.ort_ops.get(graph) if name == "ort-fusions" else None
                held = f" ({', '.join(f'{op} {n}' for op, n in sorted(ops.items()))} in the graph)" if ops else ""
                parts.append(f"{name} fired {fired}x{held}")
        return f"{graph}: " + ", ".join(parts)


def optimize(artifact: Path, out: Path, passes: list[str], force: bool = False) -> OptimizeResult:
    import onnx_ir as ir

    from tokedge.export.onnx_export import save_graph
    from tokedge.export.passes import get_passes, run_passes
    from tokedge.export.validate import Tolerance, load_reference, run_cases
    from tokedge.runtime.graphs import ArtifactGraphs

    artifact, out = Path(artifact), Path(out)
    if artifact.resolve() == out.resolve():
        raise UsageError("--out must differ from the artifact: optimize writes a new artifact")
    get_passes(passes)
    verified = open_artifact(artifact)  # every file read once, no links followed, hashed: these bytes are copied
    manifest = verified.manifest
    counts: dict[str, dict[str, int]] = {}
    ort_ops: dict[str, dict[str, int]] = {}
    earlier: dict[str, dict[str, int]] = {}
    for record in manifest.optimizations:
        per = earlier.setdefault(record["graph"], {})
        per[record["pass"]] = per.get(record["pass"], 0) + int(record["fired"])
    with staged_directory(out, force=force, protect=(Path(artifact),)) as stage:
        verified.write_to(stage)
        for name, spec in manifest.graphs.items():
            model = ir.load(stage / spec.file)
            for value in model.graph.initializers.values():  # detach from the copied data file
                if isinstance(value.const_value, ir.ExternalTensor):
                    value.const_value = ir.tensor(value.const_value.numpy(), name=value.name)
            counts[name] = run_passes(model, passes)
            if "ort-fusions" in passes:
                from tokedge.export.passes.ort_fusions import ort_nodes

                ort_ops[name] = dict(ort_nodes(model))
            threshold = 0 if spec.external_data else 1 << 62
            if spec.external_data:
                (stage / spec.external_data).unlink()
            save_graph(model, stage, Path(spec.file).stem, threshold)
        pixel_values, cases = load_reference(verified.read(manifest.reference["file"]))
        tol = Tolerance(**manifest.reference["tolerance"])
        staged = dataclasses.replace(manifest, files={})
        with ArtifactGraphs(stage, staged) as graphs:
            report = run_cases(graphs, pixel_values, cases, tol)
        report.raise_if_failed(f"optimize ({', '.join(passes)})")
        records = tuple(manifest.optimizations) + tuple(
            {"graph": g, "pass": p, "fired": n} for g, per in counts.items() for p, n in per.items()
        )
        write_manifest(stage, dataclasses.replace(manifest, optimizations=records, files=hash_tree(stage)))
    return OptimizeResult(out=out, counts=counts, parity=report.to_dict(), earlier=earlier, ort_ops=ort_ops)
