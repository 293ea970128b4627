"""Robust image and mask decoding shared by dataset preparation and loading.

Every real dataset brings its own file quirks: greyscale or palette PNGs, RGBA screenshots, CMYK JPEGs,
16-bit medical PNGs, phone photos rotated by an EXIF tag. The official loaders call
``Image.open(path).convert("RGB")`` and ``np.array(Image.open(mask).convert("L")) > 0``
(docs/methods.md §1.3); this module keeps those semantics where they are right and fixes them where they are
not:

* **Colour modes** (:func:`load_image`): every mode becomes 8-bit RGB. Alpha is *dropped*, not composited:
  ``convert("RGB")`` keeps the colour stored under transparent pixels, exactly what the official loaders
  (and open_clip's ``_convert_to_rgb``) feed the model, so scores stay comparable with theirs.
* **16-bit and 32-bit greyscale** (``I;16*``, ``I``): PIL's ``convert`` *clips* values above 255, which turns
  most of a 16-bit image white. We rescale the full 0..65535 range to 0..255 instead (``F`` images are
  rescaled from 0..1 when they lie in it, otherwise min-max).
* **EXIF orientation**: applied to the image (``ImageOps.exif_transpose``). A mask carrying its own
  orientation tag is rotated by its own tag; a mask without one is rotated like its image, because such a
  mask was drawn on the stored pixel grid of the image (see :func:`load_pair`).
* **Masks** (:func:`load_mask`): any mode becomes a boolean (H, W) array, ``True`` where the value is > 0 in
  the greyscale (``L``) conversion, or > 0 in the raw values for 16/32-bit and float masks (so a faint
  16-bit label is never clipped away). A *directory* is a multi-file mask (MVTec LOCO stores one folder
  per image): the files in it are OR-ed. A directory holding no mask files is an all-zero mask, the
  AnomalyCLIP convention for image-only datasets.
* **Bad files**: missing, unreadable, truncated or corrupt files, and masks whose size differs from their
  image, raise :class:`DataError` naming the file and the problem.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
from PIL import ExifTags, Image, ImageOps

# OpenAI CLIP normalisation (docs/methods.md §1.1); the backbone imports these from here.
OPENAI_MEAN: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)

# File name endings (lower case) treated as images when listing dataset folders.
IMAGE_EXTENSIONS: frozenset[str] = frozenset(
    {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".gif", ".ppm", ".pgm"}
)

_ORIENTATION_TAG = ExifTags.Base.Orientation
# EXIF orientation value -> the transpose that brings the stored pixels upright (EXIF 2.3, Table 3).
_ORIENTATION_TRANSPOSE = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
_HIGH_DEPTH_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")


class DataError(ValueError):
    """A dataset file or layout problem; the message names the file and what is wrong with it."""


def denormalize(image: Any) -> np.ndarray:
    """Undo the CLIP normalisation of one (3, H, W) image (tensor or array) -> uint8 (H, W, 3) for figures."""
    # Duck-typed so that this module needs no torch import.
    arr = image.detach().cpu().float().numpy() if hasattr(image, "detach") else np.asarray(image, dtype=float)
    if arr.ndim != 3 or arr.shape[0] != 3:
        raise ValueError(f"denormalize expects one (3, H, W) image, got shape {tuple(arr.shape)}")
    mean = np.asarray(OPENAI_MEAN).reshape(3, 1, 1)
    std = np.asarray(OPENAI_STD).reshape(3, 1, 1)
    rgb = np.clip(arr * std + mean, 0.0, 1.0)
    return np.rint(rgb * 255.0).astype(np.uint8).transpose(1, 2, 0)


def is_image_file(path: str | os.PathLike) -> bool:
    """True for a visible regular file whose extension is in :data:`IMAGE_EXTENSIONS`."""
    p = Path(path)
    return p.suffix.lower() in IMAGE_EXTENSIONS and not p.name.startswith(".") and p.is_file()


def _open_decoded(path: str | os.PathLike, what: str) -> Image.Image:
    """Open and fully decode ``path``; any failure becomes a :class:`DataError` naming the file.

    ``Image.open`` only reads the header, so ``load()`` is forced here: truncated files fail at decode time.
    PIL signals corrupt data with many exception types (OSError, SyntaxError, struct.error, ValueError,
    DecompressionBombError, ...), hence the broad ``except``; the cause stays chained.
    """
    p = Path(path)
    if not p.exists():
        raise DataError(f"{what} not found: {p}")
    if not p.is_file():
        raise DataError(f"{what} is not a file: {p}")
    try:
        with Image.open(p) as im:
            im.load()
            return im.copy()  # the context manager closes the file and frees the decoded data
    except Exception as exc:
        raise DataError(f"cannot decode {what} {p}: {type(exc).__name__}: {exc}") from exc


def _orientation(im: Image.Image) -> int | None:
    """The EXIF orientation tag of a decoded image, or None when the file has no such tag."""
    value = im.getexif().get(_ORIENTATION_TAG)
    return int(value) if value is not None else None


def _transpose(im: Image.Image, orientation: int | None) -> Image.Image:
    method = _ORIENTATION_TRANSPOSE.get(orientation or 1)
    return im.transpose(method) if method is not None else im


def _high_depth_to_uint8(arr: np.ndarray, mode: str) -> np.ndarray:
    """Rescale a 16/32-bit or float greyscale array to 0..255 (PIL's ``convert`` would clip instead)."""
    a = arr.astype(np.float64)
    if mode == "F":
        lo, hi = (0.0, 1.0) if a.size and a.min() >= 0.0 and a.max() <= 1.0 else (a.min(), a.max())
    elif a.size and (a.min() < 0 or a.max() > 65535):
        lo, hi = a.min(), a.max()  # mode "I" beyond the 16-bit range: no natural scale, use min-max
    else:
        lo, hi = 0.0, 65535.0
    scaled = (a - lo) * (255.0 / (hi - lo)) if hi > lo else np.zeros_like(a)
    return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)


