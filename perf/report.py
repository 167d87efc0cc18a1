"""The headline report for this machine (also `dllm bench`).

    python -m dllm.perf.report [--family llada dream] [--preset small] [--update-docs]

Per family, in one run: every policy's end-to-end seconds, tokens/s, speedup over NoCache and token
agreement with it (perf.e2e), in the default dtype (bfloat16 where the device has it natively) and in
--compare-dtype; every step kind of every policy under every available backend, its ratio to eager,
its FLOPs, bytes, roofline floor from the matmul peak and bandwidth measured in the same run, and the
achieved fraction of that floor (perf.roofline); the same kinds in --compare-dtype. Prints Markdown;
--update-docs rewrites the section of docs/performance.md between the perf.report markers with it.
"""
from __future__ import annotations

import argparse
import datetime
import platform
import re
from pathlib import Path

import torch

from dllm.graphs import available
from dllm.models.quant import Quantization
from dllm.models.tiny import PRESETS, SHAPE_PRESETS
from dllm.runtime import DllmCache
from dllm.runtime.decoding import DecodeConfig
from dllm.runtime.device import DTYPE_CHOICES, resolve_dtype
from dllm.runtime.options import parse_spec
from dllm.runtime.state import RequestShape

from .e2e import DTYPES, policy_rows, preset_engine, random_prompt
from .roofline import measure_peaks, roofline_rows
from .steps import backend_times, weight_floor

ROOT = Path(__file__).resolve().parent.parent
BEGIN, END = "<!-- perf.report:begin -->", "<!-- perf.report:end -->"
DEFAULT_POLICIES = ["none", "none:threshold=0.9", "dllm-cache:kp=100,kr=7,rho=0.25",
                    "dllm-cache:kp=50,kr=7,rho=0.25", "d2cache:k=32,attn_budget=32",
                    "d2cache:k=32,attn_budget=32,quasi_l2r=true", "dual-cache", "dual-cache:threshold=0.9"]
KIND_POLICIES = ["none", "dllm-cache:kp=100,kr=7,rho=0.25", "d2cache:k=32,attn_budget=32", "dual-cache"]


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        names = re.findall(r"model name\s*:\s*(.+)", Path("/proc/cpuinfo").read_text())
        cpu = names[0].strip() if names else cpu
    except OSError:
        pass
    gpu = f", GPU {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ", no GPU"
    return (f"{cpu}, {torch.get_num_threads()} threads{gpu}; torch {torch.__version__}, "
            f"Python {platform.python_version()}; {datetime.date.today().isoformat()}")


