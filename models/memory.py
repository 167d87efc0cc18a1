"""What a device can still hold: the one place that asks (model loading and the runtime's request
estimates both check against it before allocating)."""
from __future__ import annotations

import os
from pathlib import Path

import torch

from .config import CheckpointError


def available_bytes(device) -> int | None:
    """Memory a new allocation can still get on `device` (None: unknown). CPU: MemAvailable from
    /proc/meminfo (else free pages); CUDA: the driver's free memory."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    if device.type != "cpu":
        return None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def check_fits(nbytes: int, device, what: str) -> None:
    """Refuse (CheckpointError) an allocation of nbytes that the device cannot hold."""
    free = available_bytes(device)
    if free is not None and nbytes > free:
        raise CheckpointError(f"{what} needs {nbytes / 2**30:.2f} GiB but {torch.device(device)} has "
                              f"{free / 2**30:.2f} GiB available")