def to_rgb(im: Image.Image) -> Image.Image:
    """Convert a decoded PIL image of any mode to 8-bit RGB (alpha dropped, high bit depths rescaled)."""
    if im.mode == "RGB":
        return im
    if im.mode in _HIGH_DEPTH_MODES or im.mode == "F":
        return Image.fromarray(_high_depth_to_uint8(np.asarray(im), im.mode), mode="L").convert("RGB")
    try:
        return im.convert("RGB")
    except ValueError:
        # A few premultiplied modes (e.g. "La") have no direct path to RGB.
        return im.convert("RGBA").convert("RGB")


def _upright_rgb(raw: Image.Image, path: str | os.PathLike) -> Image.Image:
    try:
        return to_rgb(ImageOps.exif_transpose(raw))
    except Exception as exc:
        raise DataError(f"cannot convert image {path} (mode {raw.mode}) to RGB: {exc}") from exc


def load_image(path: str | os.PathLike) -> Image.Image:
    """Decode an image file into an upright 8-bit RGB PIL image (module docstring lists the rules)."""
    return _upright_rgb(_open_decoded(path, "image"), path)


def _binarise(im: Image.Image) -> np.ndarray:
    if im.mode in _HIGH_DEPTH_MODES or im.mode == "F":
        return np.asarray(im) > 0
    if im.mode not in ("L", "1"):
        im = im.convert("L")
    return np.asarray(im) > 0


def _load_mask_file(path: Path, orientation: int | None) -> np.ndarray:
    im = _open_decoded(path, "mask")
    own = _orientation(im)
    try:
        upright = _transpose(im, own if own is not None else orientation)
        return _binarise(upright)
    except Exception as exc:
        raise DataError(f"cannot convert mask {path} (mode {im.mode}) to binary: {exc}") from exc


