"""Single-image prediction (``zsad predict``): score, full-resolution map, overlay and, with thresholds,
label, normalised score and binary mask per image.

The detector is built like ``zsad eval`` builds it: :func:`zsad.methods.create` for training-free methods,
:func:`zsad.train.load_checkpoint` for a ``zsad train`` folder, :func:`zsad.methods.from_official` for a
released checkpoint, or an exported ONNX graph run by ONNX Runtime (:class:`zsad.export.OnnxDetector`).
Few-shot methods take their normal reference images with ``--reference``. Images are decoded with the same
robust loader as datasets (:func:`zsad.data.images.load_image`); an unreadable one is reported by name and
skipped, and the others are still scored. Every output is written under a temporary name and renamed.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from zsad.methods.base import Detector

if TYPE_CHECKING:
    from zsad.thresholds import Thresholds


LABELS = ("normal", "anomalous")


@dataclass
class Prediction:
    """One image's outcome: score (and with thresholds its normalised score and label), the files written
    for it (names inside the output folder), or the error that stopped it."""

    image: str
    score: float | None = None
    normalized_score: float | None = None
    label: int | None = None
    map: str = ""
    mask: str = ""
    overlay: str = ""
    error: str = ""


def load_detector(
    method: str,
    backbone: str | None = None,
    weights: str | None = None,
    image_size: int | None = None,
    checkpoint: str | Path | None = None,
    official: str | Path | None = None,
    device: str | torch.device | None = None,
    **options: Any,
) -> Detector:
    """A ready detector: from a checkpoint folder when given (its config fixes backbone/weights/size), from
    an official checkpoint file through ``from_official``, else the method's paper defaults overridden by the
    arguments. ``device`` (None = the CPU) and ``options`` (e.g. ``precision``) go to whichever builds it."""
    if checkpoint is not None and official is not None:
        raise ValueError("--checkpoint and --official are two sources of learned weights; give one")
    if checkpoint is not None:
        from zsad.train import load_checkpoint

        return load_checkpoint(checkpoint, method, backbone, weights, image_size, device, **options)
    from zsad import methods

    if official is not None:
        if not Path(official).is_file():
            raise ValueError(f"{official}: no such official checkpoint file")
        return methods.from_official(
            method,
            checkpoint=official,
            weights=weights,
            image_size=image_size,
            backbone=backbone,
            device=device,
            **options,
        )

    detector = methods.create(
        method, backbone=backbone, weights=weights, image_size=image_size, device=device, **options
    )
    if getattr(detector, "learned", None) is not None:
        print(
            f"zsad: warning: {method} has learned parts and no --checkpoint was given; "
            "predicting with its untrained initialisation",
            file=sys.stderr,
        )
    return detector


def _output_stem(path: Path, used: set[str]) -> str:
    stem, i = path.stem, 1
    while stem in used:  # two inputs with one file name (a/x.png, b/x.png)
        i += 1
        stem = f"{path.stem}_{i}"
    used.add(stem)
    return stem


def load_references(paths: Sequence[str | Path]) -> list[Any]:
    """Decode few-shot reference images: files, or folders whose image files are all used (sorted).

    Returns decoded PIL images; a folder without an image file, or an unreadable file, is one ValueError
    naming it (references are never silently skipped: they define what "normal" is).
    """
    from zsad.data.images import is_image_file, load_image

    files: list[Path] = []
    for path in map(Path, paths):
        if path.is_dir():
            found = sorted(f for f in path.iterdir() if f.is_file() and is_image_file(f))
            if not found:
                raise ValueError(f"{path}: reference folder holds no image file")
            files += found
        elif path.is_file():
            files.append(path)
        else:
            raise ValueError(f"{path}: no such reference image or folder")
    images = []
    for file in files:
        try:
            images.append(load_image(file))
        except (OSError, ValueError) as err:
            raise ValueError(f"{file}: unreadable reference image ({err})") from None
    return images


def full_resolution(anomaly_map: torch.Tensor, height: int, width: int) -> np.ndarray:
    """The square (S, S) map resized back to the image's (height, width), bilinear (align_corners=False,
    as the maps' own upsampling from the patch grid), float32."""
    grid = anomaly_map.float().reshape(1, 1, *anomaly_map.shape[-2:])
    resized = F.interpolate(grid, size=(height, width), mode="bilinear", align_corners=False)
    return resized[0, 0].cpu().numpy().astype(np.float32)


