"""WinCLIP (zero-shot) and WinCLIP+ (few-shot): Jeong et al., CVPR 2023 (docs/methods.md §2).

Training-free. Each image is described at three scales: the whole image (the CLS embedding) and every
k x k window of patches (k = 2, 3; stride 1). A window embedding is made by *token masking*, not by cropping:
keep the CLS token plus the k*k patch tokens of the window, run the whole transformer on that short
sequence and take the projected CLS (``backbone.encode_windows``). Each embedding is scored against the
class's compositional prompt ensemble (CPE, docs/methods.md §1.2) with

    ascore(f) = softmax([cos(f, t_n), cos(f, t_a)] / tau)[abnormal],   tau = 0.07.

A patch's score at one scale is the harmonic mean of the scores of all windows that contain it; the
zero-shot map is the harmonic mean of {image score, 2x2 map, 3x3 map}, bilinearly upsampled
(``align_corners=False``, as anomalib and zqhang/WinCLIP-pytorch) with no smoothing. The image score is the
CLS ascore alone.

WinCLIP+ adds a reference memory of k normal images per class: final-layer patch tokens and the window
embeddings of each scale. A test feature's association score is min over the memory of (1 - cos) / 2; the
few-shot map is the mean of the patch-level map and the harmonically aggregated window-level maps (as in
anomalib's ``_compute_few_shot_scores``). Final map = (zero-shot map + few-shot map) / 2 and image score =
(zero-shot score + max of the few-shot map) / 2.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

import torch
import torch.nn.functional as F

from zsad.backbone import CLIPBackbone, ImageFeatures
from zsad.methods.base import Detector, check_precision, upsample_grid
from zsad.methods.memory_bank import MemoryBank
from zsad.prompts import BANKS, class_phrase, text_features

AGGREGATIONS = ("harmonic", "caoyunkang")
PATCH_FEATURES = ("ln_post", "raw", "proj")


# ------------------------------------------------------------------------------------------ windows
def window_indices(grid: tuple[int, int], size: int, stride: int = 1) -> torch.Tensor:
    """Patch indices (row-major, 0..h*w-1) of every size x size window: (K, size*size), windows row-major.

    On a 15x15 grid: 196 windows of 2x2 and 169 of 3x3 (docs/methods.md §2.1).
    """
    h, w = grid
    if not 1 <= size <= min(h, w):
        raise ValueError(f"window size {size} does not fit the {h}x{w} patch grid")
    ids = torch.arange(h * w).reshape(h, w)
    # unfold gives (n_rows, n_cols, size, size) blocks of the index grid.
    blocks = ids.unfold(0, size, stride).unfold(1, size, stride)
    return blocks.reshape(-1, size * size)


def incidence_matrix(windows: torch.Tensor, num_patches: int) -> torch.Tensor:
    """0/1 float (K windows x P patches) matrix: entry (w, p) is 1 when window w contains patch p."""
    incidence = torch.zeros(windows.shape[0], num_patches)
    incidence.scatter_(1, windows, 1.0)
    return incidence


def harmonic_aggregation(window_scores: torch.Tensor, incidence: torch.Tensor) -> torch.Tensor:
    """Per patch, the harmonic mean of the scores of the windows that contain it (WinCLIP eq. 3).

    ``window_scores`` (B, K) in [0, 1], ``incidence`` (K, P) 0/1 -> (B, P) with
    M(p) = n_p / sum_{w contains p} 1/s_w, as one matrix product instead of a loop over patches.
    A zero window score makes the patches it covers 0 (1/0 = inf; anomalib's ``nan_to_num(posinf=0)``): those
    windows are counted by a second product, because inf x 0 in the first would give NaN everywhere else.
    A patch covered by no window gets 0.
    """
    incidence = incidence.float()
    reciprocal = 1.0 / window_scores.float()
    infinite = torch.isinf(reciprocal)
    summed = torch.where(infinite, 0.0, reciprocal) @ incidence
    zeroed = (infinite.float() @ incidence) > 0
    result = torch.nan_to_num(incidence.sum(dim=0) / summed, nan=0.0, posinf=0.0)
    return result.masked_fill(zeroed, 0.0)


def harmonic_mean(maps: Sequence[torch.Tensor]) -> torch.Tensor:
    """Element-wise harmonic mean of equally shaped maps: len / sum 1/m (zero maps to zero)."""
    stacked = torch.stack([m.float() for m in maps])
    return torch.nan_to_num(len(maps) / (1.0 / stacked).sum(dim=0), nan=0.0)


def state_probabilities(embeddings: torch.Tensor, text: torch.Tensor, temperature: float) -> torch.Tensor:
    """softmax over [normal, abnormal] of cos(f, t) / tau (WinCLIP eq. 1).

    ``embeddings`` (B, ..., D) un-normalised, ``text`` (B, D, 2) unit columns -> (B, ..., 2).
    """
    flat = F.normalize(embeddings.float(), dim=-1).reshape(embeddings.shape[0], -1, embeddings.shape[-1])
    cos = torch.bmm(flat, text.float())
    return (cos / temperature).softmax(dim=-1).reshape(*embeddings.shape[:-1], 2)


def last_patch_features(
    backbone: CLIPBackbone, features: ImageFeatures, layer: int, kind: str
) -> torch.Tensor:
    """Patch tokens (CLS dropped) of ``layer`` as WinCLIP+'s patch-level memory, (B, P, C) float32.

    "ln_post": open_clip's output tokens (``ln_post``, no ``proj``; anomalib's ``patch_embeddings``);
    "raw": the residual stream (zqhang/WinCLIP-pytorch); "proj": ``ln_post`` + ``proj`` (the joint space).
    """
    if kind == "proj":
        return features.tokens_proj[layer][:, 1:].float()
    raw = features.tokens[layer][:, 1:].float()
    if kind == "raw":
        return raw
    return backbone.model.visual.ln_post(raw)


# ------------------------------------------------------------------------------------------ detectors
class WinCLIP(Detector):
    """WinCLIP zero-shot (docs/methods.md §2). Options (defaults follow the paper):

    - ``scales`` window sizes in patches, default (2, 3);
    - ``temperature`` tau of the two-way softmax, 0.07 (caoyunkang uses 0.01, i.e. logit scale 100);
    - ``prompt_bank`` "winclip" (paper, 22 templates) or "winclip-anomalib" (21, docs/methods.md §1.2);
    - ``normalize_sentences`` True = normalise each sentence embedding before the mean (paper);
      False = average raw embeddings (anomalib, docs/methods.md pitfall 11);
    - ``aggregation`` "harmonic" (paper, anomalib, zqhang) or "caoyunkang": 1 - harmonic mean over scales of
      the per-scale harmonic mean of the *normal* probability (caoyunkang/WinClip, docs/methods.md §2.2);
    - ``replace_underscores`` use "metal nut" rather than the meta.json key "metal_nut" in prompts;
    - ``precision`` "fp32" (default) or "bf16" (autocast of the image tower and window passes).
    """

    method_id: ClassVar[str] = "winclip"
    paper: ClassVar[str] = (
        "Jeong et al., WinCLIP: Zero-/Few-Shot Anomaly Classification and Segmentation, CVPR 2023"
    )
    default_backbone: ClassVar[str] = "ViT-B-16-plus-240"
    default_weights: ClassVar[str | None] = "laion400m_e31"
    default_image_size: ClassVar[int] = 240
    few_shot: ClassVar[bool] = False
    # Options a subclass adds and passes up (recorded in ``config()``); anything else is a typo.
    _subclass_options: ClassVar[tuple[str, ...]] = ()

    def __init__(
        self,
        backbone: CLIPBackbone,
        scales: Sequence[int] = (2, 3),
        temperature: float = 0.07,
        prompt_bank: str = "winclip",
        normalize_sentences: bool = True,
        aggregation: str = "harmonic",
        replace_underscores: bool = False,
        precision: str = "fp32",
        **options: Any,
    ) -> None:
        unknown = sorted(set(options) - set(self._subclass_options))
        if unknown:
            raise TypeError(
                f"{self.method_id}: unknown option(s) {', '.join(unknown)}; see help({type(self).__name__})"
            )
        scales = tuple(int(s) for s in scales)
        if not scales or len(set(scales)) != len(scales):
            raise ValueError(f"scales must be distinct window sizes in patches, e.g. (2, 3); got {scales}")
        if not temperature > 0:
            raise ValueError(f"temperature must be positive; got {temperature}")
        if prompt_bank not in BANKS:
            raise ValueError(f"unknown prompt_bank {prompt_bank!r}; available: {', '.join(sorted(BANKS))}")
        if aggregation not in AGGREGATIONS:
            raise ValueError(f"unknown aggregation {aggregation!r}; choose one of {', '.join(AGGREGATIONS)}")
        super().__init__(
            backbone,
            scales=list(scales),
            temperature=float(temperature),
            prompt_bank=prompt_bank,
            normalize_sentences=bool(normalize_sentences),
            aggregation=aggregation,
            replace_underscores=bool(replace_underscores),
            precision=check_precision(precision),
            **options,
        )
        self.scales = scales
        self.temperature = float(temperature)
        self.prompt_bank = prompt_bank
        self.normalize_sentences = bool(normalize_sentences)
        self.aggregation = aggregation
        self.replace_underscores = bool(replace_underscores)
        self.grid = tuple(backbone.grid_size)
        num_patches = self.grid[0] * self.grid[1]
        self.windows = {s: window_indices(self.grid, s) for s in scales}
        self.incidence = {s: incidence_matrix(self.windows[s], num_patches) for s in scales}
        # Shared by every WinCLIP / WinCLIP+ on this backbone (e.g. the zero-shot and the k-shot detectors
        # of one notebook): the text never depends on the references.
        self._text_cache: dict[tuple[str, str, bool], torch.Tensor] = {}
        # Only WinCLIP+ keeps last-block patch features (its patch-level memory).
        self._patch_kind: str | None = None

    # ------------------------------------------------------------------ features
    def text_features(self, class_name: str) -> torch.Tensor:
        """The (D, 2) CPE matrix [t_normal, t_abnormal] of a class, computed once per class and setting."""
        phrase = class_phrase(class_name, self.replace_underscores)
        key = (phrase, self.prompt_bank, self.normalize_sentences)
        if key not in self._text_cache:
            self._text_cache[key] = (
                text_features(
                    self.backbone, phrase, self.prompt_bank, normalize_sentences=self.normalize_sentences
                )
                .float()
                .cpu()
            )
        return self._text_cache[key]

    @property
    def features_device(self) -> torch.device:
        """The CPU: window scoring runs there (see :meth:`_encode`)."""
        return torch.device("cpu")

    def _text_batch(self, class_names: Sequence[str]) -> torch.Tensor:
        return torch.stack([self.text_features(name) for name in class_names])

    @torch.no_grad()
    def _encode(self, images: torch.Tensor, patch_kind: str | None = None) -> dict[str, torch.Tensor]:
        """CLS embedding ("image", (B, D)), window embeddings per scale ("window_k", (B, K, D)) and, when
        ``patch_kind`` is given, the last block's patch features ("patch", (B, P, C)) for WinCLIP+."""
        last = self.backbone.num_layers
        layers = (last,) if patch_kind else ()
        features = self.backbone.encode_image(images, layers=layers, autocast=self.autocast)
        out = {"image": features.pooled}
        for s in self.scales:
            out[f"window_{s}"] = self.backbone.encode_windows(images, self.windows[s], autocast=self.autocast)
        if patch_kind:
            out["patch"] = last_patch_features(self.backbone, features, last, patch_kind)
        # Scoring runs on the CPU (the incidence matrices and the memory live there): a few MB per batch.
        return {key: value.float().cpu() for key, value in out.items()}

    # ------------------------------------------------------------------ zero-shot maps
    def _zero_shot(
        self, encoded: dict[str, torch.Tensor], class_names: Sequence[str]
    ) -> dict[str, torch.Tensor]:
        """Image scores ("score", (B,)) and grid maps ((B, h, w)) per scale plus their combination."""
        text = self._text_batch(class_names)
        b, (h, w) = encoded["image"].shape[0], self.grid
        image_probs = state_probabilities(encoded["image"].unsqueeze(1), text, self.temperature)[:, 0]
        # "caoyunkang" aggregates the normal probability and flips at the end (docs/methods.md §2.2).
        channel = 1 if self.aggregation == "harmonic" else 0
        per_scale = {"image": image_probs[:, channel, None].expand(b, h * w)}
        for s in self.scales:
            probs = state_probabilities(encoded[f"window_{s}"], text, self.temperature)[..., channel]
            per_scale[f"window_{s}"] = harmonic_aggregation(probs, self.incidence[s])
        combined = harmonic_mean(list(per_scale.values()))
        maps = {**per_scale, "zero_shot": combined}
        if channel == 0:
            maps = {key: 1.0 - value for key, value in maps.items()}
        out = {key: value.reshape(b, h, w) for key, value in maps.items()}
        out["score"] = image_probs[:, 1]
        return out

    def _maps(self, features: dict[str, torch.Tensor], class_names: list[str]) -> dict[str, torch.Tensor]:
        maps = self._zero_shot(features, class_names)
        maps["final"] = maps["zero_shot"]
        return maps

    def _upsample(self, grid_map: torch.Tensor) -> torch.Tensor:
        return upsample_grid(grid_map, grid_map.shape[-2:], self.image_size)

    # ------------------------------------------------------------------ protocol
    def _check(self, images: torch.Tensor, class_names: list[str]) -> None:
        self.check_input(images, class_names)

    def feature_key(self) -> dict[str, Any]:
        """What the frozen features depend on (for :class:`zsad.cache.FeatureCache`); text is not cached."""
        return {
            "backbone": self.backbone.name,
            "weights": self.backbone.weights_id,
            "size": self.image_size,
            "kind": "winclip-windows",
            "scales": list(self.scales),
            "patch_features": self._patch_kind,
            "precision": self.options["precision"],
        }

    @torch.no_grad()
    def extract_features(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """The frozen image features WinCLIP needs: "image" (B, D), "window_k" (B, K, D) [, "patch"]."""
        return self._encode(images, self._patch_kind)

    @torch.no_grad()
    def predict_features(
        self, features: dict[str, torch.Tensor], class_names: list[str]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        maps = self._maps(features, list(class_names))
        return maps["score"].float().cpu(), self._upsample(maps["final"]).cpu()

    @torch.no_grad()
    def predict(self, images: torch.Tensor, class_names: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(scores (B,), maps (B, S, S)) float32 on CPU; S is the input size."""
        self._check(images, class_names)
        return self.predict_features(self.extract_features(images), class_names)

    @torch.no_grad()
    def predict_scales(self, images: torch.Tensor, class_names: list[str]) -> dict[str, torch.Tensor]:
        """Every intermediate map, upsampled to the input size (B, S, S), for teaching and debugging.

        Keys: "image" (CLS score broadcast), "window_k" per scale, "zero_shot" and "final"; WinCLIP+ adds
        "fewshot_patch", "fewshot_window_k" and "few_shot".
        """
        self._check(images, class_names)
        maps = self._maps(self.extract_features(images), list(class_names))
        return {key: self._upsample(value).cpu() for key, value in maps.items() if key != "score"}


class WinCLIPPlus(WinCLIP):
    """WinCLIP+ (few-shot, docs/methods.md §2.2): WinCLIP plus a reference memory of k normal images per
    class.

    Extra option ``patch_features`` chooses the patch-level memory features of the last block:
    "ln_post" (default; open_clip's output tokens, ``ln_post`` without ``proj``, as anomalib),
    "raw" (residual stream, as zqhang/WinCLIP-pytorch) or "proj" (``ln_post`` + ``proj``, the joint space).
    ``fit_few_shot(images, class_names)`` replaces the memory of every class named in the call.
    """

    method_id: ClassVar[str] = "winclip-fewshot"
    few_shot: ClassVar[bool] = True
    _subclass_options: ClassVar[tuple[str, ...]] = ("patch_features",)

    def __init__(self, backbone: CLIPBackbone, patch_features: str = "ln_post", **options: Any) -> None:
        if patch_features not in PATCH_FEATURES:
            raise ValueError(
                f"unknown patch_features {patch_features!r}; choose one of {', '.join(PATCH_FEATURES)}"
            )
        super().__init__(backbone, patch_features=patch_features, **options)
        self._patch_kind = patch_features
        self.memory = MemoryBank()

    def _check(self, images: torch.Tensor, class_names: list[str]) -> None:
        # Before the expensive window passes: a class without references fails at once.
        super()._check(images, class_names)
        self.memory.check_fitted(class_names)

    @torch.no_grad()
    def fit_few_shot(self, images: torch.Tensor, class_names: list[str]) -> WinCLIPPlus:
        """Store the patch features and window embeddings of these normal images as their classes' memory."""
        self.check_input(images, class_names)
        encoded = self.extract_features(images)
        self.memory.clear(class_names)
        self.memory.add(list(class_names), {key: value for key, value in encoded.items() if key != "image"})
        return self

    def _maps(self, features: dict[str, torch.Tensor], class_names: list[str]) -> dict[str, torch.Tensor]:
        maps = self._zero_shot(features, class_names)
        queries = {key: value for key, value in features.items() if key != "image"}
        # Association score (WinCLIP eq. 4): min over the memory of (1 - cos) / 2.
        association = {key: value / 2.0 for key, value in self.memory.distances(class_names, queries).items()}
        b, (h, w) = len(class_names), self.grid
        few = {"fewshot_patch": association["patch"].reshape(b, h, w)}
        for s in self.scales:
            few[f"fewshot_window_{s}"] = harmonic_aggregation(
                association[f"window_{s}"], self.incidence[s]
            ).reshape(b, h, w)
        few["few_shot"] = torch.stack(list(few.values())).mean(dim=0)
        maps.update(few)
        maps["final"] = (maps["zero_shot"] + maps["few_shot"]) / 2.0
        maps["score"] = (maps["score"] + maps["few_shot"].amax(dim=(-2, -1))) / 2.0
        return maps
