"""The CPU's float32 GEMM paths on the model's own matmul shapes: why models/prepack.py packs for oneDNN.

    python -m dllm.perf.gemm [--preset small] [--rows 32 65 129 640] [--iters 15]

For every weight matrix of the preset (fused q|k|v, output, gate|up, down, the head) and every row
count M (a partial step's 32-129 rows, a full step's 640), the best of --iters calls of: a plain
`x @ w.t()` (MKL's sgemm, which packs the weight on every call), the weight pre-transposed to [K, N],
MKL's own packed sgemm (`torch.ops.mkl._mkl_linear`, one packed copy per M) and oneDNN with the weight
prepacked once (`models.prepack`, what engines run). Prints GFLOP/s and each path's ratio to plain, and
whether the path's output is bit-identical to plain.
"""
from __future__ import annotations

import argparse

import torch

from dllm.models import prepack
from dllm.models.config import parse_config
from dllm.models.quant import matrix_shapes
from dllm.models.tiny import PRESETS, tiny_config

from .roofline import best_seconds


def paths(x: torch.Tensor, w: torch.Tensor) -> dict:
    """name -> a zero-argument product x @ w.t() by that path."""
    wt, M = w.t().contiguous(), x.shape[0]
    mkl = torch.ops.mkl._mkl_reorder_linear_weight(w, M) if torch.backends.mkl.is_available() else None
    dnn = prepack.pack(w) if torch.backends.mkldnn.is_available() else None
    out = {"plain": lambda: x @ w.t(), "transposed": lambda: x @ wt}
    if mkl is not None:
        out["mkl packed"] = lambda: torch.ops.mkl._mkl_linear(x, mkl, w, None, M)
    if dnn is not None:
        out["onednn packed"] = lambda: prepack.matmul(x, dnn)
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", choices=sorted(PRESETS), default="small")
    ap.add_argument("--rows", type=int, nargs="+", default=[32, 65, 129, 640])
    ap.add_argument("--iters", type=int, default=15)
    a = ap.parse_args(argv)
    cfg = parse_config(tiny_config("llada", PRESETS[a.preset]))
    print(f"# float32 GEMM on cpu, {torch.get_num_threads()} threads, preset {a.preset}: GFLOP/s (x plain; "
          f"= bit-identical to plain)")
    names = None
    torch.manual_seed(0)
    with torch.inference_mode():
        for field, (N, K) in matrix_shapes(cfg).items():
            w = torch.randn(N, K)
            for M in a.rows:
                x = torch.randn(M, K)
                fns = paths(x, w)
                if names is None:
                    names = list(fns)
                    print("| matrix | M x K x N | " + " | ".join(names) + " |")
                    print("|---|---|" + "---|" * len(names))
                ref = fns["plain"]()
                cells, base = [], None
                for name, fn in fns.items():
                    rate = 2 * M * K * N / best_seconds(torch.device("cpu"), fn, a.iters) / 1e9
                    base = base or rate
                    same = " =" if torch.equal(fn(), ref) else ""
                    cells.append(f"{rate:.1f}" + ("" if name == "plain" else f" ({rate / base:.2f}x){same}"))
                print(f"| {field} | {M} x {K} x {N} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
