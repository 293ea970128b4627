"""SynthAD generator (design.md, "The embedded default world").

References are independent of the code under test: a clean render of the same seed (masks must be exactly
the changed pixels), PIL resizes done here (the ``out_size`` path), the MVTec indexer of
``zsad.data.prepare`` (the written tree), and word lists written out here (captions).
"""

from __future__ import annotations

import json
import multiprocessing as mp
import pickle
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from skimage.morphology import skeletonize
from sklearn.metrics import roc_auc_score

from zsad.data import load_pair, read_meta
from zsad.data.prepare import prepare_dataset
from zsad.data.synth import (
    CATEGORIES,
    CATEGORY_PHRASES,
    DEFECTS,
    OBJECTS,
    TEXTURES,
    apply_defect,
    caption,
    contact_sheet,
    draw_scene,
    ensure,
    fix_articles,
    generate,
    render,
    sample_batch,
)

SIZE = 64  # small renders keep the suite fast; geometry is relative, so every path is exercised


def _rng(*key: int) -> np.random.Generator:
    return np.random.default_rng(list(key))


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


# ------------------------------------------------------------------------------------------------ catalogue
def test_catalogue_has_textures_objects_and_caption_friendly_names():
    assert len(CATEGORIES) >= 12 and len(TEXTURES) >= 5 and len(OBJECTS) >= 5
    assert set(TEXTURES) | set(OBJECTS) == set(CATEGORIES) and not set(TEXTURES) & set(OBJECTS)
    assert len(set(CATEGORIES)) == len(CATEGORIES)
    for c in CATEGORIES:
        assert re.fullmatch(r"[a-z]+", c), c  # a single lower-case word, usable as a prompt's class name
        assert CATEGORY_PHRASES[c]
    assert set(DEFECTS) == {"scratch", "hole", "stain", "crack", "missing", "color"}


# ----------------------------------------------------------------------------------------------- rendering
@pytest.mark.parametrize("category", CATEGORIES)
def test_same_seed_same_bytes_and_different_seeds_differ(category):
    a, ma, ia = render(category, _rng(3, 1), SIZE, "random")
    b, mb, ib = render(category, _rng(3, 1), SIZE, "random")
    assert a.dtype == np.uint8 and a.shape == (SIZE, SIZE, 3)
    assert mb.dtype == bool and mb.shape == (SIZE, SIZE)
    assert a.tobytes() == b.tobytes() and ma.tobytes() == mb.tobytes() and ia == ib
    c, _, _ = render(category, _rng(3, 2), SIZE, "random")
    assert np.abs(a.astype(int) - c).mean() > 2


@pytest.mark.parametrize("category", CATEGORIES)
def test_normal_images_have_empty_masks(category):
    image, mask, info = render(category, _rng(5), SIZE)
    assert not mask.any()
    assert info["defect"] is None and info["category"] == category and isinstance(info["color"], str)
    assert image.std() > 3  # not a blank frame


def _stray_pixels(mask: np.ndarray) -> int:
    """Mask pixels with no other mask pixel within 2 px, away from the frame border (where a stroke that
    leaves the frame may graze a lone pixel): rounding noise, not a drawn defect."""
    padded = np.pad(mask, 2).astype(int)
    near = sum(np.roll(np.roll(padded, dy, 0), dx, 1) for dy in range(-2, 3) for dx in range(-2, 3))
    lone = mask & (near[2:-2, 2:-2] == 1)
    return int(lone[1:-1, 1:-1].sum())


@pytest.mark.parametrize("category", CATEGORIES)
def test_defects_are_local_exact_and_visible(category):
    key = CATEGORIES.index(category)
    for seed, size in ((0, SIZE), (1, 96)):
        clean, _, clean_info = render(category, _rng(seed, key), size)
        for defect in DEFECTS:
            image, mask, info = render(category, _rng(seed, key), size, defect)
            assert info["defect"] == defect and info["color"] == clean_info["color"]
            diff = np.abs(image.astype(int) - clean.astype(int))
            # Same clean scene underneath: only the defect's pixels changed, and the mask is exactly them.
            assert np.array_equal(diff.any(axis=-1), mask), (category, defect, seed)
            assert 4 <= mask.sum() < 0.25 * size * size, (category, defect, seed, mask.sum())
            if category in TEXTURES:  # on objects a stroke may legitimately clip to a lone edge pixel
                assert _stray_pixels(mask) == 0, (category, defect, seed)
            # "clearly visible": at least ~12 % of the 0..255 range on average inside the mask
            assert diff[mask].mean() >= 30, (category, defect, seed, diff[mask].mean())