def family_section(family: str, a, device: torch.device) -> list[str]:
    dtype = resolve_dtype(a.dtype, device)
    other = None if a.compare_dtype in (None, "none") else DTYPES[a.compare_dtype]
    other = None if other == dtype else other
    name, oname = (str(t).replace("torch.", "") if t else None for t in (dtype, other))
    a.progress(f"{family}: end to end, {name} ...")
    eng = preset_engine(family, a.preset, device=device, dtype=dtype)
    cfg = eng.cfg
    prompt = random_prompt(cfg, a.prompt_len)
    kw = dict(gen_length=a.gen_length, steps=a.steps, block_length=a.block_length)
    rows = policy_rows(eng, prompt, a.policies, a.repeats, **kw)
    orows = None
    if other is not None:
        a.progress(f"{family}: end to end, {oname} ...")
        oeng = preset_engine(family, a.preset, device=device, dtype=other)
        orows = policy_rows(oeng, prompt, a.policies, a.repeats, **kw)
    out = [f"**{family}**, preset `{a.preset}` (layers {cfg.n_layers}, d {cfg.d_model}, vocab {cfg.vocab_size}), "
           f"P={a.prompt_len}, G={a.gen_length}, {a.steps} steps, block {a.block_length}, {name}, eager, "
           f"median of {a.repeats}:", ""]
    extra = f" {oname} seconds | {oname} speedup vs NoCache | {name} / {oname} |" if orows else ""
    out += [f"| policy | seconds | tokens/s | speedup vs NoCache | agreement with NoCache | steps |{extra}",
            "|---|---|---|---|---|---|" + ("---|---|---|" if orows else "")]
    for i, r in enumerate(rows):
        o = orows[i] if orows else None
        cells = f" {o['seconds']:.3f} | {o['speedup']:.2f}× | {o['seconds'] / r['seconds']:.2f}× |" if o else ""
        out.append(f"| {r['policy']} | {r['seconds']:.3f} | {r['tok_s']:.1f} | {r['speedup']:.2f}× | "
                   f"{r['agree']:.1%} | {r['steps']} |{cells}")
    names = a.backends or available(device)
    shape = RequestShape(1, a.prompt_len, a.gen_length, a.block_length, a.steps)   # the end-to-end shape
    a.progress(f"{family}: matmul peak and bandwidth ...")
    peaks = measure_peaks(device, dtype, cfg, shape.length)
    table, prep_s = [], {n: 0.0 for n in names}
    for spec in a.kind_policies:
        label, policy = spec, parse_spec(spec)["policy"]
        a.progress(f"{family}: step kinds of {label} ({', '.join(names)}) ...")
        res, prep = backend_times(cfg, eng.weights, device, dtype, shape, policy, prompt, names, a.iters)
        ores = None
        if other is not None:
            ores, _ = backend_times(cfg, oeng.weights, device, other, shape, policy, prompt, ["eager"], a.iters)
        for n in names:
            prep_s[n] += prep[n]
        kmax = eng.prepared(shape, DecodeConfig.make(cfg.family).structure, policy).state.kmax
        best = {k: min(res[n][k] for n in names) for k in policy.kinds}
        for r in roofline_rows(cfg, shape, kmax, policy, dtype, best, peaks):
            k = r["kind"]
            cells = [f"{res[n][k] * 1e3:.2f}" + ("" if n == "eager" or "eager" not in res else
                                                 f" ({res['eager'][k] / res[n][k]:.2f}×)") for n in names]
            if ores:
                cells += [f"{ores['eager'][k] * 1e3:.2f}", f"{ores['eager'][k] / res['eager'][k]:.2f}×"]
            table.append(f"| {label} | {k} | " + " | ".join(cells) + f" | {r['gflop']:.2f} | {r['mb']:.0f} | "
                         f"{r['floor_ms']:.2f} ({r['bound']}) | {r['fraction']:.0%} |")
    ocols = [f"eager {oname} ms", f"{oname} / {name} (eager)"] if other is not None else []
    cols = [f"{n} ms" for n in names] + ocols + ["GFLOP", "MB moved", "floor ms", "of floor"]
    out += ["", f"Per step kind ({name}, median of {a.iters}; in brackets: speedup over eager; preparation s: " +
            ", ".join(f"{n} {prep_s[n]:.0f}" for n in names) + f"). Floor = max(GFLOP / matmul peak, bytes / "
            f"bandwidth) with {peaks.describe()} (`perf.roofline`); of floor = floor / the fastest backend's time:",
            "", "| policy | step kind | " + " | ".join(cols) + " |", "|---|---|" + "---|" * len(cols)] + table
    for mode in a.quantize:
        a.progress(f"{family}: step kinds with {mode} weights (eager) ...")
        out += quantized_section(family, a, device, dtype, eng, mode, shape, prompt, peaks)
    if device.type == "cuda":
        cache = eng.prepared(shape, DecodeConfig.make(cfg.family).structure, DllmCache(kp=100, kr=7, rho=0.25)).cache
        floor = weight_floor(eng.weights, device, cache)
        out += ["", floor.describe()[0].upper() + floor.describe()[1:] + "."]
    return out + [""]


