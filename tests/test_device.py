"""Device and precision handling on a machine without CUDA (issue 16): the resolver, one-line refusals
before any weights load, and that the device, worker and checkpoint plumbing leaves CPU results unchanged.
The CUDA cases themselves are in tests/test_gpu.py (marker ``gpu``)."""

from __future__ import annotations

import json

import pandas as pd
import pytest
import torch
from safetensors.torch import load_file

from zsad import methods
from zsad.cli import main
from zsad.data import load_dataset
from zsad.device import DeviceError, available_devices, check_precision_on, resolve_device
from zsad.evaluate import evaluate
from zsad.train import STATE_FILE, load_checkpoint, train


@pytest.fixture
def two_gpus(monkeypatch):
    """torch reports two CUDA devices (nothing is ever run on them)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)


@pytest.fixture
def no_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)


def test_resolver_with_two_cuda_devices(two_gpus):
    assert available_devices() == ["cpu", "cuda:0", "cuda:1"]
    assert resolve_device("auto") == resolve_device(None) == torch.device("cuda:0")
    assert resolve_device("cuda") == torch.device("cuda:0")
    assert resolve_device("CUDA:1") == torch.device("cuda:1")
    assert resolve_device(torch.device("cpu")) == torch.device("cpu")
    with pytest.raises(DeviceError, match=r"'cuda:2' does not exist.*available: cpu, cuda:0, cuda:1"):
        resolve_device("cuda:2")
    assert check_precision_on("fp16", torch.device("cuda:1")) == "fp16"


def test_resolver_without_cuda(no_cuda):
    assert resolve_device("auto") == torch.device("cpu")
    with pytest.raises(DeviceError, match=r"'cuda:0' does not exist on this machine; available: cpu$"):
        resolve_device("cuda")
    for bad in ("gpu", "cuda:x", "mps"):
        with pytest.raises(DeviceError, match="auto, cpu, cuda, cuda:N"):
            resolve_device(bad)
    with pytest.raises(DeviceError, match="fp16 needs a CUDA device"):
        check_precision_on("fp16", torch.device("cpu"))
    with pytest.raises(DeviceError, match="precision must be one of fp32, bf16, fp16"):
        check_precision_on("int8", torch.device("cpu"))


@pytest.mark.parametrize(
    ("command", "flags", "expected"),
    [
        ("eval", ["--device", "cuda"], "does not exist on this machine; available: cpu"),
        ("eval", ["--device", "tpu:0"], "unknown device 'tpu:0'"),
        ("eval", ["--precision", "fp16", "--device", "cpu"], "fp16 needs a CUDA device"),
        ("train", ["--device", "cuda:1"], "available: cpu"),
        ("train", ["--precision", "fp16"], "fp16 needs a CUDA device"),
        ("predict", ["--device", "cuda"], "available: cpu"),
        ("calibrate", ["--device", "cuda"], "available: cpu"),
        ("calibrate", ["--precision", "fp16"], "fp16 needs a CUDA device"),
    ],
)
def test_cli_refuses_a_device_it_lacks_in_one_line_before_loading(
    command, flags, expected, no_cuda, tmp_path, capsys, monkeypatch
):
    # Weights that do not exist and a dataset that does not exist: the device error must come first.
    def no_loading(*args, **kwargs):
        raise AssertionError("weights were loaded before the device was checked")

    monkeypatch.setattr("zsad.backbone.load_clip", no_loading)
    common = ["--method", "aprilgan", "--backbone", "zsad-tiny", "--weights", str(tmp_path / "none.pt")]
    where = {
        "eval": ["--data", str(tmp_path / "absent")],
        "train": ["--aux", str(tmp_path / "absent"), "--out", str(tmp_path / "out")],
        "predict": [str(tmp_path / "x.png"), "--out", str(tmp_path / "out")],
        "calibrate": ["--data", str(tmp_path / "absent"), "--out", str(tmp_path / "out")],
    }[command]
    assert main([command, *common, *where, *flags]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("zsad: error: ") and expected in err[0], err


def test_create_moves_a_loaded_backbone_and_refuses_fp16_on_cpu(tiny_random):
    detector = methods.create("aprilgan", backbone=tiny_random, device="cpu")
    assert detector.backbone.device == torch.device("cpu")
    assert all(p.device == torch.device("cpu") for p in detector.learned.parameters())
    with pytest.raises(ValueError, match="fp16 needs a CUDA device"):
        methods.create("clip", backbone=tiny_random, precision="fp16")
    with pytest.raises(ValueError, match="fp16 autocast needs a CUDA device"):
        tiny_random.encode_image(
            torch.zeros(1, 3, tiny_random.image_size, tiny_random.image_size), autocast=torch.float16
        )


def test_device_cpu_flag_gives_the_numbers_of_no_flag(synthad_root, tmp_path):
    # The shipped weights: two "random" loads in one process would draw two different seeds.
    base = ["eval", "--method", "clip", "--data", str(synthad_root), "--backbone", "zsad-tiny"]
    base += ["--classes", "nut", "--image-size", "112"]
    assert main([*base, "--out", str(tmp_path / "plain"), "--workers", "0"]) == 0
    assert main([*base, "--out", str(tmp_path / "cpu"), "--device", "cpu", "--workers", "2"]) == 0
    for name in ("metrics.csv", "scores.csv"):
        pd.testing.assert_frame_equal(
            pd.read_csv(tmp_path / "plain" / name), pd.read_csv(tmp_path / "cpu" / name)
        )


def test_workers_do_not_change_evaluation_or_training(synthad_root, tiny_trained, tmp_path):
    data = load_dataset(synthad_root, "test", image_size=tiny_trained.image_size, classes=["wood"])
    detector = methods.create("clip", backbone=tiny_trained)
    serial = evaluate(detector, data, progress=False, workers=0)
    parallel = evaluate(detector, data, progress=False, workers=2)
    pd.testing.assert_frame_equal(serial.table, parallel.table)
    pd.testing.assert_frame_equal(serial.scores, parallel.scores)

    options = dict(
        backbone="zsad-tiny",
        weights="random",
        image_size=112,
        classes=["nut"],
        epochs=2,
        batch_size=8,
        progress=False,
    )
    options["mosaic"] = 0.3  # mosaics are drawn in the main process, so the draws must not depend on workers
    a = train("aprilgan", synthad_root, tmp_path / "w0", cache=tmp_path / "c0", workers=0, **options)
    # Epoch 2 reads the features kept on the device (the CPU here) instead of the disk cache.
    b = train(
        "aprilgan",
        synthad_root,
        tmp_path / "w2",
        cache=tmp_path / "c2",
        workers=2,
        features_on_device=True,
        **options,
    )
    first, second = (load_file(str(out / "model.safetensors")) for out in (a, b))
    for key in first:
        assert torch.equal(first[key], second[key]), key


def test_calibrate_workers_give_the_thresholds_of_no_workers(synthad_root, tmp_path):
    base = ["calibrate", "--method", "clip", "--backbone", "zsad-tiny", "--data", str(synthad_root)]
    base += ["--classes", "carpet,wood", "--batch-size", "4"]
    for workers in (0, 2):
        assert main([*base, "--workers", str(workers), "--out", str(tmp_path / f"w{workers}")]) == 0
    serial, parallel = (json.loads((tmp_path / f"w{n}" / "thresholds.json").read_text()) for n in (0, 2))
    assert serial["classes"] == parallel["classes"] and serial["classes"]["wood"]["counts"]["anomalous"] > 0
    with pytest.raises(SystemExit) as refused:  # argparse's own one-line usage error
        main([*base, "--workers", "-1", "--out", str(tmp_path / "bad")])
    assert refused.value.code == 2


def test_checkpoint_holds_cpu_tensors_and_loads_with_a_map_location(synthad_root, tmp_path):
    out = train(
        "clipad-sdp-plus",
        synthad_root,
        tmp_path / "ckpt",
        backbone="zsad-tiny",
        weights="random",
        image_size=112,
        classes=["nut"],
        epochs=1,
        cache=tmp_path / "cache",
        device="cpu",
        progress=False,
    )
    state = torch.load(out / STATE_FILE, map_location="cpu", weights_only=True)

    def devices(obj):
        if isinstance(obj, torch.Tensor):
            return {obj.device.type}
        if isinstance(obj, dict):
            return set().union(*map(devices, obj.values())) if obj else set()
        return set()

    assert devices(state["optimizer"]["state"]) == devices(state["learned"]) == {"cpu"}
    assert state["scaler"] == {}  # fp32 training has no loss scaler
    detector = load_checkpoint(out, device="cpu")
    saved = load_file(str(out / "model.safetensors"))
    for key, value in detector.learned_state().items():
        assert torch.equal(value, saved[key]), key
