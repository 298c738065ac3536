"""`tokedge sweep`: a grid of methods x budgets x tasks (x quantization), exported, evaluated and
profiled, resumable, locally or on a Ray cluster (docs/eval.md)."""
