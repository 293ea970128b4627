"""Fault injection for the trainer (issue 20): SIGKILL a training process at seeded random points over several
epochs, resume each run, and the final weights equal the uninterrupted run's bit for bit.

A "point" is one of the trainer's events, counted in order: an optimiser step, or either side of writing a
checkpoint file's temporary copy (before the write, and after it but before the rename). The kill comes from
the process itself at the chosen event, so the points are exact and reproducible. Each point is a forked
child (one per point; a fork inherits the imports, so it costs no 5 s start-up), every resume runs here.
"""

from __future__ import annotations

import json
import os
import random
import signal
from pathlib import Path

import pandas as pd
import pytest

import zsad.train as trainer

KILL_POINTS = 5
EPOCHS = 3
SEED = 20


def _count_events(patch, kill_at: int | None = None) -> list[int]:
    """Count the trainer's events (optimiser steps, and both sides of each checkpoint file's temporary write)
    through ``patch``; at event ``kill_at`` the process SIGKILLs itself. Returns the live count."""
    count = [0]
    real_write, real_optimizer = trainer._atomic_write, trainer._make_optimizer

    def event(*args) -> None:
        count[0] += 1
        if count[0] == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)

    def write(path, fill):
        event()

        def fill_then_event(tmp):
            fill(tmp)
            event()

        real_write(path, fill_then_event)

    def optimizer(params, settings):
        made = real_optimizer(params, settings)
        made.register_step_post_hook(event)
        return made

    patch.setattr(trainer, "_atomic_write", write)
    patch.setattr(trainer, "_make_optimizer", optimizer)
    return count


def _train_and_die(kill_at: int, kwargs: dict) -> int:
    """Fork a child that trains until it SIGKILLs itself at event ``kill_at``; returns its wait status. A
    fork inherits this process's imports and loaded model, so a kill point costs training time only."""
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        try:
            with pytest.MonkeyPatch.context() as patch:
                _count_events(patch, kill_at)
                trainer.train(**kwargs)
        finally:
            os._exit(3)  # reached only if the kill did not happen
    return os.waitpid(pid, 0)[1]


def test_sigkill_at_random_points_then_resume_is_bit_identical(synthad_root, tmp_path, monkeypatch):
    records = json.loads((synthad_root / "meta.json").read_text())["test"]["carpet"]
    meta = tmp_path / "aux.json"
    normal = [r for r in records if r["anomaly"] == 0][:4]
    anomalous = [r for r in records if r["anomaly"] == 1][:4]
    meta.write_text(json.dumps({"train": {}, "test": {"carpet": normal + anomalous}}))
    kwargs = {
        "method_id": "aprilgan",
        "aux_root": str(synthad_root),
        "meta": str(meta),
        "backbone": "zsad-tiny",
        "epochs": EPOCHS,
        "batch_size": 4,
        "cache": str(tmp_path / "cache"),
        "progress": False,
    }
    with monkeypatch.context() as patch:
        count = _count_events(patch)  # the uninterrupted run, counting the events it passes
        reference = trainer.train(out_dir=str(tmp_path / "reference"), **kwargs)
    events = count[0]
    assert events == EPOCHS * (2 + 4 * 2)  # per epoch: 2 steps, 4 files (before and after each write)
    rng, per_epoch = random.Random(SEED), events // EPOCHS
    firsts = [rng.randrange(e * per_epoch, (e + 1) * per_epoch) + 1 for e in range(EPOCHS)]  # every epoch
    rest = rng.sample(sorted(set(range(1, events + 1)) - set(firsts)), KILL_POINTS - EPOCHS)
    points = sorted(firsts + rest)
    expected = (reference / trainer.MODEL_FILE).read_bytes()
    losses = pd.read_csv(reference / trainer.LOG_FILE)["loss"].tolist()
    for point in points:
        status = _train_and_die(point, {**kwargs, "out_dir": str(tmp_path / f"k{point}")})
        assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL, (point, status)
        out = tmp_path / f"k{point}"
        trainer.train(out_dir=str(out), resume=True, **kwargs)
        assert (out / trainer.MODEL_FILE).read_bytes() == expected, f"killed at event {point} of {events}"
        assert pd.read_csv(out / trainer.LOG_FILE)["loss"].tolist() == losses, point
        assert json.loads((out / trainer.CONFIG_FILE).read_text())["epochs_done"] == EPOCHS
        kept = sorted(p.name for p in Path(out).iterdir() if not p.name.endswith(".tmp"))
        assert kept == sorted(p.name for p in reference.iterdir())  # a kill's .tmp leftovers aside
