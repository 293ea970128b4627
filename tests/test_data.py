"""meta.json reading/writing, robust decoding and the AnomalyDataset (docs/methods.md §1.1, §1.3, pitfall 9).

References are independent of the code under test: hand-computed pixels, the official torchvision pipeline
(Resize bicubic + CenterCrop + ToTensor + Normalize; Resize bilinear + ToTensor + > 0.5 for masks), and JSON
written by hand the way the official generators write it.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms

from zsad.data import (
    OPENAI_MEAN,
    OPENAI_STD,
    DataError,
    denormalize,
    load_dataset,
    load_image,
    load_mask,
    load_pair,
    read_meta,
    write_meta,
)


def _rec(img: str, mask: str, cls: str, specie: str, anomaly: int) -> dict:
    return {"img_path": img, "mask_path": mask, "cls_name": cls, "specie_name": specie, "anomaly": anomaly}


def _save(path: Path, arr: np.ndarray, **kwargs) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path, **kwargs)
    return path


def _dataset_root(tmp_path: Path) -> Path:
    """bottle: 1 normal + 1 anomalous (mask box); cable: 1 anomalous. Images 16x16."""
    rng = np.random.default_rng(0)
    for name in ("bottle/good.png", "bottle/bad.png", "cable/bad.png"):
        _save(tmp_path / name, rng.integers(0, 256, (16, 16, 3), dtype=np.uint8))
    mask = np.zeros((16, 16), np.uint8)
    mask[4:12, 4:12] = 255
    _save(tmp_path / "bottle/bad_mask.png", mask)
    _save(tmp_path / "cable/bad_mask.png", mask)
    meta = {
        "train": {},
        "test": {
            "cable": [_rec("cable/bad.png", "cable/bad_mask.png", "cable", "cut", 1)],
            "bottle": [
                _rec("bottle/good.png", "", "bottle", "good", 0),
                _rec("bottle/bad.png", "bottle/bad_mask.png", "bottle", "broken", 1),
            ],
        },
    }
    write_meta(meta, tmp_path / "meta.json")
    return tmp_path


# --- meta.json ----------------------------------------------------------------------------------------------


def test_reads_file_written_like_official_generator(tmp_path):
    # AnomalyCLIP's br35.py order (cls_name before mask_path), empty train, json.dumps(indent=4) + "\n".
    info = {"train": {}, "test": {"brain": [{"img_path": "x/yes/a.png", "cls_name": "brain", "mask_path": "",
                                             "specie_name": "yes", "anomaly": 1}]}}  # fmt: skip
    (tmp_path / "meta.json").write_text(json.dumps(info, indent=4) + "\n")
    meta = read_meta(tmp_path)  # a root directory works as well as the file
    assert meta["train"] == {}
    assert meta["test"]["brain"][0]["specie_name"] == "yes"
    assert read_meta(tmp_path / "meta.json") == meta


def test_write_meta_official_layout_and_roundtrip(tmp_path):
    record = {
        "anomaly": 1,
        "specie_name": "hole",
        "cls_name": "a",
        "mask_path": "a/m.png",
        "img_path": "a/i.png",
    }
    meta = {"train": {"a": []}, "test": {"a": [record]}}
    path = write_meta(meta, tmp_path)
    assert path == tmp_path / "meta.json"
    text = path.read_text()
    assert text.endswith("}\n")
    assert '\n    "train": {' in text  # 4-space indent
    keys = list(json.loads(text)["test"]["a"][0])
    assert keys == ["img_path", "mask_path", "cls_name", "specie_name", "anomaly"]
    assert read_meta(path) == meta


@pytest.mark.parametrize(
    ("meta", "needle"),
    [
        ([], "top level"),
        ({"Test": {}}, "unknown top-level"),
        ({"test": {"a": {}}}, "must be a list"),
        ({"test": {"a": [_rec("i.png", "", "a", "good", 0) | {"anomaly": 2}]}}, "0 or 1"),
        ({"test": {"a": [_rec("i.png", "", "a", "good", 0) | {"anomaly": True}]}}, "0 or 1"),
        (
            {"test": {"a": [{"img_path": "i.png", "cls_name": "a", "specie_name": "", "anomaly": 0}]}},
            "mask_path",
        ),
        ({"test": {"a": [_rec("i.png", None, "a", "good", 0)]}}, "'mask_path' must be a string"),
        ({"test": {"a": [_rec("i.png", "", "b", "good", 0)]}}, "listed under"),
        ({"test": {"a": [_rec("", "", "a", "good", 0)]}}, "empty"),
    ],
)
def test_read_meta_rejects_bad_structure_naming_file(tmp_path, meta, needle):
    path = tmp_path / "my_meta.json"
    path.write_text(json.dumps(meta))
    with pytest.raises(DataError, match=needle) as err:
        read_meta(path)
    assert "my_meta.json" in str(err.value)


def test_read_meta_missing_or_invalid_json(tmp_path):
    with pytest.raises(DataError, match="not found"):
        read_meta(tmp_path)
    (tmp_path / "meta.json").write_text("{not json")
    with pytest.raises(DataError, match="not valid JSON"):
        read_meta(tmp_path)


# --- decoding -----------------------------------------------------------------------------------------------


def test_greyscale_palette_rgba_cmyk_become_rgb(tmp_path):
    grey = np.array([[0, 100], [200, 255]], np.uint8)
    assert np.array_equal(np.asarray(load_image(_save(tmp_path / "g.png", grey))), np.stack([grey] * 3, -1))

    pal = Image.new("P", (2, 1))
    pal.putpalette([0, 0, 0, 10, 20, 30] + [0] * 762)
    pal.putpixel((1, 0), 1)
    pal.save(tmp_path / "p.png")
    assert np.asarray(load_image(tmp_path / "p.png")).tolist() == [[[0, 0, 0], [10, 20, 30]]]

    rgba = np.array([[[10, 20, 30, 0], [40, 50, 60, 255]]], np.uint8)  # alpha dropped, colour kept
    assert np.asarray(load_image(_save(tmp_path / "a.png", rgba))).tolist() == [[[10, 20, 30], [40, 50, 60]]]

    Image.new("CMYK", (1, 1), (255, 0, 0, 0)).save(tmp_path / "c.tif")  # pure cyan, lossless
    assert np.asarray(load_image(tmp_path / "c.tif")).tolist() == [[[0, 255, 255]]]


def test_16bit_png_is_rescaled_not_clipped(tmp_path):
    raw = np.array([[0, 1000, 32896, 65535]], np.uint16)
    Image.fromarray(raw).save(tmp_path / "d.png")
    assert Image.open(tmp_path / "d.png").mode == "I;16"
    out = np.asarray(load_image(tmp_path / "d.png"))[..., 0]
    assert out.tolist() == [[0, 4, 128, 255]]  # round(v * 255 / 65535); PIL's convert would give 255 for 1000
    Image.fromarray(np.array([[0.0, 0.5, 1.0]], np.float32)).save(tmp_path / "f.tif")  # float in [0, 1]
    assert np.asarray(load_image(tmp_path / "f.tif"))[..., 1].tolist() == [[0, 128, 255]]
    Image.fromarray(np.array([[-10, 90]], np.int32)).save(tmp_path / "i.tif")  # beyond 16 bit: min-max
    assert np.asarray(load_image(tmp_path / "i.tif"))[..., 2].tolist() == [[0, 255]]


def test_mask_modes_binarise_above_zero(tmp_path):
    Image.fromarray(np.array([[0, 1]], np.uint16)).save(tmp_path / "m16.png")
    assert load_mask(tmp_path / "m16.png").tolist() == [[False, True]]
    assert load_mask(_save(tmp_path / "l.png", np.array([[0, 1]], np.uint8))).tolist() == [[False, True]]
    rgb = np.array([[[0, 0, 0], [0, 0, 9]]], np.uint8)
    assert load_mask(_save(tmp_path / "rgb.png", rgb)).tolist() == [[False, True]]
    Image.fromarray(np.array([[False, True]])).save(tmp_path / "b.png")  # mode "1"
    mask = load_mask(tmp_path / "b.png")
    assert mask.dtype == np.bool_ and mask.tolist() == [[False, True]]


def _exif_jpeg(path: Path, arr: np.ndarray, orientation: int) -> Path:
    im = Image.fromarray(arr)
    exif = im.getexif()
    exif[0x0112] = orientation
    im.save(path, quality=100, exif=exif.tobytes())
    return path


@pytest.mark.parametrize(("orientation", "where"), [(6, (0, 7)), (8, (15, 0))])
def test_exif_rotation_applied_to_image_and_mask(tmp_path, orientation, where):
    # Stored 16 wide x 8 high; a white 2x2 block at the stored top-left corner.
    arr = np.zeros((8, 16, 3), np.uint8)
    arr[:2, :2] = 255
    img = _exif_jpeg(tmp_path / "r.jpg", arr, orientation)
    mask_arr = np.zeros((8, 16), np.uint8)
    mask_arr[:2, :2] = 255
    mask = _save(tmp_path / "r_mask.png", mask_arr)  # no EXIF: drawn on the stored pixel grid
    image, m = load_pair(img, mask)
    assert image.size == (8, 16)  # displayed upright: 8 wide, 16 high
    # Orientation 6 = stored image is rotated 90 degrees CCW: stored top-left shows at top-right.
    # Orientation 8 = rotated 90 degrees CW: stored top-left shows at bottom-left.
    y, x = where
    assert np.asarray(image)[y, x].min() > 200
    assert m.shape == (16, 8) and m[y, x] and m.sum() == 4


@pytest.mark.parametrize("orientation", [1, 3, 6, 8])
def test_mask_only_loader_equals_load_pair_without_decoding_the_image(tmp_path, orientation, monkeypatch):
    """Cached training epochs read masks through ``load_pair_mask``: same mask, same EXIF handling, and the
    image's pixels are never decoded (its header suffices)."""
    from zsad.data import images as images_mod
    from zsad.data.images import load_pair_mask

    arr = np.zeros((8, 16, 3), np.uint8)
    img = _exif_jpeg(tmp_path / "r.jpg", arr, orientation)
    mask_arr = np.zeros((8, 16), np.uint8)
    mask_arr[:2, :3] = 255
    mask = _save(tmp_path / "r_mask.png", mask_arr)
    _, expected = load_pair(img, mask)
    _, zero = load_pair(img, None)
    decoded = []
    real = images_mod._open_decoded
    monkeypatch.setattr(images_mod, "_open_decoded", lambda p, what: decoded.append(what) or real(p, what))
    assert np.array_equal(load_pair_mask(img, mask), expected)
    assert np.array_equal(load_pair_mask(img, None), zero)
    assert decoded == ["mask"]
    wrong = _save(tmp_path / "w.png", np.zeros((9, 16), np.uint8))
    with pytest.raises(DataError, match=r"w\.png is \d+x\d+ \(WxH\)"):
        load_pair_mask(img, wrong)
    with pytest.raises(DataError, match="not found"):
        load_pair_mask(tmp_path / "missing.jpg", mask)


