"""The headline report for this machine (also `dllm bench`).

    python -m dllm.perf.report [--family llada dream] [--preset small] [--update-readme]

Per family, in one run: every policy's end-to-end seconds, tokens/s, speedup over NoCache and token
agreement with it (perf.e2e); every available backend's per-step latency and its ratio to eager
(perf.steps); on CUDA also the full step against the weights-only floor and the dLLM-Cache verify step
against the weights + cache floor (perf.steps.Floor). Prints Markdown;
--update-readme rewrites the README section between the perf.report markers with it.
"""
from __future__ import annotations

import argparse
import datetime
import platform
import re
from pathlib import Path

import torch

from dllm.graphs import available
from dllm.models.tiny import PRESETS, SHAPE_PRESETS
from dllm.runtime import DllmCache
from dllm.runtime.decoding import DecodeConfig
from dllm.runtime.state import RequestShape

from .e2e import policy_rows, preset_engine, random_prompt
from .steps import KINDS, backend_times, weight_floor

ROOT = Path(__file__).resolve().parent.parent
BEGIN, END = "<!-- perf.report:begin -->", "<!-- perf.report:end -->"
DEFAULT_POLICIES = ["none", "none:threshold=0.9", "dllm-cache:kp=100,kr=7,rho=0.25",
                    "dllm-cache:kp=50,kr=7,rho=0.25", "d2cache:k=32,attn_budget=32",
                    "d2cache:k=32,attn_budget=32,quasi_l2r=true", "dual-cache", "dual-cache:threshold=0.9"]


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
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    eng = preset_engine(family, a.preset, device=device, dtype=dtype)
    prompt = random_prompt(eng.cfg, a.prompt_len)
    kw = dict(gen_length=a.gen_length, steps=a.steps, block_length=a.block_length)
    out = [f"**{family}**, preset `{a.preset}` (layers {eng.cfg.n_layers}, d {eng.cfg.d_model}), P={a.prompt_len}, "
           f"G={a.gen_length}, {a.steps} steps, block {a.block_length}, {str(dtype).replace('torch.', '')}, "
           f"eager, median of {a.repeats}:", "",
           "| policy | seconds | tokens/s | speedup vs NoCache | agreement with NoCache | steps |",
           "|---|---|---|---|---|---|"]
    for r in policy_rows(eng, prompt, a.policies, a.repeats, **kw):
        out.append(f"| {r['policy']} | {r['seconds']:.3f} | {r['tok_s']:.1f} | {r['speedup']:.2f}× | "
                   f"{r['agree']:.1%} | {r['steps']} |")
    names = a.backends or available(device)
    shape = RequestShape(1, a.prompt_len, a.gen_length, a.block_length, a.steps)
    res, prep = backend_times(eng.cfg, eng.weights, device, dtype, shape, DllmCache(kp=100, kr=7, rho=0.25),
                              prompt, names, a.iters)
    out += ["", f"Per-step latency of the dllm-cache step kinds by backend (ms, median of {a.iters}; "
                f"in brackets: speedup over eager; preparation s: " +
            ", ".join(f"{n} {prep[n]:.0f}" for n in names) + "):", "",
            "| step kind | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for k in KINDS:
        cells = [f"{res[n][k] * 1e3:.2f}" + ("" if n == "eager" or "eager" not in res else
                                             f" ({res['eager'][k] / res[n][k]:.2f}×)") for n in names]
        out.append(f"| {k} | " + " | ".join(cells) + " |")
    if device.type == "cuda":
        cache = eng.prepared(shape, DecodeConfig.make(eng.cfg.family), DllmCache(kp=100, kr=7, rho=0.25)).cache
        floor = weight_floor(eng.weights, device, cache)
        out += ["", floor.describe()[0].upper() + floor.describe()[1:] + "; full step / weights-only floor: " +
                ", ".join(f"{n} {res[n]['full'] / floor.weights_s:.2f}×" for n in names) +
                "; verify step / weights + cache floor: " +
                ", ".join(f"{n} {res[n]['verify'] / floor.partial_s:.2f}×" for n in names)]
    return out + [""]


def report(a) -> str:
    device = torch.device(a.device)
    cmd = "python -m dllm.perf.report " + " ".join(a.argv)
    lines = [f"Measured on {machine()}, with `{cmd.strip()}`. Random weights (latency does not depend on "
             f"their values; token agreement does: see the notes below the tables).", ""]
    for fam in a.family:
        lines += family_section(fam, a, device)
    return "\n".join(lines)


def update_readme(text: str, readme: Path = ROOT / "README.md") -> None:
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
    ap.add_argument("--policies", nargs="+", default=DEFAULT_POLICIES)
    ap.add_argument("--backends", nargs="*", default=None)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--update-readme", action="store_true")
    a = ap.parse_args(argv)
    a.argv = [x for x in argv if x != "--update-readme"]
    if a.preset in SHAPE_PRESETS and a.device != "cuda":
        ap.error(f"--preset {a.preset} has real dimensions: run it on a GPU (--device cuda)")
    text = report(a)
    print(text)
    if a.update_readme:
        update_readme(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
