"""`tokedge sweep`: the full grid shape (3 methods, the random baseline and the unreduced reference x
3 budgets x 2 tasks) on tiny-llava writes one comparison report with Pareto plots; the same grid
on a real two-node Ray cluster gives the same accuracy table; a sweep killed mid-way loses no
finished result and its rerun computes exactly the missing points; a point that fails twice is
reported in the table. One set of exports is shared by every test of the module (the local
sweep's `artifacts/`, copied), so only the first test pays for exporting."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
METHODS = ["cls-attn", "fastv", "pool"]  # pre-LLM by CLS attention, in-LLM, pooling (divprune exports 2-3x slower)
BUDGETS = [16, 36, 64]


def _tasks(where: Path) -> list[str]:
    """Two small tasks in formats `tokedge eval` reads: POPE (yes/no) and the generic JSONL."""
    from PIL import Image, ImageDraw

    for i, colour in enumerate(("red", "blue")):
        img = Image.new("RGB", (96, 64), "white")
        ImageDraw.Draw(img).ellipse((20, 10, 60, 50), fill=colour)
        img.save(where / f"scene{i}.png")
    pope = [{"question_id": i, "image": f"scene{i}.png", "text": "Is there a circle in the image?", "label": "yes"}
            for i in range(2)]
    (where / "pope_circles.json").write_text("".join(json.dumps(r) + "\n" for r in pope))
    colours = [{"id": f"c{i}", "image": f"scene{i}.png", "question": "What colour is the circle?", "answers": [c],
                "metric": "exact"} for i, c in enumerate(("red", "blue"))]
    (where / "colours.jsonl").write_text("".join(json.dumps(r) + "\n" for r in colours))
    return ["pope:pope_circles.json", "colours.jsonl"]


TASKS = ["pope-pope_circles", "jsonl-colours"]  # the names tokedge eval gives them


def _grid(where: Path, name: str, methods: list[str], budgets: list[int], *, reference: str = "none",
          baseline: str = "random", profile: bool = False) -> Path:
    path = where / name
    path.write_text(
        f'model = "tiny-llava"\nmethods = {json.dumps(methods)}\nbudgets = {json.dumps(budgets)}\n'
        f'tasks = ["pope:pope_circles.json", "colours.jsonl"]\nreference = "{reference}"\nbaseline = "{baseline}"\n'
        f'limit = 2\nvalidate = false\n[profile]\nenabled = {str(profile).lower()}\nruns = 1\nwarmup = 0\n'
        'max_new_tokens = 2\n')
    return path


def _cli(*args: str) -> int:
    from tokedge.cli import main

    return main(list(args))


@pytest.fixture(scope="module")
def sweep_dir(tmp_path_factory) -> Path:
    where = tmp_path_factory.mktemp("sweep")
    _tasks(where)
    _grid(where, "grid.toml", METHODS, BUDGETS)
    assert _cli("sweep", "--grid", str(where / "grid.toml"), "--out", str(where / "local")) == 0
    return where


def _table(report: dict) -> list[tuple]:
    """What must not depend on where a sweep ran: each row's identity and scores, and the best method."""
    return [(r["role"], r["label"], r["budget"], json.dumps(r["scores"], sort_keys=True)) for r in report["rows"]]


