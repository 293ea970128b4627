"""ONNX Runtime vs torch fp32 images/s of the exported graphs, on this CPU, as a ratio (not a timed test).

For each method x backbone: build the detector (the shipped weights for zsad-tiny, random weights for the
open_clip architectures: the cost does not depend on the values), export it for one class
(:func:`zsad.export.export_onnx`), then time single-image prediction of the same SynthAD test images in
torch (``predict``, one image per call, inference mode) and in ONNX Runtime
(:class:`zsad.export.OnnxDetector`, which runs the graph one image at a time), alternating the two
``--repeats`` times (a busy machine slows both alike) and keeping each one's best. Both use ``--threads``
threads. Prints the CPU (``lscpu``'s model name), a table and the ratio.

    python benchmarks/bench_onnx.py [--methods clip winclip] [--backbones zsad-tiny ViT-B-16-plus-240]
        [--images 8] [--threads 2] [--repeats 3] [--csv out.csv]
"""

from __future__ import annotations

import argparse
import subprocess
import tempfile
import time
from pathlib import Path

import pandas as pd
import torch

from zsad import methods
from zsad.backbone import load_clip
from zsad.cache import default_synthad_root
from zsad.data import load_dataset
from zsad.data.synth import ensure
from zsad.export import OnnxDetector, export_onnx

METHODS = ("clip", "winclip", "clipad-sdp", "aprilgan", "anomalyclip")
CLASS = "wood"


def cpu_name() -> str:
    """``Model name`` from lscpu (the machines here differ: Intel with AMX, AMD EPYC)."""
    try:
        text = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return "unknown CPU (no lscpu)"
    names = [line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("Model name")]
    return names[0] if names else "unknown CPU"


def sample(size: int, count: int) -> torch.Tensor:
    test = load_dataset(ensure(default_synthad_root()), "test", image_size=size, classes=[CLASS])
    return torch.stack([test[i]["image"] for i in range(min(count, len(test)))])


def seconds(run, images: torch.Tensor) -> float:
    start = time.perf_counter()
    for i in range(len(images)):
        run(images[i : i + 1])
    return time.perf_counter() - start


def measure(method: str, backbone: str, count: int, threads: int, repeats: int, folder: Path) -> dict:
    torch.set_num_threads(threads)
    clip = load_clip(backbone, pretrained=None if backbone == "zsad-tiny" else "random")
    detector = methods.create(method, backbone=clip)
    images = sample(detector.image_size, count)
    path = export_onnx(detector, CLASS, folder / f"{method}-{backbone}.onnx")
    runner = OnnxDetector(path, threads=threads)

    def torch_run(x: torch.Tensor) -> None:
        with torch.inference_mode():
            detector.predict(x, [CLASS])

    def onnx_run(x: torch.Tensor) -> None:
        runner.predict(x, [CLASS])

    torch_run(images[:1]), onnx_run(images[:1])  # warm-up: caches, allocator, ORT's first-run planning
    torch_best = onnx_best = float("inf")
    for _ in range(repeats):
        torch_best = min(torch_best, seconds(torch_run, images))
        onnx_best = min(onnx_best, seconds(onnx_run, images))
    torch_speed, onnx_speed = len(images) / torch_best, len(images) / onnx_best
    return {
        "method": method,
        "backbone": backbone,
        "size": detector.image_size,
        "torch_img_s": torch_speed,
        "onnxruntime_img_s": onnx_speed,
        "ratio_ort_over_torch": onnx_speed / torch_speed,
    }


def main(argv: list[str] | None = None) -> pd.DataFrame:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", nargs="+", default=list(METHODS))
    parser.add_argument("--backbones", nargs="+", default=["zsad-tiny"])
    parser.add_argument("--images", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--csv", type=Path, default=None)
    args = parser.parse_args(argv)
    import onnxruntime
    import torch as torch_module

    print(
        f"CPU: {cpu_name()}; {args.threads} threads; torch {torch_module.__version__}, "
        f"onnxruntime {onnxruntime.__version__}; batch 1, {args.images} images, best of {args.repeats}"
    )
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        for backbone in args.backbones:
            for method in args.methods:
                rows.append(measure(method, backbone, args.images, args.threads, args.repeats, Path(folder)))
                row = rows[-1]
                speeds = f"torch {row['torch_img_s']:7.2f}, onnxruntime {row['onnxruntime_img_s']:7.2f} img/s"
                print(
                    f"{method:12s} {backbone:18s} {speeds}, ratio {row['ratio_ort_over_torch']:.2f}",
                    flush=True,
                )
    table = pd.DataFrame(rows)
    print("| " + " | ".join(table.columns) + " |\n|" + "---|" * len(table.columns))
    for row in table.itertuples(index=False):
        print("| " + " | ".join(f"{v:.2f}" if isinstance(v, float) else str(v) for v in row) + " |")
    if args.csv:
        table.to_csv(args.csv, index=False)
    return table


if __name__ == "__main__":
    main()
