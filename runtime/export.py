"""Export the step functions of one request shape as a self-contained package (docs/ARCHITECTURE.md,
"Export"). A top-layer module: it uses the runtime, nothing in the runtime uses it.

    dllm export --model DIR --out PKG --prompt-bucket 64 --gen-length 128 --steps 128 --block-length 32
                [--policy none|dllm-cache|d2cache|dual-cache ...] [--dtype ...] [--device ...]

PKG/steps.pt is one TorchScript module whose buffers are the weights and every piece of step state
(canvas, schedules, caches, the policy's scratch): the tensors of one runtime.prepared.Prepared. Its methods share those buffers: `fill(prompt [1, P],
n_pad [1])` loads a left-padded prompt, and one method per step kind (`full`, `partial`, ...) runs that
step in place. PKG/plan.json carries the shapes, ids and the step plan, so a host (graphs/cpp/dllm_run)
needs no Python: fill, call the plan's methods in order, read the `st_tokens` buffer.

The cache buffers live inside the module (not passed in) so a C++ host cannot get the aliasing wrong
and every method sees the same state; the cost is one package per shape. Greedy decoding only: the
sampling noise comes from a torch.Generator, which a traced graph cannot carry.

--format aoti writes the modern equivalent (TorchScript is deprecated since torch 2.11): PKG/aoti/
<kind>.pt2, one torch.export + AOTInductor package per step kind plus fill.pt2. AOTI packages cannot
share buffers, so there the state is the *input*: every program takes all state tensors (listed with
shape and dtype in PKG/state.txt) and updates them in place; the host allocates them once, zeroed, and
passes the same tensors to every call. fill also writes the static ones (schedules, kernels). The
weights are constants inside each program (one copy per step kind: fine for CPU-sized models).
"""
from __future__ import annotations

import json
import time
import warnings
from dataclasses import fields, replace
from pathlib import Path

import torch

from dllm import graphs
from dllm.models.checkpoint import Weights
from dllm.runtime.decoding import DecodeConfig, RequestError
from dllm.runtime.policy import NoCache
from dllm.runtime.prepared import Prepared, _tensors
from dllm.runtime.state import RequestShape

FORMATS = ("torchscript", "aoti")


def _step_module(tensors: dict[str, torch.Tensor], methods: dict) -> torch.nn.Module:
    """An nn.Module whose buffers are exactly `tensors` (the same objects the step closures use, so
    tracing records buffer accesses) and whose methods run the given zero-argument functions."""
    def method(fn):
        def run(self, *args):
            fn(*args)
            return self.st_step
        return run
    cls = type("DllmSteps", (torch.nn.Module,), {name: method(fn) for name, fn in methods.items()})
    mod = cls()
    for name, t in tensors.items():
        mod.register_buffer(name, t)
    return mod


def _rebind(obj, prefix: str, tensors: dict):
    """A copy of a buffers dataclass whose tensors are the given ones (by '<prefix>_<field>')."""
    if obj is None:
        return None
    return replace(obj, **{f.name: tensors[f"{prefix}_{f.name}"] for f in fields(obj)
                           if f"{prefix}_{f.name}" in tensors})


class _AotiProgram(torch.nn.Module):
    """forward(*extra, *state): runs one step kind (or fill) on state tensors passed in by the host."""

    def __init__(self, engine, prep: Prepared, kind: str, names: list[str]):
        super().__init__()
        self.engine_cfg, self.prep, self.kind, self.names = engine.cfg, prep, kind, names
        for name, t in _tensors("w", engine.weights).items():
            self.register_buffer(name, t)
        if kind == "fill":
            state = prep.tensors()
            for name in prep.static_names():
                self.register_buffer("init_" + name, state[name].clone())

    def forward(self, *args):
        extra = 2 if self.kind == "fill" else 0
        tensors = dict(zip(self.names, args[extra:]))
        p = self.prep
        view = replace(p, state=_rebind(p.state, "st", tensors), cache=_rebind(p.cache, "cache", tensors),
                       scratch=_rebind(p.scratch, "scratch", tensors))
        if self.kind == "fill":
            for name in p.static_names():
                tensors[name].copy_(getattr(self, "init_" + name))
            view.load(self.engine_cfg, args[0], args[1])
        else:
            w = Weights(**{f.name: getattr(self, "w_" + f.name, None) for f in fields(Weights)})
            p.policy.bodies(w, self.engine_cfg, view.state, view.cache, view.scratch)[self.kind]()
        return (tensors["st_step"] + 0,)


def _export_aoti(engine, prep: Prepared, kinds, out: Path, padded, n_pad) -> None:
    from torch._inductor import aoti_compile_and_package
    state = prep.tensors()
    names = list(state)
    (out / "aoti").mkdir(exist_ok=True)
    lines = [f"{n} {str(t.dtype).replace('torch.', '')} {' '.join(map(str, t.shape))}" for n, t in state.items()]
    (out / "state.txt").write_text("\n".join(lines) + "\n")
    for kind in ["fill", *kinds]:
        prog = _AotiProgram(engine, prep, kind, names)
        inputs = tuple(state[n] for n in names)
        args = (padded, n_pad, *inputs) if kind == "fill" else inputs
        ep = torch.export.export(prog, args, strict=False)
        aoti_compile_and_package(ep, package_path=str(out / "aoti" / f"{kind}.pt2"))
        prog(*args)                          # leave the state as after this kind, like a run would


