"""``zsad predict`` / ``zsad eval`` outputs of issue 18: full-resolution maps, few-shot references, official
checkpoints, ``--save-maps``; bad input named in one line with nothing half-written."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from zsad.cli import main


def test_a_300x200_image_gets_a_300x200_map_equal_to_the_square_map_resized(
    synthad_root, tiny_trained, tmp_path
):
    from zsad import methods
    from zsad.data.dataset import preprocess_image
    from zsad.data.images import load_image
    from zsad.predict import predict_images

    source = synthad_root / "wood" / "test" / "scratch" / "000.png"
    wide = tmp_path / "wide.png"
    load_image(source).resize((300, 200), Image.Resampling.BICUBIC).save(wide)
    detector = methods.create("clip", backbone=tiny_trained)
    [result] = predict_images(detector, [wide], tmp_path / "out", "wood", progress=False)
    full = np.load(tmp_path / "out" / result.map)
    assert full.dtype == np.float32 and full.shape == (200, 300)
    with torch.inference_mode():
        _, square = detector.predict(preprocess_image(load_image(wide), detector.image_size)[None], ["wood"])
    # Reference resize: PIL's bilinear on the float map (upsampling: the same centre-aligned sampling).
    expected = np.asarray(Image.fromarray(square[0].numpy(), mode="F").resize((300, 200), Image.BILINEAR))
    span = float(square.max() - square.min())
    assert np.abs(full - expected).max() <= 1e-3 * span + 1e-6


def _official_aprilgan_heads(backbone, path):
    """Seeded random APRIL-GAN heads saved in the official checkpoint format (``trainable_linearlayer``)."""
    from zsad.methods.aprilgan import AprilGAN

    torch.manual_seed(3)
    torch.save({"trainable_linearlayer": AprilGAN(backbone).learned.state_dict()}, path)
    return path


@pytest.mark.parametrize("method", ["aprilgan", pytest.param("winclip-fewshot", marks=pytest.mark.slow)])
def test_predict_with_references_for_few_shot_methods(method, synthad_root, tiny_trained, tmp_path):
    """APRIL-GAN few-shot with released-format heads (``--official``) in the default run; WinCLIP+ (same
    reference path, slower) in the slow run."""
    from zsad import methods
    from zsad.data.dataset import preprocess_image
    from zsad.data.images import load_image

    good = synthad_root / "wood" / "train" / "good"
    references = [good / "000.png", good / "001.png"]
    image = sorted((synthad_root / "wood" / "test").glob("[!g]*/*.png"))[0]  # a defective image
    refs = torch.stack([preprocess_image(load_image(p), 128) for p in references])
    query = preprocess_image(load_image(image), 128)[None]
    extra, build = [], lambda: methods.create(method, backbone=tiny_trained)
    if method == "aprilgan":
        heads = _official_aprilgan_heads(tiny_trained, tmp_path / "epoch_1.pth")
        extra = ["--official", str(heads)]
        build = lambda: methods.from_official("aprilgan", checkpoint=heads, backbone="zsad-tiny")  # noqa: E731
    out = tmp_path / method
    argv = ["predict", str(image), "--method", method, "--backbone", "zsad-tiny", "--class-name", "wood"]
    assert main([*argv, *extra, "--reference", *map(str, references), "--out", str(out)]) == 0
    detector = build().fit_few_shot(refs, ["wood", "wood"])
    with torch.inference_mode():
        expected, _ = detector.predict(query, ["wood"])
        zero_shot, _ = build().predict(query, ["wood"]) if method == "aprilgan" else (None, None)
    score = pd.read_csv(out / "scores.csv")["score"].iloc[0]
    assert score == pytest.approx(float(expected[0]), abs=1e-5)
    if zero_shot is not None:  # the references changed the score: the memory was used
        assert abs(score - float(zero_shot[0])) > 1e-4


def test_reference_errors_are_one_line(synthad_root, tmp_path, capsys):
    good = synthad_root / "wood" / "train" / "good"
    image = sorted((synthad_root / "wood" / "test").glob("[!g]*/*.png"))[0]
    capsys.readouterr()
    # A memory-only method without references, and a reference folder without an image: one line each.
    argv = ["predict", str(image), "--method", "winclip-fewshot", "--backbone", "zsad-tiny"]
    assert main([*argv, "--out", str(tmp_path / "none")]) == 2
    assert "--reference" in capsys.readouterr().err
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("no image here")
    assert main([*argv, "--reference", str(empty), "--out", str(tmp_path / "none")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and str(empty) in err and "Traceback" not in err
    assert not (tmp_path / "none").exists()  # nothing half-written
    zero_shot_argv = ["predict", str(image), "--method", "clip", "--backbone", "zsad-tiny"]
    assert main([*zero_shot_argv, "--reference", str(good), "--out", str(empty)]) == 2
    assert "zero-shot" in capsys.readouterr().err


def test_official_checkpoint_on_predict_and_eval_with_saved_maps(synthad_root, tiny_trained, tmp_path):
    from zsad.thresholds import Entry, Level, Thresholds

    _official_aprilgan_heads(tiny_trained, tmp_path / "epoch_1.pth")
    # A small meta.json over four wood test images (two normal, two defective), outside the dataset.
    meta = json.loads((synthad_root / "meta.json").read_text())
    wood = meta["test"]["wood"]
    picked = [r for r in wood if not r["anomaly"]][:2] + [r for r in wood if r["anomaly"]][:2]
    (tmp_path / "meta.json").write_text(json.dumps({"train": {}, "test": {"wood": picked}}))
    level = Level(threshold=0.5, min=0.0, max=1.0)
    thresholds = Thresholds("normal-quantile", 0.99, {}, Entry("normal-quantile", level, level, {}))
    thresholds.save(tmp_path / "th" / "thresholds.json")
    maps = tmp_path / "maps"
    argv = [
        "eval",
        "--method",
        "aprilgan",
        "--official",
        str(tmp_path / "epoch_1.pth"),
        "--backbone",
        "zsad-tiny",
    ]
    argv += [
        "--data",
        str(synthad_root),
        "--meta",
        str(tmp_path / "meta.json"),
        "--out",
        str(tmp_path / "ev"),
    ]
    assert main([*argv, "--thresholds", str(tmp_path / "th"), "--save-maps", str(maps)]) == 0
    scores = pd.read_csv(tmp_path / "ev" / "scores.csv")
    assert {"normalized_score", "predicted", "per_image_score"} <= set(scores.columns)
    first = picked[2]["img_path"]
    full = np.load(maps / first.replace(".png", "_map.npy"))
    with Image.open(synthad_root / first) as im:
        assert full.shape == (im.height, im.width)
    mask = np.asarray(Image.open(maps / first.replace(".png", "_mask.png")))
    assert np.array_equal(mask > 0, full >= 0.5)
    # APRIL-GAN's evaluated score is transductive; the label is decided on the per-image score
    assert np.array_equal(scores["predicted"].to_numpy() == 1, scores["per_image_score"].to_numpy() >= 0.5)
