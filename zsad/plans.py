"""Batch plans: a YAML list of notebook runs, validated up front, executed into ``reports/<plan>/<run>/``.

A plan (``notebooks/plans/*.yaml``)::

    name: embedded                 # optional; default: the file's stem
    description: every notebook on the embedded world
    defaults:                      # optional; parameters given to every run (a run's own win)
      backbone: zsad-tiny
    resources: {num_cpus: 1}       # optional; per-run resources for the Ray executor (a run's own win)
    runs:
      - name: winclip
        notebook: 01_winclip.ipynb # relative to the plan's folder, or a name in the notebooks folder
        parameters: {shots: [0, 1]}
        resources: {num_gpus: 1}   # optional
        paper: {image_auroc: 91.8} # optional; published numbers, shown beside ours in summary.csv

String values may use ``${VAR}`` or ``${VAR:-default}`` (environment variables), so one plan serves machines
that keep datasets and weights in different places.

Everything that can be checked before running is checked before any run starts (:func:`load_plan`): unknown
keys, unknown notebooks, parameters that are not in the notebook's ``parameters`` cell, unknown method IDs,
missing dataset roots, checkpoints and weight files. A bad plan raises :class:`PlanError` naming the file, the
run and the key, and no output folder is created.

Execution (:func:`run_plan`) is resumable and loss-free: each run executes into a temporary folder beside its
final one and is renamed into place when done, so an interrupted plan leaves every finished run intact; a run
whose ``plan_run.json`` says it finished with the same parameters hash is skipped unless ``force``; a failing
notebook keeps its partial executed copy and ``error.txt`` in its folder while the other runs go on.
"""

from __future__ import annotations

import ast
import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from zsad.runs import ERROR_FILE, RUN_FILE, PlanRun, RunResult

PLAN_KEYS = ("name", "description", "defaults", "resources", "runs")
RUN_KEYS = ("name", "notebook", "parameters", "resources", "paper", "description")
# Parameters the runner sets itself (zsad.report.render_notebook passes the report folder as ``out_dir``).
INJECTED = ("out_dir",)
# Parameters that name an existing folder (datasets) or file/folder (checkpoints) when not None.
DATASET_KEYS = ("data_root", "aux_root")
PATH_KEYS = ("data_src", "target", "meta")
RESOURCE_KEYS = ("num_cpus", "num_gpus", "memory", "resources")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
_ENV = re.compile(r"\$\{(\w+)(?::-([^}]*))?\}")


class PlanError(ValueError):
    """A plan that cannot run; ``problems`` holds one line per problem (file, run, key)."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        super().__init__("\n".join(problems))


@dataclass
class Plan:
    """A validated plan: its name (the report folder under ``reports/``), source file and runs."""

    name: str
    path: Path
    runs: list[PlanRun]
    description: str = ""

    def select(self, only: list[str] | None) -> list[PlanRun]:
        """The runs named in ``only`` (all when None), in plan order; an unknown name is a PlanError."""
        if not only:
            return list(self.runs)
        names = [r.name for r in self.runs]
        unknown = [n for n in only if n not in names]
        if unknown:
            raise PlanError(
                [f"{self.path}: --only {n}: no run of that name; runs: {', '.join(names)}" for n in unknown]
            )
        return [r for r in self.runs if r.name in only]


# ------------------------------------------------------------------------------------------- parsing
def is_plan_file(path: str | Path) -> bool:
    """True for ``.yaml`` / ``.yml`` files (``zsad report`` then runs a plan instead of one notebook)."""
    return Path(path).suffix.lower() in (".yaml", ".yml")


def notebook_parameters(notebook: str | Path) -> dict[str, Any]:
    """Names assigned in the notebook's cell tagged ``parameters`` (values where they are literals)."""
    nb = json.loads(Path(notebook).read_text(encoding="utf-8"))
    for cell in nb.get("cells", []):
        if cell.get("cell_type") == "code" and "parameters" in cell.get("metadata", {}).get("tags", []):
            found: dict[str, Any] = {}
            source = cell.get("source", "")
            for node in ast.parse("".join(source) if isinstance(source, list) else source).body:
                targets = node.targets if isinstance(node, ast.Assign) else []
                if isinstance(node, ast.AnnAssign):
                    targets = [node.target]
                for target in targets:
                    if isinstance(target, ast.Name):
                        try:
                            found[target.id] = ast.literal_eval(node.value) if node.value else None
                        except ValueError:
                            found[target.id] = ...
            return found
    return {}


