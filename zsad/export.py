"""ONNX export of a detector for one class (``zsad export``) and its ONNX Runtime runner (``predict --onnx``).

Once a class's text embeddings (and, for few-shot methods, the reference memory) are computed, the test path
of most methods is a fixed graph from the image to (score, map): the export runs ``predict`` once to fill the
per-class caches, then traces it for a single image, so those tensors become constants of the graph (what
anomalib had to do by hand for WinCLIP, its issue 1641). The Gaussian smoothing of the maps (scipy in the
torch path, docs/methods.md pitfall 6) is traced as a convolution with the same kernel (truncate 4) and the
same "reflect" border, so the smoothing is inside the graph. What cannot be a fixed graph is refused with
one line (:func:`why_not_exportable`: AdaCLIP's HSF k-means); transductive scores over a whole test set
(APRIL-GAN's and CLIP-AD's per-class min-max, ``finalize_scores``) are never part of a single image's
prediction, in torch or in ONNX.

The graph takes one (1, 3, S, S) normalised image and returns ``score`` (1,) and ``map`` (1, S, S); the
model's metadata names the method, class, image size, backbone and weights, and :class:`OnnxDetector`
refuses a file that does not match what the caller asks for.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from zsad.methods.base import Detector

# What keeps a method's test path from being one fixed graph, and the option that lifts it (if any).
HSF_REASON = (
    "its HSF image score clusters each image's patch tokens with k-means (a data-dependent number of "
    "iterations, outside torch), which is no fixed graph; export it with the option hsf=off (-o hsf off)"
)


def why_not_exportable(detector: Any) -> str | None:
    """One line saying why this detector cannot be exported, or None when it can."""
    if getattr(detector, "method_id", "") == "adaclip" and detector.options.get("hsf") != "off":
        return HSF_REASON
    return None


OPSET = 17
SMOOTHING_MODULES = ("zsad.methods.clipad_sdp", "zsad.methods.anomalyclip", "zsad.methods.adaclip")
INSTALL_HINT = "ONNX export needs onnx and onnxruntime: pip install 'zsad[export]'"


def gaussian_smooth(maps: torch.Tensor, sigma: float) -> torch.Tensor:
    """scipy's ``gaussian_filter(m, sigma)`` per (S, S) map, in traceable torch ops: the same kernel
    (radius ``int(4 sigma + 0.5)``, normalised exp(-x^2 / 2 sigma^2)), one axis after the other, with the
    "reflect" border (d c b a | a b c d) done by gathering mirrored indices."""
    if sigma <= 0:
        return maps.float()
    radius = int(4.0 * sigma + 0.5)
    offsets = torch.arange(-radius, radius + 1, dtype=torch.float64)
    kernel = torch.exp(-0.5 * (offsets / sigma) ** 2)
    kernel = (kernel / kernel.sum()).float().to(maps.device)
    out = maps.float()
    for axis in (1, 2):  # rows (axis 1 of (B, S, S)), then columns, as scipy filters axis 0 then axis 1
        lines = out.transpose(1, 2) if axis == 1 else out  # the filtered axis last
        n = lines.shape[2]
        index = torch.arange(-radius, n + radius)
        for _ in range(math.ceil(radius / n) + 1):  # fold indices back inside until none is outside
            index = torch.where(index < 0, -index - 1, index)
            index = torch.where(index >= n, 2 * n - index - 1, index)
        padded = lines.index_select(2, index.to(maps.device))
        filtered = F.conv1d(padded.reshape(-1, 1, padded.shape[2]), kernel.view(1, 1, -1)).reshape(
            lines.shape
        )
        out = filtered.transpose(1, 2) if axis == 1 else filtered
    return out


def _modules_of(detector: Detector) -> list[nn.Module]:
    """The torch modules a detector holds (backbone model, learned parts), one level into its attributes."""
    found: list[nn.Module] = []
    for owner in (detector, getattr(detector, "backbone", None)):
        for value in vars(owner).values() if owner is not None else ():
            if isinstance(value, nn.Module) and all(value is not m for m in found):
                found.append(value)
    return found


@contextlib.contextmanager
def frozen(detector: Detector) -> Iterator[None]:
    """No parameter requires grad while tracing: the tracer can only fold such tensors into constants."""
    parameters = [p for module in _modules_of(detector) for p in module.parameters()]
    flags = [p.requires_grad for p in parameters]
    try:
        for p in parameters:
            p.requires_grad_(False)
        yield
    finally:
        for p, flag in zip(parameters, flags, strict=True):
            p.requires_grad_(flag)


@contextlib.contextmanager
def traceable_smoothing() -> Iterator[None]:
    """Swap the methods' scipy smoothing for :func:`gaussian_smooth` while a graph is traced."""
    import importlib

    modules = [importlib.import_module(name) for name in SMOOTHING_MODULES]
    saved = [module.smooth_map_tensor for module in modules]
    try:
        for module in modules:
            module.smooth_map_tensor = gaussian_smooth
        yield
    finally:
        for module, original in zip(modules, saved, strict=True):
            module.smooth_map_tensor = original


class _SingleClassGraph(nn.Module):
    """``predict`` of one image for one class, as a module torch.onnx can trace."""

    def __init__(self, detector: Detector, class_name: str) -> None:
        super().__init__()
        self.detector = detector
        self.class_name = class_name

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        scores, maps = self.detector.predict(images, [self.class_name])
        return scores.float(), maps.float()