def test_mask_with_own_orientation_tag_uses_it(tmp_path):
    arr = np.zeros((8, 16, 3), np.uint8)
    img = _exif_jpeg(tmp_path / "r.jpg", arr, 6)
    upright = Image.fromarray(np.zeros((16, 8), np.uint8))  # already drawn upright, tagged as such
    exif = upright.getexif()
    exif[0x0112] = 1
    upright.save(tmp_path / "m.png", exif=exif.tobytes())
    image, mask = load_pair(img, tmp_path / "m.png")
    assert mask.shape == (16, 8) == (image.height, image.width)


def test_zero_mask_keeps_image_orientation(tmp_path):
    image, mask = load_pair(_save(tmp_path / "i.png", np.zeros((5, 12, 3), np.uint8)), None)
    assert mask.shape == (5, 12) and not mask.any()  # (H, W), not the official (W, H)


def test_mask_directory_is_or_of_its_files(tmp_path):
    a, b = np.zeros((4, 6), np.uint8), np.zeros((4, 6), np.uint8)
    a[0, 0], b[3, 5] = 255, 7
    _save(tmp_path / "m/000.png", a)
    _save(tmp_path / "m/001.png", b)
    merged = load_mask(tmp_path / "m")
    assert merged.sum() == 2 and merged[0, 0] and merged[3, 5]
    (tmp_path / "empty").mkdir()
    assert load_mask(tmp_path / "empty", shape=(3, 2)).shape == (3, 2)
    with pytest.raises(DataError, match="no mask files"):
        load_mask(tmp_path / "empty")
    _save(tmp_path / "m/002.png", np.zeros((5, 6), np.uint8))
    with pytest.raises(DataError, match="002.png"):
        load_mask(tmp_path / "m")


