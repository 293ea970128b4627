"""Batch plans: validation before any run, resumable loss-free execution, failures, interrupts, Ray, index."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml
from plan_helpers import write_plan

from zsad import plans, runs
from zsad.cli import main
from zsad.index import local_links, write_index
from zsad.plans import PlanError, is_finished, load_plan, run_plan

REPO = Path(__file__).resolve().parents[1]
PLANS = REPO / "notebooks" / "plans"
RUNS_NAMES = ("good", "bad")
RUNS = [
    {"name": "good", "notebook": "tiny.ipynb", "parameters": {"value": 3}},
    {"name": "bad", "notebook": "tiny", "parameters": {"value": 4, "fail": True}},
]


# ------------------------------------------------------------------------------------ bad plans
@pytest.mark.parametrize(
    ("run", "expected"),
    [
        ({"name": "r1", "notebook": "nope.ipynb"}, ["run r1", "notebook", "nope.ipynb"]),
        ({"name": "r1", "notebook": "tiny.ipynb", "parameters": {"valeu": 2}}, ["run r1", "'valeu'", "tiny"]),
        (
            {"name": "r1", "notebook": "tiny.ipynb", "parameters": {"method": "winclap"}},
            ["run r1", "winclap"],
        ),
        ({"name": "r1", "notebook": "tiny.ipynb", "extra": 1}, ["run r1", "unknown key 'extra'"]),
        ({"name": "r1", "notebook": "tiny.ipynb", "resources": {"gpus": 1}}, ["run r1", "'gpus'"]),
    ],
)
def test_bad_plan_names_file_run_and_key(tmp_path, run, expected):
    plan = write_plan(tmp_path, [RUNS[0], run])
    with pytest.raises(PlanError) as err:
        load_plan(plan)
    message = str(err.value)
    assert str(plan) in message
    for part in expected:
        assert part in message, message
    assert "run good" not in message  # the good run has no problem


def test_missing_dataset_and_weights_are_named(tmp_path):
    plan = write_plan(
        tmp_path,
        [
            {
                "name": "d",
                "notebook": "tiny.ipynb",
                "parameters": {"data_root": "${ZSAD_TEST_DATA:-/no/mvtec}"},
            },
            {"name": "w", "notebook": "tiny.ipynb", "parameters": {"weights": str(tmp_path / "nope.pt")}},
        ],
    )
    nb = tmp_path / "tiny.ipynb"
    nb.write_text(nb.read_text().replace("value = 1", "value = 1\\ndata_root = None\\nweights = None"))
    assert {"data_root", "weights"} <= set(plans.notebook_parameters(nb))
    with pytest.raises(PlanError) as err:
        load_plan(plan)
    problems = err.value.problems
    assert any("run d" in p and "'data_root'" in p and "/no/mvtec" in p for p in problems), problems
    assert any("run w" in p and "'weights'" in p and "nope.pt" in p for p in problems), problems
    # The environment variable decides the dataset root.
    data = tmp_path / "mvtec"
    data.mkdir()
    os.environ["ZSAD_TEST_DATA"] = str(data)
    try:
        with pytest.raises(PlanError) as err:
            load_plan(plan)
        assert any("run d" in p and "meta.json" in p for p in err.value.problems)
        (data / "meta.json").write_text("{}")
        with pytest.raises(PlanError) as err:
            load_plan(plan)
        assert not any("run d" in p for p in err.value.problems)
    finally:
        del os.environ["ZSAD_TEST_DATA"]


def test_bad_plan_cli_stops_before_any_run(tmp_path, capsys):
    plan = write_plan(tmp_path, [RUNS[0], {"name": "r2", "notebook": "tiny.ipynb", "parameters": {"x": 1}}])
    reports = tmp_path / "reports"
    assert main(["report", str(plan), "--out", str(reports)]) == 2
    err = capsys.readouterr().err
    assert "run r2" in err and "'x'" in err and "Traceback" not in err
    assert not reports.exists()  # nothing ran, nothing was created
    assert main(["report", str(plan.with_name("missing.yaml")), "--out", str(reports)]) == 2
    assert main(["report", str(write_plan(tmp_path, RUNS)), "--only", "nope", "--out", str(reports)]) == 2
    assert "--only nope" in capsys.readouterr().err
    assert not reports.exists()


def test_shipped_plans_validate(monkeypatch):
    embedded = load_plan(PLANS / "embedded.yaml")
    listed = {r.notebook.name for r in embedded.runs}
    on_disk = {p.name for p in (REPO / "notebooks").glob("*.ipynb")}
    assert listed == on_disk, f"embedded.yaml must run every notebook; missing: {sorted(on_disk - listed)}"
    for var in ("MVTEC_ROOT", "VISA_ROOT", "ZSAD_WEIGHTS"):
        monkeypatch.delenv(var, raising=False)
    with pytest.raises(PlanError) as err:
        load_plan(PLANS / "paper_tables.yaml")
    assert any("data_root" in p and "does not exist" in p for p in err.value.problems)


# ------------------------------------------------------------------------------------ execution
@pytest.fixture(scope="module")
def executed(tmp_path_factory):
    """The two-run plan (one run fails on purpose), executed once with two local jobs through the CLI."""
    root = tmp_path_factory.mktemp("plan")
    plan = write_plan(root, RUNS, description="test plan")
    reports = root / "reports"
    rc = main(["report", str(plan), "--out", str(reports), "--jobs", "2"])
    return plan, reports, rc


def test_failing_run_keeps_partial_notebook_and_the_other_run_completes(executed):
    plan, reports, rc = executed
    assert rc == 1
    good, bad = reports / "tplan" / "good", reports / "tplan" / "bad"
    for name in ("tiny.ipynb", "tiny.html", "metrics.csv", "curve.png", "plan_run.json"):
        assert (good / name).is_file(), name
    assert json.loads((good / "plan_run.json").read_text())["status"] == "ok"
    assert "deliberate failure 4" in (bad / "error.txt").read_text()
    partial = json.loads((bad / "tiny.ipynb").read_text())
    assert any(o.get("ename") == "RuntimeError" for c in partial["cells"] for o in c.get("outputs", []))
    assert json.loads((bad / "plan_run.json").read_text())["status"] == "failed"
    assert not [p for p in (reports / "tplan").iterdir() if p.name.startswith(".")]  # no temporary left
    summary = pd.read_csv(reports / "tplan" / "summary.csv")
    assert list(summary["run"]) == ["good", "bad"]
    assert list(summary["status"]) == ["ok", "failed"]
    assert summary.loc[0, "image_auroc"] == pytest.approx(0.3)
    assert summary.loc[0, "aupro_convention"] == "cflow"
    assert "| bad | failed |" in (reports / "tplan" / "summary.md").read_text()
    assert (reports / "tplan" / "summary.png").is_file()
    # The executed notebook names the final folder, not the temporary one it ran in.
    assert ".good.tmp-" not in (good / "tiny.ipynb").read_text()


def test_finished_run_is_skipped_force_reexecutes_and_parameters_invalidate(executed, capsys):
    plan, reports, _ = executed
    good = reports / "tplan" / "good"
    before = (good / "tiny.html").stat().st_mtime_ns
    assert main(["report", str(plan), "--out", str(reports), "--only", "good"]) == 0
    assert "skipped  good" in capsys.readouterr().out
    assert (good / "tiny.html").stat().st_mtime_ns == before
    assert main(["report", str(plan), "--out", str(reports), "--only", "good", "--force"]) == 0
    assert (good / "tiny.html").stat().st_mtime_ns != before
    loaded = load_plan(plan)
    assert is_finished(loaded.runs[0], reports / "tplan")
    assert not is_finished(loaded.runs[1], reports / "tplan")  # failed runs run again
    changed = yaml.safe_load(plan.read_text())
    changed["runs"][0]["parameters"]["value"] = 5
    plan.write_text(yaml.safe_dump(changed))
    assert not is_finished(load_plan(plan).runs[0], reports / "tplan")
    (good / "metrics.csv").unlink()  # an output gone: not finished either
    assert not is_finished(loaded.runs[0], reports / "tplan")


def test_index_links_resolve(executed):
    _, reports, _ = executed
    index = write_index(reports)
    links = local_links(index)
    targets = {p.relative_to(reports.resolve()).as_posix() for _, p in links}
    assert {"tplan/good/tiny.html", "tplan/bad/error.txt", "tplan/summary.png", "tplan/summary.md"} <= targets
    assert all(p.exists() for _, p in links), [r for r, p in links if not p.exists()]
    text = index.read_text()
    assert "tiny-test" in text and "synthetic-3" in text  # the report header: weights and data


def test_interrupt_keeps_finished_runs(tmp_path, monkeypatch):
    plan = load_plan(write_plan(tmp_path, [RUNS[0], {**RUNS[0], "name": "second"}]))
    reports = tmp_path / "reports"
    (reports / "tplan" / "second").mkdir(parents=True)
    (reports / "tplan" / "second" / "old.txt").write_text("an earlier result")
    calls = []
    real = runs.execute_notebook

    def fake(notebook, executed, parameters, progress, cwd=None):
        calls.append(parameters)
        if len(calls) == 2:
            Path(executed).write_text("{partial")
            raise KeyboardInterrupt
        real(notebook, executed, parameters, progress, cwd)

    monkeypatch.setattr(runs, "execute_notebook", fake)
    results, interrupted = run_plan(plan, reports, progress=False)
    assert interrupted
    assert [r.status for r in results] == ["ok", "interrupted"]
    assert is_finished(plan.runs[0], reports / "tplan")
    assert (reports / "tplan" / "second" / "old.txt").read_text() == "an earlier result"
    assert not (reports / "tplan" / "second" / "plan_run.json").exists()
    assert not [p for p in (reports / "tplan").iterdir() if p.name.startswith(".")]


def test_ctrl_c_with_parallel_jobs_keeps_finished_runs_and_stops_promptly(tmp_path):
    """A real SIGINT to the process group (what a terminal's Ctrl-C sends) during ``--jobs 2``."""
    runs = [
        {"name": "quick", "notebook": "tiny.ipynb", "parameters": {"value": 2}},
        {"name": "slow", "notebook": "tiny.ipynb", "parameters": {"value": 3, "pause": 120}},
    ]
    plan, reports = write_plan(tmp_path, runs), tmp_path / "reports"
    command = [sys.executable, "-m", "zsad", "report", str(plan), "--out", str(reports), "--jobs", "2"]
    proc = subprocess.Popen(
        command,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),  # as in an interactive shell
    )
    deadline = time.time() + 120
    while not (reports / "tplan" / "quick" / "plan_run.json").exists() and time.time() < deadline:
        time.sleep(0.25)
    assert list((reports / "tplan").glob(".slow.tmp-*")), "the slow run should be executing"
    os.killpg(proc.pid, signal.SIGINT)
    start = time.time()
    out, _ = proc.communicate(timeout=90)
    assert proc.returncode == 130, out
    assert time.time() - start < 60  # not waiting for the 120 s notebook to finish
    assert "interrupted slow" in out.decode()
    assert is_finished(load_plan(plan).runs[0], reports / "tplan")
    assert sorted(p.name for p in (reports / "tplan").iterdir() if p.is_dir()) == ["quick"]


