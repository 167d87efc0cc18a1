"""`dllm export`: write the step programs of one request shape as a package a C++ host runs."""
from __future__ import annotations

import argparse
from pathlib import Path

from dllm.apps.common import engine_args, engine_from_args, request_args, run_guarded

from .package import FORMATS

# What a package cannot carry (sampling, threshold decoding) is refused by export(); these are not flags here.
NOT_EXPORTED = ("temperature", "top_p", "top_k", "threshold", "seed", "chat", "stop")


def build_parser() -> argparse.ArgumentParser:
    e = argparse.ArgumentParser(prog="dllm export", description="write the step programs of one request shape as "
                                "a package a C++ host runs (apps/export/cpp/dllm_run)")
    engine_args(e, backend_help=argparse.SUPPRESS)
    e.add_argument("--quiet", action="store_true", help="no progress on stderr (loading, compiling)")
    e.add_argument("--out", required=True, help="package folder to write (steps.pt or aoti/ + plan.json)")
    e.add_argument("--force", action="store_true",
                   help="replace a non-empty --out (only once the new package is complete)")
    e.add_argument("--format", choices=list(FORMATS), default="torchscript")
    request_args(e, skip=NOT_EXPORTED)
    e.set_defaults(prompt_bucket="64")
    return e


def run(a) -> int:
    from dllm.apps.common import request_from_args

    from .write import check_cuda_toolkit, check_out, export
    request = request_from_args(a, None, skip=NOT_EXPORTED)
    check_out(Path(a.out), a.force)           # before minutes of loading: refuse a non-empty --out now
    if a.device == "cuda" and a.format == "aoti":
        check_cuda_toolkit()                  # AOTInductor compiles CUDA kernels with nvcc
    a.backend = "eager"
    eng = engine_from_args(a)
    info = export(eng, a.out, request, fmt=a.format, replace=a.force)
    print(f"wrote {a.out}: {info['format']} {info['family']} prompt<={info['prompt_bucket']} gen {info['gen_length']} "
          f"steps {info['steps']} policy {info['policy']['name']} kinds {', '.join(info['kinds'])}")
    return 0


def main(argv: list[str]) -> int:
    a = build_parser().parse_args(argv)
    return run_guarded(run, a, quiet=a.quiet)
