"""`dllm`: the command. Each subcommand is a face with its own `main(argv)`, imported only when it runs,
so `dllm`, `dllm --help` and `dllm --version` answer without importing torch."""
from __future__ import annotations

import argparse
import importlib
import subprocess
import sys

# subcommand -> (module with main(argv), the pip extra it needs or None, one line of help)
SUBCOMMANDS = {
    "generate": ("dllm.apps.generate.main", None, "denoise a response for a prompt (--live: watch it)"),
    "serve": ("dllm.apps.serve.main", "serve", "an OpenAI-compatible HTTP server over one engine"),
    "eval": ("dllm.apps.evaluate", "eval", "lm-evaluation-harness with the runtime as model 'dllm'"),
    "export": ("dllm.apps.export.main", None, "write one request shape as a package a C++ host runs"),
    "quantize": ("dllm.apps.quantize", None, "write a weight-only int8 / int4 copy of a checkpoint folder"),
    "bench": ("dllm.perf.report", None, "the headline latency report for this machine (perf.report)"),
}


def dllm_version() -> str:
    from importlib.metadata import PackageNotFoundError, version
    try:
        return version("dllm-runtime")
    except PackageNotFoundError:
        return "unknown (not installed: pip install -e .)"


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="dllm", description="Static-shape inference for diffusion LMs (LLaDA, Dream). "
                                 "`dllm COMMAND --help` lists a command's options.")
    ap.add_argument("--version", action="version", version=f"%(prog)s {dllm_version()}",
                    help="print the installed dllm-runtime version and exit")
    sub = ap.add_subparsers(dest="command", metavar="COMMAND")
    for name, (_module, _extra, help_text) in SUBCOMMANDS.items():
        sub.add_parser(name, help=help_text, add_help=False)
    return ap


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    ap = build_parser()
    if not argv:
        ap.print_usage(sys.stderr)
        print("dllm: give a COMMAND (dllm --help lists them)", file=sys.stderr)
        return 2
    a, rest = ap.parse_known_args(argv)
    if a.command is None:
        ap.error(f"unrecognized arguments: {' '.join(rest)}")
    module, extra, _ = SUBCOMMANDS[a.command]
    if a.command == "bench":                  # perf sits above the faces: run it as its own program
        return subprocess.call([sys.executable, "-m", module, *rest])
    try:
        mod = importlib.import_module(module)
    except ImportError as e:
        if extra is None or e.name is None or e.name.startswith("dllm"):
            raise
        print(f"dllm: error: dllm {a.command} needs the {extra} extra ({e.name} is missing): "
              f"pip install 'dllm-runtime[{extra}]'", file=sys.stderr)
        return 2
    return mod.main(rest)


if __name__ == "__main__":
    sys.exit(main())
