"""Hybrid Semantic Fusion (HSF): AdaCLIP's image-level feature from the most anomalous patch tokens
(Cao et al., ECCV 2024, arXiv 2407.15795, the paper's HSF module; docs/methods.md §6.2).

Two variants:

- ``"released"`` (the official code at e27ee32, which its authors call "more stable" than the paper): the
  token-level anomaly probability P_a = softmax(mean over layers of the logits)[abnormal]; the top
  k = 5 K tokens by P_a; their projected tokens of all layers concatenated along the channels
  (k, L x D) are clustered by k-means with K clusters; each cluster's centre is the mean of its member tokens
  over all layers, and h = normalise(mean of the K centres).
- ``"most-anomalous"`` (the paper's description, kept as commented code upstream): all tokens averaged
  over layers (N, D) are clustered into K groups; the group with the highest mean P_a gives
  h = normalise(its mean).

The k-means is sklearn's ``KMeans(n_clusters=K, n_init="auto")`` (k-means++ init, one Lloyd run), as upstream,
so the official labels are reproducible bit for bit given the same random stream. Which stream is a choice
(docs/methods.md §13.4): upstream draws from numpy's global RNG, seeded once and shared by every image in
order, so an image's result depends on the images before it. zsad seeds every image afresh by default
(``per_image_rng``) and offers the shared stream as a named option (``SharedRNG``).

Cluster labels are not differentiable; the centres are (gradients reach the tokens through the member
means), as in the official training loop, which runs HSF on every step.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

HSF_MODES = ("released", "most-anomalous", "off")
KMEANS_RNGS = ("per-image", "shared")
DEFAULT_CLUSTERS = 20
ALPHA = 0.2  # weight of h in normalise(alpha h + (1 - alpha) g)


def kmeans_labels(data: np.ndarray, n_clusters: int, random_state: np.random.RandomState) -> np.ndarray:
    """sklearn ``KMeans(n_clusters, n_init="auto")`` labels of ``data`` (n, d).

    The cluster count is capped at the number of points (sklearn refuses more clusters than points)."""
    from sklearn.cluster import KMeans

    n_clusters = min(int(n_clusters), data.shape[0])
    model = KMeans(n_clusters=n_clusters, n_init="auto", random_state=random_state)
    return np.asarray(model.fit_predict(data), dtype=np.int64)


def _one_thread():
    """sklearn's OpenMP busy-waits on a loaded shared CPU; one limit per batch (it costs ~10 ms to set)."""
    from threadpoolctl import threadpool_limits

    return threadpool_limits(limits=1)


def token_anomaly(logits: Sequence[torch.Tensor]) -> torch.Tensor:
    """P_a per token: softmax over {normal, abnormal} of the layer-mean logits, (L x (B, N, 2)) -> (B, N)."""
    return torch.stack(list(logits), dim=1).mean(dim=1).softmax(dim=-1)[..., 1]


def cluster_mean_weights(labels: torch.Tensor) -> torch.Tensor:
    """Per point, the weight that makes sum_m w_m x_m the mean over non-empty clusters of the cluster means:
    w_m = 1 / (C x |cluster(m)|) with C the number of non-empty clusters."""
    counts = torch.bincount(labels)
    present = int((counts > 0).sum())
    return 1.0 / (present * counts[labels].to(torch.float64))


def released_hsf(
    tokens: Sequence[torch.Tensor],
    logits: Sequence[torch.Tensor],
    rng_for: Callable[[int], np.random.RandomState],
    n_clusters: int = DEFAULT_CLUSTERS,
    top_k: int | None = None,
) -> tuple[torch.Tensor, list[np.ndarray]]:
    """The released HSF (module docstring). ``tokens``: per layer (B, N, D) unit projected patch tokens;
    ``logits``: per layer (B, N, 2); ``rng_for(b)``: the RandomState for image b. Returns h (B, D), unit
    rows, and each image's k-means labels (k,).

    Official empty-cluster handling would average an empty set (NaN); sklearn's Lloyd step relocates empty
    clusters, and should one remain the mean runs over the non-empty ones."""
    score = token_anomaly(logits)
    k = min(score.shape[1], 5 * n_clusters if top_k is None else int(top_k))
    index = score.topk(k, dim=1).indices  # (B, k), sorted by P_a as upstream
    selected = [t.gather(1, index[..., None].expand(-1, -1, t.shape[-1])) for t in tokens]
    stacked = torch.cat(selected, dim=2).detach().float().cpu().numpy()  # (B, k, L x D)
    mean_over_layers = torch.stack(selected, dim=0).mean(dim=0)  # (B, k, D), differentiable
    with _one_thread():
        all_labels = [kmeans_labels(stacked[b], n_clusters, rng_for(b)) for b in range(score.shape[0])]
    out = []
    for b, labels in enumerate(all_labels):
        weights = cluster_mean_weights(torch.from_numpy(labels)).to(mean_over_layers)
        out.append(weights @ mean_over_layers[b])
    return F.normalize(torch.stack(out), dim=-1), all_labels


def most_anomalous_hsf(
    tokens: Sequence[torch.Tensor],
    logits: Sequence[torch.Tensor],
    rng_for: Callable[[int], np.random.RandomState],
    n_clusters: int = DEFAULT_CLUSTERS,
) -> tuple[torch.Tensor, list[np.ndarray]]:
    """The paper's HSF (module docstring): k-means on all layer-averaged tokens, the centroid of the cluster
    with the highest mean P_a. Same arguments and returns as :func:`released_hsf`."""
    score = token_anomaly(logits)
    averaged = torch.stack(list(tokens), dim=0).mean(dim=0)  # (B, N, D)
    data = averaged.detach().float().cpu().numpy()
    with _one_thread():
        all_labels = [kmeans_labels(data[b], n_clusters, rng_for(b)) for b in range(score.shape[0])]
    out = []
    for b, labels in enumerate(all_labels):
        ids = torch.from_numpy(labels).to(score.device)
        counts = torch.bincount(ids).to(score.dtype)
        cluster_score = torch.zeros_like(counts).index_add_(0, ids, score[b].detach()) / counts.clamp(min=1)
        cluster_score[counts == 0] = -1.0  # an empty cluster is never the most anomalous
        best = int(cluster_score.argmax())
        out.append(averaged[b][ids == best].mean(dim=0))
    return F.normalize(torch.stack(out), dim=-1), all_labels


def fuse(h: torch.Tensor, g: torch.Tensor, alpha: float = ALPHA) -> torch.Tensor:
    """normalise(alpha h + (1 - alpha) g): the HSF feature mixed into the projected global embedding."""
    return F.normalize(alpha * h + (1.0 - alpha) * g, dim=-1)


class SharedRNG:
    """The official k-means stream: one ``RandomState(seed)`` consumed by every image in order
    (docs/methods.md §13.4). ``reset()`` restarts it, as a fresh official process would."""

    def __init__(self, seed: int) -> None:
        self.seed = int(seed)
        self.state = np.random.RandomState(self.seed)

    def reset(self) -> None:
        self.state = np.random.RandomState(self.seed)

    def __call__(self, b: int) -> np.random.RandomState:
        return self.state


def per_image_rng(seed: int) -> Callable[[int], np.random.RandomState]:
    """zsad's default: every image gets a fresh ``RandomState(seed)``, so a score depends on that image alone
    (not on its position in the batch or the data order)."""
    return lambda b: np.random.RandomState(int(seed))