def _truncated(path: Path) -> Path:
    rng = np.random.default_rng(1)
    _save(path, rng.integers(0, 256, (32, 32, 3), dtype=np.uint8))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


@pytest.mark.parametrize("suffix", [".png", ".jpg"])
def test_bad_files_raise_data_error_naming_file(tmp_path, suffix):
    bad = _truncated(tmp_path / f"trunc{suffix}")
    with pytest.raises(DataError, match=f"trunc{suffix}"):
        load_image(bad)
    (tmp_path / f"junk{suffix}").write_bytes(b"definitely not an image")
    with pytest.raises(DataError, match=f"junk{suffix}"):
        load_image(tmp_path / f"junk{suffix}")
    with pytest.raises(DataError, match="not found.*missing"):
        load_image(tmp_path / f"missing{suffix}")
    assert issubclass(DataError, ValueError)


def test_mask_size_mismatch_raises(tmp_path):
    img = _save(tmp_path / "i.png", np.zeros((8, 10, 3), np.uint8))
    mask = _save(tmp_path / "m.png", np.zeros((10, 8), np.uint8))  # transposed
    with pytest.raises(DataError, match=r"m\.png is 8x10.*i\.png is 10x8"):
        load_pair(img, mask)


# --- dataset ------------------------------------------------------------------------------------------------


