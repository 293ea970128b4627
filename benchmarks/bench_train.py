"""Training and inference cost of every method with learned parts on the shared trainer (not a timed test).

Per method and backbone: seconds of epoch 1 (runs the frozen image encoder and fills the feature cache) vs the
mean of the cached epochs (encoder skipped), their ratio, inference images/s (encoder included), and the
process's peak RSS and the number of learned parameters. Backbones: zsad-tiny (shipped weights) on the
embedded auxiliary set, and with ``--large`` each method's paper backbone and size (e.g. ViT-L-14-336 at 518)
with random weights on a few SynthAD images (no pretrained weights exist here; the cost does not depend on the
values). Each in fp32 and with bf16 autocast of the image tower.

    python benchmarks/bench_train.py [--methods aprilgan anomalyclip] [--large] [--csv out.csv]

Run with MALLOC_MMAP_THRESHOLD_=1048576 MALLOC_TRIM_THRESHOLD_=1048576 MALLOC_ARENA_MAX=2 (the Makefile sets
them) so that peak memory reflects the model, not glibc's arenas.
"""

from __future__ import annotations

import argparse
import resource
import tempfile
import time
from pathlib import Path

import pandas as pd
import torch

from zsad import methods
from zsad.data import load_dataset
from zsad.data.synth import ensure
from zsad.methods.base import TrainableDetector
from zsad.train import load_checkpoint, read_log, train


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def bench(
    method: str, backbone: str, weights: str | None, size: int | None, aux: Path, precision: str, epochs: int
) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = train(
            method,
            aux,
            Path(tmp) / "ck",
            backbone=backbone,
            weights=weights,
            image_size=size,
            epochs=epochs,
            cache=Path(tmp) / "cache",
            progress=False,
            precision=precision,
        )
        log = read_log(out)
        detector = load_checkpoint(out)
        test = load_dataset(aux, split="test", image_size=detector.image_size)
        images = torch.stack([test[i]["image"] for i in range(min(8, len(test)))])
        names = [test.items[i]["cls_name"] for i in range(len(images))]
        detector.predict(images, names)  # warm-up: every class's text features, allocations
        started = time.perf_counter()
        detector.predict(images, names)
        per_second = len(images) / (time.perf_counter() - started)
        learned = sum(p.numel() for p in detector.learned.parameters())
    first, cached = log[0]["seconds"], sum(r["seconds"] for r in log[1:]) / max(1, len(log) - 1)
    return {
        "method": method,
        "backbone": backbone,
        "precision": precision,
        "aux_images": len(test),
        "epoch1_s": round(first, 2),
        "cached_epoch_s": round(cached, 3),
        "ratio": round(first / cached, 1),
        "infer_img_per_s": round(per_second, 2),
        "peak_rss_mb": round(peak_rss_mb()),
        "learned_params": learned,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", nargs="*", default=None, help="default: every trainable method")
    parser.add_argument("--large", action="store_true", help="also ViT-L-14-336 at 518 (random weights)")
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--precisions", nargs="*", default=["fp32", "bf16"], choices=["fp32", "bf16"])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--csv", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from zsad.cache import zsad_home
    from zsad.tiny import embedded_aux_root

    tiny = ("zsad-tiny", None, None, embedded_aux_root())
    trainable = [m for m in methods.available() if issubclass(methods.get_class(m), TrainableDetector)]
    rows = []
    for method in args.methods or trainable:
        runs = [tiny]
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
            runs.append((cls.default_backbone, "random", cls.default_image_size, few))
        for backbone, weights, size, aux in runs:
            for precision in args.precisions:
                row = bench(method, backbone, weights, size, aux, precision, args.epochs)
                print(row, flush=True)
                rows.append(row)
    table = pd.DataFrame(rows)
    print(table.to_string(index=False))
    if args.csv:
        table.to_csv(args.csv, index=False)


if __name__ == "__main__":
    main()