def quantized_section(family: str, a, device, dtype, eng, mode: str, shape, prompt, peaks) -> list[str]:
    """Every step kind (eager) with weight-only `mode` weights beside the dense ones in the same dtype:
    ms, ratio, MB moved and the roofline floor of the quantized bytes (perf.roofline)."""
    qeng = preset_engine(family, a.preset, device=device, dtype=dtype, quantize=mode)
    cfg, quant, name = eng.cfg, Quantization(mode), str(dtype).replace("torch.", "")
    rows = []
    for spec in a.kind_policies:
        policy = parse_spec(spec)["policy"]
        base, _ = backend_times(cfg, eng.weights, device, dtype, shape, policy, prompt, ["eager"], a.iters)
        res, _ = backend_times(cfg, qeng.weights, device, dtype, shape, policy, prompt, ["eager"], a.iters)
        kmax = eng.prepared(shape, DecodeConfig.make(cfg.family).structure, policy).state.kmax
        dense = {r["kind"]: r for r in roofline_rows(cfg, shape, kmax, policy, dtype, base["eager"], peaks)}
        for r in roofline_rows(cfg, shape, kmax, policy, dtype, res["eager"], peaks, quant):
            d = dense[r["kind"]]
            rows.append(f"| {spec} | {r['kind']} | {d['ms']:.2f} | {r['ms']:.2f} | {d['ms'] / r['ms']:.2f}× | "
                        f"{d['mb']:.0f} | {r['mb']:.0f} | {r['floor_ms']:.2f} ({r['bound']}) | {r['fraction']:.0%} |")
    return ["", f"Weight-only {mode} (activations {name}, eager, median of {a.iters}): each kind against {name} "
            f"weights and against the floor of its quantized bytes:", "",
            f"| policy | step kind | {name} ms | {mode} ms | speedup | {name} MB | {mode} MB | {mode} floor ms | "
            f"of floor |", "|---|---|---|---|---|---|---|---|---|"] + rows


def report(a) -> str:
    device = torch.device(a.device)
    cmd = "python -m dllm.perf.report " + " ".join(a.argv)
    lines = [f"Measured on {machine()}, with `{cmd.strip()}`. Random weights (latency does not depend on "
             f"their values; token agreement does: see the notes below the tables).", ""]
    for fam in a.family:
        lines += family_section(fam, a, device)
    return "\n".join(lines)


def update_docs(text: str, readme: Path = ROOT / "docs" / "performance.md") -> None:
    src = readme.read_text()
    if BEGIN not in src or END not in src:
        raise SystemExit(f"{readme} has no {BEGIN} ... {END} section to update")
    head, rest = src.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    readme.write_text(f"{head}{BEGIN}\n{text}\n{END}{tail}")


def main(argv=None) -> int:
    import sys
    argv = sys.argv[1:] if argv is None else argv
    ap = argparse.ArgumentParser(prog="dllm bench", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--family", nargs="+", choices=["llada", "dream"], default=["llada", "dream"])
    ap.add_argument("--preset", choices=sorted(PRESETS) + sorted(SHAPE_PRESETS), default="small")
    ap.add_argument("--prompt-len", type=int, default=512)
    ap.add_argument("--gen-length", type=int, default=128)
    ap.add_argument("--steps", type=int, default=128)
    ap.add_argument("--block-length", type=int, default=32)
    ap.add_argument("--policies", nargs="+", default=DEFAULT_POLICIES, help="end to end; the first is the baseline")
    ap.add_argument("--kind-policies", nargs="+", default=KIND_POLICIES,
                    help="policies whose step kinds are timed per backend against their FLOP / byte floor")
    ap.add_argument("--dtype", choices=DTYPE_CHOICES, default="auto",
                    help="auto: bfloat16 where the device computes it natively, else float32 (as dllm generate)")
    ap.add_argument("--compare-dtype", choices=[*DTYPES, "none"], default="float32",
                    help="also time every policy and step kind (eager) in this dtype (skipped when it is --dtype)")
    ap.add_argument("--backends", nargs="*", default=None)
    ap.add_argument("--quantize", nargs="*", choices=["int8", "int4"], default=[],
                    help="also time every step kind (eager) with these weight-only quantizations")
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--update-docs", action="store_true", help="write the tables into docs/performance.md")
    a = ap.parse_args(argv)
    a.argv = [x for x in argv if x != "--update-docs"]
    a.progress = lambda msg: print(f"[dllm bench] {msg}", file=sys.stderr, flush=True)
    if a.preset in SHAPE_PRESETS and a.device != "cuda":
        ap.error(f"--preset {a.preset} has real dimensions: run it on a GPU (--device cuda)")
    text = report(a)
    print(text)
    if a.update_docs:
        update_docs(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