def load_mask(
    path: str | os.PathLike,
    *,
    orientation: int | None = None,
    shape: tuple[int, int] | None = None,
) -> np.ndarray:
    """Decode a mask file, or a directory of mask files, into a boolean (H, W) array.

    Args:
        path: a mask image, or a directory whose image files are OR-ed (MVTec LOCO: one folder per image).
        orientation: EXIF orientation of the paired image, applied when the mask file has no tag of its own.
        shape: (H, W) of the all-zero mask returned for a directory that holds no mask files (the
            AnomalyCLIP convention for image-only datasets); required in that case.

    Raises:
        DataError: missing or undecodable file, files of different sizes inside one mask directory, or an
            empty directory without ``shape``.
    """
    p = Path(path)
    if not p.is_dir():
        return _load_mask_file(p, orientation)
    files = sorted(f for f in p.iterdir() if is_image_file(f))
    if not files:
        if shape is None:
            raise DataError(f"mask directory {p} holds no mask files and no shape was given for a zero mask")
        return np.zeros(shape, dtype=bool)
    merged = _load_mask_file(files[0], orientation)
    for f in files[1:]:
        part = _load_mask_file(f, orientation)
        if part.shape != merged.shape:
            raise DataError(
                f"mask {f} is {part.shape[1]}x{part.shape[0]} (WxH) but {files[0]} in the same mask "
                f"directory is {merged.shape[1]}x{merged.shape[0]}"
            )
        merged |= part
    return merged


def image_header(path: str | os.PathLike) -> tuple[int | None, tuple[int, int]]:
    """EXIF orientation and upright (H, W) of an image from its header alone (no pixel decoding)."""
    p = Path(path)
    if not p.is_file():
        raise DataError(f"image not found: {p}")
    try:
        with Image.open(p) as im:
            orientation, (width, height) = _orientation(im), im.size
    except Exception as exc:
        raise DataError(f"cannot read the header of image {p}: {type(exc).__name__}: {exc}") from exc
    # Orientations 5-8 transpose the stored pixels, so the upright image is W x H (EXIF 2.3, Table 3).
    return orientation, ((width, height) if orientation in (5, 6, 7, 8) else (height, width))


def load_pair_mask(image_path: str | os.PathLike, mask_path: str | os.PathLike | None) -> np.ndarray:
    """The mask :func:`load_pair` returns, without decoding the image (its header gives the orientation and
    size): what a training epoch on cached image features needs."""
    orientation, shape = image_header(image_path)
    if mask_path is None:
        return np.zeros(shape, dtype=bool)
    mask = load_mask(mask_path, orientation=orientation, shape=shape)
    if mask.shape != shape:
        raise DataError(
            f"mask {mask_path} is {mask.shape[1]}x{mask.shape[0]} (WxH) but its image {image_path} is "
            f"{shape[1]}x{shape[0]}"
        )
    return mask


def load_pair(
    image_path: str | os.PathLike, mask_path: str | os.PathLike | None
) -> tuple[Image.Image, np.ndarray]:
    """Decode an image and its mask, in the same upright orientation, and check that their sizes agree.

    ``mask_path=None`` gives an all-zero mask of the image's (H, W), *not* the (W, H) array the official
    loaders build with ``np.zeros(img.size)`` (docs/methods.md §1.3).

    Raises:
        DataError: either file is bad, or the mask size differs from the image size.
    """
    raw = _open_decoded(image_path, "image")
    orientation = _orientation(raw)
    image = _upright_rgb(raw, image_path)
    shape = (image.height, image.width)
    if mask_path is None:
        return image, np.zeros(shape, dtype=bool)
    mask = load_mask(mask_path, orientation=orientation, shape=shape)
    if mask.shape != shape:
        raise DataError(
            f"mask {mask_path} is {mask.shape[1]}x{mask.shape[0]} (WxH) but its image {image_path} is "
            f"{image.width}x{image.height}"
        )
    return image, mask
