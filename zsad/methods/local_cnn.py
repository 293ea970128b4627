"""A frozen torchvision ResNet as a source of local image features (MFP-CLIP's SP and I2TP,
docs/methods.md §7).

MFP-CLIP's self prompt (SP) reads "local features of a CNN"; the write-up does not name the CNN. Our choice:
**torchvision ResNet-18** (any torchvision ResNet name works), frozen, run on the same image as the ViT. Its
five feature levels (the stem after max-pooling, then ``layer1`` .. ``layer4``; 64, 64, 128, 256, 512 channels
for ResNet-18) are each global-average-pooled into one vector: five levels for the paper's K = 5 adapters.

Weights follow :func:`zsad.backbone.load_clip`'s rules:

- a torchvision weights tag of the model (e.g. ``"IMAGENET1K_V1"``): the file in torch.hub's cache
  (``$TORCH_HOME/hub/checkpoints``) if it is there, otherwise torchvision's download; offline or failing, one
  :class:`zsad.backbone.BackboneError` that says which file to fetch and where to put it;
- a local file (``.pth`` / ``.pt`` / ``.safetensors``; pickles read with ``weights_only=True``);
- ``"random"``: a seeded init (``seed``), what the embedded world (zsad-tiny) uses: there are no ImageNet
  weights offline, and the adapters learn to read whatever the frozen random filters respond to.

The input is the CLIP-normalised image; it is re-normalised to ImageNet statistics first (torchvision's
ResNets are trained with them).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import Tensor, nn

from zsad.backbone import OPENAI_MEAN, OPENAI_STD, BackboneError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
LEVELS = 5  # stem + the four residual stages


class LocalCNN(nn.Module):
    """Frozen ResNet -> per-level pooled features. ``forward(images)`` -> list of ``LEVELS`` tensors (B, C_k).

    ``channels``: C_k per level; ``weights_id``: "random-<seed>", the tag, or "sha256-<16 hex>" of a file
    (feature-cache keys include it).
    """

    def __init__(self, net: nn.Module, name: str, weights_id: str) -> None:
        super().__init__()
        self.net = net.eval().requires_grad_(False)
        self.name, self.weights_id = name, weights_id
        self.channels = [net.conv1.out_channels] + [
            _stage_width(getattr(net, f"layer{i}")) for i in range(1, 5)
        ]
        shift = torch.tensor(OPENAI_MEAN), torch.tensor(OPENAI_STD)
        target = torch.tensor(IMAGENET_MEAN), torch.tensor(IMAGENET_STD)
        # x_imagenet = (x_clip * std_clip + mean_clip - mean_in) / std_in = x_clip * scale + offset
        self.register_buffer("scale", (shift[1] / target[1]).view(1, 3, 1, 1), persistent=False)
        self.register_buffer(
            "offset", ((shift[0] - target[0]) / target[1]).view(1, 3, 1, 1), persistent=False
        )

    def train(self, mode: bool = True) -> LocalCNN:
        """Frozen: batch-norm statistics never update, whatever a parent module asks."""
        super().train(mode)
        self.net.eval()
        return self

    @torch.no_grad()
    def forward(self, images: Tensor) -> list[Tensor]:
        net = self.net
        x = images.float() * self.scale + self.offset
        x = net.maxpool(net.relu(net.bn1(net.conv1(x))))
        levels = [x]
        for i in range(1, 5):
            x = getattr(net, f"layer{i}")(x)
            levels.append(x)
        return [level.mean(dim=(2, 3)) for level in levels]


def _stage_width(stage: nn.Sequential) -> int:
    last = stage[-1]
    return (last.bn3 if hasattr(last, "bn3") else last.bn2).num_features


def _build(name: str, seed: int) -> nn.Module:
    import torchvision

    if not name.startswith("resnet") or name not in torchvision.models.list_models():
        raise ValueError(
            f"cnn={name!r}: only torchvision ResNets are supported (resnet18, resnet34, resnet50, ...)"
        )
    with torch.random.fork_rng(devices=[]):  # seeded init that leaves the caller's RNG untouched
        torch.manual_seed(seed)
        return torchvision.models.get_model(name, weights=None)


def load_local_cnn(name: str = "resnet18", weights: str | os.PathLike = "random", seed: int = 0) -> LocalCNN:
    """Build a frozen torchvision ResNet with ``weights``: a torchvision tag, a file, or "random" (seeded)."""
    net = _build(name, seed)
    if str(weights) == "random":
        return LocalCNN(net, name, f"random-{seed}")
    import torchvision

    enum = torchvision.models.get_model_weights(name)
    tags = [w.name for w in enum]
    if str(weights) in tags:
        state = _tag_state_dict(name, enum[str(weights)])
        weights_id = str(weights)
    else:
        path = Path(weights)
        if not path.is_file():
            if path.suffix or len(path.parts) > 1:
                raise BackboneError(f"CNN weights file not found: {path.resolve()}")
            raise BackboneError(
                f"cnn_weights={str(weights)!r} is neither a tag of {name} ({tags}) nor a file"
            )
        state = _read_file(path)
        from zsad.backbone import _file_sha256

        weights_id = f"sha256-{_file_sha256(path)[:16]}"
    try:
        net.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise BackboneError(f"CNN weights {weights} do not fit {name}: {str(err)[:400]}") from err
    return LocalCNN(net, name, weights_id)


def _read_file(path: Path) -> dict[str, Tensor]:
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise BackboneError(f"cannot read CNN weights file {path}: {type(err).__name__}: {err}") from err
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise BackboneError(f"{path} does not contain a state dict of tensors")
    return state


def _tag_state_dict(name: str, weights) -> dict[str, Tensor]:
    """The tag's state dict from torch.hub's cache, or downloaded; a clear error offline."""
    checkpoints = Path(torch.hub.get_dir()) / "checkpoints"
    filename = os.path.basename(weights.url)
    cached = checkpoints / filename
    if cached.is_file():
        return _read_file(cached)
    try:
        return weights.get_state_dict(progress=False, check_hash=True)
    except Exception as err:  # urllib / http raise many types; all mean "not available"
        reason = f"{type(err).__name__}: {(str(err).splitlines() or [''])[0][:200]}"
        raise BackboneError(
            f"CNN weights {name}/{weights.name} are not on this machine and cannot be downloaded ({reason}). "
            f"To fix: download {weights.url} on a machine with internet and put it at {cached} (torch.hub's "
            f"cache, $TORCH_HOME/hub/checkpoints); or pass the file itself: "
            f"cnn_weights='/path/to/{filename}'; or cnn_weights='random' for a seeded random CNN"
        ) from err