def save_outputs(
    out: Path,
    stem: str,
    image: torch.Tensor,
    size: tuple[int, int],
    anomaly_map: torch.Tensor,
    class_name: str,
    thresholds: Thresholds | None,
    title: str,
) -> dict[str, str]:
    """Write ``<stem>_map.npy`` (float32, the original ``size`` = (height, width)), ``<stem>_mask.png``
    (with thresholds) and ``<stem>_overlay.png`` (on the network's input ``image``) for one image; each
    through a temporary name. Returns the names written."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    from PIL import Image

    from zsad.thresholds import atomic_write
    from zsad.viz import overlay_grid

    full = full_resolution(anomaly_map, *size)
    names = {"map": f"{stem}_map.npy", "overlay": f"{stem}_overlay.png"}
    atomic_write(out / names["map"], partial(np.save, arr=full))
    if thresholds is not None:
        mask = thresholds.mask(full, class_name)
        if mask is not None:
            names["mask"] = f"{stem}_mask.png"
            binary = Image.fromarray(mask.astype(np.uint8) * 255)
            atomic_write(out / names["mask"], lambda tmp: binary.save(tmp, format="PNG"))
    fig = overlay_grid([image], [anomaly_map], titles=[title], columns=1)
    atomic_write(out / names["overlay"], partial(fig.savefig, format="png", dpi=110, bbox_inches="tight"))
    plt.close(fig)
    return names


class ImageDecoder(torch.utils.data.Dataset):
    """One input image decoded and resized (in a DataLoader worker): (index, (height, width), tensor, "") or,
    for a file that cannot be read, (index, None, None, the error)."""

    def __init__(self, paths: Sequence[str | Path], image_size: int) -> None:
        self.paths, self.image_size = list(paths), image_size

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[int, tuple[int, int] | None, torch.Tensor | None, str]:
        from zsad.data.dataset import preprocess_image
        from zsad.data.images import load_image

        try:
            decoded = load_image(self.paths[index])
            return index, (decoded.height, decoded.width), preprocess_image(decoded, self.image_size), ""
        except (OSError, ValueError) as err:
            return index, None, None, str(err)


def predict_images(
    detector: Detector,
    images: list[str | Path],
    out_dir: str | Path,
    class_name: str = "object",
    batch_size: int = 8,
    progress: bool = True,
    thresholds: Thresholds | None = None,
    workers: int = 0,
) -> list[Prediction]:
    """Score every image; per scored image write its full-resolution map, overlay and (with thresholds)
    binary mask (:func:`save_outputs`), then ``OUT/scores.csv`` (all images: score, normalised score,
    label, file names, and an ``error`` column for the ones that could not be read or scored). ``workers``:
    DataLoader processes decoding and resizing the images."""
    from torch.utils.data import DataLoader

    from zsad.thresholds import atomic_write

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    results = [Prediction(str(p)) for p in images]
    tensors: dict[int, torch.Tensor] = {}
    sizes: dict[int, tuple[int, int]] = {}
    decoder = ImageDecoder(images, detector.image_size)
    for i, size, tensor, error in DataLoader(decoder, batch_size=None, num_workers=workers):
        if error:
            results[i].error = error
        else:
            sizes[i], tensors[i] = size, tensor
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
                scores, maps = scores.cpu(), maps.cpu()
            except (ValueError, RuntimeError) as err:
                for i in batch:
                    results[i].error = f"{type(err).__name__}: {err}"
                continue
            for j, i in enumerate(batch):
                result = results[i]
                result.score = float(scores[j])
                title = f"{Path(images[i]).name}: {result.score:.3f}"
                if thresholds is not None:
                    result.normalized_score, result.label = thresholds.decide(result.score, class_name)
                    title += f" ({LABELS[result.label]})"
                stem = _output_stem(Path(images[i]), used)
                names = save_outputs(out, stem, stacked[j], sizes[i], maps[j], class_name, thresholds, title)
                for key, name in names.items():
                    setattr(result, key, name)
    frame = pd.DataFrame([vars(r) for r in results])
    if thresholds is None:
        frame = frame.drop(columns=["normalized_score", "label", "mask"])
    else:
        frame["label"] = frame["label"].astype("Int64")
    atomic_write(out / "scores.csv", lambda tmp: frame.to_csv(tmp, index=False))  # full precision
    return results


def resolve_thresholds(
    path: str | Path | None, checkpoint: str | Path | None, config: dict[str, Any] | None = None
) -> Thresholds | None:
    """``--thresholds FILE``, else the checkpoint folder's own ``thresholds.json`` if it has one; checked
    against the detector's ``config`` (method, backbone, image size) when given."""
    from zsad.thresholds import load_thresholds

    if path is None and checkpoint is not None and (Path(checkpoint) / "thresholds.json").is_file():
        path = Path(checkpoint) / "thresholds.json"
    if path is None:
        return None
    thresholds = load_thresholds(path)
    thresholds.source = str(path)
    if config is not None:
        thresholds.check_detector(config, path)
    return thresholds


