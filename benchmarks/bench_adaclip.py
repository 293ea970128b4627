"""AdaCLIP inference cost (not a timed test): images/s at batch 1 vs batch 8, and HSF's k-means per image.

The official code runs one image at a time (its dynamic text prompts do not broadcast, methods.md pitfall 13);
zsad batches the prompted text tower (B x 48 sentences in one pass). Reported per backbone: images/s of
``predict`` at batch 1 and batch 8 (the unprompted pass for the dynamic prompts, the prompted passes of both
towers, the text ensemble, HSF and smoothing; fp32), the time of one training step per image (forward +
backward through both prompted towers; batch 8, or 1 for ViT-L), and the seconds per image of HSF's
k-means (sklearn, K=20 on the top-100 tokens) alone.

Backbones: zsad-tiny (shipped weights) on SynthAD images; with ``--large`` also ViT-L-14-336 at 518 px with
random weights (the cost does not depend on the weight values).

    python benchmarks/bench_adaclip.py [--large] [--threads 2] [--repeats 3] [--csv out.csv]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from zsad import methods
from zsad.backbone import load_clip
from zsad.cache import default_synthad_root
from zsad.data import load_dataset
from zsad.data.synth import ensure
from zsad.methods.hsf import kmeans_labels


def seconds(fn, repeats: int) -> float:
    """Best of ``repeats`` wall times (the machine is shared; the minimum is the least disturbed run)."""
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - started)
    return best


def bench(name: str, weights: str | None, size: int | None, repeats: int, train_batch: int = 8) -> dict:
    clip = load_clip(name, pretrained=weights, image_size=size)
    torch.manual_seed(0)
    detector = methods.create("adaclip", backbone=clip)
    test = load_dataset(ensure(default_synthad_root()), split="test", image_size=clip.image_size)
    picked = list(range(0, len(test), max(1, len(test) // 8)))[:8]
    images = torch.stack([test[i]["image"] for i in picked])
    names = [test.items[i]["cls_name"] for i in picked]
    detector.predict(images[:1], names[:1])  # warm-up (sklearn import, allocator)
    batch1 = seconds(
        lambda: [detector.predict(images[i : i + 1], names[i : i + 1]) for i in range(8)], repeats
    )
    batch8 = seconds(lambda: detector.predict(images, names), repeats)
    features = detector.extract_features(images[:train_batch])
    masks = torch.zeros(train_batch, clip.image_size, clip.image_size)
    labels = torch.zeros(train_batch, dtype=torch.long)

    def step() -> None:
        detector.learned.zero_grad()
        detector.training_loss(features, masks, labels, names[:train_batch])[0].backward()

    train_step = seconds(step, repeats)
    data = np.random.default_rng(0).standard_normal((100, len(detector.layers) * clip.embed_dim))
    data = data.astype(np.float32)
    kmeans = seconds(lambda: [kmeans_labels(data, 20, np.random.RandomState(111)) for _ in range(8)], repeats)
    return {
        "backbone": f"{name}@{clip.image_size}",
        "weights": clip.weights_label,
        "images_per_s_batch1": 8 / batch1,
        "images_per_s_batch8": 8 / batch8,
        "batch8_speedup": batch1 / batch8,
        "train_batch": train_batch,
        "train_step_s_per_image": train_step / train_batch,
        "hsf_kmeans_s_per_image": kmeans / 8,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--large", action="store_true", help="also ViT-L-14-336 at 518 px (random weights)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--csv", type=Path, default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = [bench("zsad-tiny", None, None, args.repeats)]
    if args.large:
        # one image per training step: backward through ViT-L at 518 px holds ~3 GB of activations per image
        rows.append(bench("ViT-L-14-336", "random", 518, max(1, args.repeats - 2), train_batch=1))
    table = pd.DataFrame(rows)
    print(f"torch threads: {args.threads}")
    print(table.round(4).to_string(index=False))
    if args.csv:
        table.to_csv(args.csv, index=False)


if __name__ == "__main__":
    main()
