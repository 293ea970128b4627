"""``zsad predict``: per-image scores and overlays, unreadable images named, checkpoints reused."""

from __future__ import annotations

import pandas as pd
import pytest
import torch
from PIL import Image

from zsad.cli import main


def _images(root):
    return [root / "wood" / "test" / "scratch" / "000.png", root / "wood" / "test" / "good" / "000.png"]


def _dataset_scores(detector, root, paths):
    """The same images through the evaluation path (load_dataset + predict), for comparison."""
    from zsad.data import load_dataset

    test = load_dataset(root, split="test", image_size=detector.image_size, classes=["wood"])
    by_path = {str(item["img_path"]): i for i, item in enumerate(test.items)}
    picked = [test[next(i for p, i in by_path.items() if str(path).endswith(p))] for path in paths]
    with torch.inference_mode():
        scores, _ = detector.predict(torch.stack([s["image"] for s in picked]), ["wood"] * len(picked))
    return scores.tolist()


def test_predict_scores_overlays_and_names_unreadable_images(synthad_root, tiny_trained, tmp_path, capsys):
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    good = _images(synthad_root)
    out = tmp_path / "out"
    argv = ["predict", str(good[0]), str(broken), str(good[1]), "--method", "clip", "--backbone", "zsad-tiny"]
    rc = main([*argv, "--class-name", "wood", "--out", str(out)])
    assert rc == 1  # one image failed
    err = capsys.readouterr().err
    assert "broken.png" in err and "Traceback" not in err
    table = pd.read_csv(out / "scores.csv")
    assert list(table["image"]) == [str(good[0]), str(broken), str(good[1])]
    assert table["score"].isna().tolist() == [False, True, False]
    assert table.loc[1, "error"]
    for name in table["overlay"].dropna():
        with Image.open(out / name) as im:
            assert im.size[0] > 50 and im.size[1] > 50
    assert sorted(p.name for p in out.glob("*.png")) == ["000_2_overlay.png", "000_overlay.png"]
    from zsad import methods

    expected = _dataset_scores(methods.create("clip", backbone=tiny_trained), synthad_root, good)
    assert table["score"].dropna().tolist() == pytest.approx(expected, abs=1e-5)


def test_predict_all_readable_exits_zero_and_fewshot_is_refused(synthad_root, tmp_path, capsys):
    args = ["predict", str(_images(synthad_root)[1]), "--backbone", "zsad-tiny", "--out", str(tmp_path / "o")]
    assert main([*args, "--method", "clip"]) == 0
    assert main([*args, "--method", "winclip-fewshot"]) == 2
    assert "few-shot" in capsys.readouterr().err
    assert main([*args, "--method", "nope"]) == 2


def test_predict_with_a_trained_checkpoint(synthad_root, tmp_path):
    from zsad.train import load_checkpoint, train

    ck = train(
        "aprilgan",
        synthad_root,
        tmp_path / "ck",
        backbone="zsad-tiny",
        weights="random",
        classes=["wood"],
        epochs=1,
        progress=False,
    )
    out = tmp_path / "out"
    images = _images(synthad_root)
    argv = ["predict", *map(str, images), "--method", "aprilgan", "--checkpoint", str(ck)]
    assert main([*argv, "--class-name", "wood", "--out", str(out)]) == 0
    expected = _dataset_scores(load_checkpoint(ck), synthad_root, images)
    assert pd.read_csv(out / "scores.csv")["score"].tolist() == pytest.approx(expected, abs=1e-5)