def _expand(value: Any, where: str, problems: list[str]) -> Any:
    """``${VAR}`` / ``${VAR:-default}`` in strings, recursively through lists and dicts."""
    if isinstance(value, str):

        def sub(match: re.Match) -> str:
            var, default = match.group(1), match.group(2)
            if var in os.environ:
                return os.environ[var]
            if default is not None:
                return default
            problems.append(f"{where}: environment variable {var} is not set (and the plan gives no default)")
            return match.group(0)

        return _ENV.sub(sub, value)
    if isinstance(value, list):
        return [_expand(v, where, problems) for v in value]
    if isinstance(value, dict):
        return {k: _expand(v, where, problems) for k, v in value.items()}
    return value


def _find_notebook(name: str, plan_path: Path) -> Path | None:
    base = plan_path.parent
    candidates = [base / name, base.parent / name]
    if not name.endswith(".ipynb"):
        candidates += [c.with_name(c.name + ".ipynb") for c in candidates]
    return next((c for c in candidates if c.is_file()), None)


def _check_resources(resources: Any, where: str, problems: list[str]) -> dict[str, Any]:
    if resources is None:
        return {}
    if not isinstance(resources, dict):
        problems.append(f"{where}: resources must be a mapping like {{num_gpus: 1}}")
        return {}
    for key in resources:
        if key not in RESOURCE_KEYS:
            problems.append(f"{where}: resources: unknown key {key!r}; allowed: {', '.join(RESOURCE_KEYS)}")
    return dict(resources)