@pytest.mark.parametrize("category", OBJECTS)
def test_object_defects_stay_on_the_object(category):
    key = CATEGORIES.index(category)
    scene = draw_scene(category, _rng(7, key), SIZE)
    assert scene.support is not None
    for defect in DEFECTS:
        _, mask = apply_defect(scene, defect, _rng(7, key, DEFECTS.index(defect)))
        assert mask.any() and not (mask & (scene.support <= 0)).any(), defect


def test_compose_rounds_identically_whatever_the_surface_dtype():
    # A defect recomposes a float64 surface where untouched pixels must keep their exact bytes.
    for category in ("nut", "screw", "capsule", "bottle"):
        scene = draw_scene(category, np.random.default_rng(9), 224)
        assert np.array_equal(scene.compose(scene.base.astype(np.float64)), scene.compose()), category


def test_apply_defect_matches_render_with_the_same_stream():
    rng = _rng(11)
    scene = draw_scene("nut", rng, SIZE)
    image, mask = apply_defect(scene, "stain", rng)
    ref_image, ref_mask, _ = render("nut", _rng(11), SIZE, "stain")
    assert np.array_equal(image, ref_image) and np.array_equal(mask, ref_mask)
    assert np.array_equal(scene.compose(), render("nut", _rng(11), SIZE)[0])


def test_random_defect_covers_all_types():
    seen = {render("tile", _rng(13, i), 24, "random")[2]["defect"] for i in range(60)}
    assert seen == set(DEFECTS)


@pytest.mark.parametrize("size", [16, 37, 300])
def test_any_size_works(size):
    for category in ("wood", "screw"):
        image, mask, _ = render(category, _rng(17), size, "scratch")
        assert image.shape == (size, size, 3) and mask.shape == (size, size) and mask.any()


def test_thin_defects_are_at_least_two_pixels_wide_at_128():
    for category, seed in (("fabric", 1), ("grid", 2), ("nut", 3), ("capsule", 4)):
        for defect in ("scratch", "crack"):
            _, mask, _ = render(category, _rng(seed), 128, defect)
            # Mean stroke width = area / centre-line length; a 1-px stroke gives ~1.
            width = mask.sum() / skeletonize(mask).sum()
            assert width >= 1.7, (category, defect, width)


def test_global_colour_does_not_separate_normal_from_defective():
    normal, defective = [], []
    for key, category in enumerate(CATEGORIES):
        for i in range(12):
            normal.append(render(category, _rng(19, key, i), 32)[0].reshape(-1, 3).mean(0))
            defective.append(render(category, _rng(23, key, i), 32, "random")[0].reshape(-1, 3).mean(0))
    labels = np.r_[np.zeros(len(normal)), np.ones(len(defective))]
    feats = np.vstack([normal, defective])
    for channel in range(3):
        auroc = roc_auc_score(labels, feats[:, channel])
        assert 0.35 < auroc < 0.65, (channel, auroc)


def test_normal_images_vary():
    means = np.array([render("carpet", _rng(29, i), 32)[0].reshape(-1, 3).mean(0) for i in range(20)])
    assert means.std(axis=0).min() > 20  # colour varies a lot between normal images of one category


def test_bad_arguments_raise_clear_errors():
    with pytest.raises(ValueError, match="unknown SynthAD category 'metal_nut'"):
        render("metal_nut", _rng(0), SIZE)
    with pytest.raises(ValueError, match="unknown defect 'dent'"):
        render("nut", _rng(0), SIZE, "dent")
    with pytest.raises(ValueError, match="size must be an integer"):
        render("nut", _rng(0), 8)
    with pytest.raises(ValueError, match="categories is empty"):
        sample_batch(0, [], 2, SIZE)
    with pytest.raises(ValueError, match="p_defect"):
        sample_batch(0, None, 2, SIZE, p_defect=1.5)


