"""An emulated CUDA device for machines without one: placement mistakes fail here as they would on a GPU.

The project's machines have no accelerator, and one is lent only at times (docs/gpu.md). What goes wrong
most often when code first meets a GPU is placement, not arithmetic: a tensor made on the CPU inside a
forward pass and combined with one on the device, features read back from a disk cache and never moved,
a ``.numpy()`` of a device tensor, a checkpoint that pickles device tensors (``torch.load(...,
weights_only=True)`` refuses the wrapper class). Inside :func:`emulated_cuda`:

- ``zsad.device`` reports a ``cuda:0`` (so ``--device cuda`` resolves), and ``cuda`` in a ``device=``
  argument, ``.to(...)`` or ``.cuda()`` makes a :class:`DeviceTensor`: a CPU tensor in a wrapper whose
  ``.device`` reads ``cuda:0`` in Python.
- Every operation on a DeviceTensor runs on the CPU (the same kernels, so results equal a CPU run up to
  float rounding, ~1e-6 here) and returns DeviceTensors, except a copy to the CPU.
- As on CUDA, an operation that mixes a DeviceTensor with a CPU tensor of one or more dimensions raises
  "Expected all tensors to be on the same device"; CPU scalars (0-d) and CPU index tensors are allowed;
  ``.numpy()`` of a DeviceTensor raises; pinning memory is a no-op.

``torch.inference_mode()`` runs as ``torch.no_grad()`` inside (a wrapper tensor cannot be an inference-mode
view). What it cannot show: CUDA's own arithmetic (TF32, cuBLAS/cuDNN reductions), autocast on CUDA (bf16/fp16
autocast with device type "cuda" is switched off without CUDA, with a warning), streams and memory. Those
are the ``gpu`` tests' job on a real card. C++ (autograd) sees the wrapper on the ``meta`` device: a
"cuda" wrapper would make autograd ask the CUDA driver for a stream.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator
from typing import Any

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._mode_utils import no_dispatch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_map

EMULATED = torch.device("cuda", 0)
_CLAIMED = torch.device("meta")  # what C++ sees; see the module docstring

# CUDA accepts a CPU tensor as the source or destination of a copy ...
_COPIES = {torch.ops.aten.copy_.default, torch.ops.aten._to_copy.default}
# ... and CPU index tensors into a device tensor (not device indices into a CPU tensor).
_INDEXING = {
    torch.ops.aten.index.Tensor,
    torch.ops.aten.index_put.default,
    torch.ops.aten.index_put_.default,
    torch.ops.aten._index_put_impl_.default,
}


# Operations run on DeviceTensors since import: a test can check that a run really used the device.
operations_on_device = 0


class PlacementError(RuntimeError):
    """What CUDA raises when an operation mixes devices."""


class DeviceTensor(torch.Tensor):
    """A CPU tensor that the rest of the program must treat as living on ``cuda:0``."""

    __torch_function__ = torch._C._disabled_torch_function_impl

    @staticmethod
    def __new__(cls, elem: torch.Tensor) -> DeviceTensor:
        wrapper = torch.Tensor._make_wrapper_subclass(
            cls,
            elem.size(),
            strides=elem.stride(),
            storage_offset=elem.storage_offset(),
            dtype=elem.dtype,
            layout=elem.layout,
            device=_CLAIMED,
            requires_grad=elem.requires_grad,
        )
        wrapper.elem = elem
        return wrapper

    def __repr__(self) -> str:
        return f"DeviceTensor({self.elem!r}, device='{EMULATED}')"

    def __format__(self, spec: str) -> str:
        # f"{loss:.3f}" of a one-element CUDA tensor formats its value; torch does so only for plain tensors.
        return format(self.item(), spec) if self.dim() == 0 else super().__format__(spec)

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.ops.aten._has_compatible_shallow_copy_type.default:
            # Module._apply asks before `param.data = moved`: a CPU tensor cannot take a device tensor's data.
            return type(args[0]) is type(args[1])
        _check_placement(func, args, kwargs)
        originals: dict[int, Any] = {}

        def unwrap(x: Any) -> Any:
            if isinstance(x, DeviceTensor):
                originals[id(x.elem)] = x
                return x.elem
            if isinstance(x, torch.Tensor):
                if x.device.type == _CLAIMED.type:
                    raise RuntimeError(f"emulated CUDA: a real meta tensor reached {func} (an emulator gap)")
                originals[id(x)] = x
            return x

        out = func(*tree_map(unwrap, args), **tree_map(unwrap, kwargs))
        global operations_on_device
        operations_on_device += 1
        target = kwargs.get("device")
        to_cpu = func is torch.ops.aten._to_copy.default and target is not None and target.type == "cpu"

        def rewrap(x: Any) -> Any:
            if not isinstance(x, torch.Tensor):
                return x
            if id(x) in originals:  # an in-place op returns its argument: keep that object (and its device)
                return originals[id(x)]
            return x if to_cpu else DeviceTensor(x)

        result = tree_map(rewrap, out)
        if isinstance(result, DeviceTensor) and (
            result.shape != result.elem.shape or result.stride() != result.elem.stride()
        ):
            _follow_in_place_metadata_change(func, result, args, kwargs)
        return result


def _check_placement(func, args, kwargs) -> None:
    """CUDA's rule: the tensors of one operation share a device, but for 0-d CPU tensors (scalars), the
    CPU end of a copy, and CPU index tensors into a device tensor."""
    if func in _COPIES:
        return
    if func in _INDEXING:
        indexed, indices, rest = args[0], [i for i in args[1] if i is not None], list(args[2:])
        placed = [indexed, *rest, *([] if isinstance(indexed, DeviceTensor) else indices)]
    else:
        placed = [x for x in (*args, *kwargs.values()) for x in (x if isinstance(x, list | tuple) else [x])]
    tensors = [x for x in placed if isinstance(x, torch.Tensor)]
    on_device = any(isinstance(x, DeviceTensor) for x in tensors)
    on_cpu = any(not isinstance(x, DeviceTensor) and x.dim() > 0 for x in tensors)
    if on_device and (on_cpu or (func in _INDEXING and not isinstance(args[0], DeviceTensor))):
        raise PlacementError(
            f"Expected all tensors to be on the same device, but found at least two devices, "
            f"{EMULATED} and cpu! (emulated CUDA, in {func})"
        )


def _follow_in_place_metadata_change(func, wrapper: DeviceTensor, args, kwargs) -> None:
    """An in-place op that changes only the shape (``squeeze_`` inside ``matmul`` of a vector, ``t_``, ...)
    changed the wrapped tensor; the same op on the wrapper with dispatch off runs the meta kernel, which
    updates the wrapper's own sizes and strides."""
    if args[0] is not wrapper or any(isinstance(a, torch.Tensor) for a in (*args[1:], *kwargs.values())):
        raise NotImplementedError(f"emulated CUDA: {func} changed a tensor's shape in a way it cannot follow")
    with no_dispatch():
        func(*args, **kwargs)
    if wrapper.shape != wrapper.elem.shape or wrapper.stride() != wrapper.elem.stride():
        raise NotImplementedError(f"emulated CUDA: {func} left the wrapper's shape behind")


