"""Build a ``meta.json`` (docs/methods.md §1.3) for a dataset in its original, unmodified layout.

``prepare_dataset(fmt, src)`` lists the files of ``src``, pairs images with masks, and writes the index; it
never moves, renames or rewrites an image. Paths in the index are relative to ``src``; classes, defect types
and files are sorted, so the output is deterministic. Layouts (``FORMATS``):

``mvtec`` (also ``mpdd``, ``btad``): ``<cls>/{train,test}/<specie>/<img>`` with masks in
    ``<cls>/ground_truth/<specie>/``. A specie named ``good``/``ok``/``normal`` is normal, every other one
    anomalous. Masks are paired by file stem (``<stem>_mask.*`` or ``<stem>.*``, any image extension, so
    BTAD's ``.bmp`` images with ``.png`` masks pair), not by sorted position as the official generator does;
    on MVTec, MPDD and BTAD both give the same pairs, and a missing mask is reported instead of silently
    shifting every later pair. The sub-variant is detected per class:

    * MVTec 3D-AD: ``<cls>/<split>/<specie>/rgb/<img>`` with ``.../gt/<img>`` masks (RGB only).
    * MVTec LOCO: masks are folders ``<cls>/ground_truth/<specie>/<stem>/`` holding one or more mask files;
      the *folder* is stored as ``mask_path`` and :func:`zsad.data.images.load_mask` OR-s its files.
    * For all variants a ``validation`` split (normal images only) is added to ``train``.

``visa``: ``split_csv/1cls.csv`` (columns object, split, label, image, mask; label ``normal``/``anomaly``),
    paths taken from the CSV, ``specie_name`` empty, as in the official generator.

``ksdd``: KolektorSDD ``kos*/PartN.jpg`` + ``PartN_label.bmp`` (all to ``test``), or KolektorSDD2
    ``{train,test}/N.png`` + ``N_GT.png`` (the official split is kept, so ``train`` also holds the anomalous
    training images: few-shot code must filter on ``anomaly``). An image is anomalous when its label has a
    non-zero pixel; ``specie_name`` is ``good``/``defect``; class ``kolektor``.

``magnetic_tile``: the original ``MT_<Type>/Imgs/<stem>.jpg`` + ``<stem>.png`` mask layout. One class
    ``magnetic_tile``; ``specie_name`` is the lower-cased type (``MT_Free`` -> ``good``). Split: a fixed half
    of ``MT_Free`` (the ``n // 2`` stems with the smallest ``sha256(f"{seed}:{stem}")``, seed
    :data:`MAGNETIC_TILE_SEED`) goes to ``train``; the other normal images and every defect image go to
    ``test``. The hash makes the split independent of platform, Python version and listing order. The four
    ``MT_Uneven`` images whose masks are empty keep ``anomaly = 1`` (their folder label).

``folder`` (generic), either
    * ``<cls>/<sub>/<img>``: ``sub`` in good/normal/ok is normal, any other ``sub`` anomalous
      (``specie_name = sub``); optional masks in ``<cls>/<tree>/<sub>/`` or directly in ``<cls>/<tree>/``
      with ``<tree>`` one of ground_truth/masks/gt/mask, matched by ``<stem>_mask.*`` or ``<stem>.*``. An
      anomalous image without a mask gets ``mask_path = ""`` (image-level only); or
    * flat single class: ``images/<img>`` + optional ``masks/`` (or ``ground_truth/``, ``gt/``): an image is
      anomalous when its mask has a non-zero pixel. Class name: the name of ``src``.
    Everything goes to ``test``.

``tn3k``: folder pairs ``<prefix>-image`` / ``<prefix>-mask`` (e.g. ``trainval-image``, ``test-image``),
    masks by stem; ``test`` goes to ``test``, any other prefix to ``train`` (the fine-tuning split of
    docs/methods.md §12.2). All images anomalous, class ``thyroid`` (as in AnomalyCLIP), ``specie_name``
    empty.

``normal_abnormal``: image-only medical sets (HeadCT, BrainMRI, Br35H): ``src/<normal>/`` with
    ``<normal>`` one of no/normal/good/ok/0/negative/healthy, and one or more other folders (yes/abnormal/1,
    ...) of anomalous images. ``mask_path`` is ``""`` everywhere (no pixel metrics,
    docs/methods.md pitfall 22); all to ``test``; class name: the name of ``src``.

Single-class formats accept ``class_name=`` to override the default name. ``skip_bad=True`` decodes every
pair and drops unreadable ones (and anomalous images whose mask is missing) with one warning; without it any
such problem raises :class:`DataError` listing them.
"""