# --------------------------------------------------------------------------------------------- batches
def test_sample_batch_out_size_equals_pil_resize_of_the_full_render():
    full, full_masks, infos = sample_batch(31, ["carpet", "nut", "screw"], 6, 96, p_defect=0.7)
    small, small_masks, small_infos = sample_batch(31, ["carpet", "nut", "screw"], 6, 96, 0.7, out_size=40)
    assert infos == small_infos and small.shape == (6, 40, 40, 3) and small_masks.shape == (6, 40, 40)
    assert any(i["defect"] for i in infos) and any(i["defect"] is None for i in infos)
    for i in range(6):
        ref = np.asarray(Image.fromarray(full[i]).resize((40, 40), Image.Resampling.BICUBIC))
        assert np.array_equal(small[i], ref)
        ref_mask = Image.fromarray(full_masks[i].astype(np.uint8) * 255).resize((40, 40), Image.BILINEAR)
        assert np.array_equal(small_masks[i], np.asarray(ref_mask, np.float32) / 255.0 > 0.5)


def test_sample_batch_p_defect_extremes_and_categories():
    _, masks, infos = sample_batch(np.random.default_rng(37), ["wood"], 5, 32, p_defect=0.0)
    assert not masks.any() and all(i["defect"] is None and i["category"] == "wood" for i in infos)
    _, masks, infos = sample_batch(np.random.default_rng(37), None, 8, 32, p_defect=1.0)
    assert all(m.any() for m in masks) and all(i["defect"] in DEFECTS for i in infos)


def test_sample_batch_works_in_a_process_pool():
    assert pickle.loads(pickle.dumps(sample_batch)) is sample_batch
    args = [((41, k), ["pill", "grid"], 2, 32) for k in range(2)]
    with mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn").Pool(2) as pool:
        results = pool.starmap(sample_batch, args)
    for arg, (images, masks, infos) in zip(args, results, strict=True):
        ref_images, ref_masks, ref_infos = sample_batch(*arg)
        assert np.array_equal(images, ref_images) and np.array_equal(masks, ref_masks) and infos == ref_infos


# -------------------------------------------------------------------------------------------- captions
NORMAL_WORDS = {"flawless", "perfect", "unblemished", "normal", "good", "intact", "pristine", "clean"}
ABNORMAL_WORDS = {"damaged", "broken", "defective", "flawed", "abnormal", "imperfect", "faulty", "blemished"}
DEFECT_WORDS = {
    "scratch": {"scratch", "scratches", "scratched"},
    "hole": {"hole", "punctured", "holed"},
    "stain": {"stain", "stained", "contaminated", "contamination"},
    "crack": {"crack", "cracks", "cracked"},
    "missing": {"missing", "chipped", "incomplete"},
    "color": {"color", "discolored", "discoloration"},
}
ALL_DEFECT_WORDS = set().union(*DEFECT_WORDS.values())


def _words(text: str) -> list[str]:
    return re.findall(r"[a-z]+", text.lower())


def test_normal_captions_never_name_a_defect_except_negated():
    rng = _rng(43)
    for i in range(400):
        category = CATEGORIES[i % len(CATEGORIES)]
        text = caption(rng, category, {"color": "red", "defect": None})
        words = _words(text)
        assert CATEGORY_PHRASES[category] in words, text
        assert not ABNORMAL_WORDS & set(words), text
        for k, w in enumerate(words):
            if w in ALL_DEFECT_WORDS or w in {"defect", "flaw", "damage"}:
                assert k > 0 and words[k - 1] == "without", text


def test_defective_captions_use_specific_or_generic_words():
    rng = _rng(47)
    for defect in DEFECTS:
        for _ in range(40):
            words = set(_words(caption(rng, "bottle", {"color": "green", "defect": defect}, p_specific=1.0)))
            assert words & DEFECT_WORDS[defect] and not words & NORMAL_WORDS - {"good"}
            generic = caption(rng, "bottle", {"color": "green", "defect": defect}, p_specific=0.0)
            gw = set(_words(generic))
            assert gw & (ABNORMAL_WORDS | {"defect", "flaw", "damage"}) and not gw & ALL_DEFECT_WORDS, generic


def test_caption_mix_colours_and_articles():
    rng = _rng(53)
    texts = [caption(rng, "capsule", {"color": "orange", "defect": d}) for d in (None, *DEFECTS) * 30]
    assert 0.15 < np.mean(["orange" in t for t in texts]) < 0.6
    assert len(set(texts)) > 100
    for t in texts:
        assert not re.search(r"\ba [aeiou]", t) and not re.search(r"\ban [^aeiou]", t), t
    assert fix_articles("a photo of a intact nut") == "a photo of an intact nut"
    assert fix_articles("A orange pill") == "An orange pill"


