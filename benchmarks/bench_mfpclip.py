"""MFP-CLIP training cost: seconds per epoch on the shared trainer (not a timed test).

With SP on, the prompt enters ViT block 1, so every block sees it: each step runs the frozen ViT forward and
backward, and the cache holds only the preprocessed image and the CNN levels. With SP off the ViT features are
cached after epoch 1 (APRIL-GAN-like). This script measures both, per variant: epoch 1 (CNN / encoder runs
and fills the cache), the mean of the later epochs (epoch 1 if only one ran) and seconds per image of those,
inference images/s, learned parameters.

Backbones: zsad-tiny (shipped weights) on the embedded auxiliary set (``--classes`` narrows it), through
the trainer. With ``--large``, ViT-L-14-336 at 518 with random weights (no pretrained weights here; the cost
does not depend on the values) and a random ResNet-18, at the paper's batch size 1: a whole epoch on CPU
takes too long, so it times single training steps on ``--large-images`` SynthAD images (after a warm-up step
that also computes the class's 420-sentence text ensemble) and reports seconds per step = per image, i.e.
seconds per epoch / auxiliary images.

    python benchmarks/bench_mfpclip.py [--variants all no-sp] [--epochs 2] [--large] [--csv out.csv]

Run with MALLOC_MMAP_THRESHOLD_=1048576 MALLOC_TRIM_THRESHOLD_=1048576 MALLOC_ARENA_MAX=2 (the Makefile sets
them).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import pandas as pd
import torch

from zsad import methods
from zsad.data import load_dataset
from zsad.data.synth import ensure
from zsad.train import load_checkpoint, read_log, train

VARIANTS = {
    "all": {},
    "no-i2tp": {"i2tp": False},
    "no-sp": {"sp": False},
    "no-mpfa": {"mpfa": False},
    "no-mp": {"mp": False},
    "none": {"i2tp": False, "sp": False, "mpfa": False, "mp": False},
}


def bench(variant: str, backbone: str, weights, size, aux: Path, classes, epochs: int, batch: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = train(
            "mfpclip",
            aux,
            Path(tmp) / "ck",
            backbone=backbone,
            weights=weights,
            image_size=size,
            epochs=epochs,
            batch_size=batch,
            classes=classes,
            cache=Path(tmp) / "cache",
            progress=False,
            **VARIANTS[variant],
        )
        log = read_log(out)
        detector = load_checkpoint(out)
        test = load_dataset(aux, split="test", image_size=detector.image_size, classes=classes)
        images = torch.stack([test[i]["image"] for i in range(min(8, len(test)))])
        names = [test.items[i]["cls_name"] for i in range(len(images))]
        detector.predict(images, names)  # warm-up: text features of every class, allocations
        started = time.perf_counter()
        detector.predict(images, names)
        per_second = len(images) / (time.perf_counter() - started)
        learned = sum(p.numel() for p in detector.learned.parameters())
    later = [r["seconds"] for r in log[1:]] or [log[0]["seconds"]]  # epoch 1 alone when only one ran
    cached = sum(later) / len(later)
    return {
        "variant": variant,
        "backbone": backbone,
        "size": detector.image_size,
        "images": len(test),
        "batch": batch,
        "epoch1_s": round(log[0]["seconds"], 2),
        "later_epoch_s": round(cached, 2),
        "s_per_image": round(cached / len(test), 4),
        "infer_img_per_s": round(per_second, 2),
        "learned_params": learned,
    }


def bench_steps(variant: str, backbone: str, size: int, aux: Path, count: int) -> dict:
    """Seconds per training step at batch 1 (= seconds per image of an epoch), random weights."""
    from zsad.backbone import load_clip

    torch.manual_seed(0)
    detector = methods.create("mfpclip", backbone=load_clip(backbone, "random", size), **VARIANTS[variant])
    test = load_dataset(aux, split="test", image_size=size)
    optimizer = torch.optim.Adam(detector.learned.parameters(), lr=1e-3)
    timings = {"extract": [], "step": []}
    for i in range(count + 1):  # step 0: warm-up (text ensemble of the class, allocations)
        item = test[i]
        started = time.perf_counter()
        features = detector.extract_features(item["image"][None])
        extract = time.perf_counter() - started
        started = time.perf_counter()
        loss, _ = detector.training_loss(
            features, item["mask"][None], torch.tensor([int(test.items[i]["anomaly"])]), [item["cls_name"]]
        )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if i:
            timings["extract"].append(extract)
            timings["step"].append(time.perf_counter() - started)
    step = sum(timings["step"]) / count
    return {
        "variant": variant,
        "backbone": backbone,
        "size": size,
        "images": count,
        "batch": 1,
        "extract_s_per_image": round(sum(timings["extract"]) / count, 2),
        "s_per_image": round(step, 2),
        "learned_params": sum(p.numel() for p in detector.learned.parameters()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variants", nargs="*", default=["all", "no-sp"], choices=list(VARIANTS))
    parser.add_argument("--classes", nargs="*", default=None, help="aux classes (default: all seen ones)")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--large", action="store_true", help="also ViT-L-14-336 at 518 (random weights)")
    parser.add_argument("--large-images", type=int, default=2, help="timed steps (batch 1) with --large")
    parser.add_argument("--no-tiny", action="store_true", help="skip the zsad-tiny runs")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--csv", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from zsad.cache import zsad_home
    from zsad.tiny import embedded_aux_root

    rows = []
    for variant in [] if args.no_tiny else args.variants:
        row = bench(
            variant, "zsad-tiny", None, None, embedded_aux_root(), args.classes, args.epochs, args.batch_size
        )
        print(row, flush=True)
        rows.append(row)
    if args.large:
        few = ensure(
            zsad_home() / "synthad-bench",
            seed=3,
            categories=["nut"],
            n_train=1,
            n_test_good=2,
            n_test_per_defect=1,
        )
        for variant in args.variants:
            row = bench_steps(variant, "ViT-L-14-336", 518, few, args.large_images)
            print(row, flush=True)
            rows.append(row)
    table = pd.DataFrame(rows)
    print(table.to_string(index=False))
    if args.csv:
        table.to_csv(args.csv, index=False)


if __name__ == "__main__":
    main()
