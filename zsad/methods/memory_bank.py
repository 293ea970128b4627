"""Few-shot memory of normal features and its nearest-neighbour anomaly score.

APRIL-GAN's few-shot track (docs/methods.md §3.3) keeps the raw patch tokens of k normal images per class at
chosen layers; a test token scores min over the memory of (1 - cos), each layer's token map is bilinearly
upsampled (``align_corners=True``) and the layers are summed. WinCLIP+ (docs/methods.md §2.2) uses the same
nearest neighbour on its own features, divided by 2, so both methods share :class:`MemoryBank`.

The memory is pooled over positions and images: a test token is compared with every stored token of its
class, whatever its location (as in both official codes), not with the token at the same position.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from zsad.methods.base import upsample_grid

if TYPE_CHECKING:
    from zsad.backbone import ImageFeatures


class FewShotError(ValueError):
    """A few-shot detector was asked about a class that has no reference memory."""


def nearest_cosine_distance(
    queries: torch.Tensor, memory: torch.Tensor, chunk_size: int = 4096
) -> torch.Tensor:
    """min over memory rows m of (1 - cos(q, m)) for every query row q.

    ``queries`` is (..., N, D), ``memory`` is (M, D) (need not be normalised). Returns (..., N) float32.
    Queries are processed in chunks of ``chunk_size`` rows so that the (rows x M) similarity block stays
    bounded (37x37 tokens x 4 shots x 1369 tokens is ~30 MB per image per layer for ViT-L at 518 px).
    """
    if memory.ndim != 2 or memory.shape[0] == 0:
        raise ValueError(f"memory must be a non-empty (M, D) tensor; got {tuple(memory.shape)}")
    if queries.shape[-1] != memory.shape[-1]:
        raise ValueError(f"feature sizes differ: queries {queries.shape[-1]}, memory {memory.shape[-1]}")
    flat = F.normalize(queries.reshape(-1, queries.shape[-1]).float(), dim=-1)
    bank = F.normalize(memory.float(), dim=-1)
    best = [
        (1.0 - flat[start : start + chunk_size] @ bank.T).amin(dim=-1)
        for start in range(0, flat.shape[0], chunk_size)
    ]
    # 1 - cos lies in [0, 2]; rounding can give -1e-7 for a feature that is in the memory, and WinCLIP+'s
    # harmonic means would turn such tiny signed values into huge ones.
    return torch.cat(best).reshape(queries.shape[:-1]).clamp(0.0, 2.0)


class MemoryBank:
    """Per-class store of normal feature rows, under any number of keys (layers, window scales, ...).

    ``add(class_names, {key: (B, N, D)})`` appends the N rows of each image to its class's memory under each
    key; ``distances(class_names, {key: (B, N, D)})`` gives, per key, the (B, N) nearest-neighbour cosine
    distance of each test row to the memory of that image's class. A batch may mix classes.
    """

    def __init__(self, chunk_size: int = 4096) -> None:
        self.chunk_size = chunk_size
        self._memory: dict[str, dict[Hashable, torch.Tensor]] = {}

    @property
    def classes(self) -> list[str]:
        return sorted(self._memory)

    def __contains__(self, class_name: object) -> bool:
        return class_name in self._memory

    def __len__(self) -> int:
        return len(self._memory)

    def memory(self, class_name: str, key: Hashable) -> torch.Tensor:
        """The stored (M, D) rows of one class under one key (unit vectors, float32)."""
        self.check_fitted([class_name])
        return self._memory[class_name][key]

    def clear(self, class_names: Iterable[str] | None = None) -> None:
        """Forget the given classes (all classes when None)."""
        if class_names is None:
            self._memory.clear()
            return
        for name in set(class_names):
            self._memory.pop(name, None)

    def add(self, class_names: Sequence[str], features: Mapping[Hashable, torch.Tensor]) -> None:
        """Append the rows of each image (``features[key]`` is (B, N, D)) to its class's memory."""
        if not features:
            raise ValueError("features must name at least one key (a layer or a window scale)")
        for key, value in features.items():
            if value.ndim != 3 or value.shape[0] != len(class_names):
                raise ValueError(
                    f"features[{key!r}] must be (B, N, D) with B = {len(class_names)} class names; "
                    f"got {tuple(value.shape)}"
                )
        for name in dict.fromkeys(class_names):
            rows = torch.tensor([c == name for c in class_names], device=next(iter(features.values())).device)
            store = self._memory.setdefault(name, {})
            if store and set(store) != set(features):
                raise ValueError(
                    f"class {name!r} already holds keys {sorted(map(str, store))}; "
                    f"got {sorted(map(str, features))}"
                )
            for key, value in features.items():
                # Normalised once here so that scoring is one matmul per chunk; kept on the features' device
                # (the backbone's), where the nearest-neighbour search runs.
                new = F.normalize(value[rows].reshape(-1, value.shape[-1]).detach().float(), dim=-1)
                store[key] = torch.cat([store[key], new]) if key in store else new

    def check_fitted(self, class_names: Iterable[str]) -> None:
        missing = sorted(set(class_names) - set(self._memory))
        if missing:
            fitted = ", ".join(self.classes) or "none"
            raise FewShotError(
                f"no few-shot reference memory for class(es) {', '.join(map(repr, missing))}; call "
                f"fit_few_shot(images, class_names) with normal images of them first "
                f"(fitted classes: {fitted})"
            )

    def distances(
        self, class_names: Sequence[str], features: Mapping[Hashable, torch.Tensor]
    ) -> dict[Hashable, torch.Tensor]:
        """Per key, (B, N): min over the class memory of (1 - cos) for every test row."""
        self.check_fitted(class_names)
        out: dict[Hashable, torch.Tensor] = {}
        for key, value in features.items():
            result = torch.empty(value.shape[:2], dtype=torch.float32, device=value.device)
            for name in dict.fromkeys(class_names):
                rows = torch.tensor([c == name for c in class_names], device=value.device)
                if key not in self._memory[name]:
                    raise FewShotError(f"class {name!r} has no memory under key {key!r}")
                bank = self._memory[name][key].to(value.device)
                result[rows] = nearest_cosine_distance(value[rows], bank, self.chunk_size)
            out[key] = result
        return out


