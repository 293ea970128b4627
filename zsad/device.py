"""Where a run executes and at which precision: one resolver for the API, the CLI, notebooks and plans.

``resolve_device("auto" | "cpu" | "cuda" | "cuda:N" | torch.device)`` -> ``torch.device``; a device this
machine does not have is a :class:`DeviceError` naming the ones it has, raised before any weights load.
``check_precision_on(precision, device)`` refuses fp16 off CUDA (CPU fp16 matmuls are slow and not what
any paper ran). ``prepare(device, precision)`` switches TF32 off for fp32 runs on CUDA so that CUDA fp32
stays comparable with the CPU (and with the official fp32 numbers). ``default_workers()`` is the CLI's
DataLoader worker count, ``check_workers`` the one check of a count.
"""

from __future__ import annotations

import os

import torch

DEVICE_CHOICES = "auto, cpu, cuda, cuda:N"
PRECISIONS = ("fp32", "bf16", "fp16")
AUTOCAST_DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


class DeviceError(ValueError):
    """A device or precision this machine cannot run (a user mistake: one line, exit 2 in the CLI)."""


def available_devices() -> list[str]:
    """The device strings that exist here: ``cpu`` then ``cuda:0`` .. ``cuda:N-1``."""
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    return ["cpu", *(f"cuda:{i}" for i in range(count))]


def resolve_device(device: str | torch.device | None = "auto") -> torch.device:
    """``auto`` (or None) = the first CUDA device if there is one, else the CPU; ``cuda`` = ``cuda:0``."""
    spec = "auto" if device is None else str(device).strip().lower()
    have = available_devices()
    if spec == "auto":
        return torch.device(have[1] if len(have) > 1 else "cpu")
    if spec == "cuda":
        spec = "cuda:0"
    try:
        parsed = torch.device(spec)
    except (RuntimeError, ValueError):
        raise DeviceError(
            f"unknown device {spec!r}; use one of {DEVICE_CHOICES} (here: {', '.join(have)})"
        ) from None
    if parsed.type not in ("cpu", "cuda"):
        raise DeviceError(f"device {spec!r} is not supported; use one of {DEVICE_CHOICES}")
    name = "cpu" if parsed.type == "cpu" else f"cuda:{parsed.index or 0}"
    if name not in have:
        raise DeviceError(f"device {spec!r} does not exist on this machine; available: {', '.join(have)}")
    return torch.device(name)


def check_precision_on(precision: str, device: torch.device) -> str:
    """``precision`` if ``device`` can run it: fp32 and bf16 anywhere, fp16 only on CUDA."""
    if precision not in PRECISIONS:
        raise DeviceError(f"precision must be one of {', '.join(PRECISIONS)}; got {precision!r}")
    if precision == "fp16" and device.type != "cuda":
        raise DeviceError(f"precision fp16 needs a CUDA device, got {device}; use fp32 or bf16 on the CPU")
    return precision


def prepare(device: str | torch.device | None, precision: str = "fp32") -> torch.device:
    """Resolve and check ``device``/``precision``; on CUDA fp32 turn TF32 off (matmuls and convolutions)
    so that the numbers stay within 1e-4 of the CPU's. Returns the resolved device."""
    resolved = resolve_device(device)
    check_precision_on(precision, resolved)
    if resolved.type == "cuda" and precision == "fp32":
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    return resolved


def check_workers(workers: int) -> int:
    """``workers`` if it is a DataLoader worker count (0 = load in the main process)."""
    if workers < 0:
        raise ValueError(f"workers must be >= 0; got {workers}")
    return workers


def default_workers() -> int:
    """DataLoader workers for decoding and resizing: one core stays with the main process, at most 4."""
    return max(0, min(4, (os.cpu_count() or 1) - 1))
