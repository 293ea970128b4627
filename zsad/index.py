"""Plan summaries (``reports/<plan>/summary.{csv,md,png}``) and the report index (``reports/index.html``).

Each run folder is read as it is on disk: its ``metrics.csv`` (written by the notebook, see
:func:`save_metrics`), the ``run.json`` that :meth:`zsad.evaluate.EvalResult.save` writes, the plan's
``plan_run.json`` and the executed notebook's header (the "**Weights:** ... **Data:** ..." line every notebook
displays). The index links every rendered report with relative links, so it works from the file system.
"""

from __future__ import annotations

import html
import json
import math
import os
import re
from pathlib import Path
from typing import Any

import pandas as pd

from zsad.evaluate import COLUMNS as METRICS

INFO = ("method", "backbone", "weights", "dataset", "aupro_convention")
SUMMARY_COLUMNS = ("run", "status", *INFO, *METRICS)
_TAG = re.compile(r"<[^>]+>|\*\*|`")


def save_metrics(
    out_dir: str | Path | None,
    table: pd.DataFrame,
    *,
    backbone: str,
    weights: str,
    dataset: str,
    aupro_convention: str = "cflow",
) -> Path | None:
    """Write a notebook's ``metrics.csv``: one row per index entry of ``table`` (e.g. methods, prompt banks,
    settings; named by the index as ``method``), with the metric columns it has and the header columns that
    summaries and the index read. Returns the path, or None when ``out_dir`` is None (interactive use)."""
    if out_dir is None:
        return None
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    metrics = [c for c in METRICS if c in table.columns]
    frame = pd.DataFrame(
        {
            "method": [str(i) for i in table.index],
            "backbone": backbone,
            "weights": weights,
            "dataset": dataset,
            "aupro_convention": aupro_convention,
        }
    )
    for metric in metrics:
        frame[metric] = table[metric].to_numpy(dtype=float)
    path = out / "metrics.csv"
    frame.to_csv(path, index=False, float_format="%.6f")
    return path


