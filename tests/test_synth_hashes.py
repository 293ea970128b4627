"""SynthAD's output is pinned: a refactor of ``zsad.data.synth`` must not move one pixel.

The hashes were recorded with the single-module generator (before it became a package) and are compared
on decoded pixels, not PNG bytes, because PNG bytes depend on the zlib build. ``meta.json`` and
``synthad.json`` are compared byte for byte: the latter holds ``SYNTH_VERSION``, so a cache written before
the split must still be recognised by :func:`zsad.data.synth.ensure`. A change that is meant to alter the
data bumps ``SYNTH_VERSION`` and re-records these values.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
from PIL import Image

from zsad.data.synth import SYNTH_VERSION, caption, generate, render, sample_batch

CATEGORIES = ["carpet", "wood", "nut", "bottle", "pill"]
PINNED_PIXELS = {
    "carpet/train/good/000.png": "689349a20ca582cff473038c905a5c4fa90cb32591a16d1b160f43d72ac88e87",
    "nut/test/good/000.png": "05fcc8128428cce26e36fd2fa4e762e7f741b7be517a58399159e1ffe3bec4d0",
    "wood/test/crack/000.png": "e2fb88e29f724a8ebf2d8ac36cb37465a0e5757938dfb9d29daade0af7154aab",
    "wood/ground_truth/crack/000_mask.png": (
        "ab9e76e9cccd4ab5f807a4ffa8e8d318d93dbd1fe56f9188fa959c4fcf752672"
    ),
    "bottle/test/missing/000.png": "4dac5cab4a644c74303ea517c03974488a4af89a7f94b4a5d11f40c519b9dcff",
    "bottle/ground_truth/missing/000_mask.png": (
        "a07bd7e148ebf63f0ac377df58fb090ee7268f5e0b71ec973d76cb42b5fe6125"
    ),
    "pill/test/color/000.png": "2fb5e2e395021ccaa9c495b88c5067006ca734d8d71c20344f08286b89cb6bac",
}
ALL_PIXELS = "62a3cbfbd85756f1dda203ff5f2c24e3a9cbc63caad0d102e3a4bb362a075de0"  # every PNG of the tree
META_JSON = "820f3294ef54bb57b777cc6688f52c72f15fe1e71cfd1b1384fc73c2983c81c3"
SYNTHAD_JSON = "e64c1759621a829fc340c3971ca0ac823df7f46ded4fedce4c883292ed791034"
BATCH = "2f54ccf9be097721e96f6a2a48a9b7a55f0a19c25eec42f0aa21576bff285572"
CAPTIONS = "7df04dd16875a6ee0d2a68cd6da26346c5a275dda5b4adf8e01e022dce57671a"
RENDER_224 = "4338fcce5fd625ebfbe21d51061e39d2481049df1972b6449c0eca772bab397e"


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _pixels(path: Path) -> str:
    with Image.open(path) as im:
        return _sha(im.mode.encode() + str(im.size).encode() + np.asarray(im).tobytes())


def test_generated_tree_is_unchanged(tmp_path):
    assert SYNTH_VERSION == 1  # the version existing caches were written with
    root = generate(
        tmp_path, seed=7, categories=CATEGORIES, n_train=1, n_test_good=1, n_test_per_defect=1, size=48
    )
    pixels = {str(p.relative_to(root)): _pixels(p) for p in sorted(root.rglob("*.png"))}
    assert len(pixels) == len(CATEGORIES) * (2 + 2 * 6)
    assert {name: pixels[name] for name in PINNED_PIXELS} == PINNED_PIXELS
    assert _sha("".join(f"{k}={v}\n" for k, v in pixels.items()).encode()) == ALL_PIXELS
    assert _sha((root / "meta.json").read_bytes()) == META_JSON
    assert _sha((root / "synthad.json").read_bytes()) == SYNTHAD_JSON


def test_training_stream_and_captions_are_unchanged():
    images, masks, infos = sample_batch(
        (3, 1), ["tile", "screw", "capsule"], 4, 48, p_defect=0.5, out_size=32
    )
    assert _sha(images.tobytes() + masks.tobytes() + json.dumps(infos).encode()) == BATCH
    rng = np.random.default_rng(5)
    captions = [caption(rng, info["category"], info) for info in infos for _ in range(5)]
    assert _sha("\n".join(captions).encode()) == CAPTIONS
    image, mask, info = render("gear", np.random.default_rng([7, 1, 2]), 224, "scratch")
    assert _sha(image.tobytes() + mask.tobytes() + json.dumps(info).encode()) == RENDER_224
