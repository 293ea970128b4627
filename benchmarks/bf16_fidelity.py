"""What bf16 autocast changes, per method, on the embedded world (not a timed test).

For each method: evaluate the held-out SynthAD categories (zsad-tiny's card; default split) once in fp32
and once with ``precision="bf16"``, keeping the maps; report max |diff| of the maps and of the image scores,
and the image / pixel AUROC and AUPRO deltas (bf16 - fp32). Trained methods are first trained in fp32 on the
embedded auxiliary set (``--epochs``, the trainer's cache) and the same checkpoint is evaluated in both
precisions (``precision`` is an inference option).

    python benchmarks/bf16_fidelity.py [--methods clip winclip aprilgan] [--epochs 3] [--csv out.csv]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from zsad import methods
from zsad.cache import default_synthad_root
from zsad.data import load_dataset
from zsad.data.synth import ensure
from zsad.evaluate import evaluate
from zsad.methods.base import TrainableDetector
from zsad.tiny import embedded_aux_root, load_card
from zsad.train import load_checkpoint, train


def detectors(method: str, work: Path, epochs: int):
    """(fp32 detector, bf16 detector) with identical weights."""
    if issubclass(methods.get_class(method), TrainableDetector):
        out = train(
            method, embedded_aux_root(), work / method, backbone="zsad-tiny", epochs=epochs, progress=False
        )
        return load_checkpoint(out), load_checkpoint(out, precision="bf16")
    return (
        methods.create(method, backbone="zsad-tiny"),
        methods.create(method, backbone="zsad-tiny", precision="bf16"),
    )


def compare(method: str, work: Path, epochs: int, dataset) -> dict:
    fp32, bf16 = detectors(method, work, epochs)
    a = evaluate(fp32, dataset, progress=False, keep_maps=True)
    b = evaluate(bf16, dataset, progress=False, keep_maps=True)
    map_diff = max(float(np.abs(a.maps[p] - b.maps[p]).max()) for p in a.maps)
    score_diff = float(np.abs(a.scores["score"].to_numpy() - b.scores["score"].to_numpy()).max())
    row = {"method": method, "max_map_diff": map_diff, "max_score_diff": score_diff}
    for column in ("image_auroc", "pixel_auroc", "pixel_aupro"):
        row[f"{column}_fp32"] = a.table.loc["mean", column]
        row[f"{column}_delta"] = b.table.loc["mean", column] - a.table.loc["mean", column]
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    default = ["clip", "winclip", "clipad-sdp", "aprilgan", "clipad-sdp-plus", "anomalyclip"]
    parser.add_argument("--methods", nargs="+", default=default)
    parser.add_argument("--epochs", type=int, default=3, help="training epochs of the trained methods")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--csv", default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    held_out = load_card()["heldout_categories"]
    dataset = load_dataset(ensure(default_synthad_root()), "test", image_size=128, classes=held_out)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for method in args.methods:
            rows.append(compare(method, Path(tmp), args.epochs, dataset))
            print({k: round(v, 6) if isinstance(v, float) else v for k, v in rows[-1].items()}, flush=True)
    table = pd.DataFrame(rows).set_index("method")
    print(f"\nzsad-tiny, SynthAD held-out {', '.join(held_out)} ({len(dataset)} images), bf16 - fp32:")
    print(table.round(4).to_string())
    if args.csv:
        table.to_csv(args.csv)
        print(f"wrote {args.csv}")


if __name__ == "__main__":
    main()