def test_local_sweep_writes_the_comparison_report_and_pareto_plots(sweep_dir):
    out = sweep_dir / "local"
    report = json.loads((out / "report.json").read_text())
    rows = report["rows"]
    assert [r["role"] for r in rows].count("reference") == 1
    assert sorted((r["method"], r["budget"]) for r in rows if r["role"] == "baseline") == [("random", b) for b in BUDGETS]
    assert sorted((r["method"], r["budget"]) for r in rows if r["role"] == "method") == sorted(
        (m, b) for m in METHODS for b in BUDGETS)
    assert report["tasks"] == TASKS
    assert all(set(r["scores"]) == set(TASKS) and r["mean_score"] is not None for r in rows)
    assert all(r["ttft_ms"] > 0 and r["prefill_gflops"] > 0 for r in rows)
    assert sorted(report["best_per_budget"]) == sorted(str(b) for b in BUDGETS)
    assert all(m in METHODS for m in report["best_per_budget"].values())
    assert report["failures"] == [] and report["weights_notice"]
    for png in ("pareto.png", "pareto-flops.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = (out / "report.md").read_text()
    assert "> **Random weights.**" in md and "| reference | none | all |" in md
    assert len(list((out / "results").glob("*.json"))) == len(rows) * 2
    # a rerun computes nothing: every export and result comes from the cache
    assert _cli("sweep", "--grid", str(sweep_dir / "grid.toml"), "--out", str(out)) == 0
    again = json.loads((out / "report.json").read_text())
    assert again["sweep"]["ran"] == [] and len(again["sweep"]["cached"]) == len(rows) * 3
    assert _table(again) == _table(report)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _processes_under(marker: str) -> list[int]:
    """Our Ray processes: those whose command line names our own temp dir, and their children."""
    ours = set()
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                if marker in (proc / "cmdline").read_bytes().decode(errors="replace"):
                    ours.add(int(proc.name))
            except OSError:
                continue
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                ppid = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            if ppid in ours:
                ours.add(int(proc.name))
    return sorted(ours)


@pytest.fixture(scope="module")
def ray_cluster(tmp_path_factory):
    """A head and a second node, one CPU each, in a temp dir of their own; stopped (only those
    processes) at the end."""
    pytest.importorskip("ray")
    temp = Path(f"/tmp/tokedge-ray-{os.getpid()}-{time.monotonic_ns() % 10**6}")  # short: Ray's socket paths
    temp.mkdir()
    port = _free_port()
    ray_bin = str(Path(sys.executable).with_name("ray"))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
           "RAY_USAGE_STATS_ENABLED": "0"}
    common = ["--num-cpus=1", "--disable-usage-stats", f"--temp-dir={temp}"]
    try:
        subprocess.run([ray_bin, "start", "--head", f"--port={port}", "--include-dashboard=false", *common],
                       env=env, check=True, capture_output=True, timeout=120)
        subprocess.run([ray_bin, "start", f"--address=127.0.0.1:{port}", *common], env=env, check=True,
                       capture_output=True, timeout=120)
        yield f"127.0.0.1:{port}"
    finally:
        pids = _processes_under(str(temp))
        for pid in pids:
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + 1  # Ray's daemons take their time over SIGTERM
        while time.monotonic() < deadline and any(_alive(p) for p in pids):
            time.sleep(0.2)
        for pid in pids:
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)
        shutil.rmtree(temp, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        return "\nState:\tZ" not in Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False


def test_ray_two_node_sweep_gives_the_same_table(sweep_dir, ray_cluster):
    """A smaller grid (2 methods x 2 budgets, with the reference and the baseline) that also
    profiles every artifact, run by `tokedge sweep --ray` on the two-node cluster: its rows equal the
    local sweep's rows for the same points. On the way, one eval fails once on purpose (Ray retries
    it) and a Ray worker process is SIGKILLed while it profiles a point (Ray runs that task again):
    neither costs a result, the results written before the kill stay as they were, and a rerun finds
    nothing missing."""
    grid = _grid(sweep_dir, "ray.toml", ["cls-attn", "pool"], [16, 64], profile=True)
    out = sweep_dir / "ray"
    shutil.copytree(sweep_dir / "local" / "artifacts", out / "artifacts")  # export tasks find them done
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
           "TOKEDGE_SWEEP_FAIL_ONCE": "eval cls-attn-16/pope-pope_circles"}  # fails once, Ray retries it
    proc = subprocess.Popen([sys.executable, "-m", "tokedge", "sweep", "--grid", str(grid), "--out", str(out), "--ray",
                             ray_cluster], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    killed, done_before, deadline = [], {}, time.monotonic() + 120
    while not killed and proc.poll() is None and time.monotonic() < deadline:
        for pid in _ray_task_processes("profile_job")[:1]:
            done_before = {p.name: p.read_bytes() for p in (out / "results").glob("*.json")}
            os.kill(pid, signal.SIGKILL)
            killed.append(pid)
        time.sleep(0.02)
    _, stderr = proc.communicate(timeout=300)
    assert killed, "no profile task was seen running"
    assert proc.returncode == 0, stderr[-2000:]
    local = json.loads((sweep_dir / "local" / "report.json").read_text())
    remote = json.loads((out / "report.json").read_text())
    assert remote["sweep"]["engine"].startswith("ray")
    same = [row for row in _table(local) if row[1] in ("none", "random", "cls-attn", "pool") and row[2] in (None, 16, 64)]
    assert _table(remote) == same and len(same) == 7
    assert all(r["ttft_source"] == "profile" for r in remote["rows"])
    assert len(list((out / "profiles").glob("*.json"))) == 7
    assert sorted(remote["sweep"]["cached"]) == sorted(f"export {r[1]}-{r[2] or 'full'}" for r in same)
    assert (out / "attempts").is_dir() and remote["failures"] == []
    for name, data in done_before.items():
        assert (out / "results" / name).read_bytes() == data
    from tokedge.sweep.grid import load_grid
    from tokedge.sweep.jobs import attempts
    from tokedge.sweep.run import SweepConfig, run_sweep

    assert attempts(out, "eval cls-attn-16/pope-pope_circles") == 2
    again = run_sweep(SweepConfig(grid=load_grid(grid), out=out))
    assert again.ran == [] and not again.failures


def _ray_task_processes(name: str) -> list[int]:
    """Ray worker processes running a task of `name` (Ray titles them `ray::NAME`)."""
    found = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                if (proc / "cmdline").read_bytes().split(b"\0")[0].decode(errors="replace").startswith(f"ray::{name}"):
                    found.append(int(proc.name))
            except OSError:
                continue
    return found


def test_killed_sweep_loses_no_result_and_the_rerun_computes_only_what_is_missing(sweep_dir):
    grid = _grid(sweep_dir, "small.toml", ["cls-attn", "pool"], [16, 36], baseline="")
    out = sweep_dir / "killed"
    shutil.copytree(sweep_dir / "local" / "artifacts", out / "artifacts")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen([sys.executable, "-m", "tokedge", "sweep", "--grid", str(grid), "--out", str(out)],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while len(list((out / "results").glob("*.json"))) < 3 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = {p.name: p.read_bytes() for p in (out / "results").glob("*.json")}
    assert 3 <= len(done) < 10, "the sweep finished before it could be killed"
    from tokedge.sweep.grid import load_grid
    from tokedge.sweep.run import SweepConfig, run_sweep

    report = run_sweep(SweepConfig(grid=load_grid(grid), out=out))
    assert not report.failures
    ran = [label for label in report.ran if label.startswith("eval ")]
    assert len(ran) == 10 - len(done) and not [label for label in report.ran if label.startswith("export ")]
    finished = {r["label"] for r in report.records}
    assert len(finished) == 10
    for name, data in done.items():  # finished results untouched
        assert (out / "results" / name).read_bytes() == data
    assert all(f"eval {json.loads(data)['label']}" not in ran for data in done.values())


def test_a_point_that_fails_twice_is_reported_in_the_table(sweep_dir, capsys):
    grid = _grid(sweep_dir, "bad.toml", ["pool"], [16, 20], reference="", baseline="")  # pool needs a square
    out = sweep_dir / "bad"
    shutil.copytree(sweep_dir / "local" / "artifacts", out / "artifacts")
    assert _cli("sweep", "--grid", str(grid), "--out", str(out), "--json") == 1
    summary = json.loads(capsys.readouterr().out)
    assert sorted(f["label"] for f in summary["failures"]) == ["eval pool-20/jsonl-colours", "eval pool-20/pope-pope_circles"]
    assert all(f["error"].startswith("export failed: UsageError") and f["attempts"] == 2 for f in summary["failures"])
    report = json.loads((out / "report.json").read_text())
    assert len(report["failures"]) == 2
    assert "failed: " in (out / "report.md").read_text()
