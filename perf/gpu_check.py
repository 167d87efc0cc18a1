"""The first GPU run in one bounded command (`make gpu-check`, docs/gpu.md): offline, every result in one folder.

    python -m dllm.perf.gpu_check [--out-dir DIR] [--budget-minutes 7.5] [--part NAME ...] [--dry-run]

A run is a list of parts. A part is a function below, run in its own process (`--child NAME`, started by
the orchestrator) with timeout = min(its cap, budget left); at the deadline its whole process group is
killed (pytest and compile workers included), what it wrote is kept, and the next part runs. A part that
raises, hangs or crashes is recorded with its traceback or its output's tail. The default parts, in order
of information per second:

  env           GPU, driver, torch / CUDA / library versions, the CUDA toolkit; the device answers
  correctness   the trained model, every perf.quality configuration (every step kind of every policy):
                CUDA eager, CUDA-graph replay and bf16 replay tokens against the CPU fp32 reference
  cuda-tests    pytest -m cuda (replay = eager, memory flat, eviction, SDPA kernels), compile and AOTI left out
  llada-8b      LLaDA-8B, then Dream-7B shapes in bf16 (random weights made on the GPU): every step kind on
  dream-7b      eager and cudagraph against its weight and compute floors, capture seconds, SDPA kernels;
                end-to-end tokens/s of the four policies; peak memory
  cpp-runner    apps/export/cpp built against this torch, and its tests
  aoti          an AOTInductor package exported on CUDA, run from Python and from the C++ runner
  compile-tiny  compile+cudagraph at tiny shapes: tokens against eager, latency and compile seconds per kind

Later invocations, never in the default: `--part baseline` (the GPU workflow's regression baseline, written
into the output folder), `--part compile-8b` (the compile backends at the 8B shapes) and `--part quantized`
(LLaDA-8B shapes with int8 and int4 weights beside bf16, every step kind against its quantized weight floor).

Into --out-dir (default $OUT, else gpu-check-out): report.md (rewritten as each part starts and ends),
results.json (every part's outcome, one row per measurement), log.txt (every part's whole output). The last
lines printed are the summary. --dry-run runs the same parts on the CPU with stand-ins (tiny shapes, eager
wherever a GPU backend would run, NOT RUN where only a GPU can answer): it proves the orchestration, not the
GPU numbers. Without a GPU and without --dry-run it prints one line and exits 0.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parent.parent
TRAINED = ROOT / "models" / "trained" / "arith-llada"
FAMILIES = ("llada", "dream")
PRESET = {"llada": "llada-8b-shape", "dream": "dream-7b-shape"}
E2E_SPECS = ("none", "dllm-cache:kp=100,kr=7,rho=0.25", "d2cache:k=32,attn_budget=32", "dual-cache")
TINY_SPECS = ("none", "dllm-cache:kp=4,kr=2,rho=0.25", "d2cache:k=4,attn_budget=4", "dual-cache")
# perf.quality's dllm-cache configurations all have kp a multiple of kr, so none runs prompt_refresh: this does.
PROMPT_REFRESH = [("dllm-cache kp 3 kr 2 rho 0.25", {"policy": "dllm-cache", "kp": 3, "kr": 2, "rho": 0.25})]
# Tests that belong to a later part (they compile or build): cuda-tests leaves them out.
LATER_TESTS = {"compile-tiny": "tests/test_backends.py::test_compile_cudagraph_matches_eager_tokens",
               "aoti": "tests/test_export.py::test_aoti_export_on_cuda_runs_on_cuda"}
# The suite the GPU workflow (.github/workflows/gpu-latency.yml) benchmarks and gates on: keep them equal.
GATE_SUITE = "--presets tiny,llada-8b-shape --backends eager,cudagraph --rounds 20"
NO_GPU = "no GPU: gpu_check needs a CUDA device (torch.cuda.is_available() is False); nothing to measure here"
BUDGET_MIN = {"gpu": 7.5, "dry-run": 3.0}   # GPU: 7.5 min + the install (< 30 s) hold one 10-minute command
MIN_PART_S = 5.0            # a part with less time than this left is NOT RUN (budget spent)
GRACE_S = 3.0               # between SIGTERM (the part dumps its tracebacks) and SIGKILL of its process group
NOT_RUN_EXIT = 3            # a part's exit status for "cannot run here"
LOG_LIMIT = 15 << 20        # log.txt stays under the 16 MiB a file may have to come back from a lent machine


def slug(name: str) -> str:
    """'NVIDIA H100 80GB HBM3' -> 'nvidia-h100-80gb-hbm3' (baseline names)."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def first_line(e: BaseException) -> str:
    return f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0][:160]}"


# ================================================================ what a part sees

class NotRun(Exception):
    """A part that cannot run here (no toolkit, a dry run): recorded as NOT RUN with the reason."""


