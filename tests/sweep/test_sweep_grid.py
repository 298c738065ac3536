"""The sweep's data without exports: grid files, the comparison's rows, best method and Pareto front
(against hand-worked numbers), and `--ray` without Ray installed."""

from __future__ import annotations

import json
import sys

import pytest

from tokedge.errors import InputError, UsageError
from tokedge.report.compare import Roles, build_rows, comparison_dict, pareto, write_comparison
from tokedge.sweep.grid import load_grid, parse_grid


def test_grid_points_and_task_paths(tmp_path):
    (tmp_path / "pope.json").write_text("")
    (tmp_path / "mine.jsonl").write_text("")
    path = tmp_path / "grid.toml"
    path.write_text('model = "tiny-llava"\nmethods = ["cls-attn", "pool"]\nbudgets = [16, 64]\n'
                    'tasks = ["pope:pope.json", "mine.jsonl"]\nquantize = ["", "int8"]\n'
                    '[options]\npool = { x = 1 }\n[profile]\nruns = 1\n')
    grid = load_grid(path)
    assert grid.tasks == (f"pope:{tmp_path / 'pope.json'}", str(tmp_path / "mine.jsonl"))
    names = [p.name() for p in grid.exports()]
    assert names[:6] == ["none-full", "random-16", "random-64", "cls-attn-16", "cls-attn-64", "pool-16"]
    assert len(names) == 2 * (1 + 3 * 2) and names[7] == "none-full-int8"
    assert grid.exports()[5].options == (("x", "1"),) and grid.profile.runs == 1
    assert [grid.role(m) for m in ("none", "random", "pool")] == ["reference", "baseline", "method"]


@pytest.mark.parametrize("text, error", [
    ('model = "m"\nmethods = []\nbudgets = [1]\ntasks = ["t"]\n', "'methods' must be"),
    ('model = "m"\nmethods = ["a"]\nbudgets = [0]\ntasks = ["t"]\n', "'budgets' must be"),
    ('model = "m"\nmethods = ["a"]\nbudgets = [1]\ntasks = ["t"]\nbudget = 3\n', "unknown key(s) budget"),
    ('model = "m"\nmethods = ["a"]\nbudgets = [1]\ntasks = ["t"]\n[profile]\nrun = 1\n', "[profile]"),
    ('model = "m"\nmethods = ["a"\n', "not valid TOML"),
])
def test_bad_grids_are_refused_in_one_line(tmp_path, text, error):
    path = tmp_path / "g.toml"
    path.write_text(text)
    with pytest.raises(InputError, match=error.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")):
        load_grid(path)


def test_unknown_quantization_is_a_usage_error():
    with pytest.raises(UsageError, match="int3"):
        parse_grid({"model": "m", "methods": ["a"], "budgets": [1], "tasks": ["t"], "quantize": ["int3"]})


def _result(method, budget, task, score, flops, ttft=10.0):
    return {"method": method, "budget": budget, "task": task, "score": score, "ci95": [score - 0.1, score + 0.1],
            "n": 10, "metric": "accuracy", "ttft_ms_median": ttft, "prefill_flops_per_example": flops * 1e9,
            "artifact_sha256": f"{method}{budget}", "weights": None}


def test_rows_best_method_and_pareto_front():
    results = [_result("none", 576, "a", 0.9, 5.0), _result("none", 576, "b", 0.7, 5.0),
               _result("cls-attn", 64, "a", 0.8, 1.0), _result("cls-attn", 64, "b", 0.6, 1.0),
               _result("pool", 64, "a", 0.7, 0.9), _result("pool", 64, "b", 0.7, 0.9),  # same mean, fewer FLOPs
               _result("random", 64, "a", 0.5, 0.9), _result("random", 64, "b", 0.5, 0.9),
               {"method": "divprune", "budget": 64, "task": "a", "status": "failed", "error": "boom"}]
    rows, tasks = build_rows(results, roles=Roles())
    assert tasks == ["a", "b"]
    assert [(r.role, r.method) for r in rows] == [("reference", "none"), ("method", "cls-attn"),
                                                  ("method", "divprune"), ("method", "pool"), ("baseline", "random")]
    best = [r.method for r in rows if r.best]
    assert best == ["pool"]  # cls-attn and pool both mean 0.7: the tie goes to fewer FLOPs, never to latency
    assert rows[0].mean_score(tasks) == pytest.approx(0.8) and rows[2].mean_score(tasks) is None
    assert pareto([(1.0, 0.5), (2.0, 0.7), (1.5, 0.4), (3.0, 0.7), (0.5, 0.1)]) == [4, 0, 1]
    data = comparison_dict(results)
    assert data["best_per_budget"] == {"64": "pool"} and data["failures"][0]["error"] == "boom"


def test_write_comparison_banner_only_for_random_weights(tmp_path):
    results = [_result("cls-attn", 64, "a", 0.8, 1.0)]
    write_comparison(results, tmp_path / "trained")
    assert "Random weights" not in (tmp_path / "trained" / "report.md").read_text()
    write_comparison([{**results[0], "weights": "random (preset tiny-llava)"}], tmp_path / "random")
    assert (tmp_path / "random" / "report.md").read_text().count("> **Random weights.**") == 1
    assert json.loads((tmp_path / "random" / "report.json").read_text())["weights_notice"]


def test_ray_flag_without_ray_names_the_extra(tmp_path, monkeypatch, capsys):
    from tokedge.cli import main

    (tmp_path / "g.toml").write_text('model = "m"\nmethods = ["a"]\nbudgets = [1]\ntasks = ["t"]\n')
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray -> ImportError
    assert main(["sweep", "--grid", str(tmp_path / "g.toml"), "--ray", "auto"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: this command needs 'ray', which is not installed: pip install 'tokedge[sweep]'"]


def test_import_tokedge_and_the_sweep_modules_import_no_ray():
    import subprocess

    code = ("import sys, tokedge, tokedge.cli, tokedge.sweep.run, tokedge.report.compare; "
            "assert 'ray' not in sys.modules and 'torch' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_a_missing_task_file_fails_before_any_export(tmp_path, capsys):
    from tokedge.cli import main

    (tmp_path / "g.toml").write_text('model = "tiny-llava"\nmethods = ["pool"]\nbudgets = [16]\n'
                                     'tasks = ["pope:missing.json"]\n')
    assert main(["sweep", "--grid", str(tmp_path / "g.toml"), "--out", str(tmp_path / "out")]) == 2
    assert "missing.json' does not exist" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