def _is_emulated(device: Any) -> bool:
    if isinstance(device, str):
        return device.startswith("cuda")
    if isinstance(device, int) and not isinstance(device, bool):  # .to(0)
        return True
    return isinstance(device, torch.device) and device.type == "cuda"


def _lists_as_index_tensors(index: Any) -> Any:
    if isinstance(index, list):
        return torch.tensor(index)
    if isinstance(index, tuple):
        return tuple(torch.tensor(i) if isinstance(i, list) else i for i in index)
    return index


def _moved_like_a_factory(x: Any) -> Any:
    if not isinstance(x, torch.Tensor) or isinstance(x, DeviceTensor):
        return x
    return x.detach().to(_CLAIMED).requires_grad_(x.requires_grad)


def _to_device(x: Any) -> Any:
    if isinstance(x, torch.Tensor) and not isinstance(x, DeviceTensor):
        return DeviceTensor(x)
    return x


class _EmulatedCudaMode(TorchFunctionMode):
    """Turns every ``cuda`` placement into the claimed meta device, which the dispatch mode below makes
    into DeviceTensors (under autograd, so ``.to("cuda")`` of a tensor that needs a gradient stays
    differentiable), and answers ``.device``/``.is_cuda``/``.is_meta`` of a DeviceTensor as CUDA would."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if args and isinstance(args[0], DeviceTensor):
            if func == torch.Tensor.device.__get__:
                return EMULATED
            if func == torch.Tensor.is_cuda.__get__:
                return True
            if func == torch.Tensor.is_meta.__get__:
                return False  # else load_state_dict skips the copy into a "meta" parameter
        if func is torch.Tensor.cuda:
            return args[0].to(_CLAIMED, non_blocking=kwargs.get("non_blocking", False))
        if func is torch.Tensor.pin_memory:
            return args[0]
        if func in (torch.Tensor.__getitem__, torch.Tensor.__setitem__) and isinstance(args[0], DeviceTensor):
            # torch turns a list index into a tensor on the indexed tensor's device outside the dispatcher
            # (here: an empty meta tensor); a CPU index tensor is what CUDA accepts too.
            args = (args[0], _lists_as_index_tensors(args[1]), *args[2:])
        if func is torch.Tensor.to:  # through the dispatcher, so that autograd records the copy
            if "device" in kwargs and _is_emulated(kwargs["device"]):
                kwargs["device"] = _CLAIMED
            if len(args) > 1 and _is_emulated(args[1]):  # .to(device, ...)
                args = (args[0], _CLAIMED, *args[2:])
            return func(*args, **kwargs)
        if "device" in kwargs and _is_emulated(kwargs["device"]):
            # Factories (torch.tensor among them builds outside the dispatcher): made on the CPU, then moved.
            kwargs["device"] = "cpu"
            return tree_map(_moved_like_a_factory, func(*args, **kwargs))
        return func(*args, **kwargs)


class _CreatedLikeADeviceTensorMode(TorchDispatchMode):
    """Makes every tensor asked for on the claimed meta device on the CPU and wraps it: the emulated
    placements above, and the helper tensors that torch's C++ composites make with their input's options
    (``one_hot`` compares with an ``arange``). Nothing else in these tests uses meta."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        device = kwargs.get("device")
        if isinstance(device, torch.device) and device.type == _CLAIMED.type:
            return tree_map(_to_device, func(*args, **{**kwargs, "device": torch.device("cpu")}))
        return func(*args, **kwargs)


