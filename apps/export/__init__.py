"""Export packages: one request shape as files a C++ host runs (write.py), read back validated
(load.py), the C++ runner (cpp/) and its build (build.py); `dllm export` is main.py."""
from .build import build_runner
from .load import AotiRunnable, check_manifest, check_plan, load, run
from .package import FORMATS, PackageError
from .write import check_cuda_toolkit, check_out, export

__all__ = ["AotiRunnable", "FORMATS", "PackageError", "build_runner", "check_cuda_toolkit", "check_manifest",
           "check_out", "check_plan", "export", "load", "run"]
