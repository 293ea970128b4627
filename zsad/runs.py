"""The run contract shared by plans and executors: one notebook run (:class:`PlanRun`), what became of it
(:class:`RunResult`) and :func:`execute_run`, which executes it into ``plan_dir/<run>/`` through a temporary
folder. :mod:`zsad.plans` builds runs from a plan file and hands them to :mod:`zsad.executors`, which
schedules them; both import this module, and the executors never import the plans.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

RUN_FILE = "plan_run.json"
ERROR_FILE = "error.txt"
_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


@dataclass
class PlanRun:
    """One notebook execution of a plan: its name, notebook, parameters, and Ray resources."""

    name: str
    notebook: Path
    parameters: dict[str, Any]
    resources: dict[str, Any] = field(default_factory=dict)
    paper: dict[str, Any] = field(default_factory=dict)
    description: str = ""

    def params_hash(self) -> str:
        """Hash of what decides the run's result: the notebook's content (an edited notebook runs again),
        the parameters and the zsad version (another version may compute differently)."""
        import zsad

        try:
            content = hashlib.sha256(self.notebook.read_bytes()).hexdigest()
        except OSError:
            content = ""  # a notebook that vanished never matches a finished run
        payload = json.dumps(
            {
                "notebook": self.notebook.name,
                "content": content,
                "parameters": self.parameters,
                "zsad": zsad.__version__,
            },
            sort_keys=True,
            default=str,
        )
        return hashlib.sha256(payload.encode()).hexdigest()[:16]

    def to_dict(self) -> dict[str, Any]:
        """Plain data (for Ray tasks and ``plan_run.json``)."""
        return {**asdict(self), "notebook": str(self.notebook)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PlanRun:
        """The inverse of :meth:`to_dict`."""
        return cls(**{**data, "notebook": Path(data["notebook"])})


@dataclass
class RunResult:
    """What happened to one run: status ``ok``, ``failed``, ``skipped`` or ``interrupted``."""

    name: str
    status: str
    folder: str
    seconds: float = 0.0
    error: str = ""


def _error_text(err: BaseException) -> str:
    ename, evalue = getattr(err, "ename", None), getattr(err, "evalue", None)
    if ename is not None:
        cell = getattr(err, "exec_count", None)
        tb = "\n".join(_ANSI.sub("", line) for line in getattr(err, "traceback", []) or [])
        return f"{ename}: {evalue}\n(cell execution count {cell})\n\n{tb}\n"
    return "".join(traceback.format_exception(type(err), err, err.__traceback__))


def _first_line(err: BaseException) -> str:
    ename, evalue = getattr(err, "ename", None), getattr(err, "evalue", None)
    text = f"{ename}: {evalue}" if ename is not None else f"{type(err).__name__}: {err}"
    return (text.strip().splitlines() or [""])[0][:300]


def _commit(tmp: Path, final: Path) -> None:
    """Put ``tmp`` in place of ``final``: the old folder is moved aside first, deleted only afterwards."""
    old = None
    if final.exists():
        old = final.with_name(f".{final.name}.old-{os.getpid()}-{time.time_ns()}")
        final.rename(old)
    tmp.rename(final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def execute_notebook(
    notebook: Path, executed: Path, parameters: dict[str, Any], progress: bool, cwd: str | None = None
) -> None:
    """papermill, in ``cwd`` (default: the current directory; relative paths in parameters resolve there)."""
    import papermill as pm

    pm.execute_notebook(
        str(notebook), str(executed), parameters=parameters, progress_bar=progress, cwd=cwd or str(Path.cwd())
    )


def execute_run(
    run: PlanRun, plan_dir: str | Path, progress: bool = False, stop: Any = None, cwd: str | None = None
) -> RunResult:
    """Execute one run into ``plan_dir/<run>/`` through a temporary folder; never raises for a failing
    notebook (the result says ``failed``, the folder keeps the partial notebook and ``error.txt``).

    ``KeyboardInterrupt`` (or ``stop.is_set()`` for a threading.Event) discards the temporary folder and
    re-raises, leaving any earlier folder of this run as it was.
    """
    import zsad
    from zsad.outputs import share_like_umask
    from zsad.report import export_html, report_parameters

    plan_dir = Path(plan_dir)
    plan_dir.mkdir(parents=True, exist_ok=True)
    final = plan_dir / run.name
    tmp = Path(tempfile.mkdtemp(prefix=f".{run.name}.tmp-", dir=plan_dir))
    share_like_umask(tmp)  # mkdtemp makes it 0700; the report folder is for sharing
    executed = tmp / run.notebook.name
    start = time.time()
    error: BaseException | None = None
    try:
        try:
            params = report_parameters(run.notebook, run.parameters, tmp)
            execute_notebook(run.notebook, executed, params, progress, cwd)
        except Exception as err:
            error = err
        if stop is not None and stop.is_set():
            raise KeyboardInterrupt
        if executed.exists():
            # The notebook saw the temporary folder; its executed copy names the final one.
            text = executed.read_text(encoding="utf-8")
            executed.write_text(text.replace(str(tmp.resolve()), str(final.resolve())), encoding="utf-8")
            try:
                export_html(executed)
            except Exception as err:
                error = error or err
        if error is not None:
            (tmp / ERROR_FILE).write_text(_error_text(error), encoding="utf-8")
        files = sorted(str(p.relative_to(tmp)) for p in tmp.rglob("*") if p.is_file())
        record = {
            "plan_run": run.to_dict(),
            "hash": run.params_hash(),
            "zsad_version": zsad.__version__,
            "status": "ok" if error is None else "failed",
            "error": _first_line(error) if error is not None else "",
            "seconds": round(time.time() - start, 2),
            "started_at": start,
            "ended_at": time.time(),
            "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "files": files,
        }
        (tmp / RUN_FILE).write_text(json.dumps(record, indent=2, default=str) + "\n", encoding="utf-8")
        _commit(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return RunResult(run.name, record["status"], str(final), record["seconds"], record["error"])
