"""The first GPU run in one command (`make gpu-check`): everything this project has not measured yet.

    python -m dllm.perf.gpu_check [--budget-minutes 25] [--out gpu-check-<gpu>.md] [--families llada dream]

On a machine without CUDA it prints one line and exits 0. On a CUDA machine, in one run, printing
progress as it goes and appending every result to the report file (`gpu-check-<gpu>.md`) at once:

1. `pytest -m cuda tests`: the GPU tests (CUDA-graph replay = eager, efficient SDPA kernels, ...);
2. per family, at the real LLaDA-8B / Dream-7B shapes in bf16 (random weights made on the GPU; P=512,
   G=256, block 32): the SDPA kernel each step kind actually runs; the weight floors (weights only,
   weights + cache) and the compute floor (counted FLOPs / measured matmul FLOP/s); every step kind's
   latency on eager and cudagraph with capture seconds, against the floors; peak memory; end-to-end
   tokens/s of NoCache, dLLM-Cache, d2Cache and dual cache, with and without a threshold;
3. the regression baseline `perf/baselines/<gpu>.json` (the suite the GPU workflow gates on; an existing
   baseline is kept unless --force-baseline);
4. the compile backends (compile+cudagraph, then compile) per step kind, while the time budget lasts:
   what does not fit is listed as skipped, never silently dropped.
"""
from __future__ import annotations

import argparse
import re
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from dllm.models.tiny import SHAPE_PRESETS, random_weights
from dllm.runtime import POLICIES, Engine
from dllm.runtime.decoding import DecodeConfig
from dllm.runtime.state import RequestShape

from .e2e import policy_rows, random_prompt
from .regress import BASELINES, GateError, check_writable
from .steps import backend_times, device_flops, weight_floor

ROOT = Path(__file__).resolve().parent.parent
PRESET = {"llada": "llada-8b-shape", "dream": "dream-7b-shape"}
SHAPE = RequestShape(batch=1, prompt_bucket=512, gen_length=256, block_length=32, steps=256)
E2E_POLICIES = ["none", "none:threshold=0.9", "dllm-cache:kp=100,kr=7,rho=0.25",
                "dllm-cache:kp=100,kr=7,rho=0.25,threshold=0.9", "d2cache:k=32,attn_budget=32",
                "d2cache:k=32,attn_budget=32,threshold=0.9", "dual-cache", "dual-cache:threshold=0.9"]
# The suite the GPU workflow (.github/workflows/gpu-latency.yml) benchmarks and gates on: keep them equal.
GATE_SUITE = "--presets tiny,llada-8b-shape --backends eager,cudagraph --rounds 20"
FAST_BACKENDS = ("eager", "cudagraph")
COMPILE_BACKENDS = ("compile+cudagraph", "compile")
NO_GPU = "no GPU: gpu_check needs a CUDA device (torch.cuda.is_available() is False); nothing to measure here"


def slug(name: str) -> str:
    """'NVIDIA H100 80GB HBM3' -> 'nvidia-h100-80gb-hbm3' (report and baseline names)."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


@dataclass
class Report:
    """Prints each line and appends it to the report file at once, so an interrupted run keeps its results."""
    path: Path
    start: float = field(default_factory=time.perf_counter)

    def __post_init__(self):
        self.path.write_text("")

    def __call__(self, *lines: str) -> None:
        with self.path.open("a") as f:
            for line in lines:
                print(line, flush=True)
                f.write(line + "\n")

    def progress(self, what: str) -> None:
        print(f"[{(time.perf_counter() - self.start) / 60:5.1f} min] {what}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------- 1. the GPU tests

def cuda_tests(out: Report, timeout_s: int) -> None:
    out.progress("pytest -m cuda tests ...")
    cmd = [sys.executable, "-m", "pytest", "-q", "-m", "cuda", "-p", "no:cacheprovider", str(ROOT / "tests")]
    try:
        res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout_s)
        lines = (res.stdout + res.stderr).strip().splitlines()
        summary = lines[-1] if lines else "(no output)"
        failures = [line for line in lines if line.startswith(("FAILED", "ERROR"))]
    except subprocess.TimeoutExpired:
        summary, failures = f"timed out after {timeout_s} s", []
    out("## pytest -m cuda", "", f"`{' '.join(cmd[1:])}`: **{summary}**", *[f"- {f}" for f in failures], "")


# ---------------------------------------------------------------- 2. real shapes, fast backends

def sdpa_kernels(body) -> str:
    """The attention kernels one call of a step body runs (profiler op names, e.g. efficient / flash /
    math); the generic dispatcher entry is left out."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        body()
        torch.cuda.synchronize()
    names = {e.name.replace("aten::", "") for e in prof.events()
             if "attention" in e.name and e.name != "aten::scaled_dot_product_attention"}
    return ", ".join(sorted(names)) or "(none seen)"


