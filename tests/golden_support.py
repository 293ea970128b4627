"""The official goldens (tests/goldens/, docs/goldens.md): the random CLIP weights rebuilt from their seed
rule, the golden files read back, and one comparison per stage.

The oracle drivers (``../shared/oracles``) ran the official code on small CLIP configs shaped like the
papers' backbones (``tests/goldens/configs``: 24 or 12 blocks, 64-wide heads, patch 14 or 16) with
deterministic random weights. The weights are not stored: :func:`golden_weights` redraws them with the
oracles' documented rule, and the fingerprint stored in each golden file proves it drew the same numbers.
"""

from __future__ import annotations

import functools
import json
import math
import tempfile
import zlib
from pathlib import Path

import numpy as np
import open_clip
import torch

GOLDEN_DIR = Path(__file__).resolve().parent / "goldens"
CONFIG_DIR = GOLDEN_DIR / "configs"
LARGE = "ViT-golden-L-14"  # the shape of ViT-L-14-336 (24 blocks), small: AnomalyCLIP, APRIL-GAN, AdaCLIP
LARGE_ADA = "ViT-golden-L-14-ada"  # the same with embed dim = text width, as official AdaCLIP needs
BASE = "ViT-golden-B-16"  # the shape of ViT-B-16-plus-240 (12 blocks), small: CLIP-AD SDP / SDP+
WEIGHT_SEED = 0
LN_JITTER = 0.1  # weights.py --ln-jitter: LayerNorms 1 + N(0, 0.1) / N(0, 0.1), so a swapped norm shows

open_clip.add_model_config(CONFIG_DIR)


def _is_layernorm(key: str) -> bool:
    return any(part.startswith("ln_") or part == "ln_final" for part in key.split(".")[:-1])


def seeded_tensor(key: str, shape: tuple[int, ...], seed: int, ln_jitter: float) -> np.ndarray:
    """One tensor of the oracles' random weights (../shared/oracles/README.md, "Weights"): every key draws
    from its own ``default_rng([seed, crc32(key)])``; LayerNorms 1 / 0 (+ jitter), ``logit_scale`` log 100,
    positional embeddings N(0, 0.01), everything else N(0, 0.02); float64 draws cast to float32."""
    rng = np.random.default_rng([seed, zlib.crc32(key.encode("utf-8"))])
    if key == "logit_scale":
        return np.full(shape, math.log(100.0), dtype=np.float32)
    if _is_layernorm(key):
        base = 1.0 if key.endswith(".weight") else 0.0
        return (base + ln_jitter * rng.standard_normal(shape)).astype(np.float32)
    scale = 0.01 if key.endswith("positional_embedding") else 0.02
    return (scale * rng.standard_normal(shape)).astype(np.float32)


@functools.cache
def golden_weights(config: str) -> Path:
    """The oracles' weight file of ``config`` (seed 0, LayerNorm jitter 0.1), written once per session."""
    shapes = {k: tuple(v.shape) for k, v in open_clip.create_model(config).state_dict().items()}
    state = {k: torch.from_numpy(seeded_tensor(k, shapes[k], WEIGHT_SEED, LN_JITTER)) for k in sorted(shapes)}
    path = Path(tempfile.mkdtemp(prefix="zsad-golden-")) / f"{config}_seed{WEIGHT_SEED}.pt"
    torch.save(state, path)
    return path


_BACKBONES: dict[tuple, object] = {}


def share_backbones(monkeypatch) -> None:
    """Make ``zsad.backbone.load_clip`` return one backbone per set of arguments for the rest of the session
    (the backbone is frozen and never modified): the golden tests build ``from_official`` many times on the
    same weights, and zsad's sentence cache, kept per backbone, then encodes each prompt bank once."""
    import zsad.backbone

    load = zsad.backbone.load_clip

    def cached(name, pretrained=None, image_size=None, **options):
        key = (name, str(pretrained), image_size, tuple(sorted((k, str(v)) for k, v in options.items())))
        if key not in _BACKBONES:
            _BACKBONES[key] = load(name, pretrained=pretrained, image_size=image_size, **options)
        return _BACKBONES[key]

    monkeypatch.setattr(zsad.backbone, "load_clip", cached)


