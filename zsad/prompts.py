"""Hand-crafted prompt banks and the reducers that turn a bank into one text vector per state.

Every method builds a 2-column text matrix ``[t_normal, t_abnormal]`` per class (docs/methods.md §1.2): format
each state word with the class name, put it in every template, encode, L2-normalise each sentence embedding,
reduce (mean, or CLIP-AD's Representative Vector Selection, docs/methods.md §4.2) and re-normalise.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

if TYPE_CHECKING:
    from zsad.backbone import CLIPBackbone

_BASE_NORMAL = (
    "{}",
    "flawless {}",
    "perfect {}",
    "unblemished {}",
    "{} without flaw",
    "{} without defect",
    "{} without damage",
)
_WINCLIP_ABNORMAL = ("damaged {}", "{} with flaw", "{} with defect", "{} with damage")
# APRIL-GAN, AnomalyCLIP and AdaCLIP add "broken" to WinCLIP's four abnormal states (docs/methods.md §1.2).
_APRILGAN_ABNORMAL = ("damaged {}", "broken {}", "{} with flaw", "{} with defect", "{} with damage")


def _both_articles(*phrases: str, period: bool) -> tuple[str, ...]:
    """WinCLIP's compositional templates: each phrase once with "a" and once with "the" (WinCLIP sec. 4.1)."""
    end = "." if period else ""
    return tuple(f"{p.format(article=art)}{end}" for p in phrases for art in ("a", "the"))


_WINCLIP_PHRASES = (
    "a cropped photo of {article} {{}}",
    "a close-up photo of {article} {{}}",
    "a bright photo of {article} {{}}",
    "a dark photo of {article} {{}}",
    "a jpeg corrupted photo of {article} {{}}",
    "a blurry photo of {article} {{}}",
    "a photo of {article} {{}}",
    "a photo of {article} small {{}}",
    "a photo of {article} large {{}}",
    "a photo of {article} {{}} for visual inspection",
    "a photo of {article} {{}} for anomaly detection",
)

# The 22-template set of the WinCLIP paper (caoyunkang: no trailing period; CLIP-AD: with periods).
WINCLIP_TEMPLATES = _both_articles(*_WINCLIP_PHRASES, period=False)
CLIPAD_TEMPLATES = _both_articles(*_WINCLIP_PHRASES, period=True)
# anomalib's 21-template list (its ``prompting.TEMPLATES``, 2.x; also zqhang's reproduction,
# docs/methods.md §1.2), in its order: "a cropped photo of a {}." and "a jpeg corrupted photo of a {}." are
# missing and "a jpeg corrupted photo of the {}." appears twice, so 20 distinct templates and 147 / 84
# sentences for 7 / 4 states. Offered only to reproduce anomalib's numbers.
ANOMALIB_TEMPLATES = (
    "a cropped photo of the {}.",
    "a close-up photo of a {}.",
    "a close-up photo of the {}.",
    "a bright photo of a {}.",
    "a bright photo of the {}.",
    "a dark photo of the {}.",
    "a dark photo of a {}.",
    "a jpeg corrupted photo of the {}.",
    "a jpeg corrupted photo of the {}.",
    "a blurry photo of the {}.",
    "a blurry photo of a {}.",
    "a photo of a {}.",
    "a photo of the {}.",
    "a photo of a small {}.",
    "a photo of the small {}.",
    "a photo of a large {}.",
    "a photo of the large {}.",
    "a photo of the {} for visual inspection.",
    "a photo of a {} for visual inspection.",
    "a photo of the {} for anomaly detection.",
    "a photo of a {} for anomaly detection.",
)

# The 35 ImageNet-style templates of APRIL-GAN's ensemble (also AnomalyCLIP's unused ensemble).
APRILGAN_TEMPLATES = (
    "a bad photo of a {}.",
    "a low resolution photo of the {}.",
    "a bad photo of the {}.",
    "a cropped photo of the {}.",
    "a bright photo of a {}.",
    "a dark photo of the {}.",
    "a photo of my {}.",
    "a photo of the cool {}.",
    "a close-up photo of a {}.",
    "a black and white photo of the {}.",
    "a bright photo of the {}.",
    "a cropped photo of a {}.",
    "a jpeg corrupted photo of a {}.",
    "a blurry photo of the {}.",
    "a photo of the {}.",
    "a good photo of the {}.",
    "a photo of one {}.",
    "a close-up photo of the {}.",
    "a photo of a {}.",
    "a low resolution photo of a {}.",
    "a photo of a large {}.",
    "a blurry photo of a {}.",
    "a jpeg corrupted photo of the {}.",
    "a good photo of a {}.",
    "a photo of the small {}.",
    "a photo of the large {}.",
    "a black and white photo of a {}.",
    "a dark photo of a {}.",
    "a photo of a cool {}.",
    "a photo of a small {}.",
    "there is a {} in the scene.",
    "there is the {} in the scene.",
    "this is a {} in the scene.",
    "this is the {} in the scene.",
    "this is one {} in the scene.",
)
# AdaCLIP keeps only four of them (docs/methods.md §1.2).
ADACLIP_TEMPLATES = (
    "a bad photo of a {}.",
    "a low resolution photo of the {}.",
    "a bad photo of the {}.",
    "a cropped photo of the {}.",
)