def load_plan(path: str | Path, check_paths: bool = True) -> Plan:
    """Parse and validate a plan file; every problem found is reported at once in a :class:`PlanError`."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise PlanError([f"{path}: no such plan file"])
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        raise PlanError([f"{path}: not valid YAML: {' '.join(str(err).split())}"]) from None
    if isinstance(data, list):
        data = {"runs": data}
    if not isinstance(data, dict) or not isinstance(data.get("runs"), list) or not data["runs"]:
        raise PlanError([f"{path}: a plan needs a non-empty list 'runs' (see zsad/plans.py)"])
    problems: list[str] = []
    for key in data:
        if key not in PLAN_KEYS:
            problems.append(f"{path}: unknown top-level key {key!r}; allowed: {', '.join(PLAN_KEYS)}")
    name = str(data.get("name") or path.stem)
    if not _NAME.match(name):
        problems.append(f"{path}: name {name!r} must be letters, digits, '.', '_' or '-'")
    defaults = data.get("defaults") or {}
    if not isinstance(defaults, dict):
        problems.append(f"{path}: defaults must be a mapping of parameter names to values")
        defaults = {}
    plan_resources = _check_resources(data.get("resources"), f"{path}: resources", problems)
    runs: list[PlanRun] = []
    seen: set[str] = set()
    for i, entry in enumerate(data["runs"]):
        if not isinstance(entry, dict):
            problems.append(f"{path}: runs[{i}] must be a mapping with name, notebook, parameters")
            continue
        run_name = str(entry.get("name", f"#{i}"))
        where = f"{path}: run {run_name}"
        for key in entry:
            if key not in RUN_KEYS:
                problems.append(f"{where}: unknown key {key!r}; allowed: {', '.join(RUN_KEYS)}")
        if "name" not in entry or not _NAME.match(run_name):
            problems.append(f"{where}: name must be given: letters, digits, '.', '_' or '-'")
        if run_name in seen:
            problems.append(f"{where}: name used twice")
        seen.add(run_name)
        params = entry.get("parameters") or {}
        if not isinstance(params, dict):
            problems.append(f"{where}: parameters must be a mapping")
            params = {}
        raw = {**defaults, **params}
        params = _expand(raw, where, problems)
        resources = {**plan_resources, **_check_resources(entry.get("resources"), where, problems)}
        nb_name = entry.get("notebook")
        notebook = _find_notebook(str(nb_name), path) if nb_name else None
        notebook = notebook.resolve() if notebook else None
        if notebook is None:
            problems.append(
                f"{where}: notebook: {nb_name!r} not found (looked in {path.parent} and {path.parent.parent})"
            )
        else:
            known = notebook_parameters(notebook)
            for key in params:
                if key not in known:
                    problems.append(
                        f"{where}: parameter {key!r} is not in the parameters cell of {notebook.name} "
                        f"(it has: {', '.join(k for k in known if k not in INJECTED)})"
                    )
                elif key in INJECTED:
                    problems.append(f"{where}: parameter {key!r} is set by the runner; remove it")
            if check_paths:
                problems += check_parameters(params, where, raw)
        paper = entry.get("paper") or {}
        if not isinstance(paper, dict):
            problems.append(f"{where}: paper must be a mapping, e.g. {{image_auroc: 91.8, source: ...}}")
            paper = {}
        runs.append(
            PlanRun(
                run_name,
                notebook or Path(str(nb_name)),
                params,
                resources,
                paper,
                str(entry.get("description", "")),
            )
        )
    if problems:
        raise PlanError(_merge(problems, path))
    return Plan(name, path, runs, str(data.get("description", "")))


def _merge(problems: list[str], path: Path) -> list[str]:
    """One line per distinct problem: the same missing dataset or weights in many runs is named once, with
    the runs it affects."""
    prefix = re.compile(rf"^{re.escape(str(path))}: run (\S+): (.*)$", re.S)
    merged: dict[str, list[str]] = {}
    for problem in problems:
        match = prefix.match(problem)
        key, run = (match.group(2), match.group(1)) if match else (problem, None)
        merged.setdefault(key, [])
        if run is not None:
            merged[key].append(run)
    lines = []
    for message, runs in merged.items():
        if not runs:
            lines.append(message)
        else:
            label = "run" if len(runs) == 1 else "runs"
            lines.append(f"{path}: {label} {', '.join(runs)}: {message}")
    return lines


def check_parameters(params: dict[str, Any], where: str, raw: dict[str, Any] | None = None) -> list[str]:
    """Problems with parameter values that can be seen before running: method IDs, paths, weights.

    ``raw`` holds the values before ``${VAR}`` expansion, quoted in the messages so the fix is visible.
    """
    problems: list[str] = []
    raw = raw or {}

    def origin(key: str) -> str:
        before = raw.get(key)
        return f" (from {before})" if isinstance(before, str) and "${" in before else ""

    for key in ("method", "methods"):
        value = params.get(key)
        for method in [value] if isinstance(value, str) else (value or []):
            from zsad.methods import available  # imports torch and open_clip: only when needed

            if str(method).lower() not in available():
                problems.append(
                    f"{where}: parameter {key!r}: unknown method ID {method!r}; "
                    f"available: {', '.join(available())}"
                )
    for key, value in params.items():
        if value is None or not isinstance(value, str):
            continue
        target = Path(value).expanduser()
        if key in DATASET_KEYS:
            if not target.is_dir():
                problems.append(
                    f"{where}: parameter {key!r}: dataset root {value} does not exist{origin(key)}"
                )
            elif not (target / "meta.json").is_file():
                problems.append(
                    f"{where}: parameter {key!r}: {value} has no meta.json "
                    "(write one with `zsad data prepare`)"
                )
        elif key in PATH_KEYS or key.startswith("checkpoint"):
            if not target.exists():
                problems.append(f"{where}: parameter {key!r}: {value} does not exist{origin(key)}")
    weights = params.get("weights")
    if isinstance(weights, str) and weights != "random":
        problem = _check_weights(str(params.get("backbone") or ""), weights)
        if problem:
            problems.append(f"{where}: parameter 'weights'{origin('weights')}: {problem}")
    return problems


def _check_weights(backbone: str, weights: str) -> str | None:
    """None when the weights are on this machine (a file, or a cached open_clip tag), else what is missing."""
    from zsad.backbone import WEIGHT_SUFFIXES

    path = Path(weights).expanduser()
    if path.suffix in WEIGHT_SUFFIXES or len(path.parts) > 1:
        return None if path.is_file() else f"weights file {weights} does not exist"
    if not backbone:
        return None  # a tag of the notebook's default backbone: checked when the notebook loads it
    from zsad.backbone import BackboneError, _resolve_weights

    saved = os.environ.get("HF_HUB_OFFLINE")
    os.environ["HF_HUB_OFFLINE"] = "1"  # look in the cache only: validation never downloads
    try:
        _resolve_weights(backbone, weights, None)
    except BackboneError as err:
        return str(err)
    except Exception as err:  # open_clip raises plain errors for unknown model names
        return f"{type(err).__name__}: {err}"
    finally:
        if saved is None:
            os.environ.pop("HF_HUB_OFFLINE", None)
        else:
            os.environ["HF_HUB_OFFLINE"] = saved
    return None


# ----------------------------------------------------------------------------------------- execution
def read_record(folder: Path) -> dict[str, Any] | None:
    """The ``plan_run.json`` of a run folder, or None."""
    try:
        return json.loads((folder / RUN_FILE).read_text())
    except (OSError, json.JSONDecodeError):
        return None


def is_finished(run: PlanRun, plan_dir: Path) -> bool:
    """True when the run's folder says it finished with the same parameters hash and its files exist."""
    folder = plan_dir / run.name
    record = read_record(folder)
    if not record or record.get("status") != "ok" or record.get("hash") != run.params_hash():
        return False
    return all((folder / name).exists() for name in record.get("files", [])) and bool(record.get("files"))


