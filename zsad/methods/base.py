"""The one protocol every detector follows (design.md, "One protocol for every method").

A detector is built from a loaded backbone plus method options, optionally fitted (few-shot memory or
training), and answers ``predict(images, class_names) -> (image_scores[B], anomaly_maps[B, S, S])``.
Notebooks, the evaluator and the CLI only ever talk to this interface.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from zsad.backbone import CLIPBackbone
from zsad.device import AUTOCAST_DTYPES, PRECISIONS


def upsample_grid(
    token_map: torch.Tensor, grid: tuple[int, int], size: int, align_corners: bool = False
) -> torch.Tensor:
    """Token scores (B, h*w) or (B, h, w) on a row-major grid -> (B, size, size), bilinear.

    ``align_corners`` differs between the papers (docs/methods.md pitfall 3): APRIL-GAN/AdaCLIP/SDP+ use True,
    WinCLIP (anomalib), AnomalyCLIP and CLIP-AD SDP use False.
    """
    grid_map = token_map.reshape(token_map.shape[0], 1, *grid).float()
    return F.interpolate(grid_map, size=(size, size), mode="bilinear", align_corners=align_corners)[:, 0]


def check_precision(precision: str) -> str:
    """The one precision option of every method: "fp32" (default, parity), "bf16" (autocast of the image
    tower; text features are computed once per class and stay fp32) or "fp16" (the same autocast in half
    precision, CUDA only: :func:`zsad.device.check_precision_on`)."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}; got {precision!r}")
    return precision


# Option checks shared by the methods' constructors: a user's typo fails here with the option's name, not
# later inside torch.
def check_choice(name: str, value: Any, choices: Sequence[str]) -> str:
    """``value`` if it is one of ``choices``, else a ValueError naming the option and the choices."""
    if value not in choices:
        raise ValueError(f"{name}={value!r} is not one of {', '.join(choices)}")
    return value


def check_layers(layers: Sequence[int] | None, num_layers: int, default: Sequence[int]) -> tuple[int, ...]:
    """1-based ViT block indices (``default`` when None), each in 1..``num_layers``."""
    picked = tuple(default) if layers is None else tuple(int(x) for x in layers)
    if not picked or any(not 1 <= x <= num_layers for x in picked):
        raise ValueError(f"layers must be 1-based blocks in 1..{num_layers}; got {list(picked)}")
    return picked


def check_sigma(sigma: float) -> float:
    """Gaussian smoothing of the maps in pixels; 0 disables it."""
    if sigma < 0:
        raise ValueError(f"sigma must be >= 0 (0 disables smoothing); got {sigma}")
    return float(sigma)


def quarter_layers(num_layers: int) -> tuple[int, ...]:
    """ceil(L k / 4) for k = 1..4, without repeats: (6, 12, 18, 24) for L = 24 (the blocks APRIL-GAN,
    AdaCLIP and MFP-CLIP tap by default)."""
    return tuple(dict.fromkeys(max(1, math.ceil(num_layers * k / 4)) for k in range(1, 5)))


def paper_schedule(**paper: Any) -> dict[str, Any]:
    """A trained method's ``train_settings``: the optimiser and schedule its paper gives (each method lists
    them), over what the trained methods share unless they say otherwise: no mosaic (a preset turns it on
    where the paper's auxiliary set is MVTec AD), shuffled batches and seed 111, the official scripts'."""
    return {"mosaic": 0.0, "shuffle": True, "seed": 111, **paper}


