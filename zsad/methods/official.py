"""Detectors that behave like the official code, quirks included, and read the released checkpoints.

``create(...)`` builds every method with clean defaults (fresh tensors, single-image scores, one resize
rule). :func:`from_official` instead sets every documented quirk of the official repository
(docs/methods.md §13, §10) through the methods' *named* options, so that with identical weights and inputs its
maps and scores equal the official code's. Where the two differ and why:

=================  ===========================================================================================
method             official settings (clean default in brackets)
=================  ===========================================================================================
anomalyclip        ViT-L-14-336 ``openai`` at 518 with QuickGELU, weights not rounded; positional embedding
                   resized **bilinear without antialias** [bicubic + antialias] (the official in-place resize
                   is not reproduced: zsad never mutates a parameter); deep text tokens rounded through fp16
                   (``deep_prompt_fp16=True``) [fp32]; image embedding = CLS @ proj without ``ln_post``
                   (``cls_ln_post=False``, also our default); layer 24 alone, DPAM v-v from block 6.
                   Checkpoint ``checkpoints/9_12_4_multiscale{,_visa}/epoch_15.pth``: ``{"prompt_learner":
                   ctx_pos/ctx_neg (1, 1, 12, 768), compound_prompts_text.<i> (4, 768) for i = 0..7}``; its
                   template buffers, token ids and unused ``compound_prompt_projections`` are ignored.
aprilgan           ViT-L-14-336 ``openai`` at 518 built **without QuickGELU** (exact GELU, as its model JSON;
                   [QuickGELU, what the OpenAI weights were trained with]); positional embedding bicubic with
                   antialias; Conv/Linear/attention/projection weights passed through fp16 as open_clip's
                   OpenAI loader does (a no-op on the real fp16 file); few-shot image score per-class min-max
                   (``official-transductive``) [``bounded``, one image on its own].
                   Checkpoint ``exps/pretrained/{mvtec,visa}_pretrained.pth``: ``{"trainable_linearlayer":
                   {"fc.<i>.weight": (768, 1024), "fc.<i>.bias": (768,)}}`` for i = 0..3 (layers 6/12/18/24).
clipad-sdp         ViT-B-16-plus-240 ``laion400m_e31`` at 240; DBSCAN text vectors rounded and normalised in
clipad-sdp-plus    fp16 (``text_precision="fp16-official"``) [fp32]; stored original tokens aliased in place
                   (``legacy_aliasing=True``) [clean copies]; image score per-class min-max sum
                   (``minmax-sum``) [``global``]. SDP+ checkpoint
                   ``pretrained_models/train_on_{mvtec,visa}.pth``: ``{"linear_layers": {"fc.<i>.weight":
                   (640, 896), "fc.<i>.bias": (640,)}}`` for i = 0..3 (layers 3/6/9/12).
adaclip            ViT-L-14-336 ``openai`` at 518 built **without QuickGELU** (exact GELU, as its model JSON;
                   [QuickGELU]); positional embedding resized **bicubic without antialias** [with antialias];
                   Conv/Linear/attention/projection weights passed through fp16 as open_clip's OpenAI loader
                   does (a no-op on the real fp16 file); every prompt rounded through fp16 (``prompt_fp16``)
                   [fp32]; HSF k-means on one RandomState(111) shared by the images in order
                   (``kmeans_rng="shared"``) [a fresh RandomState(111) per image]; training dice per
                   image row as ``train_one_batch`` at batch 1 (``dice="per-row"``) [per image].
                   Checkpoint: the file ``AdaCLIP_Trainer.save()`` writes, a flat dict of 38
                   ``clip_model.<part>...`` tensors
                   (text/visual ``static_prompts.<0..3>``, ``patch_token_layer.head.<0..3>``,
                   ``cls_token_layer.head.0``, ``dynamic_{visual,text}_prompt_generator.head.<0..4>``).
winclip            No official code exists; anomalib's implementation stands in: ViT-B-16-plus-240
                   ``laion400m_e31`` at 240, its 21-template bank, raw (un-normalised) sentence embeddings
                   averaged [the paper's 22 templates, normalised sentences].
=================  ===========================================================================================

``weights`` defaults to the paper's tag (a local file works: ``weights="/path/ViT-L-14-336.pt"``), and
``image_size`` to the paper's size.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from zsad.methods.base import Detector, TrainableDetector

# method -> (backbone, default weights, image size, load_clip options, detector options, checkpoint key)
OFFICIAL: dict[str, dict[str, Any]] = {
    "aprilgan": {
        "backbone": "ViT-L-14-336",
        "weights": "openai",
        "image_size": 518,
        "load": {"interpolation": "bicubic", "antialias": True, "quick_gelu": False, "round_fp16": True},
        "options": {"image_score": "official-transductive"},
        "checkpoint_key": "trainable_linearlayer",
    },
    "clipad-sdp": {
        "backbone": "ViT-B-16-plus-240",
        "weights": "laion400m_e31",
        "image_size": 240,
        "load": {},
        "options": {
            "rvs": "dbscan",
            "text_precision": "fp16-official",
            "legacy_aliasing": True,
            "image_score": "minmax-sum",
        },
        "checkpoint_key": None,
    },
    "winclip": {
        "backbone": "ViT-B-16-plus-240",
        "weights": "laion400m_e31",
        "image_size": 240,
        "load": {},
        "options": {"prompt_bank": "winclip-anomalib", "normalize_sentences": False},
        "checkpoint_key": None,
    },
}
OFFICIAL["anomalyclip"] = {
    "backbone": "ViT-L-14-336",
    "weights": "openai",
    "image_size": 518,
    "load": {"interpolation": "bilinear", "antialias": False, "quick_gelu": True},
    "options": {"dpam": "vv", "cls_ln_post": False, "deep_prompt_fp16": True},
    "checkpoint_key": "prompt_learner",
}
OFFICIAL["clipad-sdp-plus"] = {**OFFICIAL["clipad-sdp"], "checkpoint_key": "linear_layers"}
# AdaCLIP saves a flat state dict; a checkpoint key ending in "." names the prefix of its keys.
OFFICIAL["adaclip"] = {
    "backbone": "ViT-L-14-336",
    "weights": "openai",
    "image_size": 518,
    "load": {"interpolation": "bicubic", "antialias": False, "quick_gelu": False, "round_fp16": True},
    "options": {
        "prompting": "hybrid",
        "hsf": "released",
        "prompt_fp16": True,
        "kmeans_rng": "shared",
        "dice": "per-row",
    },
    "checkpoint_key": "clip_model.",
}


def read_official_checkpoint(path: str | os.PathLike, key: str) -> dict[str, torch.Tensor]:
    """The learned tensors of a released checkpoint: ``torch.load(weights_only=True)[key]``; a ``key`` ending
    in "." reads a flat state dict whose keys all start with it (AdaCLIP), the prefix removed."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"official checkpoint not found: {path}")
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise ValueError(f"cannot read {path} as a PyTorch checkpoint: {type(err).__name__}: {err}") from err
    if key.endswith("."):
        flat = isinstance(blob, dict) and blob and all(str(k).startswith(key) for k in blob)
        if not flat or not all(isinstance(v, torch.Tensor) for v in blob.values()):
            found = sorted(blob)[:4] if isinstance(blob, dict) else type(blob).__name__
            raise ValueError(
                f"{path} is not in the official format: expected a flat dict of '{key}...' tensors, "
                f"found {found}"
            )
        return {k[len(key) :]: v.float() for k, v in blob.items()}
    if not isinstance(blob, dict) or key not in blob or not isinstance(blob[key], dict):
        found = sorted(blob) if isinstance(blob, dict) else type(blob).__name__
        raise ValueError(f"{path} is not in the official format: expected a dict with {key!r}, found {found}")
    return {k: v.float() for k, v in blob[key].items()}


