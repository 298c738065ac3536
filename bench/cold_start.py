"""Cold start: a fresh process from `python` to the first generated token, timed by wall clock
around the whole process, with the phases the process reports itself (import, `Pipeline.load`:
reading, bounding and hashing every file, then creating the sessions; the first token).

Several code trees can be compared on the same artifact (`--tree NAME=DIR`, e.g. a worktree of the
previous commit): the processes alternate round by round, so load from other jobs hits every tree
alike. Medians with p10..p90, the machine named.

    python bench/cold_start.py ./art --image photo.jpg --rounds 7
    python bench/cold_start.py ./art --image photo.jpg --tree before=/work/wt-base --tree after=.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

CHILD = """
import json, sys, time
t0 = time.perf_counter()
from tokedge import Pipeline
t1 = time.perf_counter()
pipe = Pipeline.load(sys.argv[1])
t2 = time.perf_counter()
pipe.generate(sys.argv[2], "Describe this image.", max_new_tokens=1)
t3 = time.perf_counter()
print(json.dumps({"import_s": t1 - t0, "load_s": t2 - t1, "first_token_s": t3 - t2}))
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("artifact", type=Path)
    ap.add_argument("--image", type=Path, required=True)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--tree", action="append", default=[], help="NAME=DIR: a tokedge source tree (default: this one)")
    args = ap.parse_args()
    trees = dict(t.split("=", 1) for t in args.tree) or {"this tree": str(Path(__file__).resolve().parents[1])}
    rows: dict[str, list[dict]] = {name: [] for name in trees}
    for _ in range(args.rounds):
        for name, tree in trees.items():
            started = time.perf_counter()
            out = subprocess.run([sys.executable, "-c", CHILD, str(args.artifact), str(args.image)], check=True,
                                 capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(Path(tree).resolve())})
            row = json.loads(out.stdout.strip().splitlines()[-1])
            row["wall_s"] = time.perf_counter() - started
            rows[name].append(row)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from tokedge.report.machine import describe
    from tokedge.report.stats import p10, p90

    machine = describe()
    size = sum(f.stat().st_size for f in args.artifact.iterdir() if f.is_file())
    print(f"machine: {machine.get('cpu')} ({machine.get('cores')} cores); artifact {args.artifact} "
          f"({size / 1e6:.0f} MB); {args.rounds} interleaved rounds; seconds, median (p10..p90)")
    for name, values in rows.items():
        cells = []
        for key in ("wall_s", "import_s", "load_s", "first_token_s"):
            xs = [v[key] for v in values]
            cells.append(f"{key[:-2]} {statistics.median(xs):.2f} ({p10(xs):.2f}..{p90(xs):.2f})")
        print(f"{name}: " + "; ".join(cells))


if __name__ == "__main__":
    main()