def check_exportable(detector: Any) -> None:
    reason = why_not_exportable(detector)
    if reason is not None:
        raise ValueError(f"{detector.method_id} cannot be exported to ONNX: {reason}")


def export_onnx(detector: Detector, class_name: str, out: str | Path) -> Path:
    """Write ``out`` (.onnx): the detector's single-image test path for ``class_name`` with its text
    embeddings and few-shot memory as constants, smoothing inside; metadata describes it."""
    try:
        import onnx
    except ImportError:
        raise ValueError(INSTALL_HINT) from None
    from zsad.thresholds import atomic_write

    method = getattr(detector, "method_id", "")
    check_exportable(detector)
    if detector.options.get("precision", "fp32") != "fp32":
        raise ValueError("export traces the fp32 graph; drop the precision option")
    out = Path(out)
    if out.suffix != ".onnx":
        raise ValueError(f"{out}: the export file must end in .onnx")
    out.parent.mkdir(parents=True, exist_ok=True)
    example = torch.zeros(1, 3, detector.image_size, detector.image_size)
    graph = _SingleClassGraph(detector, class_name).eval()
    with torch.no_grad(), traceable_smoothing(), frozen(detector):
        graph(example)  # fills the per-class text (and memory) caches: constants in the trace
        with warnings.catch_warnings():
            # The shape checks of check_input are Python comparisons of a fixed input size: true here.
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            atomic_write(
                out,
                lambda tmp: torch.onnx.export(
                    graph,
                    (example,),
                    tmp,
                    input_names=["image"],
                    output_names=["score", "map"],
                    opset_version=OPSET,
                    dynamo=False,
                ),
            )
    model = onnx.load(str(out))
    config = detector.config()
    sigma = detector.options.get("sigma")
    metadata = {
        "zsad_method": method,
        "zsad_class": class_name,
        "zsad_image_size": str(detector.image_size),
        "zsad_backbone": str(config.get("backbone")),
        "zsad_weights": str(config.get("weights")),
        "zsad_version": _version(),
        "zsad_smoothing": f"in graph (Gaussian sigma {sigma})" if sigma else "none",
    }
    for key, value in metadata.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value
    atomic_write(out, lambda tmp: onnx.save(model, tmp))
    return out


def _version() -> str:
    import zsad

    return zsad.__version__


class OnnxDetector:
    """A ``zsad export`` graph run by ONNX Runtime, with the detector protocol's ``predict`` (torch runs no
    forward pass: images go to ONNX Runtime as numpy arrays, one at a time as the graph was traced)."""

    few_shot = False

    def __init__(
        self,
        path: str | Path,
        method: str | None = None,
        class_name: str | None = None,
        image_size: int | None = None,
        threads: int | None = None,
    ) -> None:
        try:
            import onnxruntime as ort
        except ImportError:
            raise ValueError(INSTALL_HINT) from None
        self.path = Path(path)
        if not self.path.is_file():
            raise ValueError(f"{self.path}: no such ONNX file")
        options = ort.SessionOptions()
        if threads is not None:
            options.intra_op_num_threads = threads
        try:
            self.session = ort.InferenceSession(
                str(self.path), sess_options=options, providers=["CPUExecutionProvider"]
            )
        except Exception as err:  # ONNX Runtime raises its own exception types for unreadable models
            raise ValueError(f"{self.path}: not a readable ONNX model ({type(err).__name__})") from None
        meta = self.session.get_modelmeta().custom_metadata_map
        if "zsad_method" not in meta:
            raise ValueError(f"{self.path}: not a `zsad export` model (no zsad metadata)")
        self.meta = meta
        self.method_id = meta["zsad_method"]
        self.class_name = meta["zsad_class"]
        self.image_size = int(meta["zsad_image_size"])
        for what, asked, have in (
            ("method", method, self.method_id),
            ("class", class_name, self.class_name),
            ("image size", image_size, self.image_size),
        ):
            if asked is not None and asked != have:
                raise ValueError(f"{self.path}: exported for {what} {have!r}, not {asked!r}; export again")

    def config(self) -> dict[str, Any]:
        return {
            "method": self.method_id,
            "backbone": self.meta["zsad_backbone"],
            "weights": self.meta["zsad_weights"],
            "image_size": self.image_size,
            "onnx": str(self.path),
            "class_name": self.class_name,
        }

    def predict(self, images: torch.Tensor, class_names: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(scores (B,), maps (B, S, S)) for images of the exported class."""
        other = sorted(set(class_names) - {self.class_name})
        if other:
            raise ValueError(f"{self.path}: exported for class {self.class_name!r}, not {other}")
        size = self.image_size
        if images.ndim != 4 or tuple(images.shape[1:]) != (3, size, size):
            raise ValueError(f"{self.path}: takes (B, 3, {size}, {size}) images; got {tuple(images.shape)}")
        array = images.detach().float().cpu().numpy()
        outputs = [self.session.run(None, {"image": array[i : i + 1]}) for i in range(len(array))]
        scores = np.concatenate([o[0].reshape(-1) for o in outputs]).astype(np.float32)
        maps = np.concatenate([o[1] for o in outputs]).astype(np.float32)
        return torch.from_numpy(scores), torch.from_numpy(maps)
