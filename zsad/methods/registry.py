"""The method registry: method IDs, their classes (imported lazily by name), their option checks and
:func:`create`. Re-exported by :mod:`zsad.methods`; :mod:`zsad.methods.official` builds on it."""

from __future__ import annotations

import importlib
import inspect
from typing import Any

import torch

from zsad.methods.base import Detector

# method ID -> "module:Class"; modules import lazily so that listing methods stays cheap.
_REGISTRY: dict[str, str] = {
    "adaclip": "zsad.methods.adaclip:AdaCLIP",
    "anomalyclip": "zsad.methods.anomalyclip:AnomalyCLIP",
    "aprilgan": "zsad.methods.aprilgan:AprilGAN",
    "clip": "zsad.methods.clip_baseline:CLIPBaseline",
    "clipad-sdp": "zsad.methods.clipad_sdp:ClipADSDP",
    "clipad-sdp-plus": "zsad.methods.clipad_sdp_plus:ClipADSDPPlus",
    "mfpclip": "zsad.methods.mfpclip:MFPCLIP",
    "winclip": "zsad.methods.winclip:WinCLIP",
    "winclip-fewshot": "zsad.methods.winclip:WinCLIPPlus",
}


def available() -> list[str]:
    """IDs of the methods that exist in this version."""
    return sorted(_REGISTRY)


def get_class(method_id: str) -> type[Detector]:
    key = method_id.lower()
    if key not in _REGISTRY:
        raise ValueError(f"unknown method {method_id!r}; available: {', '.join(available())}")
    module_name, class_name = _REGISTRY[key].split(":")
    return getattr(importlib.import_module(module_name), class_name)


def option_names(cls: type[Detector]) -> list[str] | None:
    """The keyword options a detector class accepts, following ``**options`` up to the class that names
    them (e.g. SDP+ takes SDP's); None when they end at :class:`Detector`, which takes any."""
    names: list[str] = []
    for klass in cls.__mro__:
        if "__init__" not in vars(klass):
            continue
        if klass is Detector:
            return None
        parameters = list(inspect.signature(klass.__init__).parameters.values())[2:]  # after self, backbone
        names += [p.name for p in parameters if p.kind is not p.VAR_KEYWORD and p.name not in names]
        if not any(p.kind is p.VAR_KEYWORD for p in parameters):
            return names
    return None


def check_options(cls: type[Detector], options: dict[str, Any]) -> None:
    """A clear error for an option the method does not have (before any weights load), not a TypeError."""
    accepted = option_names(cls)
    unknown = sorted(set(options) - set(accepted)) if accepted is not None else []
    if unknown:
        raise ValueError(
            f"{cls.method_id} has no option {', '.join(map(repr, unknown))}; "
            f"its options: {', '.join(accepted)}"
        )


def create(
    method_id: str,
    backbone: Any = None,
    weights: str | None = None,
    image_size: int | None = None,
    device: str | torch.device | None = None,
    **options: Any,
) -> Detector:
    """Build a detector with its paper defaults wherever an argument is None.

    ``backbone`` is an open_clip model name (e.g. ``"ViT-L-14-336"``, ``"zsad-tiny"``) or an already loaded
    :class:`zsad.backbone.CLIPBackbone` (then ``weights``/``image_size`` must be None).
    ``device``: "auto", "cpu", "cuda", "cuda:N" (:func:`zsad.device.resolve_device`); None keeps a loaded
    backbone where it is and loads a named one on the CPU. A loaded backbone is moved there, and everything
    the detector creates (learned parts, text and few-shot caches) follows the backbone's device. A device
    or ``precision`` option this machine cannot run fails here, before any weights load.
    """
    from zsad.backbone import CLIPBackbone, default_weights_for, load_clip
    from zsad.device import prepare

    cls = get_class(method_id)
    check_options(cls, options)
    loaded = isinstance(backbone, CLIPBackbone)
    target = prepare(
        device if device is not None else (backbone.device if loaded else "cpu"),
        options.get("precision", "fp32"),
    )
    if loaded:
        if weights is not None or image_size is not None:
            raise ValueError("pass weights/image_size to load_clip, not with an already loaded backbone")
        return cls(backbone.to(target), **options)
    name = backbone or cls.default_backbone
    if weights is None:
        weights = cls.default_weights if name == cls.default_backbone else default_weights_for(name)
    size = image_size or (cls.default_image_size if name == cls.default_backbone else None)
    return cls(load_clip(name, pretrained=weights, image_size=size, device=target), **options)
