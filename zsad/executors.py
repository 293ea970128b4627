"""Where plan runs execute: here (``local``, one or ``--jobs N`` at a time) or as Ray tasks (``ray``).

Both executors call the same :func:`zsad.runs.execute_run` for every run, so the outputs, the skip/resume
rules and the failure semantics are the same: a failing notebook becomes a ``failed`` result and the other
runs go on; an interrupt leaves every finished run's folder intact. The Ray executor declares each run's
``resources`` (e.g. ``num_gpus: 1`` for real-weight runs) on its task. Ray tasks write to ``reports/`` on
the machine they run on: on a multi-node cluster that folder must be on a shared file system.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import asdict
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from zsad.runs import PlanRun, RunResult, execute_run

EXECUTORS = ("local", "ray")
INTERRUPTED = 130  # exit status of an interrupted child run
RAY_MISSING = (
    "the ray executor needs Ray, which is not installed: `pip install 'zsad[ray]'` (or `pip install ray`), "
    "or run without --executor ray"
)


def _bar(total: int, done: int, progress: bool, desc: str) -> tqdm:
    return tqdm(total=total, initial=done, desc=desc, unit="run", disable=not progress)


class LocalExecutor:
    """Runs here: one after another in this process, or ``jobs`` at a time, each in a child process
    (``python -m zsad.executors``) watched by a thread. Children, unlike threads, can be interrupted: Ctrl-C
    reaches them (and is forwarded when only this process got it), each discards its temporary folder, and
    queued runs never start."""

    def __init__(self, jobs: int = 1) -> None:
        self.jobs = jobs

    def run(
        self, runs: list[PlanRun], plan_dir: Path, total: int, done: int, progress: bool = True
    ) -> Iterator[RunResult]:
        bar = _bar(total, done, progress, f"plan {plan_dir.name}")
        try:
            if self.jobs == 1:
                for run in runs:
                    bar.set_postfix_str(run.name)
                    result = execute_run(run, plan_dir)
                    bar.update()
                    yield result
                return
            children = _Children()
            pool = ThreadPoolExecutor(max_workers=self.jobs)
            futures = {pool.submit(children.run, run, plan_dir): run for run in runs}
            try:
                pending = set(futures)
                while pending:
                    finished, pending = wait(pending, return_when=FIRST_COMPLETED)
                    for future in finished:
                        bar.update()
                        yield _result_of(future, futures[future], plan_dir)
            except BaseException:
                # Ctrl-C: queued runs never start; running children discard their temporary folders.
                for future in futures:
                    future.cancel()
                children.interrupt()
                pool.shutdown(wait=True)
                raise
            pool.shutdown(wait=True)
        finally:
            bar.close()


class _Children:
    """The child processes of a parallel local plan: one ``python -m zsad.executors RUN PLAN_DIR`` per run."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.procs: set[subprocess.Popen] = set()
        self.stopped = False

    def run(self, run: PlanRun, plan_dir: Path) -> RunResult:
        with self.lock:
            if self.stopped:
                raise KeyboardInterrupt
            proc = subprocess.Popen(
                [sys.executable, "-m", "zsad.executors", json.dumps(run.to_dict()), str(plan_dir)],
                stdout=subprocess.PIPE,
                text=True,
            )
            self.procs.add(proc)
        out, _ = proc.communicate()
        with self.lock:
            self.procs.discard(proc)
        if proc.returncode == INTERRUPTED or self.stopped:
            raise KeyboardInterrupt
        lines = out.strip().splitlines()
        if proc.returncode != 0 or not lines:
            error = f"the run's worker process exited with status {proc.returncode}"
            return RunResult(run.name, "failed", str(plan_dir / run.name), 0.0, error)
        return RunResult(**json.loads(lines[-1]))

    def interrupt(self) -> None:
        """Forward the interrupt to every running child (a terminal's Ctrl-C reaches them anyway)."""
        with self.lock:
            self.stopped = True
            for proc in self.procs:
                if proc.poll() is None:
                    proc.send_signal(signal.SIGINT)


