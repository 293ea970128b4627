"""Accelerator throughput beside the same machine's CPU (issue 16; docs/gpu.md): images/s of ``predict`` per
method, backbone, precision and batch size, peak device memory, and seconds per cached training epoch.

Backbones carry seeded random weights (the cost does not depend on the values; no pretrained weights are
needed): ViT-L-14-336 at 518 and ViT-B-16-plus-240 at 240 by default. Each configuration gets a warm-up call
(text features, allocations, cuDNN choices), then one timed call after a device synchronisation. The CPU
baseline runs the same method, backbone and precision (fp32 where the device runs fp16) on ``--cpu-images``
images and the ``ratio`` column is device images/s over CPU images/s. A training epoch is timed on features
already extracted (what a cached epoch costs): ``--epoch-images`` images in the method's batch size, and
the CPU's epoch on ``--cpu-images`` images scaled to as many (``cpu_epoch_s``; its ``ratio`` = CPU / device).

    python benchmarks/bench_gpu.py --quick --out bench-gpu          # a few methods; fits 10 min of one GPU
    python benchmarks/bench_gpu.py --out bench-gpu                  # every method, fp32/bf16/fp16, 1/8/32
    python benchmarks/bench_gpu.py --device cpu --backbones zsad-tiny --methods clip --batches 1  # smoke
"""

from __future__ import annotations

import argparse
import platform
import resource
import time
from collections.abc import Callable
from pathlib import Path

import pandas as pd
import torch

from zsad import methods
from zsad.backbone import load_clip
from zsad.device import check_precision_on, prepare
from zsad.methods.base import Detector, TrainableDetector
from zsad.train import _make_optimizer, resolve_settings

BACKBONES = {"ViT-L-14-336": 518, "ViT-B-16-plus-240": 240}
QUICK = {"methods": ["clip", "aprilgan", "anomalyclip"], "precisions": ["fp32", "fp16"], "batches": [1, 32]}
CLASSES = ["bottle", "nut"]


def backbone_size(spec: str) -> tuple[str, int | None]:
    """``NAME`` or ``NAME@SIZE`` -> (name, size); the default size of the two paper backbones, else native."""
    name, _, size = spec.partition("@")
    return name, int(size) if size else BACKBONES.get(name)


def build(method: str, backbone: str, size: int | None, precision: str, device: torch.device) -> Detector:
    clip = load_clip(backbone, pretrained="random", seed=0, image_size=size, device=device)
    torch.manual_seed(0)
    detector = methods.create(method, backbone=clip, precision=precision)
    if method == "winclip-fewshot":  # WinCLIP+ needs its reference memory before predict
        detector.fit_few_shot(images(detector.image_size, len(CLASSES), seed=1), CLASSES)
    return detector