def test_items_match_official_torchvision_pipeline(tmp_path):
    root = _dataset_root(tmp_path)
    size = 12
    ds = load_dataset(root, image_size=size)
    assert ds.classes == ["bottle", "cable"]
    assert [r["img_path"] for r in ds.items] == ["bottle/good.png", "bottle/bad.png", "cable/bad.png"]
    assert ds.class_indices("bottle") == [0, 1] and ds.class_indices("cable") == [2]
    image_tf = transforms.Compose(
        [
            transforms.Resize((size, size), interpolation=transforms.InterpolationMode.BICUBIC),
            transforms.CenterCrop(size),
            transforms.ToTensor(),
            transforms.Normalize(OPENAI_MEAN, OPENAI_STD),
        ]
    )
    mask_tf = transforms.Compose(
        [transforms.Resize((size, size)), transforms.CenterCrop(size), transforms.ToTensor()]
    )
    item = ds[1]
    assert item["image"].dtype == torch.float32 and item["image"].shape == (3, size, size)
    ref = image_tf(Image.open(root / "bottle/bad.png").convert("RGB"))
    assert torch.allclose(item["image"], ref, atol=1e-5)
    ref_mask = (mask_tf(Image.open(root / "bottle/bad_mask.png").convert("L"))[0] > 0.5).float()
    assert torch.equal(item["mask"], ref_mask) and item["mask"].sum() > 0
    assert item["label"] == 1 and item["cls_name"] == "bottle" and item["specie_name"] == "broken"
    assert item["path"] == str(root.resolve() / "bottle/bad.png")
    normal = ds[0]
    assert normal["label"] == 0 and normal["mask"].shape == (size, size) and normal["mask"].sum() == 0


def test_non_square_mask_lands_in_place(tmp_path):
    _save(tmp_path / "a/i.png", np.zeros((8, 16, 3), np.uint8))  # 16 wide, 8 high
    mask = np.zeros((8, 16), np.uint8)
    mask[0:4, 12:16] = 255  # top-right corner, off the diagonal
    _save(tmp_path / "a/m.png", mask)
    write_meta({"test": {"a": [_rec("a/i.png", "a/m.png", "a", "x", 1)]}}, tmp_path)
    got = load_dataset(tmp_path, image_size=8)[0]["mask"]
    expected = torch.zeros(8, 8)
    expected[0:4, 6:8] = 1  # width halves, height unchanged
    assert torch.equal(got, expected)


def test_bilinear_and_nearest_differ_on_thin_line(tmp_path):
    _save(tmp_path / "a/i.png", np.zeros((32, 32, 3), np.uint8))
    mask = np.zeros((32, 32), np.uint8)
    mask[:, 2] = 255  # 1 px line; nearest samples source column floor((0 + 0.5) * 4) = 2
    _save(tmp_path / "a/m.png", mask)
    write_meta({"test": {"a": [_rec("a/i.png", "a/m.png", "a", "x", 1)]}}, tmp_path)
    bilinear = load_dataset(tmp_path, image_size=8)[0]["mask"]
    nearest = load_dataset(tmp_path, image_size=8, mask_interpolation="nearest")[0]["mask"]
    assert bilinear.sum() == 0  # averaged to ~64/255 < 0.5: the defect vanishes (docs/methods.md pitfall 9)
    assert nearest[:, 0].tolist() == [1.0] * 8 and nearest.sum() == 8


