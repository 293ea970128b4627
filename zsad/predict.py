"""Single-image prediction (``zsad predict``): an anomaly score and a heatmap overlay per image.

The detector is built like ``zsad eval`` builds it: :func:`zsad.methods.create` for training-free methods,
:func:`zsad.train.load_checkpoint` for a ``zsad train`` folder. Images are decoded with the same robust
loader as datasets (:func:`zsad.data.images.load_image`); an unreadable one is reported by name and
skipped, and the others are still scored.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch
from tqdm.auto import tqdm

from zsad.methods.base import Detector


@dataclass
class Prediction:
    """One image's outcome: a score and overlay path, or the error that stopped it."""

    image: str
    score: float | None = None
    overlay: str = ""
    error: str = ""


def load_detector(
    method: str,
    backbone: str | None = None,
    weights: str | None = None,
    image_size: int | None = None,
    checkpoint: str | Path | None = None,
) -> Detector:
    """A ready detector: from a checkpoint folder when given (its config fixes backbone/weights/size), else
    the method's paper defaults overridden by the arguments."""
    if checkpoint is not None:
        from zsad.train import load_checkpoint

        return load_checkpoint(checkpoint, method, backbone, weights, image_size)
    from zsad import methods

    detector = methods.create(method, backbone=backbone, weights=weights, image_size=image_size)
    if getattr(detector, "learned", None) is not None:
        print(
            f"zsad: warning: {method} has learned parts and no --checkpoint was given; "
            "predicting with its untrained initialisation",
            file=sys.stderr,
        )
    return detector


def _overlay_name(path: Path, used: set[str]) -> str:
    name, i = f"{path.stem}_overlay.png", 1
    while name in used:  # two inputs with one file name (a/x.png, b/x.png)
        i += 1
        name = f"{path.stem}_{i}_overlay.png"
    used.add(name)
    return name


def predict_images(
    detector: Detector,
    images: list[str | Path],
    out_dir: str | Path,
    class_name: str = "object",
    batch_size: int = 8,
    progress: bool = True,
) -> list[Prediction]:
    """Score every image, write ``OUT/<stem>_overlay.png`` per scored image and ``OUT/scores.csv`` (all
    images, an ``error`` column for the ones that could not be read or scored)."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    from zsad.data.dataset import preprocess_image
    from zsad.data.images import load_image
    from zsad.viz import overlay_grid

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    results = [Prediction(str(p)) for p in images]
    tensors: dict[int, torch.Tensor] = {}
    for i, path in enumerate(images):
        try:
            tensors[i] = preprocess_image(load_image(path), detector.image_size)
        except (OSError, ValueError) as err:
            results[i].error = str(err)
    used: set[str] = set()
    order = sorted(tensors)
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    with torch.inference_mode():
        for batch in tqdm(
            batches, desc=f"{getattr(detector, 'method_id', 'detector')} predict", disable=not progress
        ):
            stacked = torch.stack([tensors[i] for i in batch])
            try:
                scores, maps = detector.predict(stacked, [class_name] * len(batch))
            except (ValueError, RuntimeError) as err:
                for i in batch:
                    results[i].error = f"{type(err).__name__}: {err}"
                continue
            for j, i in enumerate(batch):
                score = float(scores[j])
                name = _overlay_name(Path(images[i]), used)
                fig = overlay_grid(
                    [stacked[j]], [maps[j]], titles=[f"{Path(images[i]).name}: {score:.3f}"], columns=1
                )
                fig.savefig(out / name, dpi=110, bbox_inches="tight")
                plt.close(fig)
                results[i].score, results[i].overlay = score, name
    frame = pd.DataFrame([vars(r) for r in results])
    frame.to_csv(out / "scores.csv", index=False, float_format="%.6f")
    return results


def run_predict(args: argparse.Namespace) -> int:
    """``zsad predict``: 0 when every image was scored, 1 when some failed (each named on stderr)."""
    detector = load_detector(args.method, args.backbone, args.weights, args.image_size, args.checkpoint)
    if getattr(detector, "memory", None) is not None:
        raise ValueError(
            f"{args.method} scores against few-shot reference images; `zsad predict` is zero-shot. "
            "Use the zero-shot method (e.g. winclip) or `zsad eval --k-shot K`"
        )
    results = predict_images(detector, args.images, args.out, args.class_name, args.batch_size)
    failed = [r for r in results if r.error]
    for r in results:
        if not r.error:
            print(f"{r.score:.4f}  {r.image}")
    for r in failed:
        print(f"zsad: error: {r.image}: {r.error}", file=sys.stderr)
    print(
        f"wrote {Path(args.out) / 'scores.csv'} ({len(results) - len(failed)} scored, {len(failed)} failed)"
    )
    return 1 if failed else 0