@dataclass(frozen=True)
class PromptBank:
    """State words x templates: ``sentences(cls)`` gives (normal, abnormal) sentence lists."""

    name: str
    normal_states: tuple[str, ...]
    abnormal_states: tuple[str, ...]
    templates: tuple[str, ...]

    def sentences(self, class_name: str) -> tuple[list[str], list[str]]:
        def fill(states: tuple[str, ...]) -> list[str]:
            return [t.format(s.format(class_name)) for s in states for t in self.templates]

        return fill(self.normal_states), fill(self.abnormal_states)


BANKS: dict[str, PromptBank] = {
    "winclip": PromptBank("winclip", _BASE_NORMAL, _WINCLIP_ABNORMAL, WINCLIP_TEMPLATES),
    "winclip-anomalib": PromptBank("winclip-anomalib", _BASE_NORMAL, _WINCLIP_ABNORMAL, ANOMALIB_TEMPLATES),
    "aprilgan": PromptBank("aprilgan", _BASE_NORMAL, _APRILGAN_ABNORMAL, APRILGAN_TEMPLATES),
    "adaclip": PromptBank("adaclip", _BASE_NORMAL, _APRILGAN_ABNORMAL, ADACLIP_TEMPLATES),
    "clipad": PromptBank(
        "clipad",
        # CLIP-AD drops the bare "{}" and negates three specific defects (docs/methods.md §1.2).
        _BASE_NORMAL[1:] + ("{} without scratch", "{} without crack", "{} without contamination"),
        (
            "damaged {}",
            "imperfect {}",
            "blemished {}",
            "broken {}",
            "{} with flaw",
            "{} with defect",
            "{} with damage",
            "{} with scratch",
            "{} with crack",
            "{} with contamination",
        ),
        CLIPAD_TEMPLATES,
    ),
}


def get_bank(name: str) -> PromptBank:
    if name not in BANKS:
        raise ValueError(f"unknown prompt bank {name!r}; available: {', '.join(sorted(BANKS))}")
    return BANKS[name]


def class_phrase(class_name: str, replace_underscores: bool = False) -> str:
    """Class names come from meta.json keys (``metal_nut``); the official code keeps them as they are.

    ``replace_underscores`` maps ``_`` and ``-`` to spaces (AdaCLIP replaces only ``-``;
    docs/methods.md §1.2).
    """
    return class_name.replace("_", " ").replace("-", " ") if replace_underscores else class_name


# ----------------------------------------------------------------- reducers (CLIP-AD RVS,
# docs/methods.md §4.2)
def _largest_cluster_mean(x: np.ndarray, labels: np.ndarray) -> np.ndarray:
    valid = labels[labels >= 0]
    if valid.size == 0:
        # Every sentence is noise for this eps: the mean is the only representative left.
        return x.mean(axis=0)
    return x[labels == np.bincount(valid).argmax()].mean(axis=0)


def reduce_mean(x: np.ndarray) -> np.ndarray:
    return x.mean(axis=0)


def reduce_pca(x: np.ndarray) -> np.ndarray:
    """CLIP-AD's ``pca`` reducer: the embedding *dimensions* are the observations and sentences the variables.

    Each sentence's embedding is centred over its own dimensions, the top eigenvector of the resulting
    (sentences x sentences) scatter matrix weights the centred sentences, and the sign is aligned with
    the plain mean. For strongly correlated sentences this lands close to the mean direction (unlike the
    first principal axis of the centred sentence cloud, which would be orthogonal to it).
    """
    centred = x.T - x.T.mean(axis=0)  # (D, N)
    _, vectors = np.linalg.eigh(centred.T @ centred)
    direction = centred @ vectors[:, -1]
    return direction if direction @ x.mean(axis=0) >= 0 else -direction


def reduce_kde(x: np.ndarray, bandwidth: float = 0.3) -> np.ndarray:
    """Density-weighted mean: sentences in dense regions of the embedding count more (Gaussian KDE)."""
    from sklearn.neighbors import KernelDensity

    weights = np.exp(KernelDensity(kernel="gaussian", bandwidth=bandwidth).fit(x).score_samples(x))
    return (weights[:, None] * x).sum(axis=0) / weights.sum()


