"""The shared trainer: feature caching, mosaic, determinism, resume, crash-safe checkpoints, bad input."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from zsad import train as train_mod
from zsad.backbone import CLIPBackbone
from zsad.data import DataError, load_dataset
from zsad.data.dataset import preprocess_image, preprocess_mask
from zsad.data.meta import read_meta, write_meta
from zsad.methods.aprilgan import AprilGAN
from zsad.train import load_checkpoint, read_config, read_log, resolve_settings, train

AUX_CLASSES = ["carpet", "nut"]


@pytest.fixture
def count_encoder(monkeypatch):
    """Counts the images that go through the image encoder."""
    seen = {"images": 0, "calls": 0}
    original = CLIPBackbone.encode_image

    def counting(self, images, *args, **kwargs):
        seen["images"] += images.shape[0]
        seen["calls"] += 1
        return original(self, images, *args, **kwargs)

    monkeypatch.setattr(CLIPBackbone, "encode_image", counting)
    return seen


def run(root, out, cache, **kwargs):
    options = dict(backbone="zsad-tiny", weights="random", classes=AUX_CLASSES, cache=cache, progress=False)
    return train("aprilgan", root, out, **{**options, **kwargs})


def learned(out):
    return load_file(str(out / "model.safetensors"))


def test_settings_follow_class_then_preset_then_arguments():
    s = resolve_settings(AprilGAN, None)
    assert (s.epochs, s.lr, s.betas, s.batch_size, s.seed, s.mosaic) == (15, 1e-3, (0.5, 0.999), 8, 111, 0.0)
    s = resolve_settings(AprilGAN, "aux-mvtec")
    assert (s.epochs, s.mosaic) == (3, 0.2)
    assert resolve_settings(AprilGAN, "aux-mvtec", epochs=1).epochs == 1
    with pytest.raises(ValueError, match="no training preset 'mvtec'"):
        resolve_settings(AprilGAN, "mvtec")
    with pytest.raises(ValueError, match="mosaic is a probability"):
        resolve_settings(AprilGAN, None, mosaic=2.0)


def test_encoder_runs_only_in_the_first_epoch(synthad_root, tmp_path, count_encoder):
    out = run(synthad_root, tmp_path / "ck", tmp_path / "cache", epochs=3, batch_size=16)
    n = len(load_dataset(synthad_root, "test", 128, AUX_CLASSES))
    log = read_log(out)
    assert [row["encoded_images"] for row in log] == [n, 0, 0]
    assert count_encoder["images"] == n  # nothing else ran the encoder (text does not count)
    assert len(log) == 3 and all(row["loss"] > 0 for row in log)
    assert log[-1]["loss"] < log[0]["loss"]  # the heads learn something from the cached features
    assert {"loss_layer2", "loss_layer6", "seconds"} <= set(log[0])


def test_mosaic_items_run_the_encoder_and_nothing_else_does(synthad_root, tmp_path, count_encoder):
    cache = tmp_path / "cache"
    run(synthad_root, tmp_path / "warm", cache, epochs=1, batch_size=16)  # fills the cache
    before = count_encoder["images"]
    out = run(synthad_root, tmp_path / "mosaic", cache, epochs=2, batch_size=16, mosaic=0.5)
    encoded = [row["encoded_images"] for row in read_log(out)]
    n = len(load_dataset(synthad_root, "test", 128, AUX_CLASSES))
    assert all(0.25 * n < e < 0.75 * n for e in encoded)  # about half the items became mosaics
    assert count_encoder["images"] - before == sum(encoded)


def test_mosaic_stitches_four_images_and_their_masks(synthad_root, monkeypatch):
    dataset = load_dataset(synthad_root, "test", 128, ["carpet"])
    loaded = []
    original = train_mod.load_pair

    def spy(image_path, mask_path):
        pair = original(image_path, mask_path)
        loaded.append(pair)
        return pair

    monkeypatch.setattr(train_mod, "load_pair", spy)
    for seed in range(6):
        image, mask, label = train_mod.mosaic_item(dataset, "carpet", np.random.default_rng(seed))
        assert image.shape == (3, 128, 128) and mask.shape == (128, 128)
        tiles = loaded[-4:]
        corners = [(slice(0, 64), slice(0, 64)), (slice(0, 64), slice(64, 128))]
        corners += [(slice(64, 128), slice(0, 64)), (slice(64, 128), slice(64, 128))]
        for (tile_image, tile_mask), (rows, cols) in zip(tiles, corners, strict=True):
            # each quadrant is its own tile, image and mask, preprocessed at half size: equal away from the
            # seams (3 pixels: the bicubic / bilinear supports reach across them); measured difference 0.0
            tile_at_half = preprocess_image(tile_image, 64)
            assert torch.allclose(image[:, rows, cols][:, 3:-3, 3:-3], tile_at_half[:, 3:-3, 3:-3])
            mask_at_half = preprocess_mask(tile_mask, 64, dataset.mask_interpolation)
            assert torch.equal(mask[rows, cols][3:-3, 3:-3], mask_at_half[3:-3, 3:-3])
            if not tile_mask.any():
                assert not mask[rows, cols].any()
        assert label == int(any(m.any() for _, m in tiles))


def test_training_is_deterministic_and_resume_equals_one_run(synthad_root, tmp_path):
    cache = tmp_path / "cache"
    whole = run(synthad_root, tmp_path / "whole", cache, epochs=3, batch_size=16, mosaic=0.3)
    again = run(synthad_root, tmp_path / "again", cache, epochs=3, batch_size=16, mosaic=0.3)
    part = run(synthad_root, tmp_path / "part", cache, epochs=1, batch_size=16, mosaic=0.3)
    assert read_config(part)["epochs_done"] == 1
    resumed = train("aprilgan", None, part, resume=True, epochs=3, cache=cache, progress=False)
    a, b, c = learned(whole), learned(again), learned(resumed)
    assert set(a) == set(c)
    for key in a:
        assert torch.equal(a[key], b[key]) and torch.equal(a[key], c[key]), key
    assert [r["epoch"] for r in read_log(resumed)] == [1, 2, 3]
    first = run(synthad_root, tmp_path / "seed2", cache, epochs=1, batch_size=16, seed=2)
    assert not torch.equal(learned(first)["fc.0.weight"], learned(part)["fc.0.weight"])


def test_inverse_epoch_lr_decay_is_per_epoch_and_survives_resume(synthad_root, tmp_path, monkeypatch):
    """lr_decay="inverse-epoch" (MFP-CLIP's 1/(epoch+1)): epoch e (0-based) runs at lr / (e + 1); a resumed
    run sets it from the epoch, so it ends where an uninterrupted one does. The default stays constant."""
    assert resolve_settings(AprilGAN, None).lr_decay == "none"
    assert [resolve_settings(AprilGAN, None).epoch_lr(e) for e in range(3)] == [1e-3] * 3
    with pytest.raises(ValueError, match="lr_decay must be one of"):
        train_mod.TrainSettings(lr_decay="cosine").check()
    settings = {**AprilGAN.train_settings, "lr_decay": "inverse-epoch"}
    monkeypatch.setattr(AprilGAN, "train_settings", settings)
    cache, part = tmp_path / "cache", tmp_path / "part"
    run(synthad_root, part, cache, epochs=1, batch_size=16)
    run(synthad_root, tmp_path / "whole", cache, epochs=2, batch_size=16)
    train("aprilgan", None, part, resume=True, epochs=2, cache=cache, progress=False)
    for out in (part, tmp_path / "whole"):
        state = torch.load(out / "train_state.pt", weights_only=True)
        assert state["optimizer"]["param_groups"][0]["lr"] == pytest.approx(1e-3 / 2)
        assert read_config(out)["train"]["lr_decay"] == "inverse-epoch"
    a, b = learned(part), learned(tmp_path / "whole")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_crash_while_writing_leaves_the_last_checkpoint_whole(synthad_root, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    out = run(synthad_root, tmp_path / "ck", cache, epochs=1, batch_size=16)
    epoch1 = learned(out)
    real_save = train_mod.save_file

    def crash(tensors, path):
        real_save(tensors, path)
        with open(path, "r+b") as handle:  # a half-written temporary file, then the process dies
            handle.truncate(100)
        raise KeyboardInterrupt

    monkeypatch.setattr(train_mod, "save_file", crash)
    with pytest.raises(KeyboardInterrupt):
        train("aprilgan", None, out, resume=True, epochs=2, cache=cache, progress=False)
    monkeypatch.setattr(train_mod, "save_file", real_save)
    assert read_config(out)["epochs_done"] == 1
    for key, value in learned(out).items():
        assert torch.equal(value, epoch1[key])
    detector = load_checkpoint(out)
    assert torch.equal(detector.learned.fc[0].weight.detach(), epoch1["fc.0.weight"])


def test_existing_checkpoint_needs_resume_or_overwrite(synthad_root, tmp_path):
    out = run(synthad_root, tmp_path / "ck", tmp_path / "cache", epochs=1, batch_size=32)
    with pytest.raises(FileExistsError, match="--resume"):
        run(synthad_root, out, tmp_path / "cache", epochs=1)
    with pytest.raises(ValueError, match="holds a 'aprilgan' checkpoint"):
        train("clipad-sdp-plus", synthad_root, out, backbone="zsad-tiny", weights="random", progress=False)


def test_checkpoint_fixes_backbone_and_options(synthad_root, tmp_path):
    out = run(synthad_root, tmp_path / "ck", tmp_path / "cache", epochs=1, batch_size=32)
    config = json.loads((out / "config.json").read_text())
    assert config["method"] == "aprilgan" and config["backbone"] == "zsad-tiny"
    assert config["train"]["epochs"] == 1 and config["aux"]["classes"] == AUX_CLASSES
    with pytest.raises(ValueError, match="'aprilgan' checkpoint, not 'clipad-sdp-plus'"):
        load_checkpoint(out, "clipad-sdp-plus")
    with pytest.raises(ValueError, match="image_size=128"):
        load_checkpoint(out, image_size=256)
    with pytest.raises(ValueError, match="fixed by the checkpoint"):
        load_checkpoint(out, layers=[1, 2, 3, 4])
    detector = load_checkpoint(out, image_score="text")  # an inference option may change
    assert detector.options["image_score"] == "text"


def test_training_free_methods_are_refused(synthad_root, tmp_path):
    with pytest.raises(ValueError, match="training-free"):
        train("winclip", synthad_root, tmp_path / "x")


def test_an_option_the_method_lacks_is_named_before_anything_loads(synthad_root, tmp_path):
    """``lam`` is AnomalyCLIP's; MFP-CLIP has none. SDP+ takes SDP's options through ``**options``."""
    from zsad import methods

    with pytest.raises(ValueError, match=r"mfpclip has no option 'lam'; its options: layers, i2tp"):
        train("mfpclip", synthad_root, tmp_path / "x", backbone="zsad-tiny", lam=1.0)
    assert not (tmp_path / "x").exists()
    assert "legacy_aliasing" in methods.option_names(methods.get_class("clipad-sdp-plus"))
    with pytest.raises(ValueError, match="clipad-sdp-plus has no option 'dpam'"):
        methods.create("clipad-sdp-plus", "zsad-tiny", dpam="vv")


def _meta_subset(root, tmp_path, keep):
    meta = read_meta(root / "meta.json")
    test = {c: [dict(r) for r in meta["test"][c] if keep(r)] for c in AUX_CLASSES}
    path = tmp_path / "meta.json"
    write_meta({"train": {}, "test": test}, path)
    return path


def test_aux_without_anomalies_or_masks_is_a_clear_error(synthad_root, tmp_path):
    only_good = _meta_subset(synthad_root, tmp_path, lambda r: int(r["anomaly"]) == 0)
    with pytest.raises(DataError, match="no anomalous images"):
        run(synthad_root, tmp_path / "a", tmp_path / "cache", meta=only_good)
    no_masks = _meta_subset(synthad_root, tmp_path, lambda r: True)
    meta = read_meta(no_masks)
    for records in meta["test"].values():
        for r in records:
            r["mask_path"] = ""
    write_meta(meta, no_masks)
    with pytest.raises(DataError, match="no pixel masks"):
        run(synthad_root, tmp_path / "b", tmp_path / "cache", meta=no_masks)


def test_fine_tuning_starts_from_init_from_and_trains_on_the_train_split(synthad_root, tmp_path):
    """``init_from`` replaces the random initialisation (lr 1e-30 keeps it to 1e-12) and ``split="train"``
    reads only the train half that :func:`finetuning_split` cut from the test split."""
    from zsad.data.meta import finetuning_split

    cache = tmp_path / "cache"
    start = run(synthad_root, tmp_path / "start", cache, epochs=1, batch_size=32)
    split, rule = finetuning_split(read_meta(synthad_root), "carpet", seed=3)
    assert "two seeded halves" in rule
    tune, held = split["train"]["carpet"], split["test"]["carpet"]
    assert not {r["img_path"] for r in tune} & {r["img_path"] for r in held}
    assert {r["img_path"] for r in tune} | {r["img_path"] for r in held} == {
        r["img_path"] for r in read_meta(synthad_root)["test"]["carpet"]
    }
    assert abs(sum(int(r["anomaly"]) for r in tune) - sum(int(r["anomaly"]) for r in held)) <= 1
    meta = write_meta(split, tmp_path / "finetune.json")
    options = dict(meta=meta, split="train", classes=["carpet"], init_from=start, epochs=1)
    frozen = run(synthad_root, tmp_path / "frozen", cache, lr=1e-30, **options)
    for key, value in learned(start).items():
        assert (learned(frozen)[key] - value).abs().max() < 1e-12, key
    tuned = run(synthad_root, tmp_path / "tuned", cache, **options)
    config = read_config(tuned)
    assert config["aux"]["split"] == "train" and config["aux"]["images"] == len(tune)
    assert config["init_from"] == str(start)
    assert not torch.equal(learned(tuned)["fc.0.weight"], learned(start)["fc.0.weight"])
    fresh = run(synthad_root, tmp_path / "fresh", cache, **{**options, "init_from": None})
    assert not torch.equal(learned(fresh)["fc.0.weight"], learned(tuned)["fc.0.weight"])


def test_fine_tuning_input_errors_are_clear(synthad_root, tmp_path):
    from zsad.data.meta import finetuning_split

    with pytest.raises(DataError, match="no anomalous images"):  # SynthAD's own train split is normal-only
        run(synthad_root, tmp_path / "a", tmp_path / "cache", split="train")
    with pytest.raises(ValueError, match="split must be"):
        run(synthad_root, tmp_path / "b", tmp_path / "cache", split="val")
    with pytest.raises(FileNotFoundError, match="not a zsad checkpoint directory"):
        run(synthad_root, tmp_path / "c", tmp_path / "cache", init_from=tmp_path)
    with pytest.raises(DataError, match="not in the test split"):
        finetuning_split(read_meta(synthad_root), "no-such-class")


def test_train_with_validation_keeps_the_best_epoch_of_the_plain_run(synthad_root, tmp_path):
    """The success path of validation selection (docs/methods.md pitfall 14): one row per epoch, ``best``
    holds the epoch with the highest validation value, and its weights are those of a plain run of that many
    epochs (``resume`` replays the uninterrupted run exactly)."""
    from zsad.evaluate import evaluate
    from zsad.tiny import embedded_aux_root
    from zsad.train import train_with_validation

    # the shipped weights and the default cache: the embedded set's frozen features are already there
    options = dict(backbone="zsad-tiny", classes=["carpet"])
    best, rows = train_with_validation(
        "aprilgan", embedded_aux_root(), synthad_root, tmp_path / "val", metric="pixel_auroc",
        val_classes=["tile"], epochs=2, **options,
    )  # fmt: skip
    assert [r["epoch"] for r in rows] == [1, 2]
    winner = max(rows, key=lambda r: r["pixel_auroc"])
    assert read_config(best)["epochs_done"] == winner["epoch"]
    plain = train("aprilgan", embedded_aux_root(), tmp_path / "plain", epochs=winner["epoch"], progress=False,
                  **options)  # fmt: skip
    for key, value in learned(plain).items():
        assert torch.equal(learned(best)[key], value), key
    val = load_dataset(synthad_root, "test", 128, ["tile"])
    again = evaluate(load_checkpoint(best), val, progress=False).table.loc["mean", "pixel_auroc"]
    assert again == pytest.approx(winner["pixel_auroc"], abs=1e-12)
