"""Training and inference cost of every method with learned parts on the shared trainer (not a timed test).

Per method, variant and backbone: seconds of epoch 1 (runs the frozen image encoder and fills the feature
cache) vs the mean of the later epochs (encoder skipped where the method caches its features; epoch 1 if only
one ran), their ratio, seconds per auxiliary image of a later epoch, inference images/s at each
``--infer-batches`` size (encoder included), the process's peak RSS and the number of learned parameters.

Backbones: zsad-tiny (shipped weights) on the embedded auxiliary set (``--classes`` narrows it), and with
``--large`` each method's paper backbone and size (e.g. ViT-L-14-336 at 518) with random weights on a few
SynthAD images (no pretrained weights exist here; the cost does not depend on the values). Each in fp32 and
with bf16 autocast of the image tower.

A variant is a label and detector options, e.g. MFP-CLIP with and without the SP prompt, or AdaCLIP's
inference at batch 1 (the official code's only size) vs batch 8::

    python benchmarks/bench_train.py [--methods aprilgan anomalyclip] [--large] [--csv out.csv]
    python benchmarks/bench_train.py --methods mfpclip --variant all --variant no-sp sp=false --epochs 2
    python benchmarks/bench_train.py --methods adaclip --infer-batches 1 8 --precisions fp32
    python benchmarks/bench_train.py --methods mfpclip --large --no-tiny --batch-size 1 --epochs 1

Run with MALLOC_MMAP_THRESHOLD_=1048576 MALLOC_TRIM_THRESHOLD_=1048576 MALLOC_ARENA_MAX=2 (the Makefile sets
them) so that peak memory reflects the model, not glibc's arenas.
"""

from __future__ import annotations

import argparse
import json
import resource
import tempfile
import time
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from zsad import methods
from zsad.data import load_dataset
from zsad.data.synth import ensure
from zsad.methods.base import TrainableDetector
from zsad.train import load_checkpoint, read_config, read_log, train


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def parse_variant(words: list[str]) -> tuple[str, dict[str, Any]]:
    """``["no-sp", "sp=false"]`` -> ("no-sp", {"sp": False}); values are JSON, else kept as strings."""
    label, options = words[0], {}
    for word in words[1:]:
        key, sep, value = word.partition("=")
        if not sep:
            raise SystemExit(f"--variant {label}: expected KEY=VALUE, got {word!r}")
        try:
            options[key] = json.loads(value)
        except json.JSONDecodeError:
            options[key] = value
    return label, options


def images_per_second(detector, images: torch.Tensor, names: list[str], batch: int) -> float:
    """Inference images/s at ``batch`` images per ``predict`` call, after a warm-up call (every class's text
    features, allocations)."""
    detector.predict(images[:batch], names[:batch])
    started = time.perf_counter()
    for i in range(0, len(images), batch):
        detector.predict(images[i : i + batch], names[i : i + batch])
    return len(images) / (time.perf_counter() - started)


def bench(method: str, variant: tuple[str, dict], run: dict, precision: str, args) -> dict:
    label, options = variant
    with tempfile.TemporaryDirectory() as tmp:
        out = train(
            method,
            run["aux"],
            Path(tmp) / "ck",
            backbone=run["backbone"],
            weights=run["weights"],
            image_size=run["size"],
            epochs=args.epochs,
            batch_size=args.batch_size,
            classes=run["classes"],
            cache=Path(tmp) / "cache",
            progress=False,
            precision=precision,
            **options,
        )
        log, settings = read_log(out), read_config(out)["train"]
        detector = load_checkpoint(out)
        test = load_dataset(run["aux"], split="test", image_size=detector.image_size, classes=run["classes"])
        count = min(max(args.infer_batches), len(test))
        images = torch.stack([test[i]["image"] for i in range(count)])
        names = [test.items[i]["cls_name"] for i in range(count)]
        speed = {
            f"infer_img_per_s_b{b}": round(images_per_second(detector, images, names, b), 2)
            for b in args.infer_batches
        }
        learned = sum(p.numel() for p in detector.learned.parameters())
    first = log[0]["seconds"]
    later = [r["seconds"] for r in log[1:]] or [first]
    cached = sum(later) / len(later)
    return {
        "method": method,
        "variant": label,
        "backbone": run["backbone"],
        "size": detector.image_size,
        "precision": precision,
        "aux_images": len(test),
        "batch": settings["batch_size"],
        "epoch1_s": round(first, 2),
        "later_epoch_s": round(cached, 3),
        "ratio": round(first / cached, 1),
        "s_per_image": round(cached / len(test), 4),
        **speed,
        "peak_rss_mb": round(peak_rss_mb()),
        "learned_params": learned,
    }


def runs_for(method: str, args) -> list[dict]:
    from zsad.cache import zsad_home
    from zsad.tiny import embedded_aux_root

    runs = []
    if not args.no_tiny:
        runs.append(
            {
                "backbone": "zsad-tiny",
                "weights": None,
                "size": None,
                "aux": embedded_aux_root(),
                "classes": args.classes,
            }
        )
    if args.large:  # the paper's backbone and size, random weights, on a handful of images
        cls = methods.get_class(method)
        few = ensure(
            zsad_home() / "synthad-bench",
            seed=3,
            categories=["nut"],
            n_train=1,
            n_test_good=2,
            n_test_per_defect=1,
        )
        runs.append(
            {
                "backbone": cls.default_backbone,
                "weights": "random",
                "size": cls.default_image_size,
                "aux": few,
                "classes": None,
            }
        )
    return runs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", nargs="*", default=None, help="default: every trainable method")
    parser.add_argument(
        "--variant",
        nargs="+",
        action="append",
        metavar="LABEL [KEY=VALUE ...]",
        help="a labelled set of detector options (repeatable; default one variant 'default' with none)",
    )
    parser.add_argument("--large", action="store_true", help="also the paper backbone (random weights)")
    parser.add_argument("--no-tiny", action="store_true", help="skip the zsad-tiny runs")
    parser.add_argument("--classes", nargs="*", default=None, help="aux classes on zsad-tiny (default all)")
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=None, help="default: the paper's")
    parser.add_argument("--infer-batches", type=int, nargs="+", default=[8], help="predict() batch sizes")
    parser.add_argument("--precisions", nargs="*", default=["fp32", "bf16"], choices=["fp32", "bf16"])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--csv", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    variants = [parse_variant(words) for words in args.variant or [["default"]]]
    trainable = [m for m in methods.available() if issubclass(methods.get_class(m), TrainableDetector)]
    rows = []
    for method in args.methods or trainable:
        for run in runs_for(method, args):
            for variant in variants:
                for precision in args.precisions:
                    row = bench(method, variant, run, precision, args)
                    print(row, flush=True)
                    rows.append(row)
    table = pd.DataFrame(rows)
    print(f"torch threads: {args.threads}")
    print(table.to_string(index=False))
    if args.csv:
        table.to_csv(args.csv, index=False)


if __name__ == "__main__":
    main()
