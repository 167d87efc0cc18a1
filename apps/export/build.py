"""Building the C++ runner (cpp/dllm_run) against the libtorch inside the installed torch wheel."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import torch


def build_runner(build_dir: str | Path | None = None) -> Path:
    """Configure and build cpp/dllm_run against the libtorch inside the installed torch wheel;
    returns the binary. Incremental: a no-op when nothing changed. A CUDA build of torch also gets
    the CUDA toolkit's root and libnvrtc (cuda_cmake_flags)."""
    missing = [t for t in ("cmake", "c++") if shutil.which(t) is None]
    if missing:
        raise RuntimeError(f"no {' or '.join(missing)} on this machine: the C++ runner cannot be built")
    src = Path(__file__).resolve().parent / "cpp"
    build = Path(build_dir) if build_dir else src.parents[2] / "build" / "cpp"
    configure = ["cmake", "-S", str(src), "-B", str(build), f"-DCMAKE_PREFIX_PATH={torch.utils.cmake_prefix_path}",
                 "-DCMAKE_BUILD_TYPE=Release", *(cuda_cmake_flags() if torch.version.cuda else [])]
    for cmd in (configure, ["cmake", "--build", str(build), "-j2"]):
        res = subprocess.run(cmd, capture_output=True, text=True)
        if res.returncode:
            raise RuntimeError(f"{' '.join(cmd[:2])} failed:\n{res.stdout[-2000:]}{res.stderr[-2000:]}")
    return build / "dllm_run"


def cuda_root() -> Path | None:
    """The CUDA toolkit's root (the folder with include/cuda_runtime.h): $CUDA_HOME or $CUDA_PATH, else
    where the nvcc on PATH says it lives (`nvcc -dryrun` prints TOP; an nvcc wrapper script in
    /usr/local/bin would make /usr/local look like the root, which is what CMake's FindCUDA guesses),
    else /usr/local/cuda. None when no candidate holds the headers."""
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")]
    nvcc = shutil.which("nvcc")
    if nvcc:
        try:
            res = subprocess.run([nvcc, "-dryrun", "-x", "cu", "-c", os.devnull], capture_output=True, text=True,
                                 timeout=30)
            top = re.search(r"^#\$ TOP=(.+)$", res.stdout + res.stderr, re.M)
            candidates.append(top.group(1).strip() if top else None)
        except (OSError, subprocess.TimeoutExpired):
            pass
        candidates.append(str(Path(nvcc).resolve().parent.parent))
    candidates.append("/usr/local/cuda")
    for c in filter(None, candidates):
        if (Path(c) / "include" / "cuda_runtime.h").is_file():
            return Path(c).resolve()
    return None


def wheel_nvrtc(site: Path | None = None) -> Path | None:
    """libnvrtc from the NVIDIA wheels installed beside torch (site-packages/nvidia/*/lib), for a toolkit
    that has none (a toolkit assembled from pip wheels often lacks it)."""
    site = site or Path(torch.__file__).resolve().parents[1]
    found = sorted(p for p in (site / "nvidia").glob("*/lib/libnvrtc.so*")
                   if re.fullmatch(r"libnvrtc\.so(\.\d+)*", p.name))
    return found[0] if found else None


def cuda_cmake_flags(site: Path | None = None) -> list[str]:
    """What CMake needs to configure libtorch's CUDA targets: the toolkit root (and its nvcc) where FindCUDA
    would guess it wrong (`Could NOT find CUDA (missing: CUDA_INCLUDE_DIRS CUDA_CUDART_LIBRARY)`), and
    libnvrtc, the toolkit's own or else the torch wheel's (`cannot find -lCUDA_nvrtc_LIBRARY-NOTFOUND`)."""
    root, flags = cuda_root(), []
    if root is not None:
        flags += [f"-DCUDA_TOOLKIT_ROOT_DIR={root}", f"-DCUDAToolkit_ROOT={root}"]
        if (root / "bin" / "nvcc").is_file():
            flags.append(f"-DCMAKE_CUDA_COMPILER={root / 'bin' / 'nvcc'}")
    if root is None or not any((root / d / "libnvrtc.so").exists() for d in ("lib64", "lib")):
        nvrtc = wheel_nvrtc(site)
        if nvrtc is not None:
            flags += [f"-DCUDA_nvrtc_LIBRARY={nvrtc}", f"-DCUDA_NVRTC_LIB={nvrtc}"]
    return flags
