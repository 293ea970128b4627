"""The emulated CUDA device (tests/emulated_cuda.py) and the CLI on it (issue 16, docs/gpu.md).

First the emulator itself: it must raise where CUDA raises and compute what the CPU computes, or the
``[emulated-...]`` cases of tests/test_gpu.py would prove nothing. Then every CLI verb that takes
``--device`` (train -> calibrate -> eval -> predict with references) run with ``--device cuda`` on the
emulated card: its files must equal the ``--device cpu`` run's, and a placement mistake planted in the
backbone must stop it.
"""

from __future__ import annotations

import contextlib
import json

import emulated_cuda as emulator
import numpy as np
import pandas as pd
import pytest
import torch
from emulated_cuda import EMULATED, DeviceTensor, PlacementError, emulated_cuda

from zsad import methods
from zsad.backbone import CLIPBackbone
from zsad.cache import FeatureCache
from zsad.cli import main
from zsad.data import load_dataset
from zsad.evaluate import evaluate


@pytest.fixture
def cuda(monkeypatch):
    with emulated_cuda(monkeypatch) as device:
        yield device


def test_placement_follows_cuda_rules(cuda):
    on_device = torch.arange(6.0, device="cuda").reshape(2, 3)
    assert isinstance(on_device, DeviceTensor) and on_device.device == EMULATED and on_device.is_cuda
    assert (on_device * 2).device == EMULATED  # results stay on the device
    assert (on_device * torch.tensor(2.0)).device == EMULATED  # a 0-d CPU tensor is a scalar, as on CUDA
    assert on_device[torch.tensor([1])].device == EMULATED  # CPU index tensors are allowed, as on CUDA
    with pytest.raises(PlacementError, match="same device"):
        on_device + torch.ones(2, 3)
    with pytest.raises(PlacementError, match="same device"):
        torch.zeros(3)[torch.tensor([1], device="cuda")]  # a device index into a CPU tensor
    with pytest.raises(PlacementError, match="same device"):
        torch.nn.Linear(3, 1)(on_device)  # weights left on the CPU
    with pytest.raises(RuntimeError, match="numpy"):
        on_device.numpy()
    back = on_device.cpu()
    assert type(back) is torch.Tensor and back.device.type == "cpu"
    assert torch.equal(back, torch.arange(6.0).reshape(2, 3))
    assert torch.tensor([1, 2], device=on_device.device).device == EMULATED


def test_modules_autograd_and_optimisers_match_the_cpu(cuda):
    def one_step(device: str) -> tuple[torch.Tensor, torch.Tensor]:
        torch.manual_seed(0)
        layer = torch.nn.Linear(4, 3)
        prompt = torch.nn.Parameter(torch.randn(2, 4))  # kept on the CPU and moved in the forward
        layer.to(device)
        optimiser = torch.optim.AdamW([*layer.parameters(), prompt], lr=0.1)
        x = torch.randn(5, 4, generator=torch.Generator().manual_seed(1)).to(device)
        loss = layer(torch.cat([x, prompt.to(device)])).square().mean()
        loss.backward()
        optimiser.step()
        return layer.weight.detach().cpu(), prompt.grad.cpu()

    weight_cpu, grad_cpu = one_step("cpu")
    weight_dev, grad_dev = one_step("cuda")
    assert torch.equal(weight_dev, weight_cpu) and torch.equal(grad_dev, grad_cpu)

    moved = torch.nn.Linear(4, 3).to("cuda")
    moved.load_state_dict({"weight": torch.ones(3, 4), "bias": torch.zeros(3)})
    assert isinstance(moved.weight, DeviceTensor) and torch.equal(moved.weight.cpu(), torch.ones(3, 4))


def test_a_method_on_the_device_matches_the_cpu_and_a_planted_slip_is_caught(cuda, monkeypatch):
    images = torch.randn(2, 3, 128, 128, generator=torch.Generator().manual_seed(0))
    results = []
    for device in ("cpu", "cuda"):
        torch.manual_seed(0)
        detector = methods.create("aprilgan", backbone="zsad-tiny", device=device)
        scores, maps = detector.predict(images, ["nut", "wood"])
        results.append((scores.cpu(), maps.cpu()))
    for on_cpu, on_device in zip(*results, strict=True):
        torch.testing.assert_close(on_device, on_cpu, atol=1e-5, rtol=0)

    # The slip a first GPU run finds: the images are not moved to the backbone's device.
    monkeypatch.setattr(CLIPBackbone, "_check_images", lambda self, images: images)
    with pytest.raises(PlacementError, match="same device"):
        detector.predict(images, ["nut", "wood"])