def _child_main(argv: list[str]) -> int:
    """``python -m zsad.executors RUN_JSON PLAN_DIR``: execute one run, print its result as JSON."""
    run = PlanRun.from_dict(json.loads(argv[0]))
    try:
        result = execute_run(run, Path(argv[1]))
    except KeyboardInterrupt:
        return INTERRUPTED
    print(json.dumps(asdict(result)))
    return 0


def _result_of(future: Any, run: PlanRun, plan_dir: Path) -> RunResult:
    try:
        return future.result()
    except KeyboardInterrupt:
        raise
    except Exception as err:  # execute_run itself failed (disk full, ...): the run failed, the plan goes on
        return RunResult(run.name, "failed", str(plan_dir / run.name), 0.0, f"{type(err).__name__}: {err}")


def _ray_task(run: dict[str, Any], plan_dir: str, cwd: str) -> dict[str, Any]:
    """The Ray task body: execute one run where the task landed (in the driver's working directory, so
    relative paths in parameters mean the same), return its result as plain data."""
    return asdict(execute_run(PlanRun.from_dict(run), Path(plan_dir), cwd=cwd))


def ray_options(resources: dict[str, Any]) -> dict[str, Any]:
    """A run's ``resources`` as ``ray.remote(...).options`` keywords (default: one CPU)."""
    options: dict[str, Any] = {"num_cpus": 1, "max_retries": 0}
    options.update(
        {k: v for k, v in resources.items() if k in ("num_cpus", "num_gpus", "memory", "resources")}
    )
    return options


class RayExecutor:
    """Each run is one Ray task with the run's resources. Uses a running Ray session if this process has
    one (``ray.init`` called before), else connects to ``address`` (e.g. ``auto`` or ``ray://host:10001``),
    else starts a local instance for the plan and stops it afterwards."""

    def __init__(self, address: str | None = None) -> None:
        try:
            import ray  # noqa: F401
        except ImportError:
            raise ValueError(RAY_MISSING) from None
        self.address = address

    def run(
        self, runs: list[PlanRun], plan_dir: Path, total: int, done: int, progress: bool = True
    ) -> Iterator[RunResult]:
        import ray

        if not runs:
            return
        started = False
        if not ray.is_initialized():
            try:
                ray.init(address=self.address, include_dashboard=False, log_to_driver=False)
            except Exception as err:  # ray raises plain Exception / ConnectionError on start-up failures
                where = f"connect to Ray at {self.address}" if self.address else "start a local Ray instance"
                first = (str(err).strip().splitlines() or [type(err).__name__])[0]
                raise ValueError(
                    f"could not {where}: {first} (on a heavily loaded machine Ray's raylet gives its "
                    "agents only 15 s to start, ray-project/ray#65983: retry, or start Ray with "
                    "`ray start --head` and pass --address)"
                ) from None
            started = True
        bar = _bar(total, done, progress, f"plan {plan_dir.name} (ray)")
        task = ray.remote(_ray_task)
        refs = {
            task.options(**ray_options(run.resources)).remote(
                run.to_dict(), str(plan_dir.resolve()), str(Path.cwd())
            ): run
            for run in runs
        }
        pending = list(refs)
        try:
            while pending:
                finished, pending = ray.wait(pending, num_returns=1)
                ref = finished[0]
                run = refs[ref]
                try:
                    result = RunResult(**ray.get(ref))
                except Exception as err:  # the task died (worker crash, out of memory): a failed run
                    first = (str(err).strip().splitlines() or [""])[0][:300]
                    result = RunResult(run.name, "failed", str(plan_dir / run.name), 0.0, first)
                bar.update()
                yield result
        except BaseException:
            for ref in pending:
                ray.cancel(ref, force=True)
            raise
        finally:
            bar.close()
            if started:
                ray.shutdown()


def get_executor(name: str, jobs: int = 1, address: str | None = None) -> LocalExecutor | RayExecutor:
    """``local`` (default) or ``ray``; a clear ValueError for anything else or a missing Ray."""
    if name == "local":
        if address:
            raise ValueError("--address is for --executor ray")
        return LocalExecutor(jobs)
    if name == "ray":
        return RayExecutor(address)
    raise ValueError(f"unknown executor {name!r}; choose one of {', '.join(EXECUTORS)}")


if __name__ == "__main__":
    raise SystemExit(_child_main(sys.argv[1:]))
