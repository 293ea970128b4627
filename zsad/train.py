"""One trainer for every method with learned parts on a frozen CLIP (APRIL-GAN, CLIP-AD SDP+, ...).

Protocol (docs/methods.md §1.3, pitfall 15): train on the **test split of an auxiliary dataset** (it has
normal and anomalous images with masks), then evaluate zero-shot on a different target dataset. Fine-tuning on
a target that has a labelled training split (TN3K, docs/methods.md §12.2) trains on that ``split="train"``
instead, starting from a zero-shot checkpoint (``init_from``), so the target's test split is never read.

What the trainer guarantees:

- **Frozen features are computed once.** The image encoder is frozen, so its features are exact to cache:
  epoch 1 runs it and stores each image's features in :class:`zsad.cache.FeatureCache`; later epochs read
  them. Mosaic images (APRIL-GAN, docs/methods.md §3.4: four random test images of one class stitched 2x2,
  masks alike) are new images every time they are drawn, so *they* run the encoder; nothing else does.
- **Seeded and deterministic on CPU.** The learned parts are initialised under ``torch.manual_seed(seed)``;
  epoch e shuffles with a generator seeded by (seed, e) and draws mosaics from ``numpy`` seeded by (seed, e),
  so a resumed run sees exactly the batches an uninterrupted one sees.
- **Checkpoints that survive a crash.** After every epoch ``train_state.pt`` (learned parameters, optimiser
  state, epoch), ``model.safetensors``, ``config.json`` and ``train_log.csv`` are each written to a temporary
  name and renamed. ``resume=True`` continues from the last completed epoch and ends with the same weights.

CPU memory: long PyTorch runs grow through glibc's allocator unless ``MALLOC_MMAP_THRESHOLD_``,
``MALLOC_TRIM_THRESHOLD_`` (1 MiB) and ``MALLOC_ARENA_MAX=2`` are set before Python starts; the Makefile
exports them and ``zsad train --help`` says so (a warning on every run only added noise).
"""

from __future__ import annotations

import csv
import json
import os
import pickle
import shutil
import time
from collections.abc import Iterator
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from zsad.cache import FeatureCache
from zsad.data.dataset import AnomalyDataset, load_dataset, preprocess_image, preprocess_mask
from zsad.data.images import DataError, load_pair
from zsad.data.meta import record_mask_path, resolve_path
from zsad.device import check_workers, prepare
from zsad.methods.base import TrainableDetector
from zsad.outputs import expand, share_like_umask

MODEL_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
STATE_FILE = "train_state.pt"
LOG_FILE = "train_log.csv"
LR_DECAYS = ("none", "inverse-epoch")


@dataclass
class TrainSettings:
    """Optimiser and schedule; each method's class gives its paper's values (``train_settings``)."""

    epochs: int = 1
    batch_size: int = 8
    lr: float = 1e-3
    optimizer: str = "adam"  # "adam" or "adamw"
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 0.0
    mosaic: float = 0.0  # probability that an item is replaced by a 2x2 mosaic of its class
    shuffle: bool = True
    seed: int = 111
    # Per-epoch learning-rate schedule: "none" (constant) or "inverse-epoch" (lr / (epoch + 1) in the
    # 0-based epoch, MFP-CLIP's "decay factor 1/(epoch+1)"; a function of the epoch, so resume replays it).
    lr_decay: str = "none"
    extra: dict[str, Any] = field(default_factory=dict)

    def check(self) -> None:
        if self.epochs < 1 or self.batch_size < 1:
            raise ValueError(f"epochs and batch_size must be >= 1; got {self.epochs}, {self.batch_size}")
        if not 0.0 <= self.mosaic <= 1.0:
            raise ValueError(f"mosaic is a probability in [0, 1]; got {self.mosaic}")
        if self.optimizer not in ("adam", "adamw"):
            raise ValueError(f"optimizer must be 'adam' or 'adamw'; got {self.optimizer!r}")
        if self.lr <= 0:
            raise ValueError(f"lr must be > 0; got {self.lr}")
        if self.lr_decay not in LR_DECAYS:
            raise ValueError(f"lr_decay must be one of {', '.join(LR_DECAYS)}; got {self.lr_decay!r}")

    def epoch_lr(self, epoch: int) -> float:
        """Learning rate of the 0-based ``epoch``."""
        return self.lr / (epoch + 1) if self.lr_decay == "inverse-epoch" else self.lr


