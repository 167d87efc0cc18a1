"""Which device and dtype an engine runs in: names checked, "auto" resolved (bfloat16 where the device
computes it natively, else float32)."""
from __future__ import annotations

import re
from pathlib import Path

import torch

from .errors import RequestError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DTYPE_CHOICES = ("auto", *DTYPES)   # "auto": bfloat16 where the device computes it natively, else float32


def native_bf16(device) -> bool:
    """Whether `device` computes bfloat16 natively: a CUDA GPU that supports it (Ampere or later), or a
    CPU with AVX512-BF16 or AMX (Linux: from /proc/cpuinfo's flags)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return re.search(r"\b(avx512_bf16|amx_bf16)\b", flags) is not None


def resolve_dtype(dtype, device) -> torch.dtype:
    """A dtype name, "auto" or a torch dtype -> the torch dtype (RequestError for anything else)."""
    if isinstance(dtype, torch.dtype) and dtype in DTYPES.values():
        return dtype
    if dtype == "auto":
        return torch.bfloat16 if native_bf16(device) else torch.float32
    if isinstance(dtype, str) and dtype in DTYPES:
        return DTYPES[dtype]
    raise RequestError(f"dtype must be one of {', '.join(DTYPE_CHOICES)}, got {dtype!r}")


def resolve_device(device) -> torch.device:
    """'cpu', 'cuda', 'cuda:N' or a torch.device that this machine has (RequestError otherwise)."""
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise RequestError(f"device must be 'cpu', 'cuda' or 'cuda:N' (or a torch.device), got {device!r} "
                           f"({str(e).splitlines()[0]})") from None
    if device.type not in ("cpu", "cuda"):
        raise RequestError(f"device {device} is not supported; use cpu or cuda")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RequestError("device cuda was asked for but this torch build sees no CUDA device; run on the CPU "
                           "instead (device='cpu' in Python, --device cpu on the command line)", "device")
    return device