def _patches() -> list[tuple[Any, str, Any]]:
    import torch.utils.data._utils.pin_memory as pinning

    import zsad.device

    return [
        (zsad.device, "available_devices", lambda: ["cpu", str(EMULATED)]),
        # The loader's pinning thread runs outside this thread's mode; pinned memory is host memory anyway.
        (pinning, "pin_memory", lambda data, device=None: data),
        # Wrapper tensors cannot be views in inference mode (torch cannot share an inference tensor's
        # version counter); no_grad computes the same values.
        (torch, "inference_mode", lambda mode=True: torch.no_grad()),
    ]


# Without a real accelerator the DataLoader switches pinning off and says so.
_PINNING_NOTICE = "'pin_memory' argument is set as true but no accelerator"


@contextlib.contextmanager
def emulated_cuda(monkeypatch) -> Iterator[torch.device]:
    """Run the block with an emulated ``cuda:0`` (see the module docstring); yields that device."""
    for target, name, value in _patches():
        monkeypatch.setattr(target, name, value)
    with warnings.catch_warnings(), _EmulatedCudaMode(), _CreatedLikeADeviceTensorMode():
        warnings.filterwarnings("ignore", message=_PINNING_NOTICE)
        yield EMULATED


def activate() -> None:
    """The emulated ``cuda:0`` for the rest of this process, in this thread: for a notebook kernel's
    startup file (tests/test_notebooks.py renders every notebook with ``device="cuda"`` on it)."""
    for target, name, value in _patches():
        setattr(target, name, value)
    warnings.filterwarnings("ignore", message=_PINNING_NOTICE)
    _EmulatedCudaMode().__enter__()
    _CreatedLikeADeviceTensorMode().__enter__()