class Detector:
    """Base class: subclasses set the class attributes and implement :meth:`predict`.

    Class attributes name the paper defaults used by :func:`zsad.methods.create` when an argument is None.
    """

    method_id: ClassVar[str] = ""
    paper: ClassVar[str] = ""
    default_backbone: ClassVar[str] = "ViT-B-16-plus-240"
    default_weights: ClassVar[str | None] = "laion400m_e31"
    default_image_size: ClassVar[int] = 240
    few_shot: ClassVar[bool] = False

    def __init__(self, backbone: CLIPBackbone, **options: Any) -> None:
        self.backbone = backbone
        self.options = options

    @property
    def image_size(self) -> int:
        return self.backbone.image_size

    @property
    def features_device(self) -> torch.device:
        """Where ``extract_features`` leaves its features and ``predict_features`` expects them: the
        backbone's device. Features read back from a disk cache (CPU tensors) are moved here."""
        return self.backbone.device

    @property
    def autocast(self) -> torch.dtype | None:
        """The autocast dtype of the image tower for the ``precision`` option (None = fp32, no autocast)."""
        return AUTOCAST_DTYPES[self.options.get("precision", "fp32")]

    def config(self) -> dict[str, Any]:
        """JSON-serialisable description of this detector (method, backbone, weights, options)."""
        return {
            "method": self.method_id,
            "backbone": self.backbone.name,
            "weights": self.backbone.pretrained,
            "image_size": self.backbone.image_size,
            **{k: v for k, v in self.options.items() if isinstance(v, (int, float, str, bool, list, tuple))},
        }

    def frozen_feature_key(self, kind: str, **details: Any) -> dict[str, Any]:
        """What a method's frozen (cacheable) features depend on, for :class:`zsad.cache.FeatureCache`: the
        backbone, its weights, the input size and ``precision`` that every method shares, plus the method's
        own ``kind`` of features and ``details`` (e.g. the tapped ``layers``)."""
        return {
            "backbone": self.backbone.name,
            "weights": self.backbone.weights_id,
            "size": self.image_size,
            "kind": kind,
            **details,
            "precision": self.options["precision"],
        }

    def fit_few_shot(self, images: torch.Tensor, class_names: list[str]) -> Detector:
        raise NotImplementedError(f"{self.method_id} is zero-shot only; it takes no reference images")

    def predict(self, images: torch.Tensor, class_names: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def check_input(self, images: torch.Tensor, class_names: list[str]) -> None:
        """Clear errors for the usual user mistakes, before anything reaches torch internals."""
        if not isinstance(images, torch.Tensor) or images.ndim != 4 or images.shape[1] != 3:
            shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
            raise ValueError(f"{self.method_id}: images must be a float tensor (B, 3, S, S); got {shape}")
        size = self.image_size
        if images.shape[-2:] != (size, size):
            raise ValueError(
                f"{self.method_id}: images are {tuple(images.shape[-2:])} but the backbone runs at "
                f"{size}x{size}; load the dataset with image_size={size}"
            )
        if len(class_names) != images.shape[0]:
            raise ValueError(
                f"{self.method_id}: got {images.shape[0]} images but {len(class_names)} class names"
            )


class TrainableDetector(Detector):
    """A detector with learned parts on a frozen CLIP, trained by :func:`zsad.train.train`.

    Subclasses split the work so that the trainer can cache what is frozen (design.md, "Speed"):

    - ``feature_key()`` / ``extract_features(images)``: frozen backbone features per image (no grad), the
      same dict the trainer caches on disk and ``predict_features`` reads;
    - ``learned``: the module holding every learned parameter (its state dict is the checkpoint);
    - ``training_loss(features, masks, labels, class_names) -> (loss, {part: value})``;
    - ``predict_features(features, class_names) -> (scores, maps)``.

    ``train_settings`` holds the paper's optimiser and schedule; ``train_presets`` the named variants
    (e.g. APRIL-GAN's aux-MVTec / aux-VisA epochs and mosaic).
    """

    train_settings: ClassVar[dict[str, Any]] = {}
    train_presets: ClassVar[dict[str, dict[str, Any]]] = {}
    # Options that only change inference, so a checkpoint may be evaluated with other values.
    inference_options: ClassVar[tuple[str, ...]] = ()
    learned: nn.Module

    def feature_key(self) -> dict[str, Any]:
        raise NotImplementedError

    def extract_features(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def predict_features(
        self, features: dict[str, torch.Tensor], class_names: list[str]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def training_loss(
        self,
        features: dict[str, torch.Tensor],
        masks: torch.Tensor,
        labels: torch.Tensor,
        class_names: list[str],
    ) -> tuple[torch.Tensor, dict[str, float]]:
        raise NotImplementedError

    def learned_state(self) -> dict[str, torch.Tensor]:
        """The learned parameters as a flat dict of CPU tensors (what ``model.safetensors`` holds, whichever
        device trained them)."""
        return {k: v.detach().to("cpu", copy=True).contiguous() for k, v in self.learned.state_dict().items()}

    def load_learned(self, state: dict[str, torch.Tensor], source: str = "checkpoint") -> None:
        """Load learned parameters; a key or shape mismatch names the keys instead of torch's dump."""
        own = self.learned.state_dict()
        missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
        wrong = [k for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
        if missing or unexpected or wrong:
            detail = "; ".join(
                part
                for part in (
                    f"missing {missing[:6]}" if missing else "",
                    f"unexpected {unexpected[:6]}" if unexpected else "",
                    ", ".join(f"{k}: {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in wrong[:6]),
                )
                if part
            )
            raise ValueError(f"{source} does not fit {self.method_id} on {self.backbone.name}: {detail}")
        self.learned.load_state_dict({k: v.to(own[k].dtype) for k, v in state.items()})

    def predict(self, images: torch.Tensor, class_names: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        self.check_input(images, class_names)
        with torch.no_grad():
            return self.predict_features(self.extract_features(images), class_names)


class ViTL14Trainable(TrainableDetector):
    """A trainable detector whose paper uses OpenAI's ViT-L/14@336 fed 518-pixel images: APRIL-GAN,
    AnomalyCLIP, AdaCLIP and MFP-CLIP (their papers' implementation details). Their own options, schedule
    (:func:`paper_schedule`) and presets stay in each method's class."""

    default_backbone: ClassVar[str] = "ViT-L-14-336"
    default_weights: ClassVar[str | None] = "openai"
    default_image_size: ClassVar[int] = 518