def reduce_mean_shift(x: np.ndarray, bandwidth: float = 2.0) -> np.ndarray:
    from sklearn.cluster import MeanShift

    return _largest_cluster_mean(x, MeanShift(bandwidth=bandwidth).fit(x).labels_)


def reduce_dbscan(x: np.ndarray, eps: float = 0.5, min_samples: int = 15) -> np.ndarray:
    """CLIP-AD's default RVS: mean of the largest DBSCAN cluster (MVTec: eps 0.5 / 15; VisA: 1.5 / 25)."""
    from sklearn.cluster import DBSCAN

    return _largest_cluster_mean(x, DBSCAN(eps=eps, min_samples=min_samples).fit(x).labels_)


REDUCERS = {
    "mean": reduce_mean,
    "pca": reduce_pca,
    "kde": reduce_kde,
    "mean_shift": reduce_mean_shift,
    "dbscan": reduce_dbscan,
}
# CLIP-AD tuned DBSCAN per target dataset (docs/methods.md §4.2): a tuning choice, named here so it is
# visible.
DBSCAN_SETTINGS = {"mvtec": {"eps": 0.5, "min_samples": 15}, "visa": {"eps": 1.5, "min_samples": 25}}


def run_reducer(reducer: str, x: np.ndarray, **reducer_options: float) -> np.ndarray:
    """Apply a named reducer to sentence embeddings (N, D) in numpy; the result is not normalised.

    sklearn runs single-threaded here: its OpenMP neighbour searches busy-wait on a loaded CPU (measured on
    this 2-core machine with 220 sentences: MeanShift 230 s with two threads, 0.2 s with one).
    """
    from threadpoolctl import threadpool_limits

    if reducer not in REDUCERS:
        raise ValueError(f"unknown reducer {reducer!r}; available: {', '.join(REDUCERS)}")
    with threadpool_limits(limits=1):
        return np.asarray(REDUCERS[reducer](x, **reducer_options))


def reduce_sentences(
    embeddings: torch.Tensor, reducer: str = "mean", **reducer_options: float
) -> torch.Tensor:
    """Reduce L2-normalised sentence embeddings (N, D) to one unit vector (D,)."""
    if reducer == "mean":
        vector = embeddings.mean(dim=0)
    else:
        x = embeddings.detach().double().cpu().numpy()
        vector = torch.from_numpy(run_reducer(reducer, x, **reducer_options)).to(embeddings)
    return vector / vector.norm()


# backbone -> {(sentences, normalize, autocast on): (N, D)}: the text tower runs once per sentence list and
# backbone, shared by every detector built on that backbone; entries leave with the backbone.
_SENTENCE_CACHE: weakref.WeakKeyDictionary[CLIPBackbone, dict[tuple, torch.Tensor]] = (
    weakref.WeakKeyDictionary()
)


@torch.no_grad()
def encode_sentences(
    backbone: CLIPBackbone, sentences: list[str], normalize: bool = True, batch_size: int = 256
) -> torch.Tensor:
    """Encode sentences with the backbone's text tower; (N, D), L2-normalised per sentence by default.

    Cached per backbone (the hand-crafted prompt banks of WinCLIP, APRIL-GAN, CLIP-AD, AdaCLIP repeat the same
    sentences for every detector and class), separately per device and autocast state (a backbone moved to
    another device re-encodes there). Callers must not modify the returned tensor in place.
    """
    device = backbone.device
    autocast = torch.get_autocast_dtype(device.type) if torch.is_autocast_enabled(device.type) else None
    key = (tuple(sentences), bool(normalize), str(device), autocast)
    cache = _SENTENCE_CACHE.setdefault(backbone, {})
    if key not in cache:
        chunks = [
            backbone.encode_text(sentences[i : i + batch_size]) for i in range(0, len(sentences), batch_size)
        ]
        features = torch.cat(chunks).float()
        cache[key] = features / features.norm(dim=-1, keepdim=True) if normalize else features
    return cache[key]


@torch.no_grad()
def text_features(
    backbone: CLIPBackbone,
    class_name: str,
    bank: str | PromptBank = "winclip",
    reducer: str = "mean",
    normalize_sentences: bool = True,
    **reducer_options: float,
) -> torch.Tensor:
    """The (D, 2) matrix ``[t_normal, t_abnormal]`` of unit vectors for one class (docs/methods.md §1.2).

    ``normalize_sentences=False`` averages raw sentence embeddings, as anomalib's WinCLIP does
    (docs/methods.md pitfall 11).
    """
    bank = get_bank(bank) if isinstance(bank, str) else bank
    columns = []
    for sentences in bank.sentences(class_name):
        embeddings = encode_sentences(backbone, sentences, normalize=normalize_sentences)
        columns.append(reduce_sentences(embeddings, reducer, **reducer_options))
    return torch.stack(columns, dim=1)