# ---------------------------------------------------------------------------------------- MVTec tree
COUNTS = {"n_train": 2, "n_test_good": 2, "n_test_per_defect": 1, "size": 32}


def test_generate_writes_a_loadable_mvtec_tree(tmp_path):
    root = generate(tmp_path / "synth", seed=1, categories=["wood", "capsule"], **COUNTS)
    meta = read_meta(root)
    assert list(meta["train"]) == ["wood", "capsule"] and list(meta["test"]) == ["wood", "capsule"]
    for cls in ("wood", "capsule"):
        assert len(meta["train"][cls]) == 2
        test = meta["test"][cls]
        assert len(test) == 2 + len(DEFECTS)
        assert sum(r["anomaly"] for r in test) == len(DEFECTS)
        assert {r["specie_name"] for r in test} == {"good", *DEFECTS}
        for r in meta["train"][cls] + test:
            assert not Path(r["img_path"]).is_absolute()
            image, mask = load_pair(root / r["img_path"], (root / r["mask_path"]) if r["mask_path"] else None)
            assert image.size == (32, 32)
            assert mask.any() == bool(r["anomaly"])
            if r["anomaly"]:
                stored = Image.open(root / r["mask_path"])
                assert stored.mode == "L" and set(np.unique(np.asarray(stored))) <= {0, 255}
                assert r["mask_path"] == f"{cls}/ground_truth/{r['specie_name']}/000_mask.png"
            else:
                assert r["mask_path"] == ""
    # The independent MVTec indexer finds the same images, masks and labels in the tree.
    indexed = read_meta(prepare_dataset("mvtec", root, out=tmp_path / "indexed.json"))
    for split in ("train", "test"):
        ours = {
            (r["img_path"], r["mask_path"], r["specie_name"], r["anomaly"])
            for c in meta[split].values()
            for r in c
        }
        theirs = {
            (r["img_path"], r["mask_path"], r["specie_name"], r["anomaly"])
            for c in indexed[split].values()
            for r in c
        }
        assert ours == theirs
    config = json.loads((root / "synthad.json").read_text())
    assert config["seed"] == 1 and config["categories"] == ["wood", "capsule"] and config["size"] == 32


def test_generate_is_deterministic_and_subsets_agree(tmp_path):
    a = _files(generate(tmp_path / "a", seed=2, categories=["grid", "gear"], **COUNTS))
    b = _files(generate(tmp_path / "b", seed=2, categories=["grid", "gear"], **COUNTS))
    assert a == b
    sub = _files(generate(tmp_path / "c", seed=2, categories=["gear"], **COUNTS))
    gear = {k: v for k, v in sub.items() if k.startswith("gear/")}
    assert gear and all(a[k] == v for k, v in gear.items())
    other = _files(generate(tmp_path / "d", seed=3, categories=["gear"], **COUNTS))
    assert other["gear/train/good/000.png"] != sub["gear/train/good/000.png"]
    # train and test images are different draws of the same world
    assert a["gear/train/good/000.png"] != a["gear/test/good/000.png"]


def test_ensure_skips_identical_arguments_and_regenerates_otherwise(tmp_path, monkeypatch):
    root = tmp_path / "s"
    ensure(root, seed=0, categories=["pill"], **COUNTS)
    stamp = (root / "pill/train/good/001.png").stat().st_mtime_ns
    import zsad.data.synth.writer as synth  # ensure() looks generate() up in its own module

    def fail(*args, **kwargs):
        raise AssertionError("ensure regenerated an up-to-date tree")

    monkeypatch.setattr(synth, "generate", fail)
    ensure(root, seed=0, categories=["pill"], **COUNTS)
    monkeypatch.undo()
    assert (root / "pill/train/good/001.png").stat().st_mtime_ns == stamp
    # Fewer training images: the stale file of the previous run must not survive beside the new meta.json.
    ensure(root, seed=0, categories=["pill"], **{**COUNTS, "n_train": 1})
    assert not (root / "pill/train/good/001.png").exists()
    assert len(read_meta(root)["train"]["pill"]) == 1


def test_contact_sheet(tmp_path):
    out = contact_sheet(tmp_path / "sheet.png", categories=["tile", "nut"], size=32, zoom=1)
    im = Image.open(out)
    assert im.width > 7 * 32 and im.height > 2 * 32
    assert (np.asarray(im.convert("RGB")) == (255, 0, 0)).all(-1).sum() > 20  # mask outlines drawn