@dataclass
class Ctx:
    """One part's process: where its rows go (a JSON line each, written at once, so a part killed at its
    deadline keeps what it measured), the output folder, and whether this is a CPU dry run."""
    part: str
    rows: Path
    out_dir: Path
    dry: bool
    written: list[dict] = field(default_factory=list)

    @property
    def device(self) -> str:
        return "cpu" if self.dry else "cuda"

    def row(self, table: str, **fields) -> None:
        r = {"part": self.part, "table": table, **fields}
        line = json.dumps(r, default=str)
        with self.rows.open("a") as f:
            f.write(line + "\n")
        print("row:", line, flush=True)
        self.written.append(r)

    def headline(self, text: str) -> None:
        self.row("headline", text=text)

    def table(self, name: str) -> list[dict]:
        return [r for r in self.written if r["table"] == name]


# ================================================================ env, correctness

def env(ctx: Ctx) -> None:
    import platform
    from importlib import metadata

    import torch

    from dllm.apps.export.build import cuda_root
    info = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda or "none"}
    for lib in ("triton", "transformers", "safetensors", "tokenizers", "numpy", "starlette", "uvicorn", "lm_eval"):
        try:
            info[lib] = metadata.version(lib)
        except metadata.PackageNotFoundError:
            info[lib] = "not installed"
    info.update({"cuda toolkit": str(cuda_root() or "not found"), "cmake": tool_version(["cmake", "--version"])})
    if ctx.dry:
        info.update(gpu="none (dry run on the CPU)", driver="-")
    else:
        p = torch.cuda.get_device_properties(0)
        smi = ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"]
        info.update(gpu=p.name, driver=tool_version(smi), memory=f"{p.total_memory / 2**30:.1f} GiB",
                    capability=f"{p.major}.{p.minor}",
                    gpus=torch.cuda.device_count(), cudnn=torch.backends.cudnn.version())
        assert int(torch.ones(1 << 20, device="cuda").sum()) == 1 << 20, "the GPU computed a wrong sum"
    for k, v in info.items():
        ctx.row("env", key=k, value=v)
    missing = [k for k, v in info.items() if v == "not installed"]
    ctx.headline(f"toolkit {info['cuda toolkit']} · {info['cmake']} · not installed: {', '.join(missing) or '-'}")


def tool_version(cmd: list[str]) -> str:
    try:
        return (subprocess.run(cmd, capture_output=True, text=True, timeout=30).stdout.strip().splitlines() or ["?"])[0]
    except (OSError, subprocess.TimeoutExpired):
        return "not found"


def correctness(ctx: Ctx) -> str | None:
    """Every perf.quality configuration on 16 held-out prompts (4 in a dry run; one padded batch): the
    tokens of the device's eager, graph and bf16 graph runs against the CPU fp32 reference (rows that
    differ) and exact-match accuracy. Graph replay must equal eager bit for bit (same device and dtype) and
    every step kind of every policy must have run; device against CPU is reported, not judged (float sums
    differ between devices: a near-tie may flip)."""
    import torch

    from dllm.models.train_tiny import GEN, held_out
    from dllm.runtime import POLICIES, Engine

    from .quality import CONFIGS, answer, configuration
    graph = "eager" if ctx.dry else "cudagraph"
    ref = Engine.from_pretrained(TRAINED, device="cpu", backend="eager")
    engines = {"cpu": ref, "eager": ref, "graph": ref} if ctx.dry else {   # dry: the reference stands in
        "cpu": ref, "eager": Engine.from_pretrained(TRAINED, device="cuda", backend="eager"),
        "graph": Engine.from_pretrained(TRAINED, device="cuda", backend=graph)}
    engines["bf16"] = Engine.from_pretrained(TRAINED, device=ctx.device, dtype=torch.bfloat16, backend=graph)
    examples = held_out(4 if ctx.dry else 16)
    prompts = [ref.encode(p + "\n") for p, _ in examples]
    shape = {"gen_length": GEN, "steps": GEN, "block_length": GEN, "prompt_bucket": max(map(len, prompts))}
    ran, bad, differ = {}, [], Counter()     # one bucket for every engine (graph backends would round it up)
    for label, options in CONFIGS + PROMPT_REFRESH:
        policy, opts = configuration(options)
        outs = {name: eng.generate(prompts, **{**shape, "policy": policy, **opts}) for name, eng in engines.items()}
        ran.setdefault(policy.name, set()).update(outs["graph"].step_kinds)
        tok = {name: out.tokens for name, out in outs.items()}
        pairs = {f"{a}≠{b}": sum(x != y for x, y in zip(tok[a], tok[b]))
                 for a, b in (("eager", "cpu"), ("graph", "eager"), ("graph", "cpu"), ("bf16", "cpu"))}
        acc = {f"acc_{n}": sum(answer(ref, ids) == want for ids, (_, want) in zip(tok[n], examples)) / len(examples)
               for n in ("cpu", "graph", "bf16")}
        differ.update(pairs)
        kinds = " ".join(f"{k}={n}" for k, n in outs["graph"].step_kinds.items())
        ctx.row("correctness", config=label, kinds=kinds, device=ctx.device, graph=graph, prompts=len(prompts),
                **pairs, **acc)
        if pairs["graph≠eager"]:
            bad.append(f"{label}: graph replay ≠ eager in {pairs['graph≠eager']} rows")
    bad += [f"{name}: step kinds {sorted(set(cls.kinds) - ran.get(name, set()))} never ran"
            for name, cls in POLICIES.items() if set(cls.kinds) - ran.get(name, set())]
    n = len(CONFIGS + PROMPT_REFRESH)
    ctx.headline(f"{n} configs × {len(prompts)} prompts on {ctx.device} {graph}: rows ≠ CPU fp32: eager "
                 f"{differ['eager≠cpu']}, graph {differ['graph≠cpu']}, bf16 {differ['bf16≠cpu']} of "
                 f"{n * len(prompts)}; graph ≠ eager {differ['graph≠eager']}")
    return "; ".join(bad) or None