def from_official(
    method_id: str,
    checkpoint: str | os.PathLike | None = None,
    weights: str | os.PathLike | None = None,
    image_size: int | None = None,
    backbone: str | None = None,
    device: str | torch.device | None = None,
    **options: Any,
) -> Detector:
    """A detector that reproduces the official code of ``method_id`` (see the module docstring).

    checkpoint: the released learned weights in the official format (required for methods with learned
        parts; must be None for training-free ones). weights: CLIP weights (default the paper's tag).
    backbone: another open_clip architecture with the official settings (default the paper's; e.g.
        "zsad-tiny" for the embedded world); image_size then defaults to its native size.
    device: where it runs ("auto", "cpu", "cuda", "cuda:N"; None = the CPU); checked before weights load.
    options: further method options, applied over the official ones.
    """
    from zsad.backbone import load_clip
    from zsad.device import prepare
    from zsad.methods.registry import create

    key = method_id.lower()
    if key not in OFFICIAL:
        raise ValueError(f"no official preset for {method_id!r}; available: {', '.join(sorted(OFFICIAL))}")
    spec = OFFICIAL[key]
    if spec["checkpoint_key"] is None and checkpoint is not None:
        raise ValueError(f"{method_id} is training-free: it has no checkpoint (pass checkpoint=None)")
    if backbone is None or backbone == spec["backbone"]:
        name, weights = spec["backbone"], spec["weights"] if weights is None else weights
        image_size = image_size or spec["image_size"]
    else:
        name = backbone
    merged = {**spec["options"], **options}
    target = prepare("cpu" if device is None else device, merged.get("precision", "fp32"))
    clip = load_clip(name, pretrained=weights, image_size=image_size, device=target, **spec["load"])
    detector = create(key, backbone=clip, device=target, **merged)
    if spec["checkpoint_key"] is not None:
        if checkpoint is None:
            raise ValueError(
                f"{method_id} has learned parts: pass checkpoint=<the released .pth> (or train one with "
                "`zsad train` and load it with zsad.train.load_checkpoint)"
            )
        assert isinstance(detector, TrainableDetector)
        detector.load_learned(read_official_checkpoint(checkpoint, spec["checkpoint_key"]), str(checkpoint))
    return detector