def test_denormalize_inverts_preprocessing(tmp_path):
    arr = np.random.default_rng(2).integers(0, 256, (8, 8, 3), dtype=np.uint8)
    _save(tmp_path / "a/i.png", arr)
    write_meta({"test": {"a": [_rec("a/i.png", "", "a", "good", 0)]}}, tmp_path)
    out = denormalize(load_dataset(tmp_path, image_size=8)[0]["image"])  # same size: resize is identity
    assert out.dtype == np.uint8 and np.array_equal(out, arr)


def test_image_only_conventions_give_zero_masks(tmp_path):
    _save(tmp_path / "a/i.png", np.zeros((6, 9, 3), np.uint8))
    _save(tmp_path / "a/m.png", np.full((6, 9), 255, np.uint8))
    (tmp_path / "a/emptydir").mkdir()
    records = [
        _rec("a/i.png", "", "a", "yes", 1),  # AnomalyCLIP medical sets: anomalous, mask ""
        _rec("a/i.png", "a/emptydir", "a", "yes", 1),  # mask_path is a directory without masks
        _rec("a/i.png", "a/m.png", "a", "good", 0),  # normal: the official loaders ignore mask_path
    ]
    write_meta({"test": {"a": records}}, tmp_path)
    ds = load_dataset(tmp_path, image_size=4)
    assert [ds[i]["mask"].sum().item() for i in range(3)] == [0, 0, 0]
    assert not ds.has_masks() and not ds.has_masks("a")
    with_masks = load_dataset(_dataset_root(tmp_path / "other"))
    assert with_masks.has_masks() and with_masks.has_masks("cable")


def test_absolute_paths_and_external_meta(tmp_path):
    img = _save(tmp_path / "data/i.png", np.zeros((4, 4, 3), np.uint8))
    meta = {"test": {"a": [_rec(str(img), "", "a", "good", 0)]}}  # AnomalyCLIP's tn3k.py writes such paths
    path = write_meta(meta, tmp_path / "elsewhere/m.json")
    ds = load_dataset(tmp_path / "data", meta=path, image_size=4)
    assert ds[0]["path"] == str(img)


def test_dataset_argument_errors(tmp_path):
    root = _dataset_root(tmp_path)
    assert len(load_dataset(root, classes="cable")) == 1
    with pytest.raises(DataError, match=r"\['nope'\] not in split 'test'.*bottle"):
        load_dataset(root, classes=["nope"])
    with pytest.raises(DataError, match="no items"):
        load_dataset(root, split="train")
    with pytest.raises(ValueError, match="split"):
        load_dataset(root, split="val")
    with pytest.raises(ValueError, match="mask_interpolation"):
        load_dataset(root, mask_interpolation="cubic")
    with pytest.raises(DataError, match="meta file not found"):
        load_dataset(tmp_path / "cable")


def test_bad_files_raise_or_are_skipped(tmp_path):
    root = _dataset_root(tmp_path)
    (root / "cable/bad_mask.png").unlink()
    with pytest.raises(DataError, match=r"(?s)1 file.*missing.*cable/bad_mask.png"):
        load_dataset(root)
    _save(root / "cable/bad_mask.png", np.zeros((16, 16), np.uint8))
    _truncated(root / "bottle/bad.png")
    ds = load_dataset(root)  # existence is fine; decoding fails on access, naming the file
    with pytest.raises(DataError, match="bottle/bad.png"):
        ds[1]
    _save(root / "cable/bad_mask.png", np.zeros((10, 16), np.uint8))  # wrong size
    with pytest.warns(UserWarning, match="skipped 2 of 3"):
        ds = load_dataset(root, skip_bad=True)
    assert [r["img_path"] for r in ds.items] == ["bottle/good.png"]
    assert ds.classes == ["bottle"]
    skipped = dict(ds.skipped)
    assert set(skipped) == {str(root.resolve() / "bottle/bad.png"), str(root.resolve() / "cable/bad.png")}
    assert "bad_mask.png is 16x10" in skipped[str(root.resolve() / "cable/bad.png")]
    assert ds[0]["label"] == 0


def test_skip_bad_silent_when_everything_is_fine(tmp_path):
    root = _dataset_root(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ds = load_dataset(root, skip_bad=True)
    assert len(ds) == 3 and ds.skipped == []