# ================================================================ pytest inside a part

def run_pytest(ctx: Ctx, args: list[str]) -> tuple[int, Counter, list[str]]:
    """pytest in its own process, its output (full tracebacks, skip reasons) into this part's log, one row
    per test (a skip with its reason: never silent). Returns (exit status, outcome counts, skip reasons)."""
    import xml.etree.ElementTree as ET
    counts, skips = Counter(), []
    with tempfile.TemporaryDirectory() as tmp:
        xml = Path(tmp) / "junit.xml"
        cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rfEs", "--tb=long",
               f"--junitxml={xml}", *args]
        print("$", " ".join(cmd), flush=True)
        rc = subprocess.run(cmd, cwd=ROOT).returncode
        for case in ET.parse(xml).getroot().iter("testcase") if xml.exists() else []:
            bad = next((c for c in case if c.tag in ("failure", "error", "skipped")), None)
            outcome = {"failure": "failed", "error": "error", "skipped": "skipped"}.get(getattr(bad, "tag", None),
                                                                                        "passed")
            message = "" if bad is None else ((bad.get("message") or bad.text or "").strip().splitlines() or [""])[0]
            counts[outcome] += 1
            skips += [message] if outcome == "skipped" else []
            ctx.row("tests", test=f"{case.get('classname', '').replace('.', '/')}.py::{case.get('name')}",
                    outcome=outcome, seconds=float(case.get("time") or 0), message=message[:200])
    return rc, counts, skips


def tests_verdict(ctx: Ctx, rc: int, counts: Counter) -> str | None:
    said = ", ".join(f"{n} {k}" for k, n in counts.items()) or "no tests"
    failed = [r["test"] for r in ctx.table("tests") if r["outcome"] in ("failed", "error")]
    ctx.headline(said + (": " + ", ".join(failed) if failed else ""))
    return None if rc == 0 else f"pytest exit {rc}: {said}"


def cuda_tests(ctx: Ctx) -> str | None:
    if ctx.dry:   # stand-in: one CPU test and one CUDA test (skipped on a CPU), with the same flags
        args = ["tests/test_engine_limits.py::test_pool_release_drops_only_the_given_graphs",
                "tests/test_engine_limits.py::test_eviction_releases_captured_graphs"]
    else:
        args = ["-m", "cuda", *[f"--deselect={t}" for t in LATER_TESTS.values()], "tests"]
    return tests_verdict(ctx, *run_pytest(ctx, args)[:2])


# ================================================================ latency against the floors

def peaks(device: str, dtype) -> tuple[float, float]:
    """(copy bytes/s, matmul FLOP/s) measured now on `device`: the floors' denominators."""
    import torch

    from .roofline import best_seconds
    dev = torch.device(device)
    n, size = (8192, 2 << 30) if dev.type == "cuda" else (512, 64 << 20)
    with torch.inference_mode():
        a, b = torch.randn(n, n, device=dev, dtype=dtype), torch.randn(n, n, device=dev, dtype=dtype)
        src = torch.empty(size, dtype=torch.uint8, device=dev)
        dst = torch.empty_like(src)
        copy_s, matmul_s = best_seconds(dev, lambda: dst.copy_(src), 10), best_seconds(dev, lambda: a @ b, 10)
    return 2 * size / copy_s, 2 * n ** 3 / matmul_s


