"""The `zsad` command: eval writes the CSV contract, data prepare writes meta.json, mistakes end cleanly."""

from __future__ import annotations

import json
import subprocess
import sys

import pandas as pd
import pytest
import torch

from zsad.cli import main
from zsad.evaluate import COLUMNS


def test_eval_writes_metrics_csv_and_run_json(synthad_root, tmp_path, capsys):
    # "--weights random" draws its seed from torch's RNG: fixed here, so the weights (and whether a random
    # map leaves AUPRO undefined, NaN) do not depend on which tests ran before in this process.
    torch.manual_seed(0)
    classes = "nut,wood"
    code = main(
        [
            "eval",
            "--method",
            "clip",
            "--data",
            str(synthad_root),
            "--backbone",
            "zsad-tiny",
            "--weights",
            "random",
            "--classes",
            classes,
            "--out",
            str(tmp_path),
        ]
    )
    assert code == 0
    printed = capsys.readouterr().out
    assert "| class |" in printed and "pixel_aupro (cflow)" in printed
    csv = pd.read_csv(tmp_path / "metrics.csv")
    assert list(csv.columns) == ["class", *COLUMNS]
    assert csv["class"].tolist() == ["nut", "wood", "mean"]
    values = csv[list(COLUMNS)].to_numpy()
    assert ((values >= 0) & (values <= 1)).all()
    run = json.loads((tmp_path / "run.json").read_text())
    assert (
        run["aupro_convention"] == "cflow" and run["backbone"] == "zsad-tiny" and run["weights"] == "random"
    )
    assert run["data"] == str(synthad_root) and "open_clip" in run["versions"]


def test_feature_cache_second_run_reads_disk(synthad_root, tmp_path, tiny_random):
    from zsad import methods
    from zsad.cache import FeatureCache
    from zsad.data import load_dataset
    from zsad.evaluate import evaluate

    data = load_dataset(synthad_root, "test", image_size=tiny_random.image_size, classes=["pill"])
    cache = FeatureCache(tmp_path / "cache")
    first = evaluate(methods.create("clip", backbone=tiny_random), data, cache=cache, progress=False)
    assert cache.hits == 0 and cache.misses == len(data)
    second = evaluate(methods.create("clip", backbone=tiny_random), data, cache=cache, progress=False)
    assert cache.hits == len(data)
    pd.testing.assert_frame_equal(first.table, second.table)
    pd.testing.assert_frame_equal(first.scores, second.scores)


def test_unknown_method_and_missing_data_are_one_line_errors(tmp_path, capsys):
    assert main(["eval", "--method", "nope", "--data", str(tmp_path)]) == 2
    assert "unknown method" in capsys.readouterr().err
    assert (
        main(
            [
                "eval",
                "--method",
                "clip",
                "--data",
                str(tmp_path / "absent"),
                "--backbone",
                "zsad-tiny",
                "--weights",
                "random",
            ]
        )
        == 2
    )
    err = capsys.readouterr().err
    assert "dataset root not found" in err and "Traceback" not in err


def test_zero_shot_method_rejects_k_shot(synthad_root, capsys):
    with pytest.raises(SystemExit, match="zero-shot"):
        main(
            [
                "eval",
                "--method",
                "clip",
                "--data",
                str(synthad_root),
                "--backbone",
                "zsad-tiny",
                "--weights",
                "random",
                "--k-shot",
                "2",
            ]
        )


def test_python_dash_m_lists_methods():
    out = subprocess.run(
        [sys.executable, "-m", "zsad", "methods"], capture_output=True, text=True, check=True
    )
    assert "clip" in out.stdout.split()


def test_eval_k_shot_records_the_references(synthad_root, tmp_path):
    code = main(
        [
            "eval",
            "--method",
            "winclip-fewshot",
            "--data",
            str(synthad_root),
            "--backbone",
            "zsad-tiny",
            "--weights",
            "random",
            "--classes",
            "nut",
            "--k-shot",
            "2",
            "--seed",
            "1",
            "--out",
            str(tmp_path),
        ]
    )
    assert code == 0
    run = json.loads((tmp_path / "run.json").read_text())
    assert run["k_shot"] == 2 and run["seed"] == 1
    assert len(run["references"]) == 2 and all("/train/good/" in p for p in run["references"])


def test_train_then_eval_from_the_checkpoint(synthad_root, tmp_path, capsys):
    ck = tmp_path / "ck"
    common = ["--backbone", "zsad-tiny", "--weights", "random"]
    args = ["train", "--method", "aprilgan", "--aux", str(synthad_root), "--classes", "carpet,nut"]
    args += [*common, "--epochs", "1", "--batch-size", "16", "--cache", str(tmp_path / "c"), "--out", str(ck)]
    assert main(args) == 0
    assert (ck / "model.safetensors").is_file() and (ck / "train_log.csv").is_file()
    out = tmp_path / "eval"
    ev = ["eval", "--method", "aprilgan", "--checkpoint", str(ck), "--data", str(synthad_root)]
    assert main([*ev, "--classes", "wood", "--out", str(out)]) == 0
    run = json.loads((out / "run.json").read_text())
    assert run["checkpoint"] == str(ck) and run["backbone"] == "zsad-tiny" and run["method"] == "aprilgan"
    capsys.readouterr()
    # a flag that contradicts the checkpoint, another method's checkpoint, or an existing folder: one line
    assert main([*ev, "--classes", "wood", "--image-size", "256"]) == 2
    assert "trained with image_size=128" in capsys.readouterr().err
    ev[2] = "clipad-sdp-plus"
    assert main([*ev, "--classes", "wood"]) == 2
    assert "'aprilgan' checkpoint, not 'clipad-sdp-plus'" in capsys.readouterr().err
    assert main(args) == 2
    assert "--resume" in capsys.readouterr().err