def efficient_only(body) -> str:
    """Whether the body runs with SDPA restricted to the efficient kernels (a math fallback raises)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    try:
        with sdpa_kernel([SDPBackend.EFFICIENT_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.CUDNN_ATTENTION]):
            body()
            torch.cuda.synchronize()
        return "runs"
    except RuntimeError as e:
        return f"REFUSED ({str(e).splitlines()[0][:120]})"


def step_flops(body) -> int:
    from torch.utils.flop_counter import FlopCounterMode
    with FlopCounterMode(display=False) as fc:
        body()
    return fc.get_total_flops()


def kernels_and_flops(out: Report, eng: Engine, prompt) -> dict:
    """Per policy and kind: SDPA kernels, efficient-only check, counted FLOPs (one eager call each)."""
    dc, flops = DecodeConfig.make(eng.cfg.family).structure, {}
    out("| policy | kind | SDPA kernels | efficient kernels only | GFLOP |", "|---|---|---|---|---|")
    for name, cls in POLICIES.items():
        prep = eng.prepared(SHAPE, dc, cls())
        with torch.inference_mode():
            prep.fill(eng.cfg, [prompt], seed=0)
            for kind in cls.kinds:
                body = prep.bodies[kind]
                prep.state.rewind()
                kernels, eff = sdpa_kernels(body), efficient_only(body)
                prep.state.rewind()
                flops[(name, kind)] = step_flops(body)
                out(f"| {name} | {kind} | {kernels} | {eff} | {flops[(name, kind)] / 1e9:.0f} |")
    return flops


def latency_tables(out: Report, eng: Engine, prompt, names, iters: int, flops: dict, floor, peak_flops: float,
                   deadline: float | None = None) -> None:
    """Every step kind of every policy on the given backends: ms, capture/compile s, against the floors."""
    cfg = eng.cfg
    out("| policy | kind | backend | ms | prepare s | / weight floor | / compute floor |",
        "|---|---|---|---|---|---|---|")
    for name, cls in POLICIES.items():
        for backend in names:
            if deadline is not None and time.perf_counter() > deadline:
                out(f"| {name} | all | {backend} | skipped: time budget spent | | | |")
                continue
            out.progress(f"{cfg.family}: {name} on {backend} ...")
            try:
                res, prep = backend_times(cfg, eng.weights, eng.device, eng.dtype, SHAPE, cls(), prompt, [backend],
                                          iters)
            except Exception as e:                     # keep going: one failure must not cost the whole run
                out(f"| {name} | all | {backend} | FAILED: {type(e).__name__}: {str(e).splitlines()[0][:100]} "
                    f"| | | |")
                continue
            for kind, sec in res[backend].items():
                wf = floor.weights_s if kind == "full" else floor.partial_s
                cf = flops[(name, kind)] / peak_flops
                out(f"| {name} | {kind} | {backend} | {sec * 1e3:.2f} | {prep[backend]:.1f} | {sec / wf:.2f}× "
                    f"| {sec / cf:.2f}× |")
            torch.cuda.empty_cache()


def e2e_table(out: Report, eng: Engine, prompt) -> None:
    kw = dict(gen_length=SHAPE.gen_length, steps=SHAPE.steps, block_length=SHAPE.block_length,
              prompt_bucket=SHAPE.prompt_bucket)
    out(f"End to end on `{eng.backend}` (P={SHAPE.prompt_bucket}, G={SHAPE.gen_length}, {SHAPE.steps} steps, block "
        f"{SHAPE.block_length}, greedy, median of 1 after a warm-up; capture not timed):", "",
        "| policy | seconds | tokens/s | speedup vs NoCache | agreement with NoCache | steps |",
        "|---|---|---|---|---|---|")
    for r in policy_rows(eng, prompt, E2E_POLICIES, 1, **kw):
        out(f"| {r['policy']} | {r['seconds']:.3f} | {r['tok_s']:.1f} | {r['speedup']:.2f}× | {r['agree']:.1%} "
            f"| {r['steps']} |")


def family_engine(family: str, backend: str = "eager") -> Engine:
    cfg, weights = random_weights(family, SHAPE_PRESETS[PRESET[family]], torch.device("cuda"), torch.bfloat16)
    return Engine(cfg, weights, device="cuda", dtype=torch.bfloat16, backend=backend)


def family_section(out: Report, family: str, peak_flops: float, iters: int) -> None:
    out.progress(f"{family}: random {PRESET[family]} weights on the GPU ...")
    torch.cuda.reset_peak_memory_stats()
    eng = family_engine(family)
    prompt = random_prompt(eng.cfg, SHAPE.prompt_bucket)
    cache = eng.prepared(SHAPE, DecodeConfig.make(family).structure, POLICIES["dual-cache"]()).cache
    floor = weight_floor(eng.weights, eng.device, cache)
    out(f"## {family}: `{PRESET[family]}`, bf16, P={SHAPE.prompt_bucket}, G={SHAPE.gen_length}, block "
        f"{SHAPE.block_length}", "", floor.describe() + f"; compute peak {peak_flops / 1e12:.0f} TFLOP/s "
        f"(bf16 matmul, measured). Full steps are compared with the weights-only floor, partial steps with "
        f"weights + cache; compute floor = counted FLOPs / peak.", "")
    out.progress(f"{family}: SDPA kernels and FLOPs ...")
    flops = kernels_and_flops(out, eng, prompt)
    out("")
    latency_tables(out, eng, prompt, FAST_BACKENDS, iters, flops, floor, peak_flops)
    out("")
    out.progress(f"{family}: end to end (cudagraph) ...")
    e2e_table(out, Engine(eng.cfg, eng.weights, device="cuda", dtype=torch.bfloat16, backend="cudagraph"), prompt)
    out("", f"Peak GPU memory ({family}, everything above): {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB", "")


# ---------------------------------------------------------------- 3. the gate's baseline, 4. compile backends

def record_baseline(out: Report, name: str, force: bool, timeout_s: int) -> None:
    out.progress(f"recording perf/baselines/{name}.json ({GATE_SUITE}) ...")
    try:
        check_writable(BASELINES / f"{name}.json", force)
    except GateError as e:
        out("## Regression baseline", "", f"kept: {e}", "")
        return
    cmd = [sys.executable, "-m", "dllm.perf.regress", "--record", name, "--pytest-args", GATE_SUITE]
    if force:
        cmd.append("--force")
    try:
        rc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout_s).returncode
        verdict = "recorded: commit it" if rc == 0 else f"FAILED (exit {rc})"
    except subprocess.TimeoutExpired:
        verdict = f"timed out after {timeout_s} s"
    out("## Regression baseline", "", f"`{' '.join(cmd[1:])}`: perf/baselines/{name}.json {verdict}", "")


def compile_section(out: Report, family: str, peak_flops: float, iters: int, deadline: float) -> None:
    eng = family_engine(family)
    prompt = random_prompt(eng.cfg, SHAPE.prompt_bucket)
    cache = eng.prepared(SHAPE, DecodeConfig.make(family).structure, POLICIES["dual-cache"]()).cache
    floor = weight_floor(eng.weights, eng.device, cache)
    flops = {}
    dc = DecodeConfig.make(family).structure
    for name, cls in POLICIES.items():                  # FLOPs again (cheap), for the compute floor column
        prep = eng.prepared(SHAPE, dc, cls())
        with torch.inference_mode():
            prep.fill(eng.cfg, [prompt], seed=0)
            for kind in cls.kinds:
                prep.state.rewind()
                flops[(name, kind)] = step_flops(prep.bodies[kind])
    out(f"## {family}: compile backends (while the budget lasts)", "")
    latency_tables(out, eng, prompt, COMPILE_BACKENDS, iters, flops, floor, peak_flops, deadline)
    out("")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--families", nargs="+", choices=list(PRESET), default=list(PRESET))
    ap.add_argument("--budget-minutes", type=float, default=25.0,
                    help="the compile backends run only while the run is inside this budget")
    ap.add_argument("--iters", type=int, default=10, help="timed calls per step kind (median)")
    ap.add_argument("--out", default=None, help="report file (default: gpu-check-<gpu>.md in the current folder)")
    ap.add_argument("--force-baseline", action="store_true", help="replace an existing perf/baselines/<gpu>.json")
    a = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print(NO_GPU)
        return 0
    start = time.perf_counter()
    deadline = start + a.budget_minutes * 60
    gpu = torch.cuda.get_device_name()
    out = Report(Path(a.out or f"gpu-check-{slug(gpu)}.md"), start)
    out(f"# gpu_check on {gpu}", "", f"torch {torch.__version__}, CUDA {torch.version.cuda}, "
        f"{torch.cuda.get_device_properties(0).total_memory / 2**30:.0f} GiB; `python -m dllm.perf.gpu_check "
        f"{' '.join(argv if argv is not None else sys.argv[1:])}`".rstrip(), "")
    cuda_tests(out, timeout_s=360)
    peak = device_flops(torch.device("cuda"), torch.bfloat16)
    for family in a.families:
        family_section(out, family, peak, a.iters)
        torch.cuda.empty_cache()
    record_baseline(out, slug(gpu), a.force_baseline, timeout_s=900)
    for family in a.families:
        if time.perf_counter() > deadline:
            out(f"## {family}: compile backends", "", "skipped: time budget spent", "")
            continue
        compile_section(out, family, peak, a.iters, deadline)
        torch.cuda.empty_cache()
    out(f"Total {(time.perf_counter() - start) / 60:.1f} min. Report: {out.path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