def fingerprint(config: str, keys: list[str]) -> dict[str, float]:
    """The float64 sums of some weights (the oracles print that of ``visual.conv1.weight``; the goldens keep
    a LayerNorm's and the text tower's too)."""
    state = torch.load(golden_weights(config), map_location="cpu", weights_only=True)
    return {key: float(state[key].double().sum()) for key in keys}


@functools.lru_cache(maxsize=1)
def _inputs() -> dict[str, np.ndarray]:
    with np.load(GOLDEN_DIR / "inputs.npz") as blob:
        return {k: blob[k] for k in blob.files}


class Golden:
    """A golden file: small arrays whole, large ones as float32 values at seeded flat positions."""

    def __init__(self, name: str) -> None:
        self.path = GOLDEN_DIR / f"{name}.npz"
        with np.load(self.path) as blob:
            self.arrays = {k: blob[k] for k in blob.files}
        self.meta = json.loads(str(self.arrays.pop("meta_json")))

    def __getitem__(self, key: str) -> np.ndarray:
        """A whole array; the inputs come from inputs.npz (in fp16, which holds them exactly)."""
        if key in self.meta["inputs"]:
            return _inputs()[self.meta["inputs"][key]].astype(np.float32)
        return self.arrays[key]

    def __contains__(self, key: str) -> bool:
        return key in self.arrays or f"{key}.index" in self.arrays

    def meta_keys(self, prefix: str) -> list[str]:
        """The names stored under ``prefix`` (e.g. "grads_norm/": every parameter with a gradient norm)."""
        return sorted(k[len(prefix) :] for k in self.arrays if k.startswith(prefix))

    def tensor(self, key: str) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(self[key]))

    def checkpoint(self, path: Path) -> Path:
        """Write the stored learned tensors back in the official checkpoint layout; return the file."""
        if self.meta.get("checkpoint_from"):  # the same initial learned parts as another golden's
            return Golden(self.meta["checkpoint_from"]).checkpoint(path)
        layout = self.meta["checkpoint_layout"]
        state = {
            k[len("ckpt/") :]: torch.from_numpy(v.copy())
            for k, v in self.arrays.items()
            if k.startswith("ckpt/")
        }
        torch.save(state if layout == "flat" else {layout: state}, path)
        return path

    def values(self, key: str) -> np.ndarray:
        """The stored official values of ``key``, flat (float64)."""
        stored = self.arrays[key] if key in self.arrays else self.arrays[f"{key}.value"]
        return stored.astype(np.float64).reshape(-1)

    def picked(self, key: str, ours) -> np.ndarray:
        """``ours`` at the stored positions of ``key``, flat (float64), after checking the shape."""
        if isinstance(ours, torch.Tensor):
            ours = ours.detach().float().cpu().numpy()
        ours = np.asarray(ours, dtype=np.float64)
        shape = self.arrays[key].shape if key in self.arrays else tuple(self.arrays[f"{key}.shape"])
        if ours.shape != tuple(shape):
            raise AssertionError(f"{key}: shape {ours.shape}, official {tuple(shape)}")
        return ours.reshape(-1) if key in self.arrays else ours.reshape(-1)[self.arrays[f"{key}.index"]]

    def diff(self, key: str, ours) -> float:
        """max |ours - official| over the stored values of ``key`` (all of them, or the seeded sample)."""
        return float(np.abs(self.picked(key, ours) - self.values(key)).max())


def over(stages: dict[str, float], tolerance: float) -> dict[str, float]:
    """The stages whose max |diff| reaches ``tolerance`` (an empty dict is a pass)."""
    return {stage: value for stage, value in stages.items() if not value < tolerance}
