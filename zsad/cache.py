"""On-disk cache of frozen backbone features (design.md, "Speed on this machine").

ViT-L-14-336 at 518 px costs seconds per image on a CPU; frozen-feature methods and notebooks re-read the
same features many times. Entries are keyed by (backbone, weights hash, image size, layers, method feature
options) and by the image file (absolute path, size and mtime, so an edited image is re-encoded).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from zsad.outputs import expand, share_like_umask


def zsad_home() -> Path:
    """Where zsad keeps generated data and caches: ``$ZSAD_HOME`` or ``~/.cache/zsad``."""
    return expand(os.environ.get("ZSAD_HOME", Path.home() / ".cache" / "zsad"))


def default_cache_dir() -> Path:
    return expand(os.environ["ZSAD_CACHE"]) if "ZSAD_CACHE" in os.environ else zsad_home() / "features"


def default_synthad_root() -> Path:
    """The SynthAD copy that notebooks, the demo and the tests share (generated on first use)."""
    return zsad_home() / "synthad"


def _digest(obj: Any) -> str:
    return hashlib.sha1(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


class FeatureCache:
    """Maps (feature key, image path) to a dict of tensors stored as one safetensors file per image."""

    def __init__(self, root: str | Path | None = None) -> None:
        self.root = expand(root) if root is not None else default_cache_dir()
        self.hits = 0
        self.misses = 0

    def _file(self, key: dict[str, Any], path: str) -> Path:
        stat = Path(path).stat()
        image_id = _digest([str(Path(path).resolve()), stat.st_size, stat.st_mtime_ns])
        return self.root / _digest(key) / f"{image_id}.safetensors"

    def get(self, key: dict[str, Any], path: str) -> dict[str, torch.Tensor] | None:
        file = self._file(key, path)
        if not file.exists():
            self.misses += 1
            return None
        self.hits += 1
        return load_file(str(file))

    def put(self, key: dict[str, Any], path: str, features: dict[str, torch.Tensor]) -> None:
        file = self._file(key, path)
        file.parent.mkdir(parents=True, exist_ok=True)
        (file.parent / "key.json").write_text(json.dumps(key, sort_keys=True, default=str))
        tmp = file.with_suffix(".tmp")
        save_file({k: v.detach().contiguous().cpu() for k, v in features.items()}, str(tmp))
        share_like_umask(tmp)  # save_file writes 0600; a shared cache must stay readable by the group
        tmp.replace(file)