def sdpa_kernels(body) -> str:
    """The attention kernels one call of a step body dispatches to (efficient, flash, cudnn, math, ...).
    Call it outside inference_mode (SDPA is decomposed into its kernel above the watcher's level)."""
    from torch.utils._python_dispatch import TorchDispatchMode
    names = set()

    class Seen(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if "attention" in func.__name__:
                names.add(func.__name__.split(".")[0].lstrip("_"))
            return func(*args, **(kwargs or {}))
    with Seen():
        body()
    return ", ".join(sorted(names)) or "(none seen)"


def latencies(ctx: Ctx, family: str, tiny: bool, backends: tuple[str, ...], e2e_backend: str | None,
              quantize: str = "none") -> list[str]:
    """Every step kind of every policy (E2E_SPECS at the family's real shape in bf16; TINY_SPECS at a tiny
    one in fp32, and always in a dry run) on `backends`, one row each: ms, prepare (compile / capture)
    seconds, against the weight and compute floors; then end-to-end tokens/s on e2e_backend. A policy
    that fails is recorded and the next one runs. quantize: int8 / int4 weights (quantized on the device;
    the weight floor is then that of the quantized bytes), rows tagged with it. Returns what failed."""
    import traceback

    import torch

    from dllm.models.quant import Quantization, quantize_weights
    from dllm.models.tiny import PRESETS, SHAPE_PRESETS, random_weights
    from dllm.runtime import Engine
    from dllm.runtime.decoding import DecodeConfig
    from dllm.runtime.options import parse_spec
    from dllm.runtime.state import RequestShape

    from .e2e import policy_rows, random_prompt
    from .roofline import kind_cost
    from .steps import Floor, backend_times, nbytes
    tiny = tiny or ctx.dry
    preset, specs = (PRESETS["tiny"], TINY_SPECS) if tiny else (SHAPE_PRESETS[PRESET[family]], E2E_SPECS)
    shape = RequestShape(1, 16, 16, 8, 16) if tiny else RequestShape(1, 512, 256, 32, 256)
    dtype, iters = (torch.float32, 3) if tiny else (torch.bfloat16, 10)
    cfg, weights = random_weights(family, preset, torch.device(ctx.device), dtype)
    weights = quantize_weights(weights, cfg, Quantization(quantize), dtype)
    tag = {} if quantize == "none" else {"quantize": quantize}
    prompt = random_prompt(cfg, shape.prompt_bucket)
    bandwidth, flops = peaks(ctx.device, dtype)
    weight_bytes = nbytes(t for n, t in weights.tensors().items() if n != "embed")
    ctx.row("peaks", **tag, family=family, shape=f"{'tiny' if tiny else PRESET[family]} P={shape.prompt_bucket} "
            f"G={shape.gen_length} block {shape.block_length}", dtype=str(dtype)[6:], copy_gb_s=bandwidth / 1e9,
            matmul_tflop_s=flops / 1e12, weight_gb=weight_bytes / 1e9)
    eng, failed = Engine(cfg, weights, device=ctx.device, dtype=dtype, backend="eager"), []
    for spec in specs:
        policy = parse_spec(spec)["policy"]
        try:
            with torch.no_grad():        # not inference_mode: there SDPA reaches the watcher undecomposed
                prep = eng.prepared(shape, DecodeConfig.make(family).structure, policy)
                prep.fill(cfg, [prompt], seed=0)
                kernels = {}
                for kind in policy.kinds:                        # capture order: the full step writes the caches
                    prep.state.rewind()
                    kernels[kind] = sdpa_kernels(prep.bodies[kind])
            floor = Floor(weight_bytes, nbytes(prep.cache.tensors().values()) if prep.cache else 0, bandwidth)
            kmax = prep.state.kmax
            times, prepare_s = backend_times(cfg, weights, eng.device, dtype, shape, policy, prompt, list(backends),
                                             iters)
        except Exception as e:                                   # one policy's OOM or capture error: the next runs
            traceback.print_exc()
            ctx.row("latency", **tag, family=family, policy=spec, error=first_line(e))
            failed.append(f"{family} {spec}: {first_line(e)}")
            continue
        finally:
            eng.free()
        for b in backends:
            for kind, sec in times[b].items():
                wf = floor.weights_s if kind == "full" else floor.partial_s
                cf = kind_cost(cfg, shape, kmax, policy, kind, dtype).flops / flops
                ctx.row("latency", **tag, family=family, policy=spec, kind=kind, backend=b, ms=sec * 1e3,
                        prepare_s=prepare_s[b], weight_floor_ms=wf * 1e3, x_weight_floor=sec / wf,
                        compute_floor_ms=cf * 1e3, x_compute_floor=sec / cf, sdpa=kernels[kind])
    if e2e_backend:
        try:
            e2e = Engine(cfg, weights, device=ctx.device, dtype=dtype, backend=e2e_backend)
            for r in policy_rows(e2e, prompt, list(specs), 1, gen_length=shape.gen_length, steps=shape.steps,
                                 block_length=shape.block_length, prompt_bucket=shape.prompt_bucket):
                ctx.row("e2e", family=family, policy=r["policy"], backend=e2e_backend, seconds=r["seconds"],
                        tok_s=r["tok_s"], speedup=r["speedup"], agree=r["agree"], steps=r["steps"])
        except Exception as e:
            traceback.print_exc()
            ctx.row("e2e", family=family, error=first_line(e))
            failed.append(f"{family} end to end: {first_line(e)}")
    return failed


def family_part(ctx: Ctx, family: str) -> str | None:
    import torch
    if ctx.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    backends = ("eager",) if ctx.dry else ("eager", "cudagraph")
    failed = latencies(ctx, family, False, backends, backends[-1])
    if family == "llada":
        tp_rows(ctx)
    peak = torch.cuda.max_memory_allocated() / 2**30 if ctx.device == "cuda" else None      # CPU: not measured
    ctx.row("memory", family=family, peak_gib=peak)
    full = {r["backend"]: r for r in ctx.table("latency") if r.get("kind") == "full" and r["policy"] == "none"}
    tok = ", ".join(f"{r['policy'].split(':')[0]} {r['tok_s']:.0f}" for r in ctx.table("e2e") if "tok_s" in r)
    r, ms = full.get(backends[-1]), " / ".join(f"{x['ms']:.1f}" for x in full.values())
    ctx.headline((f"full {ms} ms {' / '.join(full)} ({r['x_weight_floor']:.2f}× weight, {r['x_compute_floor']:.2f}× "
                  f"compute floor) · " if r else "") + f"tok/s {tok or '-'}"
                 + (f" · peak {peak:.1f} GiB" if peak is not None else ""))
    return "; ".join(failed) or None


def tp_rows(ctx: Ctx) -> None:
    """The tensor-parallel prediction of perf.roofline for LLaDA-8B with the peaks this part measured and
    NVLink's nominal bandwidth: what each rank of a node of this GPU should reach (docs/parallel.md). The
    two-rank run itself is a CUDA test (tests/test_parallel.py), run by cuda-tests where there are 2 GPUs."""
    from .roofline import NOMINAL, tp_prediction
    p = ctx.table("peaks")[-1]
    link = NOMINAL["H200"][2]
    for (name, kind), seconds in tp_prediction(p["matmul_tflop_s"] * 1e12, p["copy_gb_s"] * 1e9, link).items():
        ms = {f"tp{n}_ms": t * 1e3 for n, t in zip((1, 2, 4, 8), seconds)}
        ctx.row("tp-prediction", policy=name, kind=kind, **ms)


def quantized_part(ctx: Ctx) -> str | None:
    """LLaDA-8B shapes, weight-only int8 and int4 (CUDA packing) beside bf16: every step kind on eager and
    cudagraph against the floor of its own weight bytes (halved / about quartered), peak memory per mode;
    the headline is the full step's ms per mode and its ratio to the bf16 row measured in this part."""
    import torch
    backends = ("eager",) if ctx.dry else ("eager", "cudagraph")
    failed, peaks_gib = [], {}
    for mode in ("none", "int8", "int4"):
        if ctx.device == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        failed += latencies(ctx, "llada", False, backends, None, quantize=mode)
        peaks_gib[mode] = torch.cuda.max_memory_allocated() / 2**30 if ctx.device == "cuda" else None
        ctx.row("memory", quantize=mode, family="llada", peak_gib=peaks_gib[mode])
    full = {r.get("quantize", "none"): r for r in ctx.table("latency")
            if r.get("kind") == "full" and r["policy"] == "none" and r["backend"] == backends[-1]}
    if "none" in full:
        base = full["none"]["ms"]
        ctx.headline(" · ".join(f"{'bf16' if m == 'none' else m} full {r['ms']:.2f} ms ({base / r['ms']:.2f}× bf16, "
                                f"{r['x_weight_floor']:.2f}× its weight floor)" for m, r in full.items()))
    return "; ".join(failed) or None


def compile_part(ctx: Ctx, tiny: bool) -> str | None:
    """compile-tiny: compile+cudagraph against cudagraph at tiny shapes (and its tokens against eager);
    compile-8b: both compile backends at the real shapes."""
    failed = []
    if tiny and not ctx.dry and run_pytest(ctx, [LATER_TESTS["compile-tiny"]])[0]:
        failed.append("compile+cudagraph tokens ≠ eager (pytest)")
    backends = (("eager",) if ctx.dry else ("cudagraph", "compile+cudagraph") if tiny
                else ("compile+cudagraph", "compile"))
    for b in backends:                  # the quicker backend first, for both families: a deadline cuts the slower
        for family in FAMILIES:
            failed += latencies(ctx, family, tiny, (b,), None)
    key = lambda r: (r["family"], r["policy"], r["kind"])  # noqa: E731
    first = {key(r): r["ms"] for r in ctx.table("latency") if r.get("backend") == backends[0]}
    last = [r for r in ctx.table("latency") if r.get("backend") == backends[-1]]
    ratio = [r["ms"] / first[key(r)] for r in last if key(r) in first]
    ctx.headline(f"{len(last)} step kinds on {backends[-1]}" + (f": {statistics.geometric_mean(ratio):.2f}× the time "
                 f"on {backends[0]} (geometric mean)" if len(backends) > 1 and ratio else "") + ", prepare "
                 f"{sum(r['prepare_s'] for r in last if r['kind'] == 'full'):.0f} s in all")
    return "; ".join(failed) or None


# ================================================================ export, baseline

def cpp_runner(ctx: Ctx) -> str | None:
    import shutil
    if ctx.dry:
        raise NotRun("dry run: the C++ build takes minutes on 2 cores (tests/test_export.py builds and runs it)")
    if shutil.which("cmake") is None or shutil.which("c++") is None:
        raise NotRun("no cmake or no c++ on this machine: the C++ runner cannot be built")
    from dllm.apps.export import build_runner
    t0 = time.perf_counter()
    ctx.row("runner", binary=str(build_runner()), build_s=time.perf_counter() - t0)
    rc, counts, _ = run_pytest(ctx, ["tests/test_export.py", "tests/test_perf_smoke.py", "-k",
                                     "test_cpp_runner_matches_python or test_cpp_vs_python_prints_ratios"])
    return tests_verdict(ctx, rc, counts)


def aoti(ctx: Ctx) -> str | None:
    if ctx.dry:
        raise NotRun("dry run: an AOTInductor package for CUDA needs a GPU and nvcc")
    from dllm.apps.export import check_cuda_toolkit
    from dllm.runtime import RequestError
    try:
        check_cuda_toolkit()
    except RequestError as e:
        raise NotRun(str(e)) from None
    rc, counts, skips = run_pytest(ctx, [LATER_TESTS["aoti"]])
    if rc == 0 and counts["skipped"] and not counts["passed"]:
        raise NotRun(f"skipped: {skips[0]}")
    return tests_verdict(ctx, rc, counts)


def baseline(ctx: Ctx) -> str | None:
    if ctx.dry:
        raise NotRun("dry run: a latency baseline is a GPU recording")
    import torch

    from .regress import record
    name = slug(torch.cuda.get_device_name())
    rc = record(name, GATE_SUITE, force=True, folder=ctx.out_dir)
    ctx.row("baseline", file=str(ctx.out_dir / f"{name}.json"), exit=rc)
    ctx.headline(f"{name}.json written: commit it as perf/baselines/{name}.json" if rc == 0 else f"exit {rc}")
    return None if rc == 0 else f"the benchmark suite exited {rc}"


# ================================================================ faults (dry run only): what the tests prove

def fault_raise(ctx: Ctx) -> None:
    ctx.row("fault", wrote="before raising")
    raise RuntimeError("a part that raises (dry-run fault)")


def fault_hang(ctx: Ctx) -> None:
    worker = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])   # as a compile worker
    ctx.row("fault", worker_pid=worker.pid)
    time.sleep(600)