def patch_tokens(features: ImageFeatures, layers: Sequence[int]) -> dict[int, torch.Tensor]:
    """Raw residual-stream patch tokens (CLS dropped) of the given layers: APRIL-GAN's few-shot features."""
    missing = [layer for layer in layers if layer not in features.tokens]
    if missing:
        raise ValueError(
            f"layers {missing} were not requested from encode_image (have {sorted(features.tokens)})"
        )
    return {layer: features.tokens[layer][:, 1:] for layer in layers}


def upsample_sum(maps: Mapping[Hashable, torch.Tensor], grid: tuple[int, int], size: int) -> torch.Tensor:
    """Sum over keys of token maps (B, h*w) bilinearly upsampled to (B, size, size), ``align_corners=True``.

    APRIL-GAN upsamples each layer's distance map before summing (docs/methods.md §3.3); range [0, 2 x
    layers].
    """
    total = None
    for value in maps.values():
        up = upsample_grid(value, grid, size, align_corners=True)
        total = up if total is None else total + up
    if total is None:
        raise ValueError("no maps to sum")
    return total


class PatchMemory:
    """APRIL-GAN's few-shot memory (docs/methods.md §3.3): raw patch tokens of normal images at chosen layers.

    Usage inside a detector: request ``layers`` from ``backbone.encode_image``; ``fit(features, class_names)``
    with the features of k normal images per class; ``anomaly_map(features, class_names, size)`` returns the
    (B, size, size) sum over layers of upsampled min(1 - cos) maps, to be added to the zero-shot map.
    """

    def __init__(self, layers: Sequence[int], grid: tuple[int, int], chunk_size: int = 4096) -> None:
        if not layers:
            raise ValueError("PatchMemory needs at least one layer")
        self.layers = tuple(layers)
        self.grid = grid
        self.bank = MemoryBank(chunk_size)

    def fit(self, features: ImageFeatures, class_names: Sequence[str]) -> None:
        """Replace the memory of every class named here by the tokens of these images."""
        self.bank.clear(class_names)
        self.bank.add(class_names, patch_tokens(features, self.layers))

    def anomaly_map(self, features: ImageFeatures, class_names: Sequence[str], size: int) -> torch.Tensor:
        return upsample_sum(
            self.bank.distances(class_names, patch_tokens(features, self.layers)), self.grid, size
        )
