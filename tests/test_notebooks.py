"""Every notebook, executed once at CI scale the way `zsad report` renders it, with ``device="cuda"`` on the
emulated card of tests/emulated_cuda.py, must run, reach its closing assertion (each notebook asserts its
headline result on the embedded world) and leave a clean page: no stderr block, no tqdm output or warning.
Plus the pieces that make that possible, checked on small inputs."""

from __future__ import annotations

import json
from pathlib import Path

import nbformat
import pandas as pd
import pytest

from zsad.report import render_notebook, report_parameters
from zsad.viz import percent_table

NOTEBOOKS = sorted((Path(__file__).resolve().parents[1] / "notebooks").glob("*.ipynb"))
SCALE_VARIABLE = "ZSAD_NOTEBOOK_SCALE"
PROGRESS_NOISE = ("tqdm", "iprogress")


def page_noise(notebook: nbformat.NotebookNode) -> list[str]:
    """What a reader of the rendered page should not see: stderr blocks, and progress-bar output or warnings
    (tqdm's text bars, "TqdmWarning: IProgress not found", widget bars) in any output."""
    found = []
    for index, cell in enumerate(notebook.cells):
        for output in cell.get("outputs", []):
            if output.get("output_type") == "stream" and output.get("name") == "stderr":
                found.append(f"cell {index}: stderr block {output.get('text', '')[:200]!r}")
                continue
            data = output.get("data", {})
            texts = [output.get("text", ""), *(v for k, v in data.items() if k.startswith("text/"))]
            text = "".join(t if isinstance(t, str) else "".join(t) for t in texts).lower()
            if any(word in text for word in PROGRESS_NOISE) or any("widget" in kind for kind in data):
                found.append(f"cell {index}: progress output {text[:200]!r}")
    return found


def parameters_source(path: Path) -> str:
    cells = nbformat.read(path, as_version=4).cells
    tagged = [c for c in cells if "parameters" in c.get("metadata", {}).get("tags", [])]
    assert len(tagged) == 1, f"{path.name}: one cell tagged `parameters`"
    return tagged[0].source


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_every_parameters_cell_reads_the_scale_variable_and_names_device_and_progress(path: Path) -> None:
    source = parameters_source(path)
    assert f'os.environ.get("{SCALE_VARIABLE}")' in source, f"{path.name} ignores {SCALE_VARIABLE}"
    for name in ("device", "progress"):
        assert f"\n{name} = " in f"\n{source}", f"{path.name}: no `{name}` parameter"


def test_page_noise_finds_stderr_blocks_and_tqdm_warnings() -> None:
    clean = nbformat.v4.new_code_cell("x = 1")
    clean.outputs = [nbformat.v4.new_output("stream", name="stdout", text="AUROC 91.2\n")]
    stderr = nbformat.v4.new_code_cell("evaluate(...)")
    stderr.outputs = [nbformat.v4.new_output("stream", name="stderr", text="clip: 100%|####| 4/4\n")]
    warning_in_stdout = nbformat.v4.new_code_cell("import tqdm.auto")
    warning_in_stdout.outputs = [
        nbformat.v4.new_output("stream", name="stdout", text="TqdmWarning: IProgress not found.")
    ]
    widget = nbformat.v4.new_code_cell("train(...)")
    widget.outputs = [
        nbformat.v4.new_output("display_data", data={"application/vnd.jupyter.widget-view+json": {}})
    ]
    figure = nbformat.v4.new_code_cell("plt.show()")  # base64 image data may spell "tqdm" by chance
    figure.outputs = [nbformat.v4.new_output("display_data", data={"image/png": "iVBORw0KGgoTqDmAAAA"})]
    assert page_noise(nbformat.v4.new_notebook(cells=[clean, figure])) == []
    found = page_noise(nbformat.v4.new_notebook(cells=[clean, stderr, warning_in_stdout, widget]))
    assert [line.split(":")[0] for line in found] == ["cell 1", "cell 2", "cell 3"]


