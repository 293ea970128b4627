"""Render a parameterised notebook into a report folder: executed notebook (papermill) + HTML (nbconvert).

The notebook receives ``out_dir`` as a parameter and writes its metrics CSV and figures there, so one folder
holds everything a reader needs: ``reports/<name>/{<name>.ipynb, <name>.html, metrics.csv, *.png}``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def parse_value(text: str) -> Any:
    """``-p key value`` arrives as text; JSON literals (numbers, null, true, lists) become Python values."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def render_notebook(
    notebook: str | Path, out_dir: str | Path, parameters: dict[str, Any] | None = None, progress: bool = True
) -> Path:
    """Execute ``notebook`` with papermill into ``out_dir``, export HTML beside it, return the HTML path."""
    import papermill as pm

    notebook, out = Path(notebook), Path(out_dir)
    if not notebook.exists():
        raise FileNotFoundError(f"no notebook at {notebook}")
    out.mkdir(parents=True, exist_ok=True)
    executed = out / notebook.name
    params = report_parameters(notebook, parameters or {}, out)
    pm.execute_notebook(
        str(notebook), str(executed), parameters=params, progress_bar=progress, cwd=str(Path.cwd())
    )
    return export_html(executed)


def report_parameters(
    notebook: str | Path, parameters: dict[str, Any], out_dir: str | Path
) -> dict[str, Any]:
    """The parameters a rendered report runs with: ``out_dir`` (where the notebook writes its files) and,
    for a notebook that declares a ``progress`` parameter, ``progress=False``: progress bars belong on the
    terminal of ``zsad report`` (papermill's own), not as stderr blocks or widgets in the rendered page. A
    person who runs the notebook in JupyterLab keeps its default, bars on. An explicit ``progress`` wins."""
    import papermill as pm

    declared = pm.inspect_notebook(str(notebook))
    quiet = {"progress": False} if "progress" in declared else {}
    return {**quiet, **parameters, "out_dir": str(Path(out_dir).resolve())}


def export_html(executed: str | Path) -> Path:
    """Render an executed notebook as HTML beside it (``name.ipynb`` -> ``name.html``); return its path."""
    import nbformat
    from nbconvert import HTMLExporter

    executed = Path(executed)
    body, _ = HTMLExporter().from_notebook_node(nbformat.read(executed, as_version=4))
    html = executed.with_suffix(".html")
    html.write_text(body, encoding="utf-8")
    return html