def test_unknown_executor_and_missing_ray_message(tmp_path, monkeypatch):
    plan = load_plan(write_plan(tmp_path, RUNS[:1]))
    with pytest.raises(ValueError, match="unknown executor"):
        run_plan(plan, tmp_path / "r", executor="dask")
    import builtins

    real_import = builtins.__import__

    def no_ray(name, *args, **kwargs):
        if name == "ray":
            raise ImportError("no ray")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_ray)
    with pytest.raises(ValueError, match=r"pip install 'zsad\[ray\]'"):
        run_plan(plan, tmp_path / "r", executor="ray")
    assert not (tmp_path / "r").exists()


def _fast_agent_imports(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Ray's raylet gives its Python agents a fixed 15 s to start (ray-project/ray#65983). Their import of
    jsonschema pulls in rfc3987_syntax, which builds its parsers at import (3-6 s on this shared 2-core CPU),
    and the raylet then aborts. The processes this test starts get a stub that makes that optional import
    fail, as jsonschema allows (only the IRI format checks go); nothing zsad runs depends on them."""
    stub = tmp_path / "stub" / "rfc3987_syntax"
    stub.mkdir(parents=True)
    (stub / "__init__.py").write_text('raise ImportError("stubbed out by tests/test_plans.py")\n')
    paths = [str(stub.parent), os.environ.get("PYTHONPATH", "")]
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(p for p in paths if p))


def test_ray_executor_runs_in_parallel_and_isolates_failure(tmp_path, monkeypatch):
    ray = pytest.importorskip("ray", reason="Ray is not installed: pip install 'zsad[ray]' to run this test")
    plan = load_plan(write_plan(tmp_path, RUNS, resources={"num_cpus": 1}))
    _fast_agent_imports(tmp_path, monkeypatch)
    ray.init(num_cpus=2, object_store_memory=200 * 1024**2, include_dashboard=False, log_to_driver=False)
    try:
        results, interrupted = run_plan(plan, tmp_path / "reports", executor="ray", progress=False)
    finally:
        ray.shutdown()
    assert not interrupted
    assert {r.name: r.status for r in results} == {"good": "ok", "bad": "failed"}
    assert is_finished(plan.runs[0], tmp_path / "reports" / "tplan")
    assert "deliberate failure" in (tmp_path / "reports" / "tplan" / "bad" / "error.txt").read_text()
    spans = [
        json.loads((tmp_path / "reports" / "tplan" / n / "plan_run.json").read_text()) for n in RUNS_NAMES
    ]
    assert spans[0]["started_at"] < spans[1]["ended_at"] and spans[1]["started_at"] < spans[0]["ended_at"]
    # Same skip semantics as the local executor: nothing left to do, Ray is not even started.
    results, _ = run_plan(plan, tmp_path / "reports", executor="ray", only=["good"], progress=False)
    assert [r.status for r in results] == ["skipped"]


def test_single_notebook_report_still_works_and_is_indexed(tmp_path, capsys):
    from plan_helpers import write_notebook

    nb = write_notebook(tmp_path)
    reports = tmp_path / "reports"
    assert main(["report", str(nb), "-p", "value", "7"]) == 2  # --out is required for a notebook
    assert main(["report", str(nb), "--out", str(reports / "single"), "--force"]) == 2  # plan-only flag
    assert main(["report", str(nb), "--out", str(reports / "single"), "-p", "value", "7"]) == 0
    assert "image_auroc" in (reports / "single" / "metrics.csv").read_text()
    index = write_index(reports)
    assert [(ref, p.exists()) for ref, p in local_links(index)] == [("single/tiny.html", True)]
    assert "synthetic-7" in index.read_text()