def notebook_header(executed: str | Path) -> dict[str, str]:
    """``{"weights": ..., "data": ...}`` from the first "**Weights:** ... **Data:** ..." output an executed
    notebook displays (empty strings when it shows none)."""
    found = {"weights": "", "data": ""}
    try:
        nb = json.loads(Path(executed).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return found
    for cell in nb.get("cells", []):
        for output in cell.get("outputs", []):
            data = output.get("data", {})
            text = data.get("text/markdown") or data.get("text/plain") or output.get("text") or ""
            text = "".join(text) if isinstance(text, list) else text
            for line in re.split(r"\s*\n\s*|\s{2,}\n", text):
                for key in found:
                    marker = f"**{key.capitalize()}:**"
                    if not found[key] and marker in line:
                        found[key] = _TAG.sub("", line.split(marker, 1)[1]).strip()
            if all(found.values()):
                return found
    return found


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return {}


def _executed(folder: Path) -> Path | None:
    notebooks = sorted(p for p in folder.glob("*.ipynb") if not p.name.startswith("."))
    return notebooks[0] if notebooks else None


def run_rows(folder: Path, run_name: str | None = None) -> list[dict[str, Any]]:
    """Summary rows of one run folder: one per row of its ``metrics.csv`` (the ``mean`` row of a per-class
    table), or one row without metrics when it has none."""
    record = _read_json(folder / "plan_run.json")
    params = record.get("plan_run", {}).get("parameters", {})
    evaluated = _read_json(folder / "run.json")
    executed = _executed(folder)
    header = notebook_header(executed) if executed else {"weights": "", "data": ""}
    base = {
        "run": run_name or folder.name,
        "status": record.get("status", "ok" if executed else "missing"),
        "method": evaluated.get("method") or params.get("method") or "",
        "backbone": evaluated.get("backbone") or params.get("backbone") or "",
        "weights": evaluated.get("weights") or params.get("weights") or header["weights"],
        "dataset": evaluated.get("data") or params.get("data_root") or header["data"],
        "aupro_convention": evaluated.get("aupro_convention") or params.get("aupro_convention") or "",
    }
    for key, value in record.get("plan_run", {}).get("paper", {}).items():
        base[f"paper_{key}"] = value
    metrics_file = folder / "metrics.csv"
    if not metrics_file.is_file():
        return [base]
    table = pd.read_csv(metrics_file)
    if "class" in table.columns:
        mean = table[table["class"].astype(str) == "mean"]
        table = mean if len(mean) else table.drop(columns="class").mean(numeric_only=True).to_frame().T
    rows = []
    for _, row in table.iterrows():
        entry = dict(base)
        for key in INFO:
            if key in row and isinstance(row[key], str) and row[key]:
                entry[key] = row[key]
        if "method" not in table.columns and len(table) > 1:
            entry["method"] = str(row.iloc[0])
        for metric in METRICS:
            value = row.get(metric, math.nan)
            entry[metric] = float(value) if pd.notna(value) else math.nan
        rows.append(entry)
    return rows


def summary_table(plan_dir: str | Path, run_names: list[str] | None = None) -> pd.DataFrame:
    """One row per run (per method where a run compares several), in plan order where names are given."""
    plan_dir = Path(plan_dir)
    names = run_names or sorted(
        p.name for p in plan_dir.iterdir() if p.is_dir() and not p.name.startswith(".")
    )
    rows = []
    for name in names:
        folder = plan_dir / name
        if folder.is_dir():
            rows += run_rows(folder, name)
        else:
            rows.append({"run": name, "status": "not run"})
    frame = pd.DataFrame(rows)
    for column in SUMMARY_COLUMNS:
        if column not in frame.columns:
            frame[column] = math.nan if column in METRICS else ""
    text = ["run", "status", *INFO]
    frame[text] = frame[text].fillna("").astype(str)
    extra = [c for c in frame.columns if c not in SUMMARY_COLUMNS]
    return frame[[*SUMMARY_COLUMNS, *extra]]


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return "n/a" if math.isnan(value) else f"{100 * value:.1f}"
    return "" if value is None else str(value)


def summary_markdown(table: pd.DataFrame, title: str) -> str:
    """Percentages to 0.1 like the papers, n/a for undefined, the AUPRO convention in its own column."""
    shown = table.copy()
    for metric in METRICS:
        shown[metric] = shown[metric].map(_fmt)
    paper = [c for c in shown.columns if c.startswith("paper_")]
    for column in paper:
        shown[column] = shown[column].map(lambda v: "" if pd.isna(v) else str(v))
    conventions = sorted({c for c in table["aupro_convention"].astype(str) if c and c != "nan"})
    lines = [
        f"# {title}",
        "",
        "Metrics in percent (macro mean over classes); `n/a` = undefined. AUPRO convention per row "
        f"(`cflow` = 200 thresholds, FPR <= 0.3; `exact` = anomalib): {', '.join(conventions) or 'none'}. "
        "`paper_*` columns are the published numbers (not measured here).",
        "",
        "| " + " | ".join(shown.columns) + " |",
        "|" + "---|" * len(shown.columns),
    ]
    for _, row in shown.iterrows():
        lines.append("| " + " | ".join(_fmt(v) if not isinstance(v, str) else v for v in row) + " |")
    return "\n".join(lines) + "\n"


def summary_figure(table: pd.DataFrame, title: str):
    """Seaborn heatmap of the metric table (rows: run / method; columns: metrics), None without metrics."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    import seaborn as sns

    metrics = [m for m in METRICS if table[m].notna().any()]
    table = table[table[metrics].notna().any(axis=1)] if metrics else table
    if not metrics or table.empty:
        return None
    labels = [
        r if not m or m == r else f"{r}: {m}" for r, m in zip(table["run"], table["method"], strict=True)
    ]
    data = pd.DataFrame(100 * table[metrics].to_numpy(dtype=float), index=labels, columns=metrics)
    fig, ax = plt.subplots(figsize=(1.3 * len(metrics) + 3, 0.45 * len(data) + 1.6))
    sns.heatmap(data, annot=True, fmt=".1f", vmin=0, vmax=100, cmap="viridis", ax=ax, cbar_kws={"label": "%"})
    ax.set_title(title, fontsize=10)
    ax.tick_params(axis="x", rotation=30)
    fig.tight_layout()
    return fig


def write_summary(plan: Any, plan_dir: str | Path) -> dict[str, Path]:
    """``summary.csv``, ``summary.md`` and ``summary.png`` of a plan's report folder (all its runs)."""
    plan_dir = Path(plan_dir)
    plan_dir.mkdir(parents=True, exist_ok=True)
    table = summary_table(plan_dir, [r.name for r in plan.runs])
    paths = {"csv": plan_dir / "summary.csv", "md": plan_dir / "summary.md"}
    table.to_csv(paths["csv"], index=False, float_format="%.6f")
    title = f"plan {plan.name}" + (f": {plan.description}" if plan.description else "")
    paths["md"].write_text(summary_markdown(table, title), encoding="utf-8")
    fig = summary_figure(table, f"plan {plan.name} (%, class means)")
    figure = plan_dir / "summary.png"
    if fig is not None:
        fig.savefig(figure, dpi=110, bbox_inches="tight")
        import matplotlib.pyplot as plt

        plt.close(fig)
        paths["png"] = figure
    elif figure.exists():
        figure.unlink()
    return paths


# ---------------------------------------------------------------------------------------------- index
def _reports(root: Path) -> list[Path]:
    """Every rendered report (an HTML beside its executed notebook) under ``root``, hidden folders skipped."""
    found = []
    for page in sorted(root.rglob("*.html")):
        rel = page.relative_to(root)
        if any(part.startswith(".") for part in rel.parts) or page.name == "index.html":
            continue
        if page.with_suffix(".ipynb").is_file():
            found.append(page)
    return found


def _link(root: Path, target: Path) -> str:
    return html.escape(Path(os.path.relpath(target, root)).as_posix(), quote=True)


def write_index(reports_dir: str | Path = "reports") -> Path:
    """``reports/index.html``: every plan's summary (figure + table links) and every report with its header
    (weights and data) and status; relative links only."""
    root = Path(reports_dir)
    root.mkdir(parents=True, exist_ok=True)
    pages = _reports(root)
    groups: dict[Path, list[Path]] = {}
    for page in pages:
        folder = page.parent
        group = folder.parent if (folder.parent / "summary.csv").is_file() else folder
        groups.setdefault(group, []).append(page)
    for summary in root.glob("*/summary.csv"):
        groups.setdefault(summary.parent, [])
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8"><title>zsad reports</title>',
        "<style>body{font-family:sans-serif;max-width:70em;margin:2em auto;padding:0 1em}"
        "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:.25em .5em;text-align:left}"
        ".failed{color:#b00}img{max-width:100%}</style></head><body>",
        "<h1>zsad reports</h1>",
        "<p>Every report executed by <code>zsad report</code> under this folder. The header columns are what "
        "each notebook says produced it (weights and data).</p>",
    ]
    for group in sorted(groups):
        is_plan = (group / "summary.csv").is_file()
        title = f"plan {group.name}" if is_plan else group.relative_to(root).as_posix()
        parts.append(f"<h2>{html.escape(title)}</h2>")
        if is_plan:
            links = [f'<a href="{_link(root, group / n)}">{n}</a>' for n in ("summary.md", "summary.csv")]
            parts.append(f"<p>{' | '.join(links)}</p>")
            if (group / "summary.png").is_file():
                parts.append(
                    f'<p><img src="{_link(root, group / "summary.png")}" alt="summary of {group.name}"></p>'
                )
        rows = []
        run_folders = {p.parent for p in groups[group]}
        if is_plan:  # failed runs too: their partial notebook may have no HTML
            run_folders |= {p for p in group.iterdir() if p.is_dir() and (p / "plan_run.json").is_file()}
        for folder in sorted(run_folders):
            record = _read_json(folder / "plan_run.json")
            status = record.get("status", "ok")
            page = next((p for p in groups[group] if p.parent == folder), None)
            executed = _executed(folder)
            header = notebook_header(executed) if executed else {"weights": "", "data": ""}
            name = folder.name if folder != group else (page.stem if page else folder.name)
            cell = f'<a href="{_link(root, page)}">{html.escape(name)}</a>' if page else html.escape(name)
            if status == "failed" and (folder / "error.txt").is_file():
                cell += f' (<a class="failed" href="{_link(root, folder / "error.txt")}">error</a>)'
            rows.append(
                f'<tr class="{html.escape(status)}"><td>{cell}</td><td>{html.escape(status)}</td>'
                f"<td>{html.escape(header['weights'])}</td><td>{html.escape(header['data'])}</td></tr>"
            )
        if rows:
            parts.append("<table><tr><th>report</th><th>status</th><th>weights</th><th>data</th></tr>")
            parts += rows
            parts.append("</table>")
    parts.append("</body></html>")
    index = root / "index.html"
    index.write_text("\n".join(parts) + "\n", encoding="utf-8")
    return index


def local_links(page: str | Path) -> list[tuple[str, Path]]:
    """(reference, resolved path) of every relative ``href``/``src`` in an HTML file (for link checks)."""
    page = Path(page)
    text = page.read_text(encoding="utf-8")
    found = []
    for ref in re.findall(r'(?:href|src)="([^"]+)"', text):
        ref = html.unescape(ref)
        if re.match(r"^[a-z][a-z0-9+.-]*:", ref) or ref.startswith(("#", "/")):
            continue
        found.append((ref, (page.parent / ref.split("#")[0]).resolve()))
    return found
