"""CUDA against the CPU (issue 16; docs/gpu.md): every method's maps and scores, one epoch of every trained
method, checkpoints across devices, half precisions, loader workers.

Each placement case runs twice, by the ``accelerator`` fixture:

- ``[cuda-...]``: a real card, random ViT-B-16-plus-240 weights. Marked ``gpu``: ``pytest -m gpu`` runs them
  (benchmarks/gpu_check.sh does); skipped with "CUDA not available" elsewhere.
- ``[emulated-...]``: tests/emulated_cuda.py's emulated ``cuda:0`` on the CPU, zsad-tiny. Part of the default
  run: a tensor left on the CPU, a ``.numpy()`` of a device tensor, or pickled device tensors fail here
  as they would on a card. It cannot judge CUDA's arithmetic or autocast, so the half-precision cases
  run on a real card only.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import pandas as pd
import pytest
import torch
from emulated_cuda import emulated_cuda
from safetensors.torch import load_file

from zsad import methods
from zsad.backbone import load_clip
from zsad.data import load_dataset
from zsad.evaluate import evaluate
from zsad.methods.base import TrainableDetector
from zsad.train import STATE_FILE, load_checkpoint, train

TRAINED = [m for m in methods.available() if issubclass(methods.get_class(m), TrainableDetector)]
CLASSES = ["nut", "wood"]
REAL_CUDA = pytest.param(
    "cuda",
    marks=[pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA not available")],
)


@dataclass(frozen=True)
class Accelerator:
    device: str
    backbone: str  # for the random-weight comparisons


@pytest.fixture(params=[REAL_CUDA, "emulated"])
def accelerator(request, monkeypatch) -> Iterator[Accelerator]:
    if request.param == "cuda":
        yield Accelerator("cuda", "ViT-B-16-plus-240")
        return
    with emulated_cuda(monkeypatch) as device:
        yield Accelerator(str(device), "zsad-tiny")


@pytest.fixture(params=[REAL_CUDA])
def cuda(request) -> str:
    """A real card only (autocast and loss scaling cannot be emulated)."""
    return request.param


def random_detector(method: str, backbone: str, device: str):
    """``method`` on seeded random ``backbone`` weights, its learned parts seeded too, built on ``device``."""
    clip = load_clip(backbone, pretrained="random", seed=0, device=device)
    torch.manual_seed(1)
    return methods.create(method, backbone=clip)


def images_for(size: int, count: int, seed: int) -> torch.Tensor:
    return torch.randn(count, 3, size, size, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("method", methods.available())
def test_maps_and_scores_on_cuda_fp32_equal_the_cpu(method, accelerator):
    outputs = {}
    for device in ("cpu", accelerator.device):
        detector = random_detector(method, accelerator.backbone, device)
        size = detector.image_size
        if method in ("winclip-fewshot", "aprilgan"):  # the few-shot memory lives on the device too
            detector.fit_few_shot(images_for(size, 2, seed=3), CLASSES)
        scores, maps = detector.predict(images_for(size, 2, seed=4), CLASSES)
        outputs[device] = (scores.float().cpu(), maps.float().cpu())
    for on_cpu, on_device in zip(outputs["cpu"], outputs[accelerator.device], strict=True):
        torch.testing.assert_close(on_device, on_cpu, atol=1e-4, rtol=0)


@pytest.mark.parametrize("method", TRAINED)
def test_one_epoch_on_cuda_learns_the_cpu_parts(method, accelerator, synthad_root, tmp_path):
    learned = {}
    for device in ("cpu", accelerator.device):  # separate caches: the devices never share features
        out = train(
            method,
            synthad_root,
            tmp_path / f"run-{device}",
            backbone="zsad-tiny",
            classes=["nut"],
            epochs=1,
            cache=tmp_path / f"cache-{device}",
            device=device,
            progress=False,
        )
        learned[device] = load_file(str(out / "model.safetensors"))
    for key, value in learned["cpu"].items():
        torch.testing.assert_close(learned[accelerator.device][key], value, atol=1e-3, rtol=0, msg=key)


def test_a_cuda_checkpoint_evaluates_on_the_cpu(accelerator, synthad_root, tmp_path):
    out = train(
        "aprilgan",
        synthad_root,
        tmp_path / "run",
        backbone="zsad-tiny",
        classes=["nut"],
        epochs=1,
        cache=tmp_path / "cache",
        device=accelerator.device,
        progress=False,
    )
    state = torch.load(out / STATE_FILE, weights_only=True)  # no map_location: the file names no device
    assert all(v.device.type == "cpu" for v in state["learned"].values())
    results = {}
    for device in ("cpu", accelerator.device):
        detector = load_checkpoint(out, device=device)
        data = load_dataset(synthad_root, "test", image_size=detector.image_size, classes=["nut"])
        results[device] = evaluate(detector, data, progress=False)
    pd.testing.assert_frame_equal(results[accelerator.device].table, results["cpu"].table, atol=1e-4)


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
@pytest.mark.parametrize("method", ["clip", "winclip", "clipad-sdp", "aprilgan", "anomalyclip"])
def test_half_precision_aurocs_within_half_a_point_of_fp32(method, precision, cuda, synthad_root):
    means = {}
    for setting in ("fp32", precision):
        torch.manual_seed(0)  # the same (untrained) learned parts at every precision
        detector = methods.create(method, backbone="zsad-tiny", device=cuda, precision=setting)
        data = load_dataset(synthad_root, "test", image_size=detector.image_size, classes=CLASSES)
        means[setting] = evaluate(detector, data, progress=False).table.loc["mean"]
    for column in ("image_auroc", "pixel_auroc"):
        assert abs(means[precision][column] - means["fp32"][column]) <= 0.005, (column, means)


def test_workers_give_the_results_of_no_workers_on_cuda(accelerator, synthad_root, tmp_path):
    torch.manual_seed(0)
    detector = methods.create("clipad-sdp", backbone="zsad-tiny", device=accelerator.device)
    data = load_dataset(synthad_root, "test", image_size=detector.image_size, classes=CLASSES)
    serial = evaluate(detector, data, progress=False, workers=0)
    parallel = evaluate(detector, data, progress=False, workers=2)
    pd.testing.assert_frame_equal(serial.table, parallel.table)
    runs = [
        train(
            "aprilgan",
            synthad_root,
            tmp_path / f"w{workers}",
            backbone="zsad-tiny",
            classes=["nut"],
            epochs=2,
            mosaic=0.3,
            cache=tmp_path / f"cache{workers}",
            device=accelerator.device,
            workers=workers,
            features_on_device=workers > 0,
            progress=False,
        )
        for workers in (0, 2)
    ]
    first, second = (load_file(str(out / "model.safetensors")) for out in runs)
    for key, value in first.items():
        torch.testing.assert_close(second[key], value, atol=1e-6, rtol=0, msg=key)


def test_fp16_training_keeps_its_loss_scaler_in_the_checkpoint(cuda, synthad_root, tmp_path):
    options = dict(backbone="zsad-tiny", classes=["nut"], cache=tmp_path / "cache", progress=False)
    whole = train(
        "aprilgan", synthad_root, tmp_path / "whole", epochs=2, device="cuda", precision="fp16", **options
    )
    part = train(
        "aprilgan", synthad_root, tmp_path / "part", epochs=1, device="cuda", precision="fp16", **options
    )
    assert torch.load(part / STATE_FILE, weights_only=True)["scaler"]["scale"] > 0
    resumed = train("aprilgan", None, part, resume=True, epochs=2, device="cuda", progress=False)
    a, b = load_file(str(whole / "model.safetensors")), load_file(str(resumed / "model.safetensors"))
    for key, value in a.items():
        torch.testing.assert_close(b[key], value, atol=1e-3, rtol=0, msg=key)