def fault_poison(ctx: Ctx) -> None:
    import ctypes
    ctx.row("fault", wrote="before the crash")
    ctypes.string_at(0)          # a crash in native code, the way a poisoned CUDA context can end a process


@dataclass(frozen=True)
class Part:
    run: Callable[[Ctx], str | None]    # returns what failed (None: passed); raises NotRun
    cap_s: float                        # its most seconds (the budget left may cut it shorter)


PARTS = {
    "env": Part(env, 60), "correctness": Part(correctness, 90), "cuda-tests": Part(cuda_tests, 150),
    "llada-8b": Part(lambda ctx: family_part(ctx, "llada"), 150),
    "dream-7b": Part(lambda ctx: family_part(ctx, "dream"), 150),
    "cpp-runner": Part(cpp_runner, 150), "aoti": Part(aoti, 150),
    "compile-tiny": Part(lambda ctx: compile_part(ctx, tiny=True), 240),
    "quantized": Part(quantized_part, 420),
    "baseline": Part(baseline, 570), "compile-8b": Part(lambda ctx: compile_part(ctx, tiny=False), 570),
    "fault-raise": Part(fault_raise, 60), "fault-hang": Part(fault_hang, 6), "fault-poison": Part(fault_poison, 60),
}
DEFAULT = ("env", "correctness", "cuda-tests", "llada-8b", "dream-7b", "cpp-runner", "aoti", "compile-tiny")
FAULTS = ("fault-raise", "fault-hang", "fault-poison")