def export(engine, out: str | Path, *, prompt_bucket: int, gen_length: int, steps: int,
           block_length: int | None = None, policy=None, remasking=None, alg=None,
           fmt: str = "torchscript") -> dict:
    """Write PKG/steps.pt and PKG/plan.json for one request shape; returns the plan."""
    if fmt not in FORMATS:
        raise RequestError(f"unknown export format {fmt!r}; choose one of {', '.join(FORMATS)}")
    cfg, policy = engine.cfg, policy or NoCache()
    dc = DecodeConfig.make(cfg.family, remasking, alg)
    if dc.random_per_row:
        raise RequestError("exported packages decode greedily; 'random' remasking and Dream's 'origin' alg "
                           "need a random generator the package cannot carry")
    shape = RequestShape(1, prompt_bucket, gen_length, block_length or gen_length, steps)
    engine._check_shape(shape)
    dev = engine.device
    prep = Prepared.allocate(engine.weights, cfg, shape, dc, policy, dev, engine.dtype)
    plan = policy.plan(steps, steps // shape.n_blocks)
    kinds = [k for k in policy.kinds if k in plan]
    tensors = {**_tensors("w", engine.weights), **prep.tensors()}
    mod = _step_module(tensors, {"fill": lambda padded, n_pad: prep.load(cfg, padded, n_pad),
                                 **{k: (lambda b: lambda _dummy: b())(prep.bodies[k]) for k in kinds}})

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    dummy = torch.zeros(1, device=dev)
    padded = torch.full((1, prompt_bucket), cfg.pad_id, dtype=torch.int64, device=dev)
    n_pad = torch.tensor([prompt_bucket - 1], device=dev)
    padded[0, -1] = 3 if cfg.mask_id != 3 else 4
    t0 = time.perf_counter()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")       # TorchScript is deprecated in torch >= 2.11 and says so per call
        if fmt == "aoti":
            _export_aoti(engine, prep, kinds, out, padded, n_pad)
        else:
            traced = torch.jit.trace_module(mod, {"fill": (padded, n_pad), **{k: (dummy,) for k in kinds}},
                                            check_trace=False)
            traced.save(str(out / "steps.pt"))
    info = {
        "format": fmt, "family": cfg.family, "batch": 1, "prompt_bucket": prompt_bucket,
        "gen_length": gen_length, "block_length": shape.block_length, "steps": steps,
        "vocab_size": cfg.vocab_size, "mask_id": cfg.mask_id, "pad_id": cfg.pad_id,
        "dtype": str(engine.dtype).replace("torch.", ""), "device": dev.type,
        "policy": {"name": policy.name, **policy.params()},
        "decoding": {"remasking": dc.remasking if cfg.family == "llada" else None,
                     "alg": dc.alg if cfg.family == "dream" else None},
        "kinds": kinds, "plan": plan, "tokens_buffer": "st_tokens", "export_seconds": time.perf_counter() - t0,
        "state_names": [n for n in tensors if not n.startswith("w_")] if fmt == "aoti" else None,
    }
    (out / "plan.json").write_text(json.dumps(info, indent=1))
    return info


def build_runner(build_dir: str | Path | None = None) -> Path:
    """Configure and build graphs/cpp/dllm_run against the libtorch inside the installed torch wheel;
    returns the binary. Incremental: a no-op when nothing changed."""
    import shutil
    import subprocess
    missing = [t for t in ("cmake", "c++") if shutil.which(t) is None]
    if missing:
        raise RuntimeError(f"no {' or '.join(missing)} on this machine: the C++ runner cannot be built")
    src = Path(graphs.__file__).resolve().parent / "cpp"
    build = Path(build_dir) if build_dir else src.parent.parent / "build" / "cpp"
    for cmd in (["cmake", "-S", str(src), "-B", str(build), f"-DCMAKE_PREFIX_PATH={torch.utils.cmake_prefix_path}",
                 "-DCMAKE_BUILD_TYPE=Release"], ["cmake", "--build", str(build), "-j2"]):
        res = subprocess.run(cmd, capture_output=True, text=True)
        if res.returncode:
            raise RuntimeError(f"{' '.join(cmd[:2])} failed:\n{res.stdout[-2000:]}{res.stderr[-2000:]}")
    return build / "dllm_run"


def load(pkg: str | Path):
    """(runnable, plan) of a package, for running it from Python."""
    pkg = Path(pkg)
    plan = json.loads((pkg / "plan.json").read_text())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if plan["format"] == "torchscript":
            return torch.jit.load(str(pkg / "steps.pt")), plan
        from torch._inductor import aoti_load_package
        progs = {k: aoti_load_package(str(pkg / "aoti" / f"{k}.pt2")) for k in ["fill", *plan["kinds"]]}
        dtypes = {"int64": torch.int64, "float32": torch.float32, "bool": torch.bool,
                  "bfloat16": torch.bfloat16, "float16": torch.float16}
        state = []
        for line in (pkg / "state.txt").read_text().splitlines():
            name, dtype, *dims = line.split()
            state.append(torch.zeros([int(x) for x in dims], dtype=dtypes[dtype]))
        return (progs, state), plan


def run(mod, plan: dict, prompt: list[int]) -> list[int]:
    """Generate with a loaded package from Python (the C++ runner does the same)."""
    P = plan["prompt_bucket"]
    padded = torch.full((1, P), plan["pad_id"], dtype=torch.int64)
    padded[0, P - len(prompt):] = torch.tensor(prompt)
    n_pad = torch.tensor([P - len(prompt)])
    with torch.no_grad():
        if plan["format"] == "aoti":
            progs, state = mod
            progs["fill"](padded, n_pad, *state)
            for kind in plan["plan"]:
                progs[kind](*state)
            return state[plan["state_names"].index("st_tokens")][0, P:].tolist()
        dummy = torch.zeros(1)
        mod.fill(padded, n_pad)
        for kind in plan["plan"]:
            getattr(mod, kind)(dummy)
        return mod.st_tokens[0, P:].tolist()
