"""Issue 20: no silent wrong result, no lost work, one clear line for every user mistake.

Every test drives ``zsad.cli.main`` in-process on the embedded world (SynthAD + zsad-tiny) or on tiny files
it writes, and checks the exit code and the one-line message a user sees.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import stat
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from zsad import metrics
from zsad.cli import build_parser, main

TINY = ["--backbone", "zsad-tiny"]


def _zsad_lines(err: str) -> list[str]:
    """What zsad itself printed on stderr (progress bars aside); never a traceback."""
    assert "Traceback" not in err, err
    return [line for line in err.replace("\r", "\n").splitlines() if line.startswith("zsad:")]


def _one_error(capsys) -> str:
    """The command printed exactly one line of its own on stderr, the error; returns it."""
    lines = _zsad_lines(capsys.readouterr().err)
    assert len(lines) == 1 and lines[0].startswith("zsad: error:"), lines
    return lines[0]


def _small_meta(root: Path, path: Path, cls: str = "wood", normal: int = 4, anomalous: int = 4) -> Path:
    """A meta.json (outside the SynthAD root, paths relative to it) with a few test images of one class."""
    records = json.loads((root / "meta.json").read_text())["test"][cls]
    good = [r for r in records if r["anomaly"] == 0][:normal]
    bad = [r for r in records if r["anomaly"] == 1][:anomalous]
    path.write_text(json.dumps({"train": {}, "test": {cls: good + bad}}))
    return path


def _forbid_model_loading(monkeypatch) -> None:
    """Make any model load fail loudly: a check that must come first then shows it did."""

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the output path was checked")

    monkeypatch.setattr("zsad.methods.create", refuse)
    monkeypatch.setattr("zsad.backbone.load_clip", refuse)


@pytest.fixture(scope="module")
def checkpoint(synthad_root, tmp_path_factory):
    """A 2-epoch APRIL-GAN checkpoint on 8 SynthAD carpet images, and the arguments that made it."""
    base = tmp_path_factory.mktemp("rel_ck")
    meta = _small_meta(synthad_root, base / "aux.json", "carpet")
    args = ["train", "--method", "aprilgan", "--aux", str(synthad_root), "--meta", str(meta), *TINY]
    args += ["--epochs", "2", "--batch-size", "4", "--cache", str(base / "cache"), "--out", str(base / "ck")]
    old = os.umask(0o022)  # the umask test reads these files' modes
    try:
        assert main(args) == 0
    finally:
        os.umask(old)
    return base / "ck", args


# ------------------------------------------------------------------------------------ silent wrong results
def test_scores_csv_round_trips_the_metrics(synthad_root, tmp_path):
    """zsad-tiny's CLIP scores on wood are tiny: %.6f made 14 of 30 read 0.000000 (AUROC 0.944, not 0.963)."""
    out = tmp_path / "ev"
    assert (
        main(
            [
                "eval",
                "--method",
                "clip",
                "--data",
                str(synthad_root),
                *TINY,
                "--classes",
                "wood",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    scores = pd.read_csv(out / "scores.csv")
    table = pd.read_csv(out / "metrics.csv").set_index("class")
    recomputed = metrics.image_metrics(scores["label"].to_numpy(), scores["score"].to_numpy())
    for name in ("auroc", "ap", "f1_max"):
        assert recomputed[name] == pytest.approx(table.loc["wood", f"image_{name}"], abs=1e-6)


def test_missing_masks_are_excluded_by_default_and_zero_fill_is_named(synthad_root, tmp_path, capsys):
    meta = _small_meta(synthad_root, tmp_path / "meta.json", normal=2, anomalous=3)
    data = json.loads(meta.read_text())
    records = data["test"]["wood"]
    unmasked = next(r for r in records if r["anomaly"] == 1)
    unmasked["mask_path"] = ""
    meta.write_text(json.dumps(data))
    without = tmp_path / "without.json"  # the same images, minus the one without a mask
    without.write_text(json.dumps({"train": {}, "test": {"wood": [r for r in records if r is not unmasked]}}))
    common = ["eval", "--method", "clip", "--data", str(synthad_root), *TINY]
    runs = {}
    for name, extra in (
        ("exclude", ["--meta", str(meta)]),
        ("zero-fill", ["--meta", str(meta), "--missing-masks", "zero-fill"]),
        ("without", ["--meta", str(without)]),
    ):
        assert main([*common, *extra, "--out", str(tmp_path / name)]) == 0
        runs[name] = (
            pd.read_csv(tmp_path / name / "metrics.csv").set_index("class").loc["wood"],
            json.loads((tmp_path / name / "run.json").read_text()),
            capsys.readouterr().err,
        )
    table, run, err = runs["exclude"]
    assert "zsad: warning: anomalous test images without a mask_path are left out" in err and "wood: 1" in err
    assert run["missing_masks"] == "exclude" and run["pixel_excluded_images"] == {"wood": 1}
    pixel = ["pixel_auroc", "pixel_ap", "pixel_f1_max", "pixel_aupro"]
    assert np.allclose(table[pixel], runs["without"][0][pixel])  # left out of the pixel pool ...
    assert len(pd.read_csv(tmp_path / "exclude/scores.csv")) == len(records)  # ... but scored and in the
    assert len(pd.read_csv(tmp_path / "without/scores.csv")) == len(records) - 1  # image metrics
    zero, zero_run, zero_err = runs["zero-fill"]
    assert zero_run["missing_masks"] == "zero-fill" and "warning" not in zero_err
    assert zero["pixel_ap"] < table["pixel_ap"]  # its defect pixels counted as normal


def test_plan_run_reruns_after_the_notebook_changes(tmp_path, monkeypatch):
    from zsad.plans import PlanRun

    notebook = tmp_path / "nb.ipynb"
    notebook.write_text(json.dumps({"cells": [], "metadata": {}, "nbformat": 4, "nbformat_minor": 5}))
    run = PlanRun("r", notebook, {"x": 1})
    before = run.params_hash()
    assert run.params_hash() == before  # stable while nothing changes
    notebook.write_text(notebook.read_text().replace('"cells": []', '"cells": [{"cell_type": "raw"}]'))
    assert run.params_hash() != before  # same name, same parameters, another notebook
    edited = run.params_hash()
    monkeypatch.setattr("zsad.__version__", "99.0")
    assert run.params_hash() != edited


def test_nonsense_sizes_and_spaced_class_lists(capsys):
    parser = build_parser()
    for size in ("0", "-5", "8", "x"):
        with pytest.raises(SystemExit) as stop:
            parser.parse_args(["eval", "--method", "clip", "--data", ".", "--image-size", size])
        assert stop.value.code == 2
        assert "--image-size" in capsys.readouterr().err
    args = parser.parse_args(["eval", "--method", "clip", "--data", ".", "--classes", "wood, pill"])
    assert args.classes == ["wood", "pill"]
    with pytest.raises(SystemExit):
        parser.parse_args(["train", "--method", "aprilgan", "--aux", ".", "--out", "o", "--epochs", "0"])


# ------------------------------------------------------------------------------------------- resume
@pytest.mark.parametrize(
    ("flags", "shown"),
    [
        (["--lr", "0.5"], "--lr 0.001; got --lr 0.5"),
        (["--seed", "7"], "--seed 111; got --seed 7"),
        (["--preset", "aux-visa"], "--preset None; got --preset aux-visa"),
        (["--batch-size", "8"], "--batch-size 4; got --batch-size 8"),
        (["--epochs", "1"], "2 epochs done; --epochs 1"),
        (["-o", "layers", "[6]"], "-o layers [2, 3, 5, 6]; got -o layers [6]"),
    ],
)
def test_resume_refuses_every_contradicting_flag(checkpoint, flags, shown, capsys):
    ck, args = checkpoint
    before = (ck / "model.safetensors").read_bytes()
    assert main([*args, "--resume", *flags]) == 2
    line = _one_error(capsys)
    assert shown in line, line
    assert (ck / "model.safetensors").read_bytes() == before


def test_resume_refuses_another_aux_and_allows_more_epochs(checkpoint, tmp_path, capsys):
    ck, args = checkpoint
    other = [a if a != args[args.index("--aux") + 1] else str(tmp_path) for a in args]
    assert main([*other, "--resume"]) == 2
    assert "--aux" in _one_error(capsys)
    copy = tmp_path / "ck"
    shutil.copytree(ck, copy)
    longer = [*args[:-1], str(copy), "--resume", "--epochs", "3"]
    assert main(longer) == 0
    assert json.loads((copy / "config.json").read_text())["epochs_done"] == 3
    help_text = build_parser()._subparsers._group_actions[0].choices["train"].format_help()
    assert "--cache" in help_text and "Free with --resume" in help_text and "MALLOC_ARENA_MAX" in help_text


# ------------------------------------------------------------------------------------------ lost work
def test_output_paths_are_checked_before_any_model_loads(synthad_root, tmp_path, monkeypatch, capsys):
    _forbid_model_loading(monkeypatch)
    a_file = tmp_path / "a_file"
    a_file.write_text("")
    ev = ["eval", "--method", "clip", "--data", str(synthad_root), *TINY]
    assert main([*ev, "--out", str(a_file)]) == 2
    assert f"--out {a_file} is a file" in _one_error(capsys)
    assert main([*ev, "--out", str(a_file / "sub")]) == 2
    assert "lies under the file" in _one_error(capsys)
    assert main([*ev, "--out", "/sys/zsad-rel-test"]) == 2  # not writable, even for root
    assert "cannot write in /sys" in _one_error(capsys)
    monkeypatch.setenv("ZSAD_CACHE", str(a_file))
    assert main([*ev, "--cache"]) == 2
    assert "ZSAD_CACHE" in _one_error(capsys)
    train = ["train", "--method", "aprilgan", "--aux", str(synthad_root), "--out", str(a_file)]
    assert main(train) == 2
    assert "is a file" in _one_error(capsys)
    predict = ["predict", str(a_file), "--method", "clip", "--out", str(a_file)]
    assert main(predict) == 2
    assert "is a file" in _one_error(capsys)
    notebook = tmp_path / "nb.ipynb"
    notebook.write_text(json.dumps({"cells": [], "metadata": {}, "nbformat": 4, "nbformat_minor": 5}))
    assert main(["report", str(notebook), "--out", str(a_file)]) == 2
    assert "is a file" in _one_error(capsys)
    calibrate = ["calibrate", "--method", "clip", "--data", str(synthad_root), *TINY, "--normal-only"]
    assert main([*calibrate, "--out", str(a_file)]) == 2
    assert "is a file" in _one_error(capsys)
    export = ["export", "--method", "clip", "--class-name", "wood", *TINY]
    assert main([*export, "--out", str(a_file / "model.onnx")]) == 2
    assert "is a file" in _one_error(capsys)


def test_quoted_tilde_paths_expand(synthad_root, tmp_path, monkeypatch):
    home, work = tmp_path / "home", tmp_path / "work"
    home.mkdir()
    work.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(work)
    meta = _small_meta(synthad_root, tmp_path / "meta.json", normal=2, anomalous=2)
    ev = ["eval", "--method", "clip", "--data", str(synthad_root), "--meta", str(meta), *TINY]
    assert main([*ev, "--out", "~/runs/x"]) == 0
    assert (home / "runs/x/scores.csv").is_file() and not (work / "~").exists()
    monkeypatch.setenv("ZSAD_HOME", "~/zh")
    from zsad.cache import default_cache_dir

    assert default_cache_dir() == home / "zh" / "features"


def _png(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), (90, 90, 90)).save(path)


def test_data_prepare_keeps_a_hand_edited_meta_and_reads_headers(tmp_path, capsys):
    src = tmp_path / "d"
    _png(src / "w/good/a.png")
    _png(src / "w/good/b.png")
    prepare = ["data", "prepare", "--format", "folder", "--src", str(src)]
    assert main(prepare) == 0
    edited = (src / "meta.json").read_text().replace('"w"', '"w_edited"')
    (src / "meta.json").write_text(edited)
    capsys.readouterr()
    assert main(prepare) == 2
    assert "--overwrite" in _one_error(capsys) and (src / "meta.json").read_text() == edited
    assert main([*prepare, "--overwrite"]) == 0
    assert (src / "meta.json.bak").read_text() == edited and "w_edited" not in (src / "meta.json").read_text()
    (src / "w/good/c.png").write_bytes(b"")  # zero bytes: used to pass prepare and stop a later eval
    capsys.readouterr()
    assert main([*prepare, "--overwrite"]) == 2
    err = capsys.readouterr().err
    assert "c.png" in err and "--skip-bad" in err and "Traceback" not in err


def test_eval_skip_bad(synthad_root, tmp_path, capsys):
    meta = _small_meta(synthad_root, tmp_path / "meta.json", normal=3, anomalous=3)
    data = json.loads(meta.read_text())
    data["test"]["wood"][0]["img_path"] = str(tmp_path / "gone.png")
    meta.write_text(json.dumps(data))
    ev = ["eval", "--method", "clip", "--data", str(synthad_root), "--meta", str(meta), *TINY]
    assert main(ev) == 2
    err = capsys.readouterr().err
    assert "zsad eval --skip-bad" in err and "Traceback" not in err
    assert main([*ev, "--skip-bad", "--out", str(tmp_path / "o")]) == 0
    assert len(pd.read_csv(tmp_path / "o/scores.csv")) == 5


# ------------------------------------------------------------------------------------ actionable errors
@pytest.mark.parametrize(
    ("code", "advice"),
    [(errno.ENOSPC, "the disk is full"), (errno.EACCES, "permissions"), (errno.ENOTDIR, "not a folder")],
)
def test_os_errors_are_one_line_with_the_path(tmp_path, monkeypatch, capsys, code, advice):
    src = tmp_path / "d"
    _png(src / "w/good/a.png")
    target = src / "meta.json"

    def fail(meta, path):
        raise OSError(code, os.strerror(code), str(target))

    monkeypatch.setattr("zsad.data.prepare.write_meta", fail)
    prepare = ["data", "prepare", "--format", "folder", "--src", str(src)]
    assert main(prepare) == 1
    line = _one_error(capsys)
    assert str(target) in line and advice in line
    monkeypatch.setenv("ZSAD_DEBUG", "1")
    assert main(prepare) == 1
    assert "Traceback" in capsys.readouterr().err


def test_damaged_checkpoint_files_say_what_to_do(checkpoint, tmp_path, synthad_root, capsys):
    ck, args = checkpoint
    copy = tmp_path / "ck"
    shutil.copytree(ck, copy)
    model = copy / "model.safetensors"
    model.write_bytes(model.read_bytes()[:100])  # a copy cut short by a full disk
    ev = ["eval", "--method", "aprilgan", "--checkpoint", str(copy), "--data", str(synthad_root)]
    ev += ["--meta", str(_small_meta(synthad_root, tmp_path / "m.json", normal=1, anomalous=1))]
    assert main(ev) == 2
    line = _one_error(capsys)
    assert str(model) in line and "damaged" in line and "--resume" in line
    resume = [*args[:-1], str(copy), "--resume"]
    assert main(resume) == 0  # rewrites model.safetensors from train_state.pt
    assert main(ev) == 0
    capsys.readouterr()
    state = copy / "train_state.pt"
    state.write_bytes(state.read_bytes()[:1000])
    assert main(resume) == 2
    line = _one_error(capsys)
    assert str(state) in line and "--overwrite" in line


def test_keyboard_interrupt_is_one_line_exit_130(checkpoint, synthad_root, tmp_path, monkeypatch, capsys):
    ck, args = checkpoint

    def interrupt(*a, **k):
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr("zsad.methods.create", interrupt)
        assert main(["eval", "--method", "clip", "--data", str(synthad_root), *TINY]) == 130
        (err,) = _zsad_lines(capsys.readouterr().err)
        assert err.startswith("zsad: interrupted")
    import zsad.train

    real_save, saves = zsad.train._save_epoch, []

    def save_then_interrupt(*a, **k):
        real_save(*a, **k)
        saves.append(1)
        raise KeyboardInterrupt

    monkeypatch.setattr(zsad.train, "_save_epoch", save_then_interrupt)
    for name in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_ARENA_MAX"):
        monkeypatch.delenv(name, raising=False)  # a fresh run used to warn about them on every start
    out = tmp_path / "ck"
    assert main([*args[:-1], str(out)]) == 130
    stderr = capsys.readouterr().err
    assert "RuntimeWarning" not in stderr and "glibc" not in stderr
    (err,) = _zsad_lines(stderr)
    assert err.startswith("zsad: interrupted") and "1 epoch(s) saved" in err
    assert f"zsad train --method aprilgan --aux {synthad_root} --out {out} --resume" in err


def test_report_notebook_checks_parameters_and_keeps_failures(tmp_path, capsys):
    import nbformat

    nb = nbformat.v4.new_notebook(
        metadata={"kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"}}
    )
    nb.cells = [
        nbformat.v4.new_code_cell("x = 1\nout_dir = None", metadata={"tags": ["parameters"]}),
        nbformat.v4.new_code_cell("raise ValueError(f'boom {x}')"),
    ]
    notebook = tmp_path / "nb.ipynb"
    nbformat.write(nb, notebook)
    out = tmp_path / "rep"
    assert main(["report", str(notebook), "--out", str(out), "-p", "y", "2"]) == 2
    line = _one_error(capsys)
    assert "-p y" in line and "it has: x" in line and not out.exists()
    assert main(["report", str(notebook), "--out", str(out), "-p", "x", "5"]) == 1
    line = _one_error(capsys)
    assert "boom 5" in line and "error.txt" in line
    assert "boom 5" in (out / "error.txt").read_text() and (out / "nb.ipynb").is_file()


def test_few_shot_method_without_shots_and_meta_json_as_data(synthad_root, capsys):
    ev = ["eval", "--method", "winclip-fewshot", "--data", str(synthad_root), *TINY]
    assert main(ev) == 2
    line = _one_error(capsys)
    assert "--k-shot K" in line and "fit_few_shot(" not in line
    assert main(["eval", "--method", "clip", "--data", str(synthad_root / "meta.json")]) == 2
    assert f"pass its folder (--data {synthad_root})" in _one_error(capsys)


def test_foreign_weights_file_names_the_model_it_looks_like(tmp_path, monkeypatch, capsys):
    from safetensors.torch import save_file

    from zsad.backbone import load_clip

    state = {k: v.contiguous() for k, v in load_clip("zsad-tiny").model.state_dict().items()}
    dropped = sorted(state)[:5]
    for key in dropped:
        del state[key]
    file = tmp_path / "w.safetensors"
    save_file(state, str(file))
    ev = ["eval", "--method", "clip", "--data", str(tmp_path), *TINY, "--weights", str(file)]
    assert main(ev) == 2
    line = _one_error(capsys)
    assert "5 of its" in line and "keys missing" in line and "zsad-tiny" in line.split("looks like")[1]
    assert len(line) < 400 and dropped[0] not in line
    monkeypatch.setenv("ZSAD_DEBUG", "1")
    assert main(ev) == 2
    assert dropped[0] in capsys.readouterr().err


def test_files_follow_the_umask(checkpoint, tmp_path, monkeypatch):
    """safetensors' save_file writes 0600 and mkdtemp makes 0700: the fixture trained under umask 022."""
    ck, _ = checkpoint
    assert stat.S_IMODE((ck / "model.safetensors").stat().st_mode) == 0o644
    cached = next((ck.parent / "cache").rglob("*.safetensors"))
    assert stat.S_IMODE(cached.stat().st_mode) == 0o644
    from zsad.runs import PlanRun, execute_run

    notebook = tmp_path / "nb.ipynb"
    notebook.write_text(json.dumps({"cells": [], "metadata": {}, "nbformat": 4, "nbformat_minor": 5}))
    monkeypatch.setattr("zsad.runs.execute_notebook", lambda nb, executed, *a, **k: shutil.copy(nb, executed))
    old = os.umask(0o022)
    try:
        execute_run(PlanRun("r", notebook, {}), tmp_path / "plan")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "plan/r").stat().st_mode) == 0o755