def give_references(detector: Detector, references: Sequence[str | Path] | None, class_name: str) -> None:
    """Fit a few-shot detector's memory on ``--reference`` images of ``class_name``; refuse references to a
    zero-shot method and a memory-only method (WinCLIP+) without them."""
    from zsad.data.dataset import preprocess_image

    method = getattr(detector, "method_id", "detector")
    if references:
        if not detector.few_shot:
            raise ValueError(f"{method} is zero-shot: it takes no --reference images")
        images = load_references(references)
        stacked = torch.stack([preprocess_image(im, detector.image_size) for im in images])
        detector.fit_few_shot(stacked, [class_name] * len(images))
    elif getattr(detector, "memory", None) is not None:
        raise ValueError(
            f"{method} scores against few-shot reference images: give k normal images with "
            "--reference DIR|FILES (or use `zsad eval --k-shot K`)"
        )


def detector_from_args(
    args: argparse.Namespace, device: torch.device | None = None, **options: Any
) -> Detector:
    """:func:`load_detector` from the CLI's ``--method``, ``--backbone``, ``--weights``, ``--image-size``,
    ``--checkpoint``, ``--official`` and, where the command has it, ``--precision`` (eval, predict, calibrate
    and export build their detectors alike)."""
    if getattr(args, "precision", None):
        options["precision"] = args.precision
    return load_detector(
        args.method,
        args.backbone,
        args.weights,
        args.image_size,
        args.checkpoint,
        args.official,
        device=device,
        **options,
    )


def run_predict(args: argparse.Namespace) -> int:
    """``zsad predict``: 0 when every image was scored, 1 when some failed (each named on stderr)."""
    from zsad.device import prepare

    device = prepare(args.device, args.precision or "fp32")  # before any weights load
    thresholds = resolve_thresholds(args.thresholds, args.checkpoint)  # a bad file fails before any load
    if args.onnx is not None:
        from zsad.export import OnnxDetector

        if args.checkpoint is not None or args.official is not None or args.reference:
            raise ValueError("--onnx runs an exported graph: learned weights and references are inside it")
        detector = OnnxDetector(
            args.onnx, method=args.method, class_name=args.class_name, image_size=args.image_size
        )
        class_name = detector.class_name
    else:
        class_name = args.class_name or "object"
        if args.method is None:
            raise ValueError("zsad predict needs --method (or --onnx MODEL)")
        from zsad.methods import get_class

        if args.reference and not get_class(args.method).few_shot:  # before any weights load
            raise ValueError(f"{args.method} is zero-shot: it takes no --reference images")
        detector = detector_from_args(args, device)
        give_references(detector, args.reference, class_name)
    if thresholds is not None:
        thresholds.check_detector(detector.config(), thresholds.source)
    results = predict_images(
        detector,
        args.images,
        args.out,
        class_name,
        args.batch_size,
        thresholds=thresholds,
        workers=args.workers,
    )
    failed = [r for r in results if r.error]
    for r in results:
        if not r.error:
            decision = "" if r.label is None else f"  {r.normalized_score:.4f}  {LABELS[r.label]}"
            print(f"{r.score:.4f}{decision}  {r.image}")
    for r in failed:
        print(f"zsad: error: {r.image}: {r.error}", file=sys.stderr)
    print(
        f"wrote {Path(args.out) / 'scores.csv'} ({len(results) - len(failed)} scored, {len(failed)} failed)"
    )
    return 1 if failed else 0