def test_reports_switch_progress_off_only_where_a_notebook_declares_it(tmp_path: Path) -> None:
    python3 = {"kernelspec": {"display_name": "Python 3", "language": "python", "name": "python3"}}
    declares = nbformat.v4.new_notebook(
        cells=[nbformat.v4.new_code_cell("progress = True\nepochs = 3")], metadata=python3
    )
    declares.cells[0].metadata["tags"] = ["parameters"]
    silent = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("x = 1")], metadata=python3)
    nbformat.write(declares, tmp_path / "declares.ipynb")
    nbformat.write(silent, tmp_path / "silent.ipynb")
    params = report_parameters(tmp_path / "declares.ipynb", {"epochs": 1}, tmp_path / "out")
    assert params == {"progress": False, "epochs": 1, "out_dir": str((tmp_path / "out").resolve())}
    assert report_parameters(tmp_path / "declares.ipynb", {"progress": True}, tmp_path)["progress"] is True
    assert "progress" not in report_parameters(tmp_path / "silent.ipynb", {}, tmp_path)


def test_percent_table_shows_fractions_as_percent_and_keeps_published_points() -> None:
    table = pd.DataFrame(
        {"image_auroc": [0.91234, float("nan")], "paper image AUROC": [91.8, 85.1], "loss": [0.01234, 2.5]},
        index=["ours", "other"],
    )
    styler = percent_table(table, points=["paper image AUROC"], raw=["loss"], caption="theirs: Table 1")
    html = styler.to_html()
    assert ">91.2<" in html and ">n/a<" in html and ">91.8<" in html and ">0.0123<" in html
    assert "theirs: Table 1" in html
    assert table.loc["ours", "image_auroc"] == 0.91234  # the frame keeps the fraction
    with pytest.raises(ValueError, match="no column"):
        percent_table(table, points=["pixel_auroc"])


KERNEL_STARTUP = """
import sys
from pathlib import Path

sys.path.insert(0, {tests!r})
import emulated_cuda

emulated_cuda.activate()
_record = Path({record!r})
get_ipython().events.register(
    "post_run_cell", lambda result: _record.write_text(str(emulated_cuda.operations_on_device))
)
"""


def emulated_cuda_kernel(home: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Kernels started from now on run tests/emulated_cuda.py's ``cuda:0`` (an IPython startup file under
    ``IPYTHONDIR``, which the papermill kernel inherits); returns the file where the kernel keeps its
    count of operations run on that device, rewritten after every cell."""
    record = home / "operations_on_device.txt"
    startup = home / "ipython" / "profile_default" / "startup" / "00-emulated-cuda.py"
    startup.parent.mkdir(parents=True)
    startup.write_text(KERNEL_STARTUP.format(tests=str(Path(__file__).parent), record=str(record)))
    monkeypatch.setenv("IPYTHONDIR", str(home / "ipython"))
    return record


@pytest.mark.notebook
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_renders_clean_at_ci_scale(
    path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Rendered with ``device="cuda"`` on the emulated card: a backbone, detector, trainer or cached
    feature the notebook leaves on the CPU, or a device tensor it hands to numpy, fails the render as it
    would on a GPU (the numbers equal a CPU run's to ~1e-6, so every closing assertion still holds)."""
    monkeypatch.setenv(SCALE_VARIABLE, "ci")  # the papermill kernel inherits it
    record = emulated_cuda_kernel(tmp_path / "kernel", monkeypatch)
    html = render_notebook(path, tmp_path / path.stem, {"device": "cuda"}, progress=False)
    executed = nbformat.read(html.with_suffix(".ipynb"), as_version=4)
    assert page_noise(executed) == []
    missing = [c for c in executed.cells if c.cell_type == "code" and "Data missing" in json.dumps(c.outputs)]
    if missing:
        pytest.skip(f"{path.name}: its dataset is absent, so it showed only the ingestion instructions")
    assert int(record.read_text()) > 0, "the notebook ran nothing on its device"


@pytest.mark.parametrize("mode", ["qk", "qq", "kk", "vv"])
def test_attention_weights_are_the_weights_the_path_applies(mode: str) -> None:
    import torch

    from zsad.clip_forward import attention, attention_weights

    torch.manual_seed(0)
    attn = torch.nn.MultiheadAttention(16, 4, batch_first=True)
    x = torch.randn(2, 7, 16)
    weights = attention_weights(attn, x, mode)
    assert weights.shape == (2, 4, 7, 7)
    torch.testing.assert_close(weights.sum(-1), torch.ones(2, 4, 7))
    v = torch.nn.functional.linear(x, attn.in_proj_weight[32:], attn.in_proj_bias[32:]).view(2, 7, 4, 4)
    mixed = (weights @ v.transpose(1, 2)).transpose(1, 2).reshape(2, 7, 16)
    torch.testing.assert_close(attn.out_proj(mixed), attention(attn, x, (mode,))[0], atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="mode must be one of"):
        attention_weights(attn, x, "qv")
