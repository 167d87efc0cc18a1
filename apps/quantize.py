"""`dllm quantize`: write a weight-only quantized copy of a checkpoint folder, which later loads (every
face, `Engine.from_pretrained`) without quantizing again (docs/quantization.md).

    dllm quantize --model DIR --out QDIR --quantize int8|int4 [--quantize-group G] [--quantize-head] [--dtype ...]
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

from dllm.apps.common import error_exit, run_guarded
from dllm.runtime.device import DTYPE_CHOICES


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="dllm quantize", description="write a weight-only int8 / int4 copy of a "
                                 "checkpoint folder (quantized.safetensors + a config.json entry)")
    ap.add_argument("--model", required=True, help="checkpoint folder (config.json + safetensors)")
    ap.add_argument("--out", required=True, help="folder to write (must be new or empty)")
    ap.add_argument("--quantize", choices=["int8", "int4"], required=True)
    ap.add_argument("--quantize-group", type=int, default=None, metavar="G",
                    help="int4 group size: 32, 64, 128 or 256 (default 128, smaller where a width needs it)")
    ap.add_argument("--quantize-head", action="store_true", help="quantize the LM head too (default: kept)")
    ap.add_argument("--dtype", choices=list(DTYPE_CHOICES), default="bfloat16",
                    help="dtype of the scales and of the weights kept dense (default bfloat16)")
    ap.add_argument("--quiet", action="store_true", help="no progress on stderr")
    return ap


def run(a) -> int:
    import logging

    from dllm.models.checkpoint import save_quantized
    from dllm.models.hub import resolve_model
    from dllm.models.quant import Quantization
    from dllm.runtime.device import resolve_dtype
    quant = Quantization(a.quantize, a.quantize_group, a.quantize_head)       # bad flags: one line, nothing read
    out = Path(a.out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        return error_exit(f"--out {out} exists and is not an empty folder; choose a new folder")
    folder = resolve_model(a.model)
    t0 = time.perf_counter()
    save_quantized(folder, out, quant, resolve_dtype(a.dtype, "cpu"))
    logging.getLogger("dllm").info("quantized in %.1f s", time.perf_counter() - t0)
    print(f"wrote {out}: {quant.mode}{' with the head' if quant.head else ''}")
    return 0


def main(argv: list[str]) -> int:
    a = build_parser().parse_args(argv)
    return run_guarded(run, a, quiet=a.quiet)
