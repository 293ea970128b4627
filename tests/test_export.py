"""ONNX export (issue 18): ONNX Runtime equals torch fp32 within 1e-4 for each exportable method, the
smoothing inside the graph equals scipy's, non-exportable settings and foreign files get one line."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

pytest.importorskip("onnx", reason="ONNX export needs the export extra: pip install 'zsad[export]'")
pytest.importorskip("onnxruntime", reason="ONNX export needs the export extra: pip install 'zsad[export]'")

from zsad import methods  # noqa: E402
from zsad.cli import main  # noqa: E402
from zsad.export import OnnxDetector, export_onnx, gaussian_smooth  # noqa: E402

TOL = 1e-4
REQUIRED = ("clip", "winclip", "clipad-sdp", "aprilgan", "anomalyclip")


@pytest.mark.parametrize(("sigma", "size"), [(4.0, 128), (8.0, 128), (8.0, 20)])
def test_gaussian_smoothing_in_the_graph_equals_scipy(sigma, size):
    from scipy.ndimage import gaussian_filter

    maps = torch.rand(2, size, size)
    expected = np.stack([gaussian_filter(m, sigma=sigma) for m in maps.numpy()])
    # size 20 with radius 32: the reflected border folds more than once, as scipy's does
    assert np.abs(gaussian_smooth(maps, sigma).numpy() - expected).max() < 1e-6


def _compare(detector, path, class_name="wood"):
    torch.manual_seed(1)
    images = torch.randn(3, 3, detector.image_size, detector.image_size)
    with torch.inference_mode():
        scores, maps = detector.predict(images, [class_name] * 3)
    export_onnx(detector, class_name, path)
    ort_scores, ort_maps = OnnxDetector(path).predict(images, [class_name] * 3)
    assert ort_maps.shape == maps.shape
    assert (ort_scores - scores).abs().max() < TOL
    assert (ort_maps - maps).abs().max() < TOL
    assert maps.std() > 0  # a map that varies: equality is not trivial


@pytest.mark.parametrize("method", REQUIRED)
def test_onnx_runtime_equals_torch_on_zsad_tiny(method, tiny_trained, tmp_path):
    _compare(methods.create(method, backbone=tiny_trained), tmp_path / f"{method}.onnx")


@pytest.mark.slow
@pytest.mark.parametrize(
    "method", ["winclip-fewshot", "aprilgan-fewshot", "clipad-sdp-plus", "mfpclip", "adaclip"]
)
def test_onnx_runtime_equals_torch_for_the_other_methods(method, tiny_trained, tmp_path):
    """Few-shot memories frozen in as constants; AdaCLIP with hsf=off (HSF's k-means is refused)."""
    name = method.removesuffix("-fewshot") if method == "aprilgan-fewshot" else method
    detector = methods.create(name, backbone=tiny_trained, **({"hsf": "off"} if name == "adaclip" else {}))
    if method.endswith("fewshot"):
        torch.manual_seed(2)
        detector.fit_few_shot(torch.randn(2, 3, 128, 128), ["wood", "wood"])
    _compare(detector, tmp_path / f"{method}.onnx")


@pytest.mark.slow
@pytest.mark.parametrize("method", REQUIRED)
def test_onnx_runtime_equals_torch_on_random_vit_b_16_plus_240(method, tmp_path):
    detector = methods.create(method, backbone="ViT-B-16-plus-240", weights="random")
    _compare(detector, tmp_path / f"{method}.onnx")


def test_export_and_predict_onnx_on_the_command_line(synthad_root, tiny_trained, tmp_path, capsys):
    model = tmp_path / "clip.onnx"
    base = ["--method", "clip", "--backbone", "zsad-tiny"]
    assert main(["export", *base, "--class-name", "wood", "--out", str(model)]) == 0
    images = [str(synthad_root / "wood" / "test" / "good" / "000.png")]
    images.append(str(sorted((synthad_root / "wood" / "test").glob("[!g]*/*.png"))[0]))
    assert main(["predict", *images, "--onnx", str(model), "--out", str(tmp_path / "onnx")]) == 0
    assert main(["predict", *images, *base, "--class-name", "wood", "--out", str(tmp_path / "torch")]) == 0
    onnx_rows, torch_rows = (pd.read_csv(tmp_path / d / "scores.csv") for d in ("onnx", "torch"))
    assert np.abs(onnx_rows["score"] - torch_rows["score"]).max() < TOL
    for a, b in zip(onnx_rows["map"], torch_rows["map"], strict=True):
        assert np.abs(np.load(tmp_path / "onnx" / a) - np.load(tmp_path / "torch" / b)).max() < TOL
    capsys.readouterr()
    # another class or image size than the export's, a file that is no model, HSF: one line each
    for argv, expected in (
        (["predict", images[0], "--onnx", str(model), "--class-name", "pill"], "exported for class 'wood'"),
        (["predict", images[0], "--onnx", str(model), "--image-size", "240"], "exported for image size 128"),
        (["predict", images[0], "--onnx", images[0]], "not a readable ONNX model"),
        (["export", "--method", "adaclip", "--backbone", "zsad-tiny", "--class-name", "wood"], "HSF"),
    ):
        out = tmp_path / "bad" / "x.onnx" if argv[0] == "export" else tmp_path / "bad"
        assert main([*argv, "--out", str(out)]) == 2
        err = capsys.readouterr().err
        errors = [line for line in err.splitlines() if line.startswith("zsad: error:")]
        assert len(errors) == 1 and expected in errors[0] and "Traceback" not in err
        assert not (tmp_path / "bad").exists()  # nothing half-written