def preset_options(cls: type[TrainableDetector], preset: str | None) -> dict[str, Any]:
    """The detector options a training preset sets (its "options" entry; e.g. AdaCLIP's "official" preset
    trains with the official per-row dice); options given to :func:`train` win over them."""
    return dict(cls.train_presets.get(preset or "", {}).get("options", {}))


def resolve_settings(cls: type[TrainableDetector], preset: str | None, **overrides: Any) -> TrainSettings:
    """Class defaults, then the named preset, then every override that is not None."""
    if preset is not None and preset not in cls.train_presets:
        known = ", ".join(sorted(cls.train_presets)) or "none"
        raise ValueError(f"{cls.method_id} has no training preset {preset!r}; presets: {known}")
    preset_settings = {k: v for k, v in cls.train_presets.get(preset or "", {}).items() if k != "options"}
    values = {**cls.train_settings, **preset_settings}
    values.update({k: v for k, v in overrides.items() if v is not None})
    names = {f.name for f in fields(TrainSettings)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise ValueError(f"unknown training setting(s) {unknown}; known: {sorted(names)}")
    if "betas" in values:
        values["betas"] = tuple(values["betas"])
    settings = TrainSettings(**values)
    settings.check()
    return settings


# ------------------------------------------------------------------------------------------ data
def check_aux_dataset(dataset: AnomalyDataset) -> None:
    """The auxiliary set must teach localisation: anomalous images with pixel masks, in every class."""
    labels = [int(r["anomaly"]) for r in dataset.items]
    where = f"{dataset.meta_path} (split '{dataset.split}')"
    if not any(labels):
        raise DataError(
            f"{where} has no anomalous images: the trained methods learn from the test split of an "
            "auxiliary dataset (normal and defective images with masks)"
        )
    if not dataset.has_masks():
        raise DataError(f"{where} has anomalous images but no pixel masks; the map losses need them")
    for cls in dataset.classes:
        if not dataset.class_indices(cls):
            raise DataError(f"{where}: class {cls!r} has no images")


def mosaic_item(
    dataset: AnomalyDataset, cls: str, rng: np.random.Generator
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """APRIL-GAN's mosaic (docs/methods.md §3.4): four test images of class ``cls`` (each: a defect type drawn
    uniformly, then one of its images), pasted 2x2 at their own size, masks alike, then preprocessed.
    Returns (image, mask, label) with label 1 when any tile is anomalous (our choice; APRIL-GAN has no
    image loss and keeps the replaced item's label)."""
    by_type: dict[str, list[dict]] = {}
    for record in dataset.items:
        if record["cls_name"] == cls:
            by_type.setdefault(record["specie_name"] or str(record["anomaly"]), []).append(record)
    kinds = sorted(by_type)
    tiles, masks, label = [], [], 0
    for _ in range(4):
        group = by_type[kinds[rng.integers(len(kinds))]]
        record = group[rng.integers(len(group))]
        image, mask = load_pair(
            resolve_path(dataset.root, record["img_path"]), record_mask_path(dataset.root, record)
        )
        tiles.append(image)
        masks.append(Image.fromarray(mask.astype(np.uint8) * 255, mode="L"))
        label = max(label, int(record["anomaly"]))
    w, h = tiles[0].size
    canvas, mask_canvas = Image.new("RGB", (2 * w, 2 * h)), Image.new("L", (2 * w, 2 * h))
    for i, (tile, mask) in enumerate(zip(tiles, masks, strict=True)):
        at = ((i % 2) * w, (i // 2) * h)
        canvas.paste(tile.resize((w, h), Image.Resampling.BICUBIC), at)
        mask_canvas.paste(mask.resize((w, h), Image.Resampling.NEAREST), at)
    size = dataset.image_size
    return (
        preprocess_image(canvas, size),
        preprocess_mask(np.asarray(mask_canvas) > 0, size, dataset.mask_interpolation),
        label,
    )


class ItemReader(Dataset):
    """What one training item needs from disk, read in DataLoader workers: its cached frozen features, or on
    a miss its decoded image; its mask and label. Items in ``resident`` (features kept on the device) read
    the mask and label only."""

    def __init__(self, dataset: AnomalyDataset, cache: FeatureCache, key: dict[str, Any]) -> None:
        self.dataset, self.cache, self.key = dataset, cache, key
        self.resident: frozenset[int] = frozenset()

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict[str, Any]:
        record = self.dataset.items[index]
        path = resolve_path(self.dataset.root, record["img_path"])
        label = int(record["anomaly"])
        item = {"index": index, "path": path, "label": label, "features": None, "image": None}
        if index not in self.resident:
            item["features"] = self.cache.get(self.key, path)
        if item["features"] is None and index not in self.resident:
            decoded = self.dataset[index]
            item["image"], item["mask"] = decoded["image"], decoded["mask"]
        else:  # features at hand: decode the mask only, never the image
            item["mask"] = self.dataset.mask(index)
        return item


class FeatureSource:
    """Frozen features per dataset item: disk cache first, the encoder (batched) for what is missing.

    Items are read by :class:`ItemReader` in ``workers`` DataLoader processes (pinned memory on CUDA) and
    each batch moves to the backbone's device; ``keep_on_device`` keeps every item's features there after
    its first read, so later epochs read only masks from disk (for auxiliary sets that fit in its memory).
    ``encoder_images`` counts the images the image encoder ran on (tests and the benchmark read it).
    """

    def __init__(
        self,
        detector: TrainableDetector,
        dataset: AnomalyDataset,
        cache: FeatureCache,
        workers: int = 0,
        keep_on_device: bool = False,
    ) -> None:
        check_workers(workers)
        self.detector, self.dataset, self.cache = detector, dataset, cache
        self.key = detector.feature_key()
        self.device = detector.backbone.device
        self.reader = ItemReader(dataset, cache, self.key)
        self.workers, self.keep_on_device = workers, keep_on_device
        self.resident: dict[int, dict[str, torch.Tensor]] = {}
        self.encoder_images = 0

    def encode(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        self.encoder_images += images.shape[0]
        with torch.no_grad():
            return self.detector.extract_features(images)

    def epoch(self, batches: list[list[int]]) -> Iterator[list[dict[str, Any]]]:
        """The items of each batch, in order, read ahead by the workers."""
        self.reader.resident = frozenset(self.resident)
        return iter(
            DataLoader(
                self.reader,
                batch_sampler=batches,
                collate_fn=list,
                num_workers=self.workers,
                pin_memory=self.device.type == "cuda",
            )
        )

    def batch(
        self, items: list[dict[str, Any]], mosaic: dict[int, tuple]
    ) -> tuple[dict, torch.Tensor, torch.Tensor]:
        """(features stacked over the batch, masks (B, S, S), labels (B,)) on the backbone's device for the
        items of one batch; ``mosaic`` maps a position in ``items`` to a replacement (image, mask, label)."""
        per_item: list[dict[str, torch.Tensor] | None] = [None] * len(items)
        masks: list[torch.Tensor | None] = [None] * len(items)
        labels = [0] * len(items)
        to_encode: list[tuple[int, torch.Tensor]] = []
        for pos, item in enumerate(items):
            if pos in mosaic:
                image, masks[pos], labels[pos] = mosaic[pos]
                to_encode.append((pos, image))
                continue
            masks[pos], labels[pos] = item["mask"], item["label"]
            per_item[pos] = self.resident.get(item["index"], item["features"])
            if per_item[pos] is None:
                to_encode.append((pos, item["image"]))
        if to_encode:
            fresh = self.encode(torch.stack([image for _, image in to_encode]))
            for j, (pos, _) in enumerate(to_encode):
                per_item[pos] = {name: value[j] for name, value in fresh.items()}
                if pos not in mosaic:
                    self.cache.put(self.key, items[pos]["path"], per_item[pos])
        move = {"device": self.device, "non_blocking": True}
        per_item = [{name: value.to(**move) for name, value in f.items()} for f in per_item]
        if self.keep_on_device:
            kept = {item["index"]: per_item[pos] for pos, item in enumerate(items) if pos not in mosaic}
            self.resident.update(kept)
        features = {name: torch.stack([f[name] for f in per_item]) for name in per_item[0]}
        return features, torch.stack(masks).to(**move), torch.tensor(labels).to(**move)


# ------------------------------------------------------------------------------------------ checkpoints
def _atomic_write(path: Path, write) -> None:
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    os.replace(tmp, path)


def _write_json(path: Path, obj: Any) -> None:
    _atomic_write(path, lambda tmp: tmp.write_text(json.dumps(obj, indent=2, default=str) + "\n"))


def _write_log(path: Path, rows: list[dict[str, Any]]) -> None:
    def write(tmp: Path) -> None:
        names = list(dict.fromkeys(k for row in rows for k in row))
        with open(tmp, "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=names)
            writer.writeheader()
            writer.writerows(rows)

    _atomic_write(path, write)


def read_log(out_dir: str | Path) -> list[dict[str, int | float]]:
    """``train_log.csv`` as a list of rows (numbers parsed)."""
    path = Path(out_dir) / LOG_FILE
    if not path.exists():
        return []
    with open(path, newline="") as handle:
        return [{k: _number(v) for k, v in row.items()} for row in csv.DictReader(handle)]


def _number(text: str) -> int | float:
    try:
        return int(text)
    except ValueError:
        return float(text)


def read_config(out_dir: str | Path) -> dict[str, Any]:
    path = Path(out_dir) / CONFIG_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{out_dir} is not a zsad checkpoint directory: {CONFIG_FILE} is missing")
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON: {err}") from err
    if not isinstance(config, dict) or "method" not in config or "backbone" not in config:
        raise ValueError(f"{path} is not a zsad checkpoint config (no 'method'/'backbone')")
    return config


def _detector_record(detector: TrainableDetector) -> dict[str, Any]:
    backbone = detector.backbone
    return {
        "method": detector.method_id,
        "backbone": backbone.name,
        "weights": backbone.pretrained,
        "weights_id": backbone.weights_id,
        "image_size": backbone.image_size,
        "backbone_options": dict(backbone.load_options),
        "options": {k: v for k, v in detector.config().items() if k not in _BACKBONE_KEYS},
    }


_BACKBONE_KEYS = ("method", "backbone", "weights", "image_size")


def load_checkpoint(
    out_dir: str | Path,
    method_id: str | None = None,
    backbone: str | None = None,
    weights: str | None = None,
    image_size: int | None = None,
    device: str | torch.device | None = None,
    **options: Any,
) -> TrainableDetector:
    """Rebuild a trained detector from a checkpoint directory (``config.json`` + ``model.safetensors``).

    Backbone, weights, image size and method options come from the config. An argument given here must
    agree with it: a contradiction is an error, never a silent override (``method_id`` too: a checkpoint
    of another method is refused). Only the method's ``inference_options`` (e.g. ``image_score``,
    ``sigma``) may differ from the recorded ones. ``device`` (None = the CPU): where it runs, whatever device
    trained it (the file holds CPU tensors; ``device``/``precision`` are checked before weights load).
    """
    from zsad.device import prepare
    from zsad.methods import get_class

    out = Path(out_dir)
    config = read_config(out)
    if method_id is not None and method_id.lower() != config["method"]:
        raise ValueError(
            f"{out} holds a {config['method']!r} checkpoint, not {method_id!r}; pass --method "
            f"{config['method']} or another checkpoint directory"
        )
    given = {"backbone": backbone, "weights": weights, "image_size": image_size}
    for key, value in given.items():
        if value is not None and str(value) != str(config[key]):
            raise ValueError(
                f"{out} was trained with {key}={config[key]!r}; got {key}={value!r}. The checkpoint fixes "
                f"it: drop the flag (or train a new checkpoint)"
            )
    free = set(get_class(config["method"]).inference_options)
    bad = sorted(
        k
        for k, v in options.items()
        if k in config["options"] and k not in free and v != config["options"][k]
    )
    if bad:
        raise ValueError(
            f"{out} was trained with "
            + ", ".join(f"{k}={config['options'][k]!r}" for k in bad)
            + "; these are fixed by the checkpoint"
        )
    model_file = out / MODEL_FILE
    if not model_file.is_file():
        raise FileNotFoundError(f"{out} has no {MODEL_FILE}: training has not completed an epoch there")
    merged = {**config["options"], **options}
    target = prepare("cpu" if device is None else device, merged.get("precision", "fp32"))
    detector = get_class(config["method"])(_recorded_backbone(config, out, target), **merged)
    detector.load_learned(read_model_file(model_file), source=str(model_file))
    return detector


def read_model_file(model_file: Path) -> dict[str, torch.Tensor]:
    """``model.safetensors`` of a checkpoint; a damaged one (cut short by a full disk or a copy) is a
    ValueError that says how to rebuild it from ``train_state.pt`` when that is there."""
    try:
        return load_file(str(model_file), device="cpu")
    except SafetensorError as err:
        if (model_file.parent / STATE_FILE).is_file():
            fix = (
                f"rebuild it from {STATE_FILE} (re-runs the last epoch's save): zsad train --method METHOD "
                f"--aux AUX --out {model_file.parent} --resume"
            )
        else:
            fix = "train again into this folder with --overwrite"
        raise ValueError(f"{model_file} is damaged ({err}); {fix}") from err


def _read_state(path: Path) -> dict[str, Any]:
    """``train_state.pt``; a damaged one names the file and the way out instead of torch's zip error."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, pickle.UnpicklingError) as err:
        first = (str(err).splitlines() or [""])[0][:120]
        raise ValueError(
            f"{path} is damaged ({type(err).__name__}: {first}); the run cannot continue from it: start it "
            f"again with --overwrite ({MODEL_FILE} still holds the last saved weights for eval)"
        ) from err


def read_learned(path: str | os.PathLike, method_id: str) -> dict[str, torch.Tensor]:
    """The learned tensors of ``method_id`` from a zsad checkpoint directory (``model.safetensors``) or a
    released official checkpoint file (the key :data:`zsad.methods.official.OFFICIAL` names; the detector's
    ``load_learned`` converts the official layout)."""
    from zsad.methods.official import OFFICIAL, read_official_checkpoint

    path = Path(path)
    if path.is_dir():
        config = read_config(path)
        if config["method"] != method_id:
            raise ValueError(f"{path} holds a {config['method']!r} checkpoint, not {method_id!r}")
        if not (path / MODEL_FILE).is_file():
            raise FileNotFoundError(f"{path} has no {MODEL_FILE}: its training has not completed an epoch")
        return read_model_file(path / MODEL_FILE)
    key = OFFICIAL.get(method_id, {}).get("checkpoint_key")
    if key is None:
        raise ValueError(
            f"{path} is not a zsad checkpoint directory, and {method_id} has no official checkpoint format"
        )
    return read_official_checkpoint(path, key)


def _recorded_backbone(config: dict[str, Any], where: Path, device: torch.device | str = "cpu"):
    """The backbone a checkpoint was trained on, rebuilt from its record on ``device``; its weights id must
    match."""
    from zsad.backbone import load_clip

    clip = load_clip(
        config["backbone"],
        pretrained=config["weights"],
        image_size=config["image_size"],
        device=device,
        **config.get("backbone_options", {}),
    )
    if config.get("weights_id") and clip.weights_id != config["weights_id"]:
        raise ValueError(
            f"{where} was trained on weights {config['weights_id']}, but {config['weights']!r} now gives "
            f"{clip.weights_id}: the weights file changed"
        )
    return clip


def _on_cpu(obj: Any) -> Any:
    """``obj`` with every tensor inside (dicts, lists) copied to the CPU: checkpoints never name a device."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: _on_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_on_cpu(v) for v in obj)
    return obj


def _save_shared(tensors: dict[str, torch.Tensor], path: Path) -> None:
    """safetensors' ``save_file`` creates 0600 files; the checkpoint gets the user's umask like the others."""
    save_file(tensors, str(path))
    share_like_umask(path)


def _save_epoch(
    out: Path,
    detector: TrainableDetector,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    epoch: int,
    record: dict[str, Any],
    log: list[dict[str, Any]],
) -> None:
    state = {
        "epoch": epoch,
        "learned": detector.learned_state(),
        "optimizer": _on_cpu(optimizer.state_dict()),
        "scaler": scaler.state_dict(),  # {} unless fp16 training
        "log": log,  # the log rows travel with the state they describe (a kill may fall between the files)
    }
    # train_state.pt alone carries everything a resume needs, so each rename leaves a whole checkpoint.
    _atomic_write(out / STATE_FILE, lambda tmp: torch.save(state, tmp))
    _atomic_write(out / MODEL_FILE, lambda tmp: _save_shared(detector.learned_state(), tmp))
    _write_json(out / CONFIG_FILE, {**record, "epochs_done": epoch})
    _write_log(out / LOG_FILE, log)


# ------------------------------------------------------------------------------------------ training
def _comparable(value: Any) -> Any:
    """Values as config.json stores them (tuples as lists, paths as text), so equal settings compare equal."""
    return json.loads(json.dumps(value, default=str))


def check_resume(
    out: Path, previous: dict[str, Any], given: dict[str, Any], epochs: int | None, options: dict[str, Any]
) -> None:
    """Every setting given to a resumed run must equal the interrupted run's (config.json): a contradiction
    is a ValueError naming both values, never a silent override. ``epochs`` may grow (train on), not fall
    below the epochs already done. None means "not given"."""
    train_cfg, aux = previous["train"], previous["aux"]
    stored = {
        "backbone": previous["backbone"],
        "weights": previous["weights"],
        "image_size": previous["image_size"],
        **{k: train_cfg[k] for k in ("seed", "batch_size", "lr", "mosaic", "shuffle")},
        "preset": previous.get("preset"),
        "classes": aux["classes"],
        "meta": aux.get("meta"),
        "split": aux.get("split", "test"),
        "init_from": previous.get("init_from"),
        "aux": aux["root"],
    }
    paths = ("meta", "init_from", "aux")
    for key, value in given.items():
        if value is None:
            continue
        was = stored[key]
        if key in paths:
            same = was is not None and expand(value).resolve() == Path(was).resolve()
        elif key == "classes":
            same = sorted(value) == sorted(was)
        elif key in ("backbone", "weights", "image_size"):
            same = str(value) == str(was)
        else:
            same = _comparable(value) == _comparable(was)
        if not same:
            flag = "--" + key.replace("_", "-")
            raise ValueError(
                f"--resume: {out} was started with {flag} {was}; got {flag} {value}. Drop the flag to "
                "continue that run, or --overwrite to start again with the new value"
            )
    for name, value in options.items():
        was = previous["options"].get(name, "(not set)")
        if _comparable(value) != _comparable(was):
            raise ValueError(
                f"--resume: {out} was started with -o {name} {json.dumps(_comparable(was))}; got -o {name} "
                f"{json.dumps(_comparable(value))}. Drop the option to continue that run, or --overwrite"
            )
    done = int(previous.get("epochs_done", 0))
    if epochs is not None and epochs < done:
        raise ValueError(
            f"--resume: {out} already has {done} epochs done; --epochs {epochs} would not train (give "
            f"--epochs {done} or more to train on, or --overwrite to start again)"
        )


def _make_optimizer(params, settings: TrainSettings) -> torch.optim.Optimizer:
    kind = torch.optim.AdamW if settings.optimizer == "adamw" else torch.optim.Adam
    return kind(params, lr=settings.lr, betas=settings.betas, weight_decay=settings.weight_decay)


def epoch_order(n: int, seed: int, epoch: int, shuffle: bool) -> list[int]:
    """Item order of one epoch, a function of (seed, epoch) only, so resuming replays it exactly."""
    if not shuffle:
        return list(range(n))
    generator = torch.Generator().manual_seed(seed * 100_003 + epoch)
    return torch.randperm(n, generator=generator).tolist()


def train(
    method_id: str,
    aux_root: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    backbone: str | None = None,
    weights: str | None = None,
    image_size: int | None = None,
    epochs: int | None = None,
    seed: int | None = None,
    batch_size: int | None = None,
    lr: float | None = None,
    mosaic: float | None = None,
    shuffle: bool | None = None,
    preset: str | None = None,
    classes: list[str] | None = None,
    meta: str | os.PathLike | None = None,
    split: str | None = None,
    init_from: str | os.PathLike | None = None,
    resume: bool = False,
    overwrite: bool = False,
    cache: FeatureCache | str | os.PathLike | None = None,
    progress: bool = True,
    device: str | torch.device | None = None,
    workers: int = 0,
    features_on_device: bool = False,
    **options: Any,
) -> Path:
    """Train ``method_id`` on the ``split`` split (default the test split) of ``aux_root`` and write a
    checkpoint into ``out_dir``.

    Settings: the method's paper defaults (``train_settings``), then ``preset`` (e.g. APRIL-GAN's
    "aux-mvtec" / "aux-visa"), then any argument given here. ``options`` go to the detector (e.g.
    ``layers``). ``split="train"`` with ``init_from`` fine-tunes on a target's labelled training split
    (docs/methods.md §12.2); ``init_from`` is a zsad checkpoint directory or an official checkpoint file whose
    learned parts replace the random initialisation. ``cache``: a :class:`FeatureCache` or a folder (default:
    ``$ZSAD_CACHE``). ``resume`` continues an interrupted run in ``out_dir``; ``overwrite`` starts afresh
    over an existing checkpoint. ``device`` (None = the CPU; "auto", "cuda:N"): where the learned parts,
    optimiser state and batches live; the checkpoint is device-independent, so a resume may use another.
    ``precision="fp16"`` (an option, CUDA only) autocasts the training forward and scales the loss (its
    scaler state is in ``train_state.pt``). ``workers``: DataLoader processes reading cached features,
    images and masks; ``features_on_device`` keeps the cached features on the device after their first
    read. Returns ``out_dir``.
    """
    from zsad import methods

    cls = methods.get_class(method_id)
    if not issubclass(cls, TrainableDetector):
        raise ValueError(f"{method_id} has no learned parts; it is training-free (use `zsad eval`)")
    target = prepare("cpu" if device is None else device, options.get("precision", "fp32"))
    if resume and overwrite:
        raise ValueError("--resume continues the run in OUT and --overwrite starts it again: give one")
    out = expand(out_dir)
    previous = read_config(out) if (out / CONFIG_FILE).exists() else None
    if previous is not None and previous["method"] != cls.method_id:
        raise ValueError(
            f"{out} holds a {previous['method']!r} checkpoint; train {method_id} into another directory"
        )
    if previous is not None and not (resume or overwrite):
        raise FileExistsError(
            f"{out} already holds a checkpoint ({previous.get('epochs_done', 0)} epochs); pass resume=True "
            "(--resume) to continue it or overwrite=True (--overwrite) to start again"
        )
    if resume and previous is not None:
        # A resumed run takes every setting from the interrupted one; contradicting arguments are errors.
        given = {
            "backbone": backbone,
            "weights": weights,
            "image_size": image_size,
            "seed": seed,
            "batch_size": batch_size,
            "lr": lr,
            "mosaic": mosaic,
            "shuffle": shuffle,
            "preset": preset,
            "classes": classes,
            "meta": meta,
            "split": split,
            "init_from": init_from,
            "aux": aux_root,
        }
        check_resume(out, previous, given, epochs, options)
        settings = TrainSettings(**{**previous["train"], "betas": tuple(previous["train"]["betas"])})
        if epochs is not None:
            settings.epochs = int(epochs)
        aux_root, classes = previous["aux"]["root"], previous["aux"]["classes"]
        meta, split = previous["aux"].get("meta"), previous["aux"].get("split", "test")
        init_from = previous.get("init_from")
        backbone = _recorded_backbone(previous, out, target)
        weights = image_size = None
        options = {**previous["options"], **options}
    else:
        split = split or "test"
        settings = resolve_settings(
            cls,
            preset,
            epochs=epochs,
            seed=seed,
            batch_size=batch_size,
            lr=lr,
            mosaic=mosaic,
            shuffle=shuffle,
        )
        options = {**preset_options(cls, preset), **options}
    torch.manual_seed(settings.seed)  # the learned parts' initialisation
    detector = methods.create(
        cls.method_id, backbone=backbone, weights=weights, image_size=image_size, device=target, **options
    )
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test'; got {split!r}")
    if init_from is not None:
        detector.load_learned(read_learned(init_from, cls.method_id), source=str(init_from))
    dataset = load_dataset(aux_root, split=split, image_size=detector.image_size, classes=classes, meta=meta)
    check_aux_dataset(dataset)
    optimizer = _make_optimizer(detector.learned.parameters(), settings)
    fp16 = detector.options.get("precision") == "fp16"
    scaler = torch.amp.GradScaler(target.type, enabled=fp16)
    start, log = 0, []
    if resume and (out / STATE_FILE).exists():
        state = _read_state(out / STATE_FILE)
        detector.load_learned(state["learned"], source=str(out / STATE_FILE))
        optimizer.load_state_dict(state["optimizer"])  # moves the state to the parameters' device
        if fp16 and state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        start = int(state["epoch"])
        log = state["log"] if "log" in state else read_log(out)[:start]
    out.mkdir(parents=True, exist_ok=True)
    record = {
        **_detector_record(detector),
        "train": asdict(settings),
        "aux": {
            "root": str(dataset.root),
            "classes": dataset.classes,
            "meta": None if meta is None else str(meta),
            "split": split,
            "images": len(dataset),
        },
        "init_from": None if init_from is None else str(init_from),
        "preset": preset,
    }
    feature_cache = cache if isinstance(cache, FeatureCache) else FeatureCache(cache)
    source = FeatureSource(detector, dataset, feature_cache, workers, features_on_device)
    detector.learned.train()
    for epoch in range(start, settings.epochs):
        started, encoded_before = time.perf_counter(), source.encoder_images
        order = epoch_order(len(dataset), settings.seed, epoch, settings.shuffle)
        rng = np.random.default_rng([settings.seed, epoch])
        for group in optimizer.param_groups:
            group["lr"] = settings.epoch_lr(epoch)
        totals: dict[str, float] = {}
        batches = [order[i : i + settings.batch_size] for i in range(0, len(order), settings.batch_size)]
        bar = tqdm(batches, desc=f"{cls.method_id} epoch {epoch + 1}/{settings.epochs}", disable=not progress)
        for indices, items in zip(bar, source.epoch(batches), strict=True):
            draws = rng.random(len(indices))
            mosaic_items = {
                pos: mosaic_item(dataset, dataset.items[i]["cls_name"], rng)
                for pos, i in enumerate(indices)
                if draws[pos] < settings.mosaic
            }
            features, masks, labels = source.batch(items, mosaic_items)
            names = [dataset.items[i]["cls_name"] for i in indices]
            # fp16: the learned forward under autocast too, its loss scaled (bf16 autocasts the tower only).
            with torch.autocast(target.type, dtype=torch.float16) if fp16 else nullcontext():
                loss, parts = detector.training_loss(features, masks, labels, names)
            if not torch.isfinite(loss):
                raise FloatingPointError(
                    f"{cls.method_id}: the loss became {loss.item()} in epoch {epoch + 1}"
                )
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)  # optimizer.step() unless fp16
            scaler.update()
            for name, value in {"loss": loss.item(), **parts}.items():
                totals[name] = totals.get(name, 0.0) + float(value) * len(indices)
            bar.set_postfix(loss=f"{loss.item():.4f}")
        row = {"epoch": epoch + 1, **{k: v / len(dataset) for k, v in totals.items()}}
        row["seconds"] = time.perf_counter() - started
        row["encoded_images"] = source.encoder_images - encoded_before
        log.append(row)
        _save_epoch(out, detector, optimizer, scaler, epoch + 1, record, log)
    if start >= settings.epochs:
        # Nothing left to train: the state is the last epoch's. Writing every file from it again completes a
        # save that a crash cut short after train_state.pt, and repairs a damaged model.safetensors.
        _save_epoch(out, detector, optimizer, scaler, start, record, log)
    detector.learned.eval()
    return out


def train_with_validation(
    method_id: str,
    aux_root: str | os.PathLike,
    val_root: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    metric: str = "pixel_f1_max",
    val_split: str = "test",
    val_classes: list[str] | None = None,
    epochs: int | None = None,
    overwrite: bool = False,
    **train_options: Any,
) -> tuple[Path, list[dict[str, float]]]:
    """Train ``method_id`` on ``aux_root`` and keep the epoch that scores best on a **validation** dataset
    the user names (docs/methods.md pitfall 14). AdaCLIP's official default validates on the *target* test
    set every epoch and keeps the best pixel F1-max, which selects the checkpoint on the data it then
    reports; here the target is never read.

    Runs :func:`train` one epoch at a time (``resume`` replays exactly the uninterrupted run), evaluates
    ``metric`` (class mean) on ``val_root``'s ``val_split`` after each epoch, and copies the best epoch's
    checkpoint to ``out_dir/best``. Returns (that folder, one row per epoch). ``val_root`` must differ from
    ``aux_root``. ``epochs`` defaults to the method's paper schedule. The default schedule (fixed epochs)
    needs none of this: ``train(method_id, ...)``.
    """
    from zsad import methods
    from zsad.evaluate import evaluate

    if Path(val_root).resolve() == Path(aux_root).resolve():
        raise ValueError("the validation dataset must differ from the auxiliary (training) dataset")
    out = Path(out_dir)
    run, best = out / "run", out / "best"
    if run.exists() or best.exists():
        if not overwrite:
            raise FileExistsError(f"{out} already holds a validation run; pass overwrite=True to start again")
        shutil.rmtree(run, ignore_errors=True)
        shutil.rmtree(best, ignore_errors=True)
    total = epochs or methods.get_class(method_id).train_settings["epochs"]
    rows: list[dict[str, float]] = []
    best_value = -np.inf
    for epoch in range(1, total + 1):
        resume = (run / CONFIG_FILE).exists()
        options = {} if resume else train_options
        train(method_id, aux_root, run, epochs=epoch, resume=resume, progress=False, **options)
        detector = load_checkpoint(run)
        val = load_dataset(val_root, val_split, detector.image_size, val_classes)
        table = evaluate(detector, val, progress=False).table
        if metric not in table.columns:
            raise ValueError(
                f"metric {metric!r} is not a column of the evaluation table: {list(table.columns)}"
            )
        value = float(table.loc["mean", metric])
        rows.append({"epoch": epoch, metric: value})
        if value > best_value:  # NaN (undefined metric) never wins
            best_value = value
            if best.exists():
                shutil.rmtree(best)
            shutil.copytree(run, best)
    if not best.exists():
        raise ValueError(f"{metric} was undefined on {val_root} at every epoch; choose another metric")
    return best, rows