from __future__ import annotations

import csv
import hashlib
import os
import re
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from zsad.data.images import DataError, is_image_file, load_mask, load_pair
from zsad.data.meta import META_NAME, SPLITS, make_record, record_mask_path, resolve_path, write_meta

FORMATS: dict[str, str] = {
    "mvtec": "MVTec AD / 3D-AD (RGB) / LOCO: <cls>/{train,test}/<specie>/ + <cls>/ground_truth/<specie>/",
    "mpdd": "MPDD, MVTec layout",
    "btad": "BTAD, MVTec layout with ok/ko folders (mask extension may differ from the image's)",
    "visa": "VisA: split_csv/1cls.csv (object, split, label, image, mask)",
    "ksdd": "KolektorSDD kos*/PartN.jpg + PartN_label.bmp, or KolektorSDD2 {train,test}/N.png + N_GT.png",
    "magnetic_tile": "Magnetic Tile Defect: MT_<Type>/Imgs/<stem>.jpg + <stem>.png",
    "folder": "generic: <cls>/{good|normal|ok,<defect>...}/ (+ masks/ or ground_truth/), or images/ + masks/",
    "tn3k": "TN3K: <prefix>-image/ + <prefix>-mask/ (trainval -> train, test -> test)",
    "normal_abnormal": "image-only medical sets: {no,yes} / {normal,abnormal} / {0,1} folders",
}
NORMAL_SPECIES = frozenset({"good", "ok", "normal"})
NORMAL_FOLDERS = frozenset({"no", "normal", "good", "ok", "0", "negative", "healthy"})
MASK_TREES = ("ground_truth", "masks", "gt", "mask")
MAGNETIC_TILE_SEED = 0
# Split folder -> meta split. Validation folders hold normal images only (MVTec 3D-AD, LOCO).
_MVTEC_SPLITS = {"train": "train", "validation": "train", "test": "test"}


@dataclass
class _Builder:
    """Accumulates records and problems (``(image path, reason)``) while a layout is walked."""

    src: Path
    meta: dict[str, dict[str, list[dict[str, Any]]]] = field(default_factory=lambda: {s: {} for s in SPLITS})
    problems: list[tuple[str, str]] = field(default_factory=list)

    def rel(self, path: Path | None) -> str:
        return "" if path is None else path.relative_to(self.src).as_posix()

    def add(self, split: str, cls: str, image: Path, mask: Path | None, specie: str, anomaly: int) -> None:
        record = make_record(self.rel(image), self.rel(mask) if anomaly else "", cls, specie, anomaly)
        self.meta[split].setdefault(cls, []).append(record)

    def problem(self, image: Path | str, reason: str) -> None:
        self.problems.append((str(image), reason))


def _subdirs(path: Path) -> list[Path]:
    """Visible sub-folders, sorted (skips ``.git``, ``__MACOSX`` and the like)."""
    return sorted(d for d in path.iterdir() if d.is_dir() and not d.name.startswith((".", "__")))


def _images(path: Path) -> list[Path]:
    return sorted(f for f in path.iterdir() if is_image_file(f)) if path.is_dir() else []


def _stem_index(paths: Iterable[Path]) -> dict[str, Path]:
    """stem -> file; with two files of one stem (``a.png``, ``a.bmp``) the first in sorted order wins."""
    index: dict[str, Path] = {}
    for p in sorted(paths):
        index.setdefault(p.stem, p)
    return index


def _match_mask(stem: str, masks: dict[str, Path]) -> Path | None:
    """The mask named ``<stem>_mask`` (MVTec, MPDD) or ``<stem>`` (BTAD, 3D-AD, TN3K, LOCO folders)."""
    for suffix in ("_mask", ""):
        if stem + suffix in masks:
            return masks[stem + suffix]
    return None


def _require_dir(src: Path, expected: str) -> None:
    if not src.exists():
        raise DataError(f"dataset folder not found: {src}")
    if not src.is_dir():
        raise DataError(f"dataset source must be a folder, got a file: {src} (expected {expected})")


def _layout_error(fmt: str, src: Path, expected: str) -> DataError:
    found = [d.name for d in _subdirs(src)][:12]
    return DataError(f"{src} is not in the '{fmt}' layout: expected {expected}; found sub-folders {found}")


# --- mvtec / mpdd / btad ------------------------------------------------------------------------------------