def images(size: int, count: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(count, 3, size, size, generator=torch.Generator().manual_seed(seed))


def names(count: int) -> list[str]:
    return [CLASSES[i % len(CLASSES)] for i in range(count)]


def timed(device: torch.device, call: Callable[[], object]) -> float:
    """Seconds of one ``call`` after a warm-up call, device work included."""
    call()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    started = time.perf_counter()
    call()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - started


def peak_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # process RSS peak (monotone)


def predict_speed(detector: Detector, batch: int, device: torch.device) -> float:
    """images/s of ``predict`` on a batch of ``batch`` random images."""
    x = images(detector.image_size, batch, seed=2).to(device)
    with torch.inference_mode():
        return batch / timed(device, lambda: detector.predict(x, names(batch)))


def epoch_seconds(detector: TrainableDetector, count: int, device: torch.device) -> float:
    """Seconds of one training epoch over ``count`` images whose frozen features are already at hand."""
    settings = resolve_settings(type(detector), None)
    x = images(detector.image_size, count, seed=3).to(device)
    with torch.no_grad():
        features = detector.extract_features(x)
    masks = (torch.rand(count, detector.image_size, detector.image_size) > 0.9).float().to(device)
    labels = torch.tensor([i % 2 for i in range(count)], device=device)
    optimizer = _make_optimizer(detector.learned.parameters(), settings)
    step = settings.batch_size

    def epoch() -> None:
        for start in range(0, count, step):
            part = {k: v[start : start + step] for k, v in features.items()}
            loss, _ = detector.training_loss(
                part,
                masks[start : start + step],
                labels[start : start + step],
                names(len(labels[start : start + step])),
            )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()

    detector.learned.train()
    return timed(device, epoch)


def run(args: argparse.Namespace) -> pd.DataFrame:
    device = prepare(args.device)
    cpu = torch.device("cpu")
    rows = []
    for spec in args.backbones:
        backbone, size = backbone_size(spec)
        for method in args.methods:
            cpu_speed: dict[str, float] = {}
            on_cpu: dict[str, Detector] = {}  # the CPU baseline detector per precision, built once
            for precision in args.precisions:
                try:
                    check_precision_on(precision, device)
                except ValueError as err:
                    print(f"skip {method} {backbone} {precision}: {err}")
                    continue
                baseline = precision if precision != "fp16" else "fp32"  # the CPU runs no fp16
                if device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats(device)
                detector = build(method, backbone, size, precision, device)
                # A CPU run is its own baseline (ratio 1 up to timing noise).
                same = device == cpu and baseline == precision
                if args.cpu_images and baseline not in cpu_speed:
                    on_cpu[baseline] = detector if same else build(method, backbone, size, baseline, cpu)
                    cpu_speed[baseline] = predict_speed(on_cpu[baseline], args.cpu_images, cpu)
                for batch in args.batches:
                    speed = predict_speed(detector, batch, device)
                    row = {
                        "method": method,
                        "backbone": backbone,
                        "image_size": detector.image_size,
                        "precision": precision,
                        "batch": batch,
                        "device": str(device),
                        "images_per_s": speed,
                        "cpu_images_per_s": cpu_speed.get(baseline, float("nan")),
                        "peak_mb": peak_mb(device),
                    }
                    row["ratio"] = speed / row["cpu_images_per_s"]
                    rows.append(row)
                    print(
                        f"{method:16s} {backbone:18s}@{detector.image_size} {precision} b{batch:<3d} "
                        f"{speed:9.2f} img/s  x{row['ratio']:.1f} vs CPU  {row['peak_mb']:.0f} MB",
                        flush=True,
                    )
                if isinstance(detector, TrainableDetector) and args.epoch_images and precision == "fp32":
                    per_image = epoch_seconds(detector, args.epoch_images, device) / args.epoch_images
                    cpu_per_image = float("nan")
                    if args.cpu_images:
                        cpu_per_image = (
                            epoch_seconds(on_cpu[precision], args.cpu_images, cpu) / args.cpu_images
                        )
                    rows.append(
                        {
                            "method": method,
                            "backbone": backbone,
                            "image_size": detector.image_size,
                            "precision": precision,
                            "device": str(device),
                            "epoch_images": args.epoch_images,
                            "epoch_s": per_image * args.epoch_images,
                            "cpu_epoch_s": cpu_per_image * args.epoch_images,
                            "ratio": cpu_per_image / per_image,
                        }
                    )
                    print(
                        f"{method:16s} {backbone} cached epoch of {args.epoch_images} images: "
                        f"{per_image * args.epoch_images:.2f} s  x{cpu_per_image / per_image:.1f} vs CPU"
                    )
                del detector
                if device.type == "cuda":
                    torch.cuda.empty_cache()
    return pd.DataFrame(rows)


def markdown(table: pd.DataFrame) -> str:
    """A pipe table (numbers to 3 decimals, blanks for n/a) without pandas' optional tabulate."""
    cells = table.round(3).astype(object).where(table.notna(), "")
    lines = ["| " + " | ".join(map(str, table.columns)) + " |", "|" + "---|" * len(table.columns)]
    lines += ["| " + " | ".join(map(str, row)) + " |" for row in cells.itertuples(index=False)]
    return "\n".join(lines)


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default auto)")
    parser.add_argument("--quick", action="store_true", help=f"the quick grid: {QUICK}")
    parser.add_argument("--methods", nargs="+", default=None, help="method IDs (default: all)")
    parser.add_argument("--backbones", nargs="+", default=list(BACKBONES), help="NAME or NAME@SIZE")
    parser.add_argument("--precisions", nargs="+", default=None, choices=["fp32", "bf16", "fp16"])
    parser.add_argument("--batches", nargs="+", type=int, default=None, help="batch sizes (default 1 8 32)")
    parser.add_argument("--cpu-images", type=int, default=1, help="images of the CPU baseline (0: none)")
    parser.add_argument("--epoch-images", type=int, default=32, help="images of the timed epoch (0: none)")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    parser.add_argument("--out", type=Path, default=None, help="folder for bench_gpu.csv and bench_gpu.md")
    args = parser.parse_args(argv)
    quick = QUICK if args.quick else {}
    args.methods = args.methods or quick.get("methods") or methods.available()
    args.precisions = args.precisions or quick.get("precisions") or ["fp32", "bf16", "fp16"]
    args.batches = args.batches or quick.get("batches") or [1, 8, 32]
    return args


def main(argv: list[str] | None = None) -> pd.DataFrame:
    args = parse(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    table = run(args)
    card = torch.cuda.get_device_name() if torch.cuda.is_available() else "no CUDA device"
    header = (
        f"device {args.device} ({card}); CPU: {platform.processor() or platform.machine()}, "
        f"{torch.get_num_threads()} threads; torch {torch.__version__}"
    )
    print(header)
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        table.to_csv(args.out / "bench_gpu.csv", index=False)
        (args.out / "bench_gpu.md").write_text(f"{header}\n\n{markdown(table)}\n")
        print(f"wrote {args.out / 'bench_gpu.csv'}")
    return table


if __name__ == "__main__":
    main()
