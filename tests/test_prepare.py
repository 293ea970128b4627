"""prepare_dataset on tiny fake trees of every supported layout, and on the real Magnetic Tile data.

Expected meta.json contents are written out by hand from the layout; the MVTec pairing is also checked
against a re-implementation of the official sorted-index pairing (docs/methods.md §1.3).
"""

from __future__ import annotations

import csv
import hashlib
import os
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from zsad.data import FORMATS, DataError, load_dataset, load_pair, prepare_dataset, read_meta

MAGNETIC_TILE = Path(__file__).resolve().parents[2] / "shared/data/magnetic_tile"


def _img(path: Path, value: int = 128, size: tuple[int, int] = (16, 16)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, (value, value // 2, 255 - value)).save(path)
    return path


def _mask(path: Path, defect: bool = True, size: tuple[int, int] = (16, 16)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = np.zeros(size[::-1], np.uint8)
    if defect:
        arr[4:8, 4:8] = 255
    Image.fromarray(arr).save(path)
    return path


def _rec(img: str, mask: str, cls: str, specie: str, anomaly: int) -> dict:
    return {"img_path": img, "mask_path": mask, "cls_name": cls, "specie_name": specie, "anomaly": anomaly}


def _snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _mvtec_tree(src: Path) -> None:
    for name in ("000.png", "001.png"):
        _img(src / "bottle/train/good" / name)
    _img(src / "bottle/test/good/000.png")
    for name in ("000", "001"):
        _img(src / f"bottle/test/broken_large/{name}.png")
        _mask(src / f"bottle/ground_truth/broken_large/{name}_mask.png")
    _img(src / "zipper/train/good/000.png")
    _img(src / "zipper/test/rough/000.png")
    _mask(src / "zipper/ground_truth/rough/000_mask.png")
    (src / "license.txt").write_text("not a class")


def test_formats_listed():
    assert {
        "mvtec",
        "mpdd",
        "btad",
        "visa",
        "ksdd",
        "magnetic_tile",
        "folder",
        "tn3k",
        "normal_abnormal",
    } <= set(FORMATS)


def test_mvtec(tmp_path):
    _mvtec_tree(tmp_path)
    before = _snapshot(tmp_path)
    path = prepare_dataset("mvtec", tmp_path)
    assert path == tmp_path / "meta.json"
    expected = {
        "train": {
            "bottle": [
                _rec("bottle/train/good/000.png", "", "bottle", "good", 0),
                _rec("bottle/train/good/001.png", "", "bottle", "good", 0),
            ],
            "zipper": [_rec("zipper/train/good/000.png", "", "zipper", "good", 0)],
        },
        "test": {
            "bottle": [
                _rec("bottle/test/broken_large/000.png", "bottle/ground_truth/broken_large/000_mask.png",
                     "bottle", "broken_large", 1),
                _rec("bottle/test/broken_large/001.png", "bottle/ground_truth/broken_large/001_mask.png",
                     "bottle", "broken_large", 1),
                _rec("bottle/test/good/000.png", "", "bottle", "good", 0),
            ],
            "zipper": [_rec("zipper/test/rough/000.png", "zipper/ground_truth/rough/000_mask.png",
                            "zipper", "rough", 1)],
        },
    }  # fmt: skip
    assert read_meta(path) == expected
    after = _snapshot(tmp_path)
    del after["meta.json"]
    assert after == before  # images untouched, nothing moved


def test_mvtec_stem_pairing_equals_official_sorted_pairing(tmp_path):
    # Real MVTec names: 000.png .. 011.png with 000_mask.png ..; unequal name lengths stress the sort.
    for i in (0, 1, 2, 10, 11):
        _img(tmp_path / f"c/test/crack/{i:03d}.png")
        _mask(tmp_path / f"c/ground_truth/crack/{i:03d}_mask.png")
    meta = read_meta(prepare_dataset("mvtec", tmp_path))
    ours = [(r["img_path"], r["mask_path"]) for r in meta["test"]["c"]]
    images = sorted(os.listdir(tmp_path / "c/test/crack"))
    masks = sorted(os.listdir(tmp_path / "c/ground_truth/crack"))
    official = [
        (f"c/test/crack/{i}", f"c/ground_truth/crack/{m}") for i, m in zip(images, masks, strict=True)
    ]
    assert ours == official


def test_mvtec_missing_mask_is_reported_not_shifted(tmp_path):
    for i in range(3):
        _img(tmp_path / f"c/test/hole/{i:03d}.png")
    _mask(tmp_path / "c/ground_truth/hole/000_mask.png")
    _mask(tmp_path / "c/ground_truth/hole/002_mask.png")
    with pytest.raises(DataError, match=r"(?s)1 bad item.*001\.png: no mask"):
        prepare_dataset("mvtec", tmp_path)
    with pytest.warns(UserWarning, match="skipped 1 bad item"):
        path = prepare_dataset("mvtec", tmp_path, skip_bad=True)
    pairs = [(r["img_path"][-7:], r["mask_path"][-12:]) for r in read_meta(path)["test"]["c"]]
    assert pairs == [("000.png", "000_mask.png"), ("002.png", "002_mask.png")]


def test_mvtec_3d_rgb(tmp_path):
    _img(tmp_path / "bagel/train/good/rgb/000.png")
    (tmp_path / "bagel/train/good/xyz").mkdir(parents=True)
    _img(tmp_path / "bagel/validation/good/rgb/000.png")
    _img(tmp_path / "bagel/test/crack/rgb/000.png")
    _mask(tmp_path / "bagel/test/crack/gt/000.png")
    _img(tmp_path / "bagel/test/good/rgb/000.png")
    _mask(tmp_path / "bagel/test/good/gt/000.png", defect=False)
    meta = read_meta(prepare_dataset("mvtec", tmp_path))
    assert meta["train"]["bagel"] == [
        _rec("bagel/train/good/rgb/000.png", "", "bagel", "good", 0),
        _rec("bagel/validation/good/rgb/000.png", "", "bagel", "good", 0),
    ]
    assert meta["test"]["bagel"] == [
        _rec("bagel/test/crack/rgb/000.png", "bagel/test/crack/gt/000.png", "bagel", "crack", 1),
        _rec("bagel/test/good/rgb/000.png", "", "bagel", "good", 0),
    ]


def test_mvtec_loco_mask_folders_are_merged(tmp_path):
    _img(tmp_path / "box/train/good/000.png")
    _img(tmp_path / "box/test/good/000.png")
    _img(tmp_path / "box/test/logical_anomalies/000.png")
    for name, rows in (("000.png", slice(0, 2)), ("001.png", slice(14, 16))):
        arr = np.zeros((16, 16), np.uint8)
        arr[rows, :] = 255
        (tmp_path / "box/ground_truth/logical_anomalies/000").mkdir(parents=True, exist_ok=True)
        Image.fromarray(arr).save(tmp_path / "box/ground_truth/logical_anomalies/000" / name)
    meta = read_meta(prepare_dataset("mvtec", tmp_path))
    assert meta["test"]["box"][1] == _rec(
        "box/test/logical_anomalies/000.png",
        "box/ground_truth/logical_anomalies/000",
        "box",
        "logical_anomalies",
        1,
    )
    mask = load_dataset(tmp_path, image_size=16)[1]["mask"]
    assert mask[:2].all() and mask[14:].all() and mask.sum() == 64


def test_btad_and_mpdd(tmp_path):
    _img(tmp_path / "btad/01/train/ok/0000.bmp")
    _img(tmp_path / "btad/01/test/ok/0000.bmp")
    _img(tmp_path / "btad/01/test/ko/0000.bmp")
    _mask(tmp_path / "btad/01/ground_truth/ko/0000.png")  # different extension than the image
    meta = read_meta(prepare_dataset("btad", tmp_path / "btad"))
    assert meta["test"]["01"] == [
        _rec("01/test/ko/0000.bmp", "01/ground_truth/ko/0000.png", "01", "ko", 1),
        _rec("01/test/ok/0000.bmp", "", "01", "ok", 0),
    ]
    assert meta["train"]["01"] == [_rec("01/train/ok/0000.bmp", "", "01", "ok", 0)]
    _img(tmp_path / "mpdd/tubes/train/good/000.png")
    _img(tmp_path / "mpdd/tubes/test/anomalous/000.png")
    _mask(tmp_path / "mpdd/tubes/ground_truth/anomalous/000_mask.png")
    meta = read_meta(prepare_dataset("mpdd", tmp_path / "mpdd"))
    assert meta["test"]["tubes"][0]["mask_path"] == "tubes/ground_truth/anomalous/000_mask.png"


def _write_csv(path: Path, rows: list[list[str]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        csv.writer(f).writerows([["object", "split", "label", "image", "mask"], *rows])


def test_visa(tmp_path):
    for p in ("candle/Data/Images/Normal/0000.JPG", "candle/Data/Images/Normal/0001.JPG",
              "candle/Data/Images/Anomaly/000.JPG", "pcb1/Data/Images/Normal/0000.JPG"):  # fmt: skip
        _img(tmp_path / p)
    _mask(tmp_path / "candle/Data/Masks/Anomaly/000.png")
    rows = [
        ["pcb1", "test", "normal", "pcb1/Data/Images/Normal/0000.JPG", ""],
        ["candle", "train", "normal", "candle/Data/Images/Normal/0001.JPG", ""],
        [
            "candle",
            "test",
            "anomaly",
            "candle/Data/Images/Anomaly/000.JPG",
            "candle/Data/Masks/Anomaly/000.png",
        ],
        ["candle", "test", "normal", "candle/Data/Images/Normal/0000.JPG", ""],
    ]
    _write_csv(tmp_path / "split_csv/1cls.csv", rows)
    meta = read_meta(prepare_dataset("visa", tmp_path))
    assert list(meta["test"]) == ["candle", "pcb1"]
    assert meta["test"]["candle"] == [  # CSV order within a class, as the official generator
        _rec("candle/Data/Images/Anomaly/000.JPG", "candle/Data/Masks/Anomaly/000.png", "candle", "", 1),
        _rec("candle/Data/Images/Normal/0000.JPG", "", "candle", "", 0),
    ]
    assert meta["train"] == {"candle": [_rec("candle/Data/Images/Normal/0001.JPG", "", "candle", "", 0)]}
    assert len(load_dataset(tmp_path, image_size=8)) == 3

    _write_csv(tmp_path / "split_csv/1cls.csv", [["pcb1", "test", "bad", "pcb1/x.JPG", ""]])
    with pytest.raises(DataError, match="line 2.*'bad'"):
        prepare_dataset("visa", tmp_path)
    _write_csv(tmp_path / "split_csv/1cls.csv", [["pcb1", "test", "normal", "pcb1/missing.JPG", ""]])
    with pytest.raises(DataError, match="image not found.*missing.JPG"):
        prepare_dataset("visa", tmp_path)


def test_ksdd_v1_and_v2(tmp_path):
    v1 = tmp_path / "KolektorSDD"
    for kos in ("kos01", "kos02"):
        _img(v1 / kos / "Part0.jpg")
        _mask(v1 / kos / "Part0_label.bmp", defect=kos == "kos02")
    meta = read_meta(prepare_dataset("ksdd", v1))
    assert meta["train"] == {}
    assert meta["test"]["kolektor"] == [
        _rec("kos01/Part0.jpg", "", "kolektor", "good", 0),
        _rec("kos02/Part0.jpg", "kos02/Part0_label.bmp", "kolektor", "defect", 1),
    ]
    v2 = tmp_path / "KolektorSDD2"
    _img(v2 / "train/10000.png")
    _mask(v2 / "train/10000_GT.png", defect=False)
    _img(v2 / "test/20000.png")
    _mask(v2 / "test/20000_GT.png")
    meta = read_meta(prepare_dataset("ksdd", v2, class_name="commutator"))
    assert meta["train"] == {"commutator": [_rec("train/10000.png", "", "commutator", "good", 0)]}
    assert meta["test"] == {
        "commutator": [_rec("test/20000.png", "test/20000_GT.png", "commutator", "defect", 1)]
    }


def test_magnetic_tile_fake_tree(tmp_path):
    for i in range(5):
        _img(tmp_path / f"MT_Free/Imgs/f{i}.jpg")
        _mask(tmp_path / f"MT_Free/Imgs/f{i}.png", defect=False)
    _img(tmp_path / "MT_Blowhole/Imgs/b0.jpg")
    _mask(tmp_path / "MT_Blowhole/Imgs/b0.png")
    meta = read_meta(prepare_dataset("magnetic_tile", tmp_path))
    train, test = meta["train"]["magnetic_tile"], meta["test"]["magnetic_tile"]
    ranked = sorted((f"f{i}" for i in range(5)), key=lambda s: hashlib.sha256(f"0:{s}".encode()).hexdigest())
    assert [Path(r["img_path"]).stem for r in train] == sorted(ranked[:2])
    assert test[0] == _rec(
        "MT_Blowhole/Imgs/b0.jpg", "MT_Blowhole/Imgs/b0.png", "magnetic_tile", "blowhole", 1
    )
    assert sorted(Path(r["img_path"]).stem for r in test[1:]) == sorted(ranked[2:])
    assert all(r["specie_name"] == "good" and r["mask_path"] == "" for r in train + test[1:])


def test_folder_class_layout(tmp_path):
    _img(tmp_path / "widget/good/a.png")
    _img(tmp_path / "widget/scratch/b.png")
    _mask(tmp_path / "widget/masks/scratch/b_mask.png")
    _img(tmp_path / "gadget/OK/a.png")
    _img(tmp_path / "gadget/dent/c.jpg")
    _mask(tmp_path / "gadget/ground_truth/c.png")
    meta = read_meta(prepare_dataset("folder", tmp_path))
    assert meta["test"] == {
        "gadget": [
            _rec("gadget/OK/a.png", "", "gadget", "OK", 0),
            _rec("gadget/dent/c.jpg", "gadget/ground_truth/c.png", "gadget", "dent", 1),
        ],
        "widget": [
            _rec("widget/good/a.png", "", "widget", "good", 0),
            _rec("widget/scratch/b.png", "widget/masks/scratch/b_mask.png", "widget", "scratch", 1),
        ],
    }
    assert load_dataset(tmp_path, image_size=8).has_masks("widget")


def test_folder_warns_on_partly_missing_masks_and_rejects_mvtec(tmp_path):
    _img(tmp_path / "w/scratch/a.png")
    _img(tmp_path / "w/scratch/b.png")
    _mask(tmp_path / "w/masks/a.png")
    with pytest.warns(UserWarning, match="1 of 2 anomalous images have no mask"):
        meta = read_meta(prepare_dataset("folder", tmp_path))
    assert [r["mask_path"] for r in meta["test"]["w"]] == ["w/masks/a.png", ""]
    _mvtec_tree(tmp_path / "mv")
    with pytest.raises(DataError, match="use format 'mvtec'"):
        prepare_dataset("folder", tmp_path / "mv")


def test_folder_flat_layout(tmp_path):
    src = tmp_path / "parts"
    _img(src / "images/a.png")
    _img(src / "images/b.png")
    _img(src / "images/c.png")
    _mask(src / "masks/a.png")
    _mask(src / "masks/b.png", defect=False)
    meta = read_meta(prepare_dataset("folder", src))
    assert meta["test"] == {
        "parts": [
            _rec("images/a.png", "masks/a.png", "parts", "defect", 1),
            _rec("images/b.png", "", "parts", "good", 0),
            _rec("images/c.png", "", "parts", "good", 0),
        ]
    }


def test_tn3k(tmp_path):
    for split in ("trainval", "test"):
        _img(tmp_path / f"{split}-image/0000.jpg")
        _mask(tmp_path / f"{split}-mask/0000.jpg")
    meta = read_meta(prepare_dataset("tn3k", tmp_path))
    assert meta["train"] == {
        "thyroid": [_rec("trainval-image/0000.jpg", "trainval-mask/0000.jpg", "thyroid", "", 1)]
    }
    assert meta["test"] == {"thyroid": [_rec("test-image/0000.jpg", "test-mask/0000.jpg", "thyroid", "", 1)]}
    item = load_dataset(tmp_path, image_size=16)[0]
    assert item["label"] == 1 and item["mask"].sum() > 0


@pytest.mark.parametrize(("normal", "abnormal"), [("no", "yes"), ("normal", "abnormal"), ("0", "1")])
def test_normal_abnormal(tmp_path, normal, abnormal):
    src = tmp_path / "HeadCT"
    _img(src / normal / "n.png")
    _img(src / abnormal / "a.png")
    meta = read_meta(prepare_dataset("normal_abnormal", src))
    expected = [
        _rec(f"{normal}/n.png", "", "HeadCT", normal, 0),
        _rec(f"{abnormal}/a.png", "", "HeadCT", abnormal, 1),
    ]
    # folders are listed in sorted order
    assert meta["test"] == {"HeadCT": sorted(expected, key=lambda r: r["img_path"])}
    ds = load_dataset(src, image_size=8)
    assert not ds.has_masks() and sorted(ds[i]["label"] for i in range(2)) == [0, 1]


def test_normal_abnormal_needs_a_normal_folder(tmp_path):
    _img(tmp_path / "yes/a.png")
    with pytest.raises(DataError, match="one normal image folder"):
        prepare_dataset("normal_abnormal", tmp_path)


@pytest.mark.parametrize("fmt", sorted(FORMATS))
def test_unrecognised_layout_and_missing_src(tmp_path, fmt):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="expected"):
        prepare_dataset(fmt, tmp_path / "empty")
    with pytest.raises(DataError, match="not found"):
        prepare_dataset(fmt, tmp_path / "nowhere")


def test_unknown_format(tmp_path):
    with pytest.raises(DataError, match="unknown dataset format 'coco'"):
        prepare_dataset("coco", tmp_path)


def test_out_argument_and_skip_bad(tmp_path):
    src = tmp_path / "src"
    _img(src / "w/good/a.png")
    _img(src / "w/good/b.png")
    _img(src / "w/good/c.png")
    whole = (src / "w/good/c.png").read_bytes()
    (src / "w/good/c.png").write_bytes(whole[: len(whole) - 30])  # header intact, pixel data cut short
    out = prepare_dataset("folder", src, out=tmp_path / "out")  # a folder: out/meta.json
    assert out == tmp_path / "out/meta.json" and not (src / "meta.json").exists()
    assert len(read_meta(out)["test"]["w"]) == 3  # without skip_bad nothing is decoded
    with pytest.warns(UserWarning, match=r"(?s)skipped 1 bad item.*c\.png"):
        out = prepare_dataset("folder", src, out=tmp_path / "m.json", skip_bad=True)
    assert [r["img_path"] for r in read_meta(out)["test"]["w"]] == ["w/good/a.png", "w/good/b.png"]
    assert len(load_dataset(src, meta=out, image_size=8)) == 2


def test_clean_prepare_emits_no_warning(tmp_path):
    _mvtec_tree(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        prepare_dataset("mvtec", tmp_path, skip_bad=True)


# --- real data ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def magnetic_tile_meta(tmp_path_factory):
    if not (MAGNETIC_TILE / "MT_Free/Imgs").is_dir():
        pytest.skip(f"real Magnetic Tile data not found at {MAGNETIC_TILE} (shared/data is outside the repo)")
    out = tmp_path_factory.mktemp("mt") / "meta.json"  # never write into the shared data folder
    return prepare_dataset("magnetic_tile", MAGNETIC_TILE, out=out)


def test_magnetic_tile_real_index(magnetic_tile_meta, tmp_path):
    meta = read_meta(magnetic_tile_meta)
    train, test = meta["train"]["magnetic_tile"], meta["test"]["magnetic_tile"]
    counts = {d.name: len(list((d / "Imgs").glob("*.jpg"))) for d in MAGNETIC_TILE.glob("MT_*")}
    assert counts["MT_Free"] == 952  # SOURCE.md table
    assert all(r["anomaly"] == 0 and r["specie_name"] == "good" for r in train)
    assert len(train) == counts["MT_Free"] // 2
    assert len(train) + len(test) == sum(counts.values())
    assert not {r["img_path"] for r in train} & {r["img_path"] for r in test}
    for name, n in counts.items():
        specie = "good" if name == "MT_Free" else name[3:].lower()
        in_test = [r for r in test if r["specie_name"] == specie]
        assert len(in_test) == (n - len(train) if name == "MT_Free" else n)
    for r in test:
        if r["anomaly"]:
            assert r["mask_path"] == r["img_path"][:-4] + ".png"
    again = prepare_dataset("magnetic_tile", MAGNETIC_TILE, out=tmp_path / "again.json")
    assert again.read_bytes() == magnetic_tile_meta.read_bytes()  # deterministic


def test_magnetic_tile_real_items(magnetic_tile_meta):
    empty = {"exp3_num_45042", "exp4_num_124690", "exp4_num_352527", "exp4_num_45057"}  # SOURCE.md
    ds = load_dataset(MAGNETIC_TILE, meta=magnetic_tile_meta, image_size=64)
    by_specie: dict[str, list[int]] = {}
    for i, r in enumerate(ds.items):
        if Path(r["img_path"]).stem not in empty:
            by_specie.setdefault(r["specie_name"], []).append(i)
    assert set(by_specie) == {"blowhole", "break", "crack", "fray", "uneven", "good"}
    for specie, indices in by_specie.items():
        for i in indices[:2]:
            item = ds[i]
            assert item["image"].shape == (3, 64, 64)
            assert (item["mask"].sum() > 0) == (specie != "good")
    # orientation: the mask covers the same pixels as the raw PNG, not transposed
    for i in by_specie["crack"][:3]:
        record = ds.items[i]
        image, mask = load_pair(MAGNETIC_TILE / record["img_path"], MAGNETIC_TILE / record["mask_path"])
        raw = np.asarray(Image.open(MAGNETIC_TILE / record["mask_path"]))
        assert image.width != image.height and mask.shape == raw.shape == (image.height, image.width)
        assert np.array_equal(mask, raw > 0)
