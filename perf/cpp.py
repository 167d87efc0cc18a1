"""C++ (apps/export/cpp/dllm_run) vs Python per-step latency on the same request, one run, one machine.

    python -m dllm.perf.cpp --preset small --prompt-len 128 --gen-length 64 --steps 64 --block-length 32

Exports the preset for each policy and format, builds the runner (apps/export/cpp), and times: the C++ runner on the
package (median ms/step over --repeat runs, measured inside the runner), and in the same run the Python
engine (eager) on the same request, and the same package driven from Python. Prints the ratios.
--device cuda exports CUDA packages (TorchScript; the runner replays them without CUDA graphs) and
allows the real-dimension presets (llada-8b-shape, dream-7b-shape: random weights made on the GPU).
"""
from __future__ import annotations

import argparse
import re
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

from dllm.apps import export as ex
from dllm.models.tiny import PRESETS, SHAPE_PRESETS
from dllm.runtime.options import parse_spec

from .e2e import DTYPES, preset_dtype, preset_engine, random_prompt


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--family", choices=["llada", "dream"], default="llada")
    ap.add_argument("--preset", choices=sorted(PRESETS) + sorted(SHAPE_PRESETS), default="small")
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--gen-length", type=int, default=64)
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--block-length", type=int, default=32)
    ap.add_argument("--policies", nargs="+", default=["none", "dllm-cache:kp=100,kr=7,rho=0.25"])
    ap.add_argument("--formats", nargs="+", default=["torchscript", "aoti"])
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                    help="default: bfloat16 for the real-dimension presets, float32 otherwise")
    a = ap.parse_args(argv)
    dtype = preset_dtype(a.preset, a.device, a.dtype)

    runner = ex.build_runner()
    with tempfile.TemporaryDirectory() as tmp:
        eng = preset_engine(a.family, a.preset, device=a.device, dtype=dtype)
        prompt = random_prompt(eng.cfg, a.prompt_len)
        shape = dict(prompt_bucket=a.prompt_len, gen_length=a.gen_length, steps=a.steps,
                     block_length=a.block_length)
        print(f"# {a.family} preset={a.preset} P={a.prompt_len} G={a.gen_length} steps={a.steps} "
              f"block={a.block_length} {a.device} {str(dtype).replace('torch.', '')}, median of {a.repeat}")
        print(f"{'policy':<34} {'format':<12} {'C++ ms/step':>12} {'Py pkg':>9} {'Py eager':>9} {'eager/C++':>10} "
              f"{'export s':>9} {'same tokens':>12}")
        for spec in a.policies:
            label, policy = spec, parse_spec(spec)["policy"]
            eng.generate(prompt, policy=policy, **shape)                      # warm-up
            runs = [eng.generate(prompt, policy=policy, **shape) for _ in range(a.repeat)]
            eager_ms = statistics.median(r.seconds for r in runs) / a.steps * 1e3
            for fmt in a.formats:
                pkg = Path(tmp) / f"{label}-{fmt}"
                info = ex.export(eng, pkg, policy=policy, fmt=fmt, **shape)
                res = subprocess.run([str(runner), str(pkg), ",".join(map(str, prompt)), "--repeat",
                                      str(a.repeat + 1)], capture_output=True, text=True, check=True)
                cpp_ms = float(re.search(r"median ([0-9.e+-]+) ms/step", res.stderr).group(1))
                same = [int(t) for t in res.stdout.strip().split(",")] == runs[-1].tokens[0]
                mod, plan = ex.load(pkg)
                ex.run(mod, plan, prompt)                                     # warm-up
                times = []
                for _ in range(a.repeat):
                    t0 = time.perf_counter()
                    ex.run(mod, plan, prompt)
                    times.append(time.perf_counter() - t0)
                py_pkg_ms = statistics.median(times) / a.steps * 1e3
                print(f"{label:<34} {fmt:<12} {cpp_ms:>12.2f} {py_pkg_ms:>9.2f} {eager_ms:>9.2f} "
                      f"{eager_ms / cpp_ms:>9.2f}x {info['export_seconds']:>9.1f} {str(same):>12}")


if __name__ == "__main__":
    main()