def _mvtec_variant(cdir: Path) -> str:
    test = cdir / "test"
    if any((s / "rgb").is_dir() for s in _subdirs(test)):
        return "3d"
    gt = cdir / "ground_truth"
    if gt.is_dir() and any(_subdirs(s) for s in _subdirs(gt)):
        return "loco"
    return "2d"


def _mvtec_masks(variant: str, cdir: Path, sdir: Path) -> dict[str, Path]:
    """stem -> mask of one specie folder: files (MVTec AD, MPDD, BTAD, 3D-AD) or folders (LOCO)."""
    if variant == "loco":
        gt = cdir / "ground_truth" / sdir.name
        return {d.name: d for d in _subdirs(gt)} if gt.is_dir() else {}
    return _stem_index(_images(sdir / "gt" if variant == "3d" else cdir / "ground_truth" / sdir.name))


def _add_mvtec_class(b: _Builder, cdir: Path, cls: str) -> None:
    variant = _mvtec_variant(cdir)
    for folder, split in _MVTEC_SPLITS.items():
        if not (cdir / folder).is_dir():
            continue
        for sdir in _subdirs(cdir / folder):
            anomalous = sdir.name.lower() not in NORMAL_SPECIES
            masks = _mvtec_masks(variant, cdir, sdir) if anomalous else {}
            for img in _images(sdir / "rgb" if variant == "3d" else sdir):
                mask = _match_mask(img.stem, masks)
                if anomalous and mask is None:
                    b.problem(
                        img, f"no mask found for this {variant} image (class {cls}, specie {sdir.name})"
                    )
                    continue
                b.add(split, cls, img, mask, sdir.name, int(anomalous))


def _prepare_mvtec(b: _Builder, fmt: str) -> None:
    class_dirs = [d for d in _subdirs(b.src) if (d / "test").is_dir()]
    if not class_dirs:
        expected = "<cls>/test/<specie>/<image> (+ <cls>/train/good/, <cls>/ground_truth/<specie>/)"
        if (b.src / "test").is_dir():
            expected += f"; {b.src} looks like a single class folder: pass its parent folder"
        raise _layout_error(fmt, b.src, expected)
    for cdir in class_dirs:
        _add_mvtec_class(b, cdir, cdir.name)


# --- visa ---------------------------------------------------------------------------------------------------

_VISA_COLUMNS = ("object", "split", "label", "image", "mask")