def child(name: str, rows: Path, out_dir: Path, dry: bool) -> int:
    """One part in this process: exit 0 PASS, 1 FAIL (an exception prints its traceback), NOT_RUN_EXIT."""
    import faulthandler
    faulthandler.register(signal.SIGTERM, chain=True)     # killed at its deadline: where every thread was
    ctx = Ctx(name, rows, out_dir, dry)
    try:
        failure = PARTS[name].run(ctx)
    except NotRun as e:
        ctx.row("not run", why=str(e))
        print(f"NOT RUN: {e}", flush=True)
        return NOT_RUN_EXIT
    if failure:
        print(f"FAILED: {failure}", flush=True)
        return 1
    return 0


# ================================================================ the orchestrator

@dataclass
class Outcome:
    """One part as the orchestrator saw it."""
    part: str
    status: str = "NOT RUN"      # PASS | FAIL | TIMED OUT | NOT RUN (RUNNING while it runs)
    why: str = "not reached"
    headline: str = ""
    seconds: float = 0.0
    timeout_s: float = 0.0
    tail: str = ""               # the end of its output (FAIL, TIMED OUT)
    rows: list[dict] = field(default_factory=list)


def stop(p: subprocess.Popen) -> None:
    """End a part's whole process group (its pytest, compile workers, anything it started): SIGTERM, so
    the part dumps its tracebacks, then SIGKILL."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(p.pid, sig)
        except (ProcessLookupError, PermissionError):
            break
        try:
            p.wait(GRACE_S)
        except subprocess.TimeoutExpired:
            pass
    p.wait()


def run_part(o: Outcome, timeout: float, log: Path, scratch: Path, out_dir: Path, dry: bool) -> None:
    rows_file = scratch / f"{o.part}.jsonl"
    cmd = [sys.executable, "-X", "faulthandler", "-m", "dllm.perf.gpu_check", "--child", o.part,
           "--rows", str(rows_file), "--out-dir", str(out_dir)] + (["--dry-run"] if dry else [])
    # A dry run's tiny shapes gain nothing from threads, and on a busy CPU OpenMP's spin-waiting makes them
    # tens of times slower: one thread each.
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **({"OMP_NUM_THREADS": "1"} if dry else {})}
    o.timeout_s = timeout
    with log.open("a") as f:
        f.write(f"\n===== part {o.part}: timeout {timeout:.0f} s =====\n")
        f.flush()
        start, t0 = f.tell(), time.perf_counter()
        p = subprocess.Popen(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, start_new_session=True, env=env)
        try:
            rc = p.wait(timeout)
        except subprocess.TimeoutExpired:
            rc = None
        except BaseException:                    # gpu_check itself stopped (SIGTERM, Ctrl-C): end the part too
            o.status, o.why = "FAIL", "interrupted: gpu_check itself was stopped"
            raise
        finally:
            stop(p)
            o.seconds = time.perf_counter() - t0
    with log.open("rb") as f:
        f.seek(start)
        lines = [s for s in f.read().decode(errors="replace").splitlines() if s.strip() and not s.startswith("row: ")]
    rows = []
    for line in rows_file.read_text().splitlines() if rows_file.exists() else []:
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:             # a line cut by the kill
            pass
    o.rows = [r for r in rows if r["table"] not in ("headline", "not run")]
    o.headline = next((r["text"] for r in reversed(rows) if r["table"] == "headline"), "")
    if rc is None:
        o.status, o.why = "TIMED OUT", f"killed at {timeout:.0f} s (cap {PARTS[o.part].cap_s:.0f} s){where(lines)}"
    elif rc == 0:
        o.status = "PASS"
    elif rc == NOT_RUN_EXIT:
        o.status, o.why = "NOT RUN", next((r["why"] for r in rows if r["table"] == "not run"), "")
    else:
        o.status = "FAIL"
        o.why = f"killed by {signal.Signals(-rc).name}{where(lines)}" if rc < 0 else lines[-1][:200] if lines else ""
    o.tail = "\n".join(lines[-40:]) if o.status in ("FAIL", "TIMED OUT") else ""
    with log.open("a") as f:
        f.write(f"===== part {o.part}: {o.status} in {o.seconds:.1f} s {o.why} =====\n")
    if log.stat().st_size > LOG_LIMIT:           # keep its first MiB and its end
        data = log.read_bytes()
        log.write_bytes(data[:1 << 20] + b"\n[... cut ...]\n" + data[-(LOG_LIMIT - (2 << 20)):])


def where(lines: list[str]) -> str:
    """' in FUNCTION (FILE:LINE)': the innermost frame in this repository of the traceback faulthandler
    dumped last (at SIGTERM, or at a crash); '' without one."""
    dump = "\n".join(lines).rsplit("Current thread", 1)
    for path, line, fn in re.findall(r'File "([^"]+)", line (\d+) in (\S+)', dump[1] if len(dump) == 2 else ""):
        if Path(path).is_relative_to(ROOT):
            return f" in {fn} ({Path(path).relative_to(ROOT)}:{line})"
    return ""


@dataclass
class Run:
    command: str
    mode: str                    # gpu | dry-run
    budget_s: float
    out_dir: str
    outcomes: list[Outcome]
    used_s: float = 0.0

    def env(self) -> dict:
        return {r["key"]: r["value"] for o in self.outcomes for r in o.rows if r["table"] == "env"}


def cell(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        v = f"{v:.0f}" if abs(v) >= 1000 else f"{v:.3g}"
    return str(v).replace("|", "\\|").replace("\n", " ")


def table(rows: list[dict]) -> list[str]:
    cols = list(dict.fromkeys(k for r in rows for k in r if k not in ("part", "table")))
    return (["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
            + ["| " + " | ".join(cell(r.get(c, "")) for c in cols) + " |" for r in rows])


def summary(run: Run) -> list[str]:
    e = run.env()
    mode = ("DRY RUN on the CPU (stand-ins: tiny shapes, eager for every backend; not GPU numbers)"
            if run.mode == "dry-run" else f"on {e.get('gpu', '? (env did not report)')}")
    lines = [f"== gpu_check {mode} ==",
             " · ".join(f"{k} {e.get(k, '?')}" for k in ("gpu", "driver", "memory", "torch", "cuda", "triton", "python")
                        if k in e or k in ("gpu", "torch")),
             f"budget {run.budget_s / 60:.1f} min, used {run.used_s / 60:.1f} min · {run.out_dir}: "
             f"report.md results.json log.txt"]
    lines += [f"{o.part:<13} {o.status:<9} {o.seconds:>4.0f} s  {' · '.join(t for t in (o.why, o.headline) if t)}"[:200]
              for o in run.outcomes]
    n = Counter(o.status for o in run.outcomes)
    return lines + ["== " + " · ".join(f"{n[s]} {s}" for s in ("PASS", "FAIL", "TIMED OUT", "NOT RUN")) + " =="]


def write(run: Run, out_dir: Path) -> None:
    """report.md and results.json as they stand now (each written whole: a stopped run keeps them)."""
    md = [f"# gpu_check: {run.env().get('gpu', '?')}", "",
          f"`{run.command}` · {run.mode} · budget {run.budget_s / 60:.1f} min · used {run.used_s / 60:.1f} min", "",
          "| part | status | seconds | why | headline |", "|---|---|---|---|---|"]
    md += [f"| {o.part} | {o.status} | {o.seconds:.0f} | {cell(o.why)} | {cell(o.headline)} |" for o in run.outcomes]
    for o in run.outcomes:
        md += ["", f"## {o.part}: {o.status} ({o.seconds:.0f} s of {o.timeout_s:.0f} s)"]
        md += [line for t in (o.why, o.headline) if t for line in ("", t)]
        for name in dict.fromkeys(r["table"] for r in o.rows):
            md += ["", f"### {name}", "", *table([r for r in o.rows if r["table"] == name])]
        md += ["", "Output's end (all of it in log.txt):", "", "```text", o.tail, "```"] if o.tail else []
    md += ["", "## Summary", "", "```text", *summary(run), "```", ""]
    results = {**{k: v for k, v in asdict(run).items() if k != "outcomes"}, "env": run.env(),
               "parts": [{k: v for k, v in asdict(o).items() if k != "rows"} for o in run.outcomes],
               "rows": [r for o in run.outcomes for r in o.rows]}
    for name, text in (("report.md", "\n".join(md)), ("results.json", json.dumps(results, indent=1))):
        tmp = out_dir / f".{name}.part"
        tmp.write_text(text)
        tmp.replace(out_dir / name)


def orchestrate(names: list[str], out_dir: Path, budget_s: float, dry: bool, command: str) -> int:
    out_dir.mkdir(parents=True, exist_ok=True)
    log = out_dir / "log.txt"
    log.write_text(f"$ {command}\n")
    run = Run(command, "dry-run" if dry else "gpu", budget_s, str(out_dir), [Outcome(n) for n in names])
    start = time.perf_counter()
    clock = lambda: f"[{(time.perf_counter() - start) / 60:4.1f} min]"  # noqa: E731
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))   # stopped: still report
    try:
        with tempfile.TemporaryDirectory() as scratch:
            for o in run.outcomes:
                left = start + budget_s - time.perf_counter()
                if left < MIN_PART_S:
                    o.why = f"budget spent ({max(left, 0):.0f} s left of {budget_s:.0f} s)"
                    continue
                o.status, o.why = "RUNNING", ""
                write(run, out_dir)
                print(f"{clock()} {o.part} ...", file=sys.stderr, flush=True)
                run_part(o, min(PARTS[o.part].cap_s, left), log, Path(scratch), out_dir, dry)
                print(f"{clock()} {o.part}: {o.status} {o.why}".rstrip(), file=sys.stderr, flush=True)
                run.used_s = time.perf_counter() - start
    finally:
        run.used_s = time.perf_counter() - start
        write(run, out_dir)
        print("\n".join(summary(run)), flush=True)
    return 1 if any(o.status in ("FAIL", "TIMED OUT") for o in run.outcomes) else 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out-dir", default=None, help="for everything (default: $OUT when set, else gpu-check-out)")
    ap.add_argument("--budget-minutes", type=float, default=None,
                    help=f"wall time for all parts (default {BUDGET_MIN['gpu']}; dry run {BUDGET_MIN['dry-run']})")
    ap.add_argument("--part", nargs="+", choices=list(PARTS), default=None, metavar="NAME",
                    help=f"the parts to run, in order (default: {' '.join(DEFAULT)}); later: baseline, compile-8b, "
                         f"quantized")
    ap.add_argument("--dry-run", action="store_true", help="every part on the CPU with stand-ins (no GPU needed)")
    ap.add_argument("--child", choices=list(PARTS), help=argparse.SUPPRESS)    # one part, in this process
    ap.add_argument("--rows", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    out_dir = Path(a.out_dir or os.environ.get("OUT") or "gpu-check-out").resolve()
    if a.child:
        return child(a.child, Path(a.rows), out_dir, a.dry_run)
    names = a.part or list(DEFAULT)
    if not a.dry_run and set(names) & set(FAULTS):
        ap.error(f"{', '.join(sorted(set(names) & set(FAULTS)))}: the fault parts run only with --dry-run")
    if not a.dry_run:
        import torch
        if not torch.cuda.is_available():
            print(NO_GPU)
            return 0
        from dllm.apps.export.build import cuda_root
        root = cuda_root()                       # one toolkit for every part (AOTI's nvcc, the runner's CMake)
        if root is not None and not os.environ.get("CUDA_HOME"):
            os.environ["CUDA_HOME"] = str(root)
    budget = 60 * (a.budget_minutes if a.budget_minutes is not None else BUDGET_MIN["dry-run" if a.dry_run else "gpu"])
    command = " ".join(["python -m dllm.perf.gpu_check", *(argv if argv is not None else sys.argv[1:])])
    return orchestrate(names, out_dir, budget, a.dry_run, command)


if __name__ == "__main__":
    raise SystemExit(main())