@pytest.mark.parametrize("method", methods.available())
def test_evaluation_from_a_feature_cache_on_the_device_equals_the_cpu(
    method, synthad_root, tmp_path, monkeypatch
):
    """Features come back from the disk cache as CPU tensors and must be placed where the method expects
    them (the backbone's device; WinCLIP's window scoring: the CPU)."""
    tables = {}
    for device in ("cpu", "cuda"):
        with emulated_cuda(monkeypatch) if device == "cuda" else contextlib.nullcontext():
            torch.manual_seed(0)
            detector = methods.create(method, backbone="zsad-tiny", device=device)
            if detector.few_shot:
                good = load_dataset(synthad_root, "train", image_size=detector.image_size, classes=["wood"])
                detector.fit_few_shot(torch.stack([good[i]["image"] for i in range(2)]), ["wood", "wood"])
            data = load_dataset(synthad_root, "test", image_size=detector.image_size, classes=["wood"])
            cache = FeatureCache(tmp_path / device)
            run = dict(cache=cache, max_images_per_class=6, batch_size=4, progress=False)
            fresh, cached = evaluate(detector, data, **run), evaluate(detector, data, **run)
            assert cache.hits == 6, "the second pass must read every image's features from the cache"
            pd.testing.assert_frame_equal(cached.scores, fresh.scores, atol=1e-6)
            tables[device] = cached.scores
    pd.testing.assert_frame_equal(tables["cuda"], tables["cpu"], atol=1e-5)


def _pipeline(device: str, root, tmp_path, monkeypatch) -> dict[str, object]:
    """train (1 epoch) -> calibrate -> eval (twice with a feature cache: fills it, then reads it) ->
    predict with references, every step on ``device``; counts the operations each step ran on the
    emulated device."""
    where = tmp_path / device
    monkeypatch.setenv("ZSAD_CACHE", str(where / "eval-cache"))  # each device its own cache
    tiny = ["--backbone", "zsad-tiny", "--device", device]
    ck = where / "ck"
    from_ck = ["--method", "aprilgan", "--checkpoint", str(ck), *tiny]
    good = sorted((root / "wood" / "train" / "good").glob("*.png"))[:2]
    query = sorted((root / "wood" / "test").glob("[!g]*/*.png"))[:2]
    wood = ["--data", str(root), "--classes", "wood"]
    steps = {
        "train": ["train", "--method", "aprilgan", "--aux", str(root), "--classes", "nut", "--epochs", "1"]
        + [*tiny, "--cache", str(where / "cache"), "--out", str(ck)],
        "calibrate": ["calibrate", *from_ck, *wood, "--out", str(where / "th")],
        "eval": ["eval", *from_ck, *wood, "--out", str(where / "eval"), "--workers", "2", "--cache"],
        "eval from the cache": ["eval", *from_ck, *wood, "--out", str(where / "eval2"), "--cache"],
        "predict": ["predict", *map(str, query), *from_ck, "--class-name", "wood", "--out", str(where / "p")]
        + ["--thresholds", str(where / "th" / "thresholds.json"), "--reference", *map(str, good)],
    }
    operations = {}
    for step, argv in steps.items():
        before = emulator.operations_on_device
        assert main(argv) == 0, step
        operations[step] = emulator.operations_on_device - before
    thresholds = json.loads((where / "th" / "thresholds.json").read_text())["classes"]["wood"]
    return {
        "operations": operations,
        "learned": torch.load(ck / "train_state.pt", weights_only=True)["learned"],
        "thresholds": [thresholds[level]["threshold"] for level in ("image", "pixel")],
        "metrics": pd.read_csv(where / "eval" / "metrics.csv"),
        "scores": pd.read_csv(where / "eval" / "scores.csv"),
        "cached scores": pd.read_csv(where / "eval2" / "scores.csv"),
        "predicted": pd.read_csv(where / "p" / "scores.csv"),
        "maps": [np.load(p) for p in sorted((where / "p").glob("*_map.npy"))],
    }


def test_cli_train_calibrate_eval_predict_on_the_device_equal_the_cpu(synthad_root, tmp_path, monkeypatch):
    on_cpu = _pipeline("cpu", synthad_root, tmp_path, monkeypatch)
    with emulated_cuda(monkeypatch):
        on_device = _pipeline("cuda", synthad_root, tmp_path, monkeypatch)
    assert set(on_cpu["operations"].values()) == {0}
    # Every step ran on the device (measured: train 4,941 operations, eval 2,949, from the cache 1,183).
    assert min(on_device["operations"].values()) > 500, on_device["operations"]
    # The checkpoint holds CPU tensors (loaded above without a map_location), equal to the CPU run's.
    for key, value in on_cpu["learned"].items():
        assert type(on_device["learned"][key]) is torch.Tensor, key
        torch.testing.assert_close(on_device["learned"][key], value, atol=1e-5, rtol=0, msg=key)
    np.testing.assert_allclose(on_device["thresholds"], on_cpu["thresholds"], atol=1e-5)
    for name in ("metrics", "scores", "cached scores"):
        pd.testing.assert_frame_equal(on_device[name], on_cpu[name], atol=1e-5)
    pd.testing.assert_frame_equal(
        on_device["predicted"].drop(columns="image"), on_cpu["predicted"].drop(columns="image"), atol=1e-5
    )
    assert len(on_cpu["maps"]) == 2
    for a, b in zip(on_device["maps"], on_cpu["maps"], strict=True):
        np.testing.assert_allclose(a, b, atol=1e-5)
