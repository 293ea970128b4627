"""CLIP-AD, training-free Staged Dual-Path (SDP): Chen et al., arXiv 2311.00453 (docs/methods.md §4).

How one image is scored (docs/methods.md §4.1-§4.4):

1. **Staged dual path.** Every vision block also runs a v-v attention (q = k = v = the value projection) on
   the original path's LN input. The second path starts from the first block's v-v output alone (no residual
   of the input), adds the v-v output of each later block of its stage, skips the FFN, and is *reset* to the
   current block's v-v output at every stage boundary. The "surgery" tokens at the stage ends (layers 3, 6, 9,
   12 for the 12-block ViT-B-16-plus-240) are therefore sums of the v-v outputs of one stage. Their CLS is the
   original path's CLS; every token then goes through ``ln_post`` and ``proj``. The backbone computes all of
   this (``AttnPath(mode="vv", variant="staged")``); this module never touches CLIP internals.
2. **Text with Representative Vector Selection (RVS).** The "clipad" bank (9 normal / 10 abnormal states x 22
   templates) is encoded, each sentence L2-normalised, and one representative vector per state is chosen by
   ``rvs`` (mean, pca, kde, mean_shift or dbscan, the official scripts' default; ``zsad.prompts``).
3. **Feature surgery** per layer (CLIP Surgery): with unit tokens p, unit CLS c and text columns t_k,
   w_k = softmax_k(<c, t_k>) / mean_k softmax (no temperature, so w is close to 1), and
   s_k = sum_c (p * t_k * w_k - mean_j p * t_j * w_j) = w_k cos(p, t_k) - mean_j w_j cos(p, t_j).
   For two states s_abnormal = (w_a cos(p, t_a) - w_n cos(p, t_n)) / 2 (docs/methods.md §4.3).
4. **Map.** Surgery scores summed over the layers, bilinearly upsampled to the input size
   (``align_corners=False``), abnormal channel, Gaussian-smoothed per image (sigma 8, scipy defaults:
   truncate 4, mode "reflect"; docs/methods.md pitfall 6).
5. **Image score** (docs/methods.md pitfall 7, §13.7), option ``image_score``:
   ``"global"`` (default) softmax(100 <c_last, T>)[abnormal], where c_last is the CLS of the last requested
   layer (layer 12: the ordinary CLIP image embedding), as in the official ``image_features[-1]``;
   ``"max"`` the maximum of the smoothed map; ``"minmax-sum"`` the paper's score, per-class min-max of both
   over the whole test set then summed. It is transductive: ``predict`` then returns the raw sum
   global + max, and :func:`transductive_scores` / :meth:`ClipADSDP.finalize_scores` must be applied to the
   whole test set afterwards.

Which CLS weights the surgery: each layer's own CLS (original path, after ``ln_post`` + ``proj``,
L2-normalised), as in the official ``image_feature[:, :1, :]`` per layer.

Aliasing quirk (docs/methods.md §4.6, pitfall 1): the official dual-path block updates the original path in
place, so the original tokens stored at layers 3, 6 and 9 also contain the next block's attention output. For
SDP this reaches only the CLS copied into the surgery tokens at those layers, i.e. the surgery class weights w
(the layer-12 CLS of the global score is unaffected, and the v-v tokens escape because the next block is a
stage boundary). It matters far more for SDP+ (trained on the "ori" tokens). The default here clones (clean);
``legacy_aliasing=True`` asks the backbone to reproduce the official behaviour.

Depths other than 12: the path is reset every L / num_stages blocks and the maps are read at the stage ends.
The default ``num_stages`` is the largest of 4, 3, 2, 1 that divides the number of vision blocks L (4 for
L = 12 or 24; 3 for the 6-block zsad-tiny, giving layers 2, 4, 6). The official test ``count % (L / 4)``
uses a float: for L = 6 it would reset at blocks 1 and 4 only (two stages of three blocks); a ``num_stages``
that does not divide L is refused here instead.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from scipy.ndimage import gaussian_filter

from zsad.backbone import AttnPath, CLIPBackbone, ImageFeatures
from zsad.methods.base import (
    Detector,
    check_choice,
    check_layers,
    check_precision,
    check_sigma,
    upsample_grid,
)
from zsad.prompts import (
    DBSCAN_SETTINGS,
    REDUCERS,
    class_phrase,
    encode_sentences,
    get_bank,
    reduce_sentences,
    run_reducer,
)

if TYPE_CHECKING:
    import pandas as pd

IMAGE_SCORES = ("global", "max", "minmax-sum")
TEXT_PRECISIONS = ("fp32", "fp16-official")
# Temperature of the global image score (official test.py); the surgery weights use none
# (docs/methods.md §4.3).
GLOBAL_LOGIT_SCALE = 100.0


def default_num_stages(num_layers: int) -> int:
    """Largest of 4, 3, 2, 1 dividing the depth: 4 stages for the paper's 12 blocks, 3 for zsad-tiny's 6."""
    return next(s for s in (4, 3, 2, 1) if num_layers % s == 0)


def stage_ends(num_layers: int, num_stages: int) -> tuple[int, ...]:
    """1-based last block of every stage: (3, 6, 9, 12) for 12 blocks in 4 stages."""
    if num_stages < 1 or num_layers % num_stages:
        raise ValueError(
            f"num_stages={num_stages} must divide the {num_layers} vision blocks of the backbone "
            f"(try {default_num_stages(num_layers)})"
        )
    step = num_layers // num_stages
    return tuple(range(step, num_layers + 1, step))


def feature_surgery(tokens: torch.Tensor, cls: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
    """CLIP-Surgery scores of unit tokens (B, N, D) against unit text columns (B, D, K) -> (B, N, K).

    w_k = softmax_k(<cls, t_k>) / mean_k softmax, without temperature (docs/methods.md §4.3, §13.4);
    s_k = w_k cos(p, t_k) - mean_j w_j cos(p, t_j), which is the channel sum of the element-wise products
    p * t_k * w_k after subtracting their mean over the K states (the "redundant feature").
    """
    prob = torch.einsum("bd,bdk->bk", cls, text).softmax(dim=-1)
    weights = prob / prob.mean(dim=-1, keepdim=True)
    weighted = torch.einsum("bnd,bdk->bnk", tokens, text) * weights[:, None, :]
    return weighted - weighted.mean(dim=-1, keepdim=True)


def cosine_scores(tokens: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
    """Plain cosine similarities (B, N, K): the "surgery off" ablation."""
    return torch.einsum("bnd,bdk->bnk", tokens, text)


def smooth_maps(maps: np.ndarray, sigma: float) -> np.ndarray:
    """Per-image scipy Gaussian filter with its defaults (truncate 4, mode "reflect");
    docs/methods.md pitfall 6."""
    if sigma <= 0:
        return maps
    return np.stack([gaussian_filter(m, sigma=sigma) for m in maps])


def smooth_map_tensor(maps: torch.Tensor, sigma: float) -> torch.Tensor:
    """:func:`smooth_maps` of a (B, S, S) tensor, float32 on its device. :mod:`zsad.export` swaps this name
    for a traceable convolution with the same kernel and border rule while it exports a graph."""
    return torch.from_numpy(smooth_maps(maps.detach().float().cpu().numpy(), sigma)).to(maps.device)


def _minmax(x: np.ndarray) -> np.ndarray:
    span = x.max() - x.min()
    # A class whose scores are all equal (or a single image) has no spread to normalise: map it to 0.
    return (x - x.min()) / span if span > 0 else np.zeros_like(x)


def transductive_scores(
    global_scores: Sequence[float] | np.ndarray,
    max_scores: Sequence[float] | np.ndarray,
    class_names: Sequence[str],
) -> np.ndarray:
    """CLIP-AD's image score: per class, min-max(global) + min-max(map max) over the class's test images.

    Transductive (docs/methods.md §4.4, §13.7): the score of one image depends on every other test image of
    its class, so it is a post-processing step over the whole test set, not part of ``predict``. A class with
    constant scores (or one image) contributes 0 for that term instead of the official 0/0 = NaN.
    """
    g = np.asarray(global_scores, dtype=np.float64)
    m = np.asarray(max_scores, dtype=np.float64)
    names = np.asarray(class_names)
    if not (len(g) == len(m) == len(names)):
        raise ValueError(
            f"transductive_scores: got {len(g)} global scores, {len(m)} max scores and "
            f"{len(names)} class names"
        )
    out = np.empty_like(g)
    for name in np.unique(names):
        idx = names == name
        out[idx] = _minmax(g[idx]) + _minmax(m[idx])
    return out


# Unit sentence embeddings per backbone object, shared by every detector on it (a notebook comparing RVS
# reducers or ablations encodes the 418 sentences of a class once). Weak keys: it dies with the backbone.
def representative_vector(
    embeddings: torch.Tensor, rvs: str = "dbscan", text_precision: str = "fp32", **reducer_options: float
) -> torch.Tensor:
    """RVS (docs/methods.md §4.2): one unit vector (D,) from unit sentence embeddings (N, D).

    ``text_precision="fp16-official"`` repeats the official arithmetic exactly (parity trap 13.2): the
    reducer runs on the float32 numpy embeddings (so DBSCAN's cluster mean is a float32 ``np.mean``), its
    result is rounded to fp16 and normalised in fp16. A float64 mean can land on the other side of an fp16
    rounding midpoint, hence float32 here. The official mean reducer stays in the text encoder's dtype (fp32
    on CPU), so "mean" is the same under both precisions.
    """
    check_choice("text_precision", text_precision, TEXT_PRECISIONS)
    if text_precision == "fp32" or rvs == "mean":
        return reduce_sentences(embeddings, rvs, **reducer_options)
    x = embeddings.detach().float().cpu().numpy()
    vector = torch.from_numpy(np.asarray(run_reducer(rvs, x, **reducer_options))).half()
    return (vector / vector.norm()).float()


class ClipADSDP(Detector):
    """CLIP-AD SDP (training-free). See the module docstring for the method and every option's source.

    Options:
        layers: 1-based blocks read for the maps; default the stage ends (3, 6, 9, 12 for L = 12).
        num_stages: stages of the v-v path; default :func:`default_num_stages` (must divide L).
        rvs: representative vector reducer, one of ``zsad.prompts.REDUCERS``; default "dbscan"
            (the official test_SDP.sh).
        dbscan_preset: "mvtec" (eps 0.5, min_samples 15; the official code's setting for every dataset but
            VisA) or "visa" (eps 1.5, 25); ``dbscan_eps`` / ``dbscan_min_samples`` override it.
        surgery: False replaces feature surgery with plain cosine similarity (ablation).
        sigma: Gaussian smoothing of the maps in pixels; 0 disables it. Default 8.
        image_score: "global" (default), "max" or "minmax-sum" (transductive, :func:`transductive_scores`).
        text_precision: "fp32", or "fp16-official" where the non-mean representative vectors are rounded to
            fp16 and normalised in fp16 as the official code does (parity trap 13.2).
        bank: prompt bank, default "clipad"; replace_underscores: "metal_nut" -> "metal nut" (default off,
            as the official code).
        legacy_aliasing: reproduce the official in-place aliasing of the stored original-path CLS
        (docs/methods.md §4.6).
        precision: "fp32" (default) or "bf16" (autocast of the image tower).
    """

    method_id: ClassVar[str] = "clipad-sdp"
    paper: ClassVar[str] = "Chen et al., CLIP-AD: A Language-Guided Staged Dual-Path Model, arXiv 2311.00453"
    default_backbone: ClassVar[str] = "ViT-B-16-plus-240"
    default_weights: ClassVar[str | None] = "laion400m_e31"
    default_image_size: ClassVar[int] = 240

    def __init__(
        self,
        backbone: CLIPBackbone,
        layers: Sequence[int] | None = None,
        num_stages: int | None = None,
        rvs: str = "dbscan",
        dbscan_preset: str = "mvtec",
        dbscan_eps: float | None = None,
        dbscan_min_samples: int | None = None,
        surgery: bool = True,
        sigma: float = 8.0,
        image_score: str = "global",
        text_precision: str = "fp32",
        bank: str = "clipad",
        replace_underscores: bool = False,
        legacy_aliasing: bool = False,
        precision: str = "fp32",
    ) -> None:
        num_layers = backbone.num_layers
        num_stages = default_num_stages(num_layers) if num_stages is None else int(num_stages)
        ends = stage_ends(num_layers, num_stages)
        layers = check_layers(layers, num_layers, default=ends)
        check_choice("rvs", rvs, tuple(REDUCERS))
        check_choice("dbscan_preset", dbscan_preset, tuple(DBSCAN_SETTINGS))
        check_choice("image_score", image_score, IMAGE_SCORES)
        check_choice("text_precision", text_precision, TEXT_PRECISIONS)
        get_bank(bank)
        if image_score == "minmax-sum":
            warnings.warn(
                "image_score='minmax-sum' is transductive: predict() returns the raw sum global + max; apply "
                "finalize_scores() (or transductive_scores()) to the whole test set to get the paper's score",
                UserWarning,
                stacklevel=2,
            )
        dbscan = dict(DBSCAN_SETTINGS[dbscan_preset])
        if dbscan_eps is not None:
            dbscan["eps"] = float(dbscan_eps)
        if dbscan_min_samples is not None:
            dbscan["min_samples"] = int(dbscan_min_samples)
        super().__init__(
            backbone,
            layers=list(layers),
            num_stages=num_stages,
            rvs=rvs,
            dbscan_eps=dbscan["eps"],
            dbscan_min_samples=dbscan["min_samples"],
            surgery=bool(surgery),
            sigma=check_sigma(sigma),
            image_score=image_score,
            text_precision=text_precision,
            bank=bank,
            replace_underscores=bool(replace_underscores),
            legacy_aliasing=bool(legacy_aliasing),
            precision=check_precision(precision),
        )
        self.layers = tuple(layers)
        self.attn_path = AttnPath(
            mode="vv", variant="staged", num_stages=num_stages, legacy_aliasing=bool(legacy_aliasing)
        )
        self._reducer_options: dict[str, float] = dbscan if rvs == "dbscan" else {}
        self._text_cache: dict[str, torch.Tensor] = {}
        # Per-image parts of the last predict() call, for the transductive score (see finalize_scores).
        self.last_score_parts: dict[str, torch.Tensor] = {}

    # ------------------------------------------------------------------------------------------ text
    @torch.no_grad()
    def text_features(self, class_name: str) -> torch.Tensor:
        """(D, 2) unit columns [t_normal, t_abnormal] of one class, RVS-reduced, cached
        (docs/methods.md §4.2)."""
        if class_name not in self._text_cache:
            phrase = class_phrase(class_name, self.options["replace_underscores"])
            columns = [
                representative_vector(
                    encode_sentences(self.backbone, sentences),
                    self.options["rvs"],
                    self.options["text_precision"],
                    **self._reducer_options,
                )
                for sentences in get_bank(self.options["bank"]).sentences(phrase)
            ]
            self._text_cache[class_name] = torch.stack(columns, dim=1)
        return self._text_cache[class_name]

    # ------------------------------------------------------------------------------------------ image
    def feature_key(self) -> dict[str, Any]:
        """What the frozen features depend on (for :class:`zsad.cache.FeatureCache`); text is not cached."""
        return {
            "backbone": self.backbone.name,
            "weights": self.backbone.weights_id,
            "size": self.image_size,
            "layers": list(self.layers),
            "kind": "clipad-staged-vv",
            "num_stages": self.options["num_stages"],
            "legacy_aliasing": self.options["legacy_aliasing"],
            "precision": self.options["precision"],
        }

    @torch.no_grad()
    def extract_features(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """Per layer l: ``cls_l`` (B, D) and ``patches_l`` (B, N, D) of the surgery tokens after ``ln_post`` +
        ``proj``, not normalised. The backbone has already written the original path's CLS into the staged
        path's CLS position (``AttnPath.replace_cls`` defaults to True for "staged"), as the official code."""
        feats = self.backbone.encode_image(
            images, layers=self.layers, attn_path=self.attn_path, autocast=self.autocast
        )
        return self.select_features(feats)

    def select_features(self, feats: ImageFeatures) -> dict[str, torch.Tensor]:
        """The per-layer ``cls_l`` / ``patches_l`` of the backbone's output (see :meth:`extract_features`)."""
        out = {}
        for layer in self.layers:
            surgery_tokens = feats.path_tokens_proj[layer].float()
            out[f"cls_{layer}"] = surgery_tokens[:, 0]
            out[f"patches_{layer}"] = surgery_tokens[:, 1:]
        return out

    def surgery_map(self, features: dict[str, torch.Tensor], text: torch.Tensor) -> torch.Tensor:
        """The unsmoothed SDP map (B, S, S): surgery scores summed over layers, upsampled
        (docs/methods.md §4.3)."""
        scores = None
        for layer in self.layers:
            cls = F.normalize(features[f"cls_{layer}"].float(), dim=-1)
            patches = F.normalize(features[f"patches_{layer}"].float(), dim=-1)
            if self.options["surgery"]:
                layer_scores = feature_surgery(patches, cls, text)
            else:
                layer_scores = cosine_scores(patches, text)
            scores = layer_scores if scores is None else scores + layer_scores
        return upsample_grid(scores[..., 1], self.backbone.grid_size, self.image_size)

    def unsmoothed_map(self, features: dict[str, torch.Tensor], text: torch.Tensor) -> torch.Tensor:
        """The map before Gaussian smoothing; SDP+ adds its heads' maps here."""
        return self.surgery_map(features, text)

    @torch.no_grad()
    def score_parts_from_features(
        self, features: dict[str, torch.Tensor], class_names: list[str]
    ) -> dict[str, torch.Tensor]:
        """Smoothed ``map`` (B, S, S) and the image scores ``global`` and ``max`` (B,);
        docs/methods.md §4.3-§4.4."""
        text = torch.stack([self.text_features(name) for name in class_names]).float()  # (B, D, 2)
        up = self.unsmoothed_map(features, text)
        maps = smooth_map_tensor(up, self.options["sigma"])
        # The global score reads the CLS of the last requested layer (official: image_features[-1]).
        cls_last = F.normalize(features[f"cls_{self.layers[-1]}"].float(), dim=-1)
        logits = GLOBAL_LOGIT_SCALE * torch.einsum("bd,bdk->bk", cls_last, text)
        # Smoothing runs on the CPU (scipy, parity); its results return to the device of the other parts.
        return {
            "map": maps,
            "global": logits.softmax(dim=-1)[:, 1],
            "max": maps.flatten(1).amax(dim=1),
        }

    @torch.no_grad()
    def predict_features(
        self, features: dict[str, torch.Tensor], class_names: list[str]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        parts = self.score_parts_from_features(features, class_names)
        self.last_score_parts = {"global": parts["global"], "max": parts["max"]}
        mode = self.options["image_score"]
        scores = parts["global"] + parts["max"] if mode == "minmax-sum" else parts[mode]
        return scores.float(), parts["map"].float()

    @torch.no_grad()
    def predict(self, images: torch.Tensor, class_names: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(scores (B,), maps (B, S, S)); ``image_score`` says what the score is."""
        self.check_input(images, class_names)
        return self.predict_features(self.extract_features(images), class_names)

    def finalize_scores(self, scores: pd.DataFrame) -> pd.DataFrame:
        """Post-processing over a whole test set (evaluator hook).

        Needs columns ``cls_name``, ``global`` and ``max`` (collected from :attr:`last_score_parts` after
        every ``predict``). With ``image_score="minmax-sum"`` returns a copy whose ``score`` is
        :func:`transductive_scores`; otherwise returns ``scores`` unchanged.
        """
        if self.options["image_score"] != "minmax-sum":
            return scores
        missing = {"cls_name", "global", "max"} - set(scores.columns)
        if missing:
            raise ValueError(
                f"{self.method_id}: finalize_scores needs the columns {sorted(missing)}; collect "
                "detector.last_score_parts after every predict() call"
            )
        out = scores.copy()
        out["score"] = transductive_scores(out["global"], out["max"], out["cls_name"])
        return out
