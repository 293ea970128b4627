"""AnomalyCLIP training and inference cost (not a timed test).

The image tower is frozen, so the trainer caches its features (DPAM-path tokens + CLS) in epoch 1; every
later step runs only the **text tower** with the learned prompts (two sentences, forward and backward), plus
the map loss. Reported per backbone: seconds of epoch 1 (encoder + cache fill) vs the mean cached epoch, the
time of one text forward+backward, and inference images/s (encoder included, fp32).

Backbones: zsad-tiny (shipped weights) on the embedded auxiliary set; with ``--large`` also ViT-L-14-336 at
518 px with random weights on a few SynthAD images (the cost does not depend on the weight values).

    python benchmarks/bench_anomalyclip.py [--large] [--epochs 3] [--threads 2] [--csv out.csv]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import pandas as pd
import torch

from zsad.data import load_dataset
from zsad.data.synth import ensure
from zsad.train import load_checkpoint, read_log, train


def text_step_seconds(detector, repeats: int = 5) -> float:
    """Mean seconds of one text forward + backward through the learned prompts."""
    started = time.perf_counter()
    for _ in range(repeats):
        detector.learned.zero_grad()
        detector.encode_prompts().sum().backward()
    return (time.perf_counter() - started) / repeats


def bench(backbone: str, weights: str | None, size: int | None, aux: Path, epochs: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = train(
            "anomalyclip",
            aux,
            Path(tmp) / "ck",
            backbone=backbone,
            weights=weights,
            image_size=size,
            epochs=epochs,
            cache=Path(tmp) / "cache",
            progress=False,
        )
        log = read_log(out)
        detector = load_checkpoint(out)
        step = text_step_seconds(detector)
        test = load_dataset(aux, split="test", image_size=detector.image_size)
        images = torch.stack([test[i]["image"] for i in range(min(8, len(test)))])
        names = [test.items[i]["cls_name"] for i in range(len(images))]
        detector.predict(images[:1], names[:1])  # warm-up
        started = time.perf_counter()
        detector.predict(images, names)
        per_second = len(images) / (time.perf_counter() - started)
    first = log[0]["seconds"]
    cached = sum(r["seconds"] for r in log[1:]) / max(1, len(log) - 1)
    return {
        "backbone": backbone,
        "aux_images": len(test),
        "steps_per_epoch": -(-len(test) // 8),
        "epoch1_s": round(first, 2),
        "cached_epoch_s": round(cached, 3),
        "ratio": round(first / cached, 1),
        "text_fwd_bwd_s": round(step, 4),
        "infer_img_per_s": round(per_second, 2),
        "learned_params": sum(p.numel() for p in detector.learned.parameters()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--large", action="store_true", help="also ViT-L-14-336 at 518 (random weights)")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--csv", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from zsad.cache import zsad_home
    from zsad.tiny import embedded_aux_root

    runs = [("zsad-tiny", None, None, embedded_aux_root())]
    if args.large:
        few = ensure(
            zsad_home() / "synthad-bench",
            seed=3,
            categories=["nut"],
            n_train=1,
            n_test_good=2,
            n_test_per_defect=1,
        )
        runs.append(("ViT-L-14-336", "random", 518, few))
    rows = []
    for backbone, weights, size, aux in runs:
        rows.append(bench(backbone, weights, size, aux, args.epochs))
        print(rows[-1], flush=True)
    table = pd.DataFrame(rows)
    print(table.to_string(index=False))
    if args.csv:
        table.to_csv(args.csv, index=False)


if __name__ == "__main__":
    main()
