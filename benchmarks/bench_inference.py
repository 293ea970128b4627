"""Inference throughput of every method, fp32 and bf16, with peak memory (not a timed test).

For each method in the registry x backbone x precision, a fresh Python process builds the detector (random
weights for the open_clip architectures: no pretrained weights exist on this machine and the cost does not
depend on the values; the shipped weights for zsad-tiny; trainable methods with untrained learned parts),
computes the text features of every class once (a warm-up call on the same batch), then times ``predict`` on
a batch of SynthAD images at the backbone's native size. The child reports images/s and its peak RSS; the
parent prints a table, the bf16 / fp32 speed ratio per method and backbone, and writes a CSV.
``--profile METHOD`` prints torch.profiler's top operators for one fp32 predict instead.

    python benchmarks/bench_inference.py [--methods clip winclip] [--backbones zsad-tiny ViT-B-16-plus-240]
        [--large] [--precisions fp32 bf16] [--images 4] [--threads 2] [--csv out.csv]
    python benchmarks/bench_inference.py --profile winclip --backbones ViT-B-16-plus-240

Run with MALLOC_MMAP_THRESHOLD_=1048576 MALLOC_TRIM_THRESHOLD_=1048576 MALLOC_ARENA_MAX=2 (the Makefile sets
them) so that peak memory reflects the model, not glibc's arenas.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import time

import pandas as pd
import torch

from zsad import methods
from zsad.backbone import load_clip
from zsad.cache import default_synthad_root
from zsad.data import load_dataset
from zsad.data.synth import ensure

DEFAULT_BACKBONES = ("zsad-tiny", "ViT-B-16-plus-240")
FEW_SHOT = {"winclip-fewshot": 1}  # methods that need reference images before predict: k per class


def build(method: str, backbone: str, precision: str):
    clip = load_clip(backbone, pretrained=None if backbone == "zsad-tiny" else "random")
    return methods.create(method, backbone=clip, precision=precision)


def sample(size: int, count: int) -> tuple[torch.Tensor, list[str]]:
    test = load_dataset(ensure(default_synthad_root()), "test", image_size=size)
    step = max(1, len(test) // count)
    items = [test[i] for i in range(0, step * count, step)]
    return torch.stack([x["image"] for x in items]), [
        test.items[i]["cls_name"] for i in range(0, step * count, step)
    ]


def measure(method: str, backbone: str, precision: str, count: int, threads: int) -> dict:
    """One configuration, in this process: images/s of ``predict`` after a one-image warm-up."""
    torch.set_num_threads(threads)
    detector = build(method, backbone, precision)
    images, names = sample(detector.image_size, count)
    if method in FEW_SHOT:
        detector.fit_few_shot(images, names)
    with torch.inference_mode():
        detector.predict(images, names)  # warm-up: every class's text features, allocations
        started = time.perf_counter()
        detector.predict(images, names)
        seconds = time.perf_counter() - started
    return {
        "method": method,
        "backbone": backbone,
        "image_size": detector.image_size,
        "precision": precision,
        "images": count,
        "images_per_s": count / seconds,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def profile(method: str, backbone: str, count: int, threads: int, rows: int = 15) -> None:
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    torch.set_num_threads(threads)
    detector = build(method, backbone, "fp32")
    images, names = sample(detector.image_size, count)
    with torch.inference_mode():
        detector.predict(images, names)
        with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
            detector.predict(images, names)
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows))


def run_child(method: str, backbone: str, precision: str, count: int, threads: int) -> dict:
    command = [sys.executable, __file__, "--child", method, backbone, precision, str(count), str(threads)]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        error = (done.stderr.strip().splitlines() or ["?"])[-1]
        return {"method": method, "backbone": backbone, "precision": precision, "error": error}
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", nargs="+", default=None, help="method IDs (default: all)")
    parser.add_argument("--backbones", nargs="+", default=list(DEFAULT_BACKBONES))
    parser.add_argument("--large", action="store_true", help="also ViT-L-14-336 (random weights)")
    parser.add_argument("--precisions", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"])
    parser.add_argument("--images", type=int, default=4, help="images per timed predict call")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--csv", default=None)
    parser.add_argument("--profile", default=None, metavar="METHOD", help="profile one fp32 predict instead")
    parser.add_argument("--child", nargs=5, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        method, backbone, precision, count, threads = args.child
        print(json.dumps(measure(method, backbone, precision, int(count), int(threads))))
        return
    backbones = args.backbones + (["ViT-L-14-336"] if args.large else [])
    if args.profile:
        for backbone in backbones:
            print(f"== {args.profile} on {backbone}, fp32, {args.images} images, {args.threads} threads")
            profile(args.profile, backbone, args.images, args.threads)
        return
    rows = []
    for method in args.methods or methods.available():
        for backbone in backbones:
            for precision in args.precisions:
                row = run_child(method, backbone, precision, args.images, args.threads)
                rows.append(row)
                shown = (
                    f"{row['images_per_s']:.3f} img/s, {row['peak_rss_mb']:.0f} MB"
                    if "error" not in row
                    else row["error"]
                )
                print(f"{method:16s} {backbone:20s} {precision}: {shown}", flush=True)
    table = pd.DataFrame(rows)
    machine = platform.processor() or platform.machine()
    print(f"\nmachine: {machine}, torch {torch.__version__}, {args.threads} threads")
    if {"fp32", "bf16"} <= set(args.precisions) and "images_per_s" in table:
        speed = table.pivot_table(index=["method", "backbone"], columns="precision", values="images_per_s")
        speed["bf16 / fp32"] = speed["bf16"] / speed["fp32"]
        print(speed.round(3).to_string())
    else:
        print(table.to_string(index=False))
    if args.csv:
        table.to_csv(args.csv, index=False)
        print(f"wrote {args.csv}")


if __name__ == "__main__":
    main()