def clean_stale(plan_dir: Path, names: list[str]) -> None:
    """Remove temporary folders an interrupted earlier execution of these runs left behind."""
    if not plan_dir.is_dir():
        return
    for name in names:
        for stale in list(plan_dir.glob(f".{name}.tmp-*")) + list(plan_dir.glob(f".{name}.old-*")):
            shutil.rmtree(stale, ignore_errors=True)


def run_plan(
    plan: Plan,
    reports_dir: str | Path = "reports",
    only: list[str] | None = None,
    force: bool = False,
    jobs: int = 1,
    executor: str = "local",
    address: str | None = None,
    progress: bool = True,
) -> tuple[list[RunResult], bool]:
    """Execute the plan's (selected) runs; returns (one result per selected run, interrupted).

    Finished runs (same parameters hash) are skipped unless ``force``. After the runs, whatever happened,
    ``reports/<plan>/summary.{csv,md,png}`` and ``reports/index.html`` are rewritten from what is on disk.
    """
    from zsad.executors import get_executor

    selected = plan.select(only)
    if jobs < 1:
        raise ValueError(f"--jobs must be >= 1; got {jobs}")
    run_executor = get_executor(executor, jobs=jobs, address=address)  # before any folder is made
    plan_dir = Path(reports_dir) / plan.name
    todo = [r for r in selected if force or not is_finished(r, plan_dir)]
    skipped = [RunResult(r.name, "skipped", str(plan_dir / r.name)) for r in selected if r not in todo]
    plan_dir.mkdir(parents=True, exist_ok=True)
    clean_stale(plan_dir, [r.name for r in todo])
    results: dict[str, RunResult] = {r.name: r for r in skipped}
    interrupted = False
    try:
        for result in run_executor.run(todo, plan_dir, len(selected), len(skipped), progress):
            results[result.name] = result
    except KeyboardInterrupt:
        interrupted = True
    for r in todo:
        results.setdefault(r.name, RunResult(r.name, "interrupted", str(plan_dir / r.name)))
    from zsad.index import write_index, write_summary

    write_summary(plan, plan_dir)
    write_index(Path(reports_dir))
    return [results[r.name] for r in selected], interrupted


def format_results(results: list[RunResult]) -> str:
    """One line per run, failures last with their first error line and where the details are."""
    lines = []
    order = {"ok": 0, "skipped": 1, "interrupted": 2, "failed": 3}
    for r in sorted(results, key=lambda r: order.get(r.status, 9)):
        if r.status == "failed":
            lines.append(f"FAILED   {r.name}: {r.error} (details: {Path(r.folder) / ERROR_FILE})")
        elif r.status == "ok":
            lines.append(f"ok       {r.name} ({r.seconds:.1f} s) -> {r.folder}")
        else:
            lines.append(f"{r.status:<8} {r.name}")
    counts = {s: sum(r.status == s for r in results) for s in order}
    lines.append(", ".join(f"{n} {s}" for s, n in counts.items() if n))
    return "\n".join(lines)