def _prepare_visa(b: _Builder) -> None:
    csv_path = b.src / "split_csv" / "1cls.csv"
    if not csv_path.is_file():
        raise _layout_error("visa", b.src, "split_csv/1cls.csv (shipped with VisA) next to the class folders")
    with csv_path.open(newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        missing = [c for c in _VISA_COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            raise DataError(f"{csv_path}: missing column(s) {missing}; expected {list(_VISA_COLUMNS)}")
        rows = list(reader)
    for line, row in enumerate(rows, start=2):
        split, label = row["split"].strip(), row["label"].strip()
        if split not in SPLITS or label not in ("normal", "anomaly"):
            raise DataError(
                f"{csv_path} line {line}: split must be train/test and label normal/anomaly, "
                f"got split={split!r} label={label!r}"
            )
        cls, image, mask = row["object"].strip(), row["image"].strip(), row["mask"].strip()
        anomalous = label == "anomaly"
        if anomalous and not mask:
            b.problem(b.src / image, f"{csv_path} line {line}: anomalous image without a mask")
            continue
        record = make_record(image, mask if anomalous else "", cls, "", int(anomalous))
        b.meta[split].setdefault(cls, []).append(record)
    for split in SPLITS:
        b.meta[split] = dict(sorted(b.meta[split].items()))


# --- ksdd ---------------------------------------------------------------------------------------------------


def _add_labelled_folder(b: _Builder, folder: Path, split: str, cls: str, label_suffix: str) -> None:
    """Images with a ``<stem><label_suffix>`` mask each; anomalous when the mask has a non-zero pixel."""
    files = _images(folder)
    labels = _stem_index(f for f in files if f.stem.endswith(label_suffix))
    for img in (f for f in files if not f.stem.endswith(label_suffix)):
        label = labels.get(img.stem + label_suffix)
        if label is None:
            b.problem(img, f"no label file {img.stem}{label_suffix}.* next to it")
            continue
        try:
            anomalous = bool(load_mask(label).any())
        except DataError as exc:
            b.problem(img, str(exc))
            continue
        b.add(split, cls, img, label, "defect" if anomalous else "good", int(anomalous))


def _prepare_ksdd(b: _Builder, cls: str) -> None:
    v2 = [d for d in (b.src / "train", b.src / "test") if d.is_dir()]
    if v2 and any(f.stem.endswith("_GT") for d in v2 for f in _images(d)):
        for d in v2:
            _add_labelled_folder(b, d, d.name, cls, "_GT")
        return
    parts = [d for d in _subdirs(b.src) if any(f.stem.endswith("_label") for f in _images(d))]
    if not parts:
        raise _layout_error(
            "ksdd",
            b.src,
            "kos*/PartN.jpg + PartN_label.bmp (KolektorSDD) or {train,test}/N.png + N_GT.png (KSDD2)",
        )
    for d in parts:
        _add_labelled_folder(b, d, "test", cls, "_label")


# --- magnetic tile ------------------------------------------------------------------------------------------


def _split_hash(stem: str, seed: int) -> str:
    return hashlib.sha256(f"{seed}:{stem}".encode()).hexdigest()


def _prepare_magnetic_tile(b: _Builder, cls: str, seed: int = MAGNETIC_TILE_SEED) -> None:
    types = [d for d in _subdirs(b.src) if d.name.startswith("MT_") and (d / "Imgs").is_dir()]
    if not types:
        raise _layout_error("magnetic_tile", b.src, "MT_<Type>/Imgs/<stem>.jpg with <stem>.png masks")
    for tdir in types:
        specie = tdir.name[3:].lower()
        normal = specie == "free"
        files = _images(tdir / "Imgs")
        # In this layout .png files are the masks and every other image file is a photo.
        masks = _stem_index(f for f in files if f.suffix.lower() == ".png")
        images = [f for f in files if f.suffix.lower() != ".png"]
        if normal:
            ranked = sorted(images, key=lambda p: _split_hash(p.stem, seed))
            train = set(ranked[: len(ranked) // 2])
            for img in images:
                b.add("train" if img in train else "test", cls, img, None, "good", 0)
            continue
        for img in images:
            mask = masks.get(img.stem)
            if mask is None:
                b.problem(img, f"no mask {img.stem}.png next to it")
                continue
            b.add("test", cls, img, mask, specie, 1)


# --- folder -------------------------------------------------------------------------------------------------


def _mask_indexes(base: Path, sub: str | None) -> list[dict[str, Path]]:
    """Stem indexes of the mask folders that may hold masks of ``base/<sub>`` images, most specific first."""
    indexes = []
    for tree in MASK_TREES:
        if sub is not None:
            indexes.append(_stem_index(_images(base / tree / sub)))
        indexes.append(_stem_index(_images(base / tree)))
    return indexes


def _find_mask(stem: str, indexes: list[dict[str, Path]]) -> Path | None:
    for index in indexes:
        found = _match_mask(stem, index)
        if found is not None:
            return found
    return None


def _prepare_flat_folder(b: _Builder, cls: str) -> None:
    indexes = _mask_indexes(b.src, None)
    for img in _images(b.src / "images"):
        mask = _find_mask(img.stem, indexes)
        anomalous = False
        if mask is not None:
            try:
                anomalous = bool(load_mask(mask).any())
            except DataError as exc:
                b.problem(img, str(exc))
                continue
        b.add("test", cls, img, mask, "defect" if anomalous else "good", int(anomalous))


def _prepare_class_folders(b: _Builder) -> None:
    for cdir in _subdirs(b.src):
        subs = [s for s in _subdirs(cdir) if s.name.lower() not in MASK_TREES]
        nested = [s.name for s in subs if s.name in ("train", "test") and _subdirs(s)]
        if nested:
            raise DataError(
                f"{cdir} has {nested} folders with sub-folders: that is the MVTec layout, use format 'mvtec'"
            )
        unmasked = n_anomalous = 0
        for sdir in subs:
            anomalous = sdir.name.lower() not in NORMAL_SPECIES
            indexes = _mask_indexes(cdir, sdir.name) if anomalous else []
            for img in _images(sdir):
                mask = _find_mask(img.stem, indexes) if anomalous else None
                n_anomalous += anomalous
                unmasked += anomalous and mask is None
                b.add("test", cdir.name, img, mask, sdir.name, int(anomalous))
        if 0 < unmasked < n_anomalous:
            warnings.warn(
                f"{cdir}: {unmasked} of {n_anomalous} anomalous images have no mask; they get mask_path ''",
                stacklevel=5,
            )


def _prepare_folder(b: _Builder, cls: str) -> None:
    if (b.src / "images").is_dir():
        _prepare_flat_folder(b, cls)
    else:
        _prepare_class_folders(b)
    if not any(b.meta["test"].values()):
        raise _layout_error(
            "folder", b.src, "<cls>/{good,normal,ok,<defect>}/<image> or images/<image> (+ masks/<image>)"
        )


# --- tn3k ---------------------------------------------------------------------------------------------------


def _prepare_tn3k(b: _Builder, cls: str) -> None:
    pairs = []
    for d in _subdirs(b.src):
        m = re.fullmatch(r"(.+?)([-_])image", d.name, flags=re.IGNORECASE)
        if m:
            mask_dir = b.src / f"{m.group(1)}{m.group(2)}mask"
            if not mask_dir.is_dir():
                raise DataError(f"{d} has no matching mask folder {mask_dir}")
            pairs.append((m.group(1), d, mask_dir))
    if not pairs:
        raise _layout_error("tn3k", b.src, "<prefix>-image/ and <prefix>-mask/ folders (trainval-*, test-*)")
    for prefix, image_dir, mask_dir in pairs:
        split = "test" if prefix.lower() == "test" else "train"
        masks = _stem_index(_images(mask_dir))
        for img in _images(image_dir):
            mask = _match_mask(img.stem, masks)
            if mask is None:
                b.problem(img, f"no mask with stem {img.stem!r} in {mask_dir}")
                continue
            b.add(split, cls, img, mask, "", 1)


# --- normal_abnormal ----------------------------------------------------------------------------------------


def _prepare_normal_abnormal(b: _Builder, cls: str) -> None:
    folders = [d for d in _subdirs(b.src) if _images(d)]
    normal = [d for d in folders if d.name.lower() in NORMAL_FOLDERS]
    abnormal = [d for d in folders if d.name.lower() not in NORMAL_FOLDERS]
    if len(normal) != 1 or not abnormal:
        raise _layout_error(
            "normal_abnormal",
            b.src,
            f"one normal image folder named one of {sorted(NORMAL_FOLDERS)} and one or more anomalous image "
            "folders (e.g. no/ + yes/, normal/ + abnormal/, 0/ + 1/)",
        )
    for d in folders:
        anomalous = d not in normal
        for img in _images(d):
            b.add("test", cls, img, None, d.name, int(anomalous))


# --- driver -------------------------------------------------------------------------------------------------

_DEFAULT_CLASS = {"ksdd": "kolektor", "magnetic_tile": "magnetic_tile", "tn3k": "thyroid"}


def _handler(fmt: str, cls: str) -> Callable[[_Builder], None]:
    table: dict[str, Callable[[_Builder], None]] = {
        "mvtec": lambda b: _prepare_mvtec(b, fmt),
        "mpdd": lambda b: _prepare_mvtec(b, fmt),
        "btad": lambda b: _prepare_mvtec(b, fmt),
        "visa": _prepare_visa,
        "ksdd": lambda b: _prepare_ksdd(b, cls),
        "magnetic_tile": lambda b: _prepare_magnetic_tile(b, cls),
        "folder": lambda b: _prepare_folder(b, cls),
        "tn3k": lambda b: _prepare_tn3k(b, cls),
        "normal_abnormal": lambda b: _prepare_normal_abnormal(b, cls),
    }
    return table[fmt]


def _header_problem(path: str) -> str | None:
    """Why PIL cannot identify ``path`` from its header (a zero-byte or non-image file), or None.

    Only the header is read (milliseconds), so a plain prepare still catches what would stop an evaluation
    half-way; ``skip_bad`` decodes everything. PIL raises many exception types for bad data, hence the
    broad except.
    """
    if os.path.isdir(path):
        return None  # MVTec LOCO: a folder of mask files, checked when loaded
    try:
        with Image.open(path):
            pass  # opening reads and checks the header
    except Exception as exc:
        return f"cannot read {path}: {type(exc).__name__}: {exc}"
    return None


def _check_files(b: _Builder, skip_bad: bool, progress: bool) -> None:
    """Record missing or unidentifiable files (always) and undecodable pairs (``skip_bad``) as problems."""
    records = [r for classes in b.meta.values() for rs in classes.values() for r in rs]
    if progress and skip_bad:
        from tqdm.auto import tqdm

        records = tqdm(records, desc="checking images", unit="img")
    for r in records:
        image, mask = resolve_path(b.src, r["img_path"]), record_mask_path(b.src, r)
        if skip_bad:
            try:
                load_pair(image, mask)
            except DataError as exc:
                b.problem(image, str(exc))
            continue
        for path, what in ((image, "image"), (mask, "mask")):
            if path is None:
                continue
            if not os.path.exists(path):
                b.problem(image, f"{what} not found: {path}")
            elif (reason := _header_problem(path)) is not None:
                b.problem(image, f"{what}: {reason}")


def _drop_problems(b: _Builder, fmt: str, skip_bad: bool) -> None:
    if not b.problems:
        return
    listing = "\n  ".join(f"{path}: {reason}" for path, reason in b.problems[:10])
    more = f"\n  ... and {len(b.problems) - 10} more" if len(b.problems) > 10 else ""
    if not skip_bad:
        raise DataError(
            f"{fmt} dataset {b.src}: {len(b.problems)} bad item(s):\n  {listing}{more}\n"
            "(pass skip_bad=True / --skip-bad to leave them out)"
        )
    bad = {os.path.normpath(os.path.abspath(p)) for p, _ in b.problems}
    for split in SPLITS:
        for cls, records in list(b.meta[split].items()):
            kept = [r for r in records if resolve_path(b.src, r["img_path"]) not in bad]
            if kept:
                b.meta[split][cls] = kept
            else:
                del b.meta[split][cls]
    warnings.warn(
        f"{fmt} dataset {b.src}: skipped {len(b.problems)} bad item(s):\n  {listing}{more}", stacklevel=3
    )


def _out_file(out: Path) -> Path:
    """A path ending in ``.json`` is the file to write; anything else is a folder to hold ``meta.json``."""
    return out if out.suffix.lower() == ".json" and not out.is_dir() else out / META_NAME


def prepare_dataset(
    fmt: str,
    src: str | os.PathLike,
    out: str | os.PathLike | None = None,
    skip_bad: bool = False,
    *,
    class_name: str | None = None,
    progress: bool = False,
    overwrite: bool = True,
) -> Path:
    """Index a dataset in its original layout and write its meta.json (the layouts: module docstring).

    Args:
        fmt: one of :data:`FORMATS`.
        src: the dataset folder; meta paths are relative to it.
        out: the file to write if it ends in ``.json``, otherwise a folder (created if needed) to hold
            ``meta.json``; default ``src/meta.json``.
            Load a meta written elsewhere with ``load_dataset(src, meta=out)``.
        skip_bad: decode every image/mask pair and leave out bad items with a warning, instead of raising.
        class_name: override the class name of single-class formats (ksdd, magnetic_tile, tn3k,
            normal_abnormal, flat ``folder``).
        progress: show a progress bar while ``skip_bad`` decodes files.
        overwrite: replace an existing meta.json; when its content changes the old one is kept as
            ``meta.json.bak`` (it may hold hand edits). ``False`` (``zsad data prepare`` without
            ``--overwrite``) makes an existing file a FileExistsError, raised before any file is read.

    Returns:
        The path of the meta.json written.

    Raises:
        DataError: unknown format, missing ``src``, unrecognised layout, or bad items without ``skip_bad``.
    """
    if fmt not in FORMATS:
        raise DataError(f"unknown dataset format {fmt!r}; supported: {sorted(FORMATS)}")
    source = Path(src)
    _require_dir(source, FORMATS[fmt])
    target = source / META_NAME if out is None else _out_file(Path(out))
    if target.exists() and not overwrite:
        raise FileExistsError(
            f"{target} exists (it may hold hand edits); pass --overwrite (overwrite=True) to replace it, "
            f"the old one is then kept as {target.name}.bak"
        )
    cls = class_name or _DEFAULT_CLASS.get(fmt, source.resolve().name)
    builder = _Builder(source)
    _handler(fmt, cls)(builder)
    if not any(builder.meta[s] for s in SPLITS) and not builder.problems:
        raise _layout_error(fmt, source, FORMATS[fmt])
    _check_files(builder, skip_bad, progress)
    _drop_problems(builder, fmt, skip_bad)
    if not any(builder.meta[s] for s in SPLITS):
        raise DataError(f"{fmt} dataset {source}: every item was bad; nothing to index")
    old = target.read_bytes() if target.is_file() else None
    written = write_meta(builder.meta, target)
    if old is not None and written.read_bytes() != old:
        written.with_name(written.name + ".bak").write_bytes(old)
    return written