class PerImageScores:
    """Keeps the per-image scores of an evaluation whose detector replaces them by a transductive step over
    the whole test set (``finalize_scores``: APRIL-GAN's and CLIP-AD's per-class min-max). Thresholds are
    calibrated on per-image scores (what ``zsad predict`` returns), so labels must be decided on those."""

    def __init__(self, detector: Detector) -> None:
        self.detector = detector
        self.scores: pd.Series | None = None
        self.finalize = getattr(detector, "finalize_scores", None)

    def __enter__(self) -> PerImageScores:
        if self.finalize is not None:
            self.detector.finalize_scores = self._record  # instance attribute, removed on exit
        return self

    def __exit__(self, *exc: object) -> None:
        if self.finalize is not None:
            del self.detector.finalize_scores

    def _record(self, frame: pd.DataFrame) -> pd.DataFrame:
        self.scores = frame["score"].copy()
        return self.finalize(frame)


def decide_scores(
    frame: pd.DataFrame, thresholds: Thresholds, per_image: pd.Series | None = None
) -> pd.DataFrame:
    """``scores.csv`` rows with ``normalized_score`` and ``predicted`` (label) from the thresholds; with a
    transductive final score, ``per_image_score`` holds the score the decision used."""
    out = frame.copy()
    scores = out["score"] if per_image is None else per_image
    if per_image is not None:
        out["per_image_score"] = per_image.to_numpy()
    decided = [thresholds.decide(float(s), c) for s, c in zip(scores, out["cls_name"], strict=True)]
    out["normalized_score"] = [d[0] for d in decided]
    out["predicted"] = [d[1] for d in decided]
    return out


def confusion_line(frame: pd.DataFrame) -> str:
    """``TP/FP/TN/FN`` of the thresholded labels against the ground truth."""
    truth, predicted = frame["label"].astype(bool), frame["predicted"].astype(bool)
    counts = {
        "TP": int((truth & predicted).sum()),
        "FP": int((~truth & predicted).sum()),
        "TN": int((~truth & ~predicted).sum()),
        "FN": int((truth & ~predicted).sum()),
    }
    return "thresholded labels: " + ", ".join(f"{k} {v}" for k, v in counts.items())


def save_eval_maps(
    maps: dict[str, np.ndarray],
    dataset: Any,
    out_dir: str | Path,
    thresholds: Thresholds | None = None,
    scores: pd.DataFrame | None = None,
) -> Path:
    """``zsad eval --save-maps DIR``: per test image, under its path relative to the dataset root, the
    files ``zsad predict`` writes (full-resolution ``_map.npy``, ``_mask.png`` with thresholds, overlay)."""
    from zsad.data.dataset import preprocess_image
    from zsad.data.images import load_image
    from zsad.data.meta import resolve_path

    out = Path(out_dir)
    maps = {str(path): value for path, value in maps.items()}
    score_of = {} if scores is None else dict(zip(scores["path"].map(str), scores["score"], strict=True))
    for item in dataset.items:
        relative = Path(item["img_path"])
        path = str(resolve_path(dataset.root, item["img_path"]))
        if path not in maps:
            continue
        folder = out / relative.parent
        folder.mkdir(parents=True, exist_ok=True)
        image = load_image(path)
        anomaly_map = torch.from_numpy(maps[path])
        title = f"{relative}: {score_of.get(path, float('nan')):.3f}"
        save_outputs(
            folder,
            relative.stem,
            preprocess_image(image, anomaly_map.shape[-1]),
            (image.height, image.width),
            anomaly_map,
            item["cls_name"],
            thresholds,
            title,
        )
    return out
