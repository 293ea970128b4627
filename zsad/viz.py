"""Figures people want to look at: heatmap overlays, ROC curves, per-class bars (matplotlib + seaborn), and
metric tables displayed in percent."""

from __future__ import annotations

from collections.abc import Sequence

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import torch
from matplotlib.figure import Figure

from zsad.data.images import denormalize


def _as_numpy(x: np.ndarray | torch.Tensor) -> np.ndarray:
    return x.detach().float().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


def overlay_grid(
    images: Sequence[torch.Tensor] | torch.Tensor,
    maps: Sequence[np.ndarray | torch.Tensor],
    masks: Sequence[np.ndarray | torch.Tensor] | None = None,
    titles: Sequence[str] | None = None,
    vmax: float | None = None,
    columns: int = 4,
) -> Figure:
    """Each image (normalised tensor) with its anomaly map as a jet overlay and the ground truth as a contour.

    One colour scale across the grid (``vmax`` defaults to the largest map value) so maps are comparable.
    """
    maps = [_as_numpy(m) for m in maps]
    vmax = float(max(m.max() for m in maps)) if vmax is None else vmax
    vmin = float(min(m.min() for m in maps))
    rows = int(np.ceil(len(maps) / columns))
    fig, axes = plt.subplots(rows, columns, figsize=(3 * columns, 3 * rows), squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for i, ax in enumerate(axes.ravel()[: len(maps)]):
        ax.imshow(denormalize(images[i]))
        ax.imshow(maps[i], cmap="jet", alpha=0.45, vmin=vmin, vmax=vmax)
        if masks is not None and _as_numpy(masks[i]).any():
            ax.contour(_as_numpy(masks[i]) > 0.5, levels=[0.5], colors="white", linewidths=1.2)
        if titles is not None:
            ax.set_title(titles[i], fontsize=9)
    fig.tight_layout()
    return fig


def roc_curves(
    scores: pd.DataFrame, by: str = "cls_name", ax: plt.Axes | None = None, title: str = "image-level ROC"
) -> Figure:
    """Image-level ROC curve per class from an :class:`zsad.evaluate.EvalResult` ``scores`` frame; the legend
    gives each class's AUROC in percent with one decimal, like every table."""
    from sklearn.metrics import roc_auc_score, roc_curve

    if ax is None:
        _, ax = plt.subplots(figsize=(5, 5))
    for name, group in scores.groupby(by):
        if group["label"].nunique() < 2:
            continue
        fpr, tpr, _ = roc_curve(group["label"], group["score"])
        ax.plot(fpr, tpr, label=f"{name} (AUROC {100 * roc_auc_score(group['label'], group['score']):.1f})")
    ax.plot([0, 1], [0, 1], ls="--", c="grey", lw=0.8)
    ax.set(xlabel="false positive rate", ylabel="true positive rate", title=title)
    ax.legend(fontsize=8)
    return ax.figure


def per_class_bars(
    tables: dict[str, pd.DataFrame] | pd.DataFrame, metric: str = "image_auroc", ax: plt.Axes | None = None
) -> Figure:
    """Seaborn bars of one metric per class; several tables (e.g. one per method) become hue groups."""
    import seaborn as sns

    if isinstance(tables, pd.DataFrame):
        tables = {"": tables}
    long = pd.concat(
        [t[[metric]].rename_axis("class").reset_index().assign(run=name) for name, t in tables.items()]
    )
    if ax is None:
        _, ax = plt.subplots(figsize=(max(5, 0.6 * long["class"].nunique() * len(tables)), 3.5))
    sns.barplot(data=long, x="class", y=metric, hue="run" if len(tables) > 1 else None, ax=ax)
    ax.axhline(0.5, ls="--", c="grey", lw=0.8)
    ax.set_ylim(0, 1)
    if len(tables) > 1:
        ax.legend(loc="lower right", fontsize=8, framealpha=0.9)
    ax.tick_params(axis="x", rotation=45)
    ax.figure.tight_layout()
    return ax.figure


def metric_bars(
    table: pd.DataFrame,
    metrics: Sequence[str] = ("image_auroc", "pixel_auroc", "pixel_aupro"),
    title: str = "",
    ax: plt.Axes | None = None,
) -> Figure:
    """Seaborn bars of a settings x metrics table (index: setting, e.g. prompt bank or layer), one hue per
    setting, metrics side by side; a dashed line at chance (0.5)."""
    import seaborn as sns

    long = (
        table[list(metrics)]
        .rename_axis("setting")
        .reset_index()
        .melt(id_vars="setting", var_name="metric", value_name="value")
    )
    if ax is None:
        _, ax = plt.subplots(figsize=(max(6, 0.5 * len(table) * len(metrics)), 3.8))
    sns.barplot(data=long, x="metric", y="value", hue="setting", ax=ax)
    ax.axhline(0.5, ls="--", c="grey", lw=0.8)
    ax.set(ylim=(0, 1), title=title, xlabel="")
    ax.legend(title=table.index.name or "setting", bbox_to_anchor=(1.01, 1), loc="upper left", fontsize=8)
    ax.figure.tight_layout()
    return ax.figure


def sweep_lines(
    table: pd.DataFrame,
    metrics: Sequence[str] = ("image_auroc", "pixel_auroc", "pixel_aupro"),
    title: str = "",
    ax: plt.Axes | None = None,
) -> Figure:
    """Seaborn lines of metrics over a numeric sweep (index: the swept value, e.g. sigma or image size)."""
    import seaborn as sns

    name = table.index.name or "value"
    long = table[list(metrics)].rename_axis(name).reset_index().melt(id_vars=name, var_name="metric")
    if ax is None:
        _, ax = plt.subplots(figsize=(6, 3.5))
    sns.lineplot(data=long, x=name, y="value", hue="metric", marker="o", ax=ax)
    ax.set(ylim=(0, 1), title=title)
    ax.figure.tight_layout()
    return ax.figure


def pro_curves(
    masks: np.ndarray | torch.Tensor,
    maps: np.ndarray | torch.Tensor,
    fpr_limit: float = 0.3,
    ax: plt.Axes | None = None,
) -> Figure:
    """The per-region-overlap curves of both AUPRO conventions on the same maps, up to ``fpr_limit``:
    ``cflow`` (200 thresholds between the maps' min and max) and ``exact`` (every distinct score)."""
    from zsad import metrics

    if ax is None:
        _, ax = plt.subplots(figsize=(5, 4))
    cflow = metrics.cflow_curve(masks, maps)
    if cflow is not None:
        _, fpr, pro = cflow
        keep = fpr <= fpr_limit
        ax.plot(fpr[keep], pro[keep], "o", ms=3, label=f"cflow ({int(keep.sum())} of {len(fpr)} thresholds)")
    exact = metrics._exact_curve(*metrics._pixel_inputs(masks, maps), fpr_limit)
    if exact is not None:
        fpr, pro = exact
        ax.plot(fpr, pro, "-", lw=1.2, label=f"exact ({len(fpr)} points)")
    ax.axvline(fpr_limit, ls="--", c="grey", lw=0.8)
    ax.set(
        xlabel="false positive rate",
        ylabel="per-region overlap",
        title="PRO curves",
        xlim=(0, fpr_limit * 1.05),
    )
    ax.legend(fontsize=8)
    return ax.figure


def embedding_map(points: pd.DataFrame, ax: plt.Axes | None = None, title: str = "") -> Figure:
    """Seaborn scatter of 2-D projected sentence embeddings: columns ``x``, ``y``, ``bank`` (hue) and
    ``state`` (marker)."""
    import seaborn as sns

    if ax is None:
        _, ax = plt.subplots(figsize=(7, 5))
    sns.scatterplot(data=points, x="x", y="y", hue="bank", style="state", s=18, alpha=0.75, ax=ax)
    ax.set(xlabel="PC 1", ylabel="PC 2", title=title)
    ax.legend(bbox_to_anchor=(1.01, 1), loc="upper left", fontsize=8)
    ax.figure.tight_layout()
    return ax.figure


def percent_table(
    table: pd.DataFrame, points: Sequence[str] = (), raw: Sequence[str] = (), caption: str | None = None
) -> pd.io.formats.style.Styler:
    """Display a metrics table in one unit, as the papers print it: every float column holds fractions in
    [0, 1] and is shown as a percentage with one decimal ("91.3"), NaN as "n/a".

    ``points`` names float columns already in percent or in points (published numbers, differences in
    points); they are shown with one decimal, unscaled. ``raw`` names float columns that are no metric
    (losses, seconds), shown with three significant digits. Only the display changes: the frame, and any CSV
    written from it, keep the fractions at full precision.
    """
    unknown = [c for c in (*points, *raw) if c not in table.columns]
    if unknown:
        raise ValueError(f"percent_table: no column {unknown} in {list(table.columns)}")
    floats = [c for c in table.columns if pd.api.types.is_float_dtype(table[c])]
    formats: dict[str, object] = {}
    for column in floats:
        if column in raw:
            formats[column] = "{:.3g}"
        elif column in points:
            formats[column] = "{:.1f}"
        else:
            formats[column] = lambda x: "n/a" if pd.isna(x) else f"{100.0 * x:.1f}"
    styler = table.style.format(formats, na_rep="n/a")
    return styler.set_caption(caption) if caption else styler
