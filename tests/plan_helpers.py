"""A tiny parameterised notebook and plan files for the plan, executor and index tests.

The notebook needs no model: it shows a weights/data header, optionally fails on purpose, and writes a
``metrics.csv`` and a figure into ``out_dir``, so a run costs one kernel start (seconds), not a model.
It is written into the test's temporary folder, never into ``tests/``, so no run picks it up as a notebook.
"""

from __future__ import annotations

from pathlib import Path

import nbformat
import yaml

PARAMETERS = """value = 1        # a number the notebook reports
method = "clip"  # the method named in metrics.csv
fail = False     # True raises in the second code cell (a failing run)
pause = 0        # seconds to sleep first (a run that is still going when interrupted)
out_dir = None   # set by zsad report"""

BODY = """import time
from pathlib import Path

import matplotlib.pyplot as plt
from IPython.display import Markdown, display

display(Markdown(f"**Weights:** `tiny-test` / v{value}  \\n**Data:** `synthetic-{value}`"))
time.sleep(pause)
if fail:
    raise RuntimeError(f"deliberate failure {value}")
if out_dir:
    fig, ax = plt.subplots(figsize=(2, 2))
    ax.plot([0, 1], [0, value])
    fig.savefig(Path(out_dir) / "curve.png")
    plt.show()  # also an image inside the rendered HTML
    Path(out_dir, "metrics.csv").write_text(
        "method,backbone,weights,dataset,aupro_convention,image_auroc,pixel_auroc,pixel_aupro\\n"
        f"{method},tiny-test,v{value},synthetic,cflow,0.{value},0.5,0.25\\n"
    )
"""


def write_notebook(folder: Path, name: str = "tiny.ipynb") -> Path:
    """The test notebook (a ``parameters`` cell, a header, optional failure, metrics.csv + a PNG)."""
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"display_name": "Python 3", "language": "python", "name": "python3"}
    params = nbformat.v4.new_code_cell(PARAMETERS)
    params.metadata["tags"] = ["parameters"]
    nb.cells = [nbformat.v4.new_markdown_cell("# tiny test report"), params, nbformat.v4.new_code_cell(BODY)]
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    nbformat.write(nb, path)
    return path


def write_plan(folder: Path, runs: list[dict], name: str = "tplan", **extra) -> Path:
    """``folder/plans/<name>.yaml`` beside ``folder/tiny.ipynb`` (the notebook is written too)."""
    write_notebook(folder)
    plans = folder / "plans"
    plans.mkdir(parents=True, exist_ok=True)
    path = plans / f"{name}.yaml"
    path.write_text(yaml.safe_dump({"name": name, **extra, "runs": runs}, sort_keys=False))
    return path
