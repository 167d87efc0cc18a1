"""Building the C++ runner (cpp/dllm_run) against the libtorch inside the installed torch wheel."""
from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import torch


def build_runner(build_dir: str | Path | None = None) -> Path:
    """Configure and build cpp/dllm_run against the libtorch inside the installed torch wheel;
    returns the binary. Incremental: a no-op when nothing changed."""
    missing = [t for t in ("cmake", "c++") if shutil.which(t) is None]
    if missing:
        raise RuntimeError(f"no {' or '.join(missing)} on this machine: the C++ runner cannot be built")
    src = Path(__file__).resolve().parent / "cpp"
    build = Path(build_dir) if build_dir else src.parents[2] / "build" / "cpp"
    for cmd in (["cmake", "-S", str(src), "-B", str(build), f"-DCMAKE_PREFIX_PATH={torch.utils.cmake_prefix_path}",
                 "-DCMAKE_BUILD_TYPE=Release"], ["cmake", "--build", str(build), "-j2"]):
        res = subprocess.run(cmd, capture_output=True, text=True)
        if res.returncode:
            raise RuntimeError(f"{' '.join(cmd[:2])} failed:\n{res.stdout[-2000:]}{res.stderr[-2000:]}")
    return build / "dllm_run"


