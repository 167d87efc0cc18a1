"""Writing export packages: the step functions of one request shape as a self-contained package
(docs/ARCHITECTURE.md, "Export"). A face: it uses the runtime, nothing in the runtime uses it.

    dllm export --model DIR --out PKG --prompt-bucket 64 --gen-length 128 --steps 128 --block-length 32
                [--policy none|dllm-cache|d2cache|dual-cache ...] [--dtype ...] [--device ...] [--force]

PKG/steps.pt is one TorchScript module whose buffers are the weights and every piece of step state
(canvas, schedules, caches, the policy's scratch): the tensors of one runtime.prepared.Prepared. Its
methods share those buffers: `fill(prompt [1, P],
n_pad [1])` loads a left-padded prompt, and one method per step kind (`full`, `verify`, `block`, ...) runs that
step in place. PKG/plan.json carries the shapes, ids and the step plan, so a host (apps/export/cpp/dllm_run)
needs no Python: fill, call the plan's methods in order, read the `st_tokens` buffer.

The cache buffers live inside the module (not passed in) so a C++ host cannot get the aliasing wrong
and every method sees the same state; the cost is one package per shape. Greedy decoding only: the
sampling noise comes from a torch.Generator, which a traced graph cannot carry.

--format aoti writes the modern equivalent (TorchScript is deprecated since torch 2.11): PKG/aoti/
<kind>.pt2, one torch.export + AOTInductor package per step kind plus fill.pt2. AOTI packages cannot
share buffers, so the weights and the state are *inputs*: every step program takes the weights (stored
once, in PKG/weights.safetensors, listed in plan.json "weights") and then all state tensors (listed with
shape and dtype in PKG/state.txt) and updates the state in place; the host loads the weights once,
allocates the state once, zeroed, on the plan's device, and passes the same tensors to every call. fill
takes (padded, n_pad, *state) and also writes the static state (schedules, kernels). So a package holds
one copy of the weights whatever the number of step kinds.

Every package carries PKG/manifest.txt: the sha256 of every other file. Both loaders (`load` here and
dllm_run) check it and validate plan.json and state.txt against each other and against the programs
before running anything; a package that fails is refused with one line (PackageError / exit 2). A
package contains native code (AOTI: shared libraries that are loaded and run): only run packages from
a trusted source; the manifest detects damage, not a forger.

A package is built in a temporary folder beside PKG and moved into place only when complete; an
existing non-empty PKG is only replaced when asked (replace=True / --force).
"""
from __future__ import annotations

import contextlib
import io
import json
import shutil
import signal
import tempfile
import threading
import time
import warnings
from dataclasses import fields, replace
from pathlib import Path

import torch
from safetensors import SafetensorError

from dllm.models import prepack as packing
from dllm.models.checkpoint import TENSOR_FIELDS, Weights
from dllm.runtime import Request, RequestError
from dllm.runtime.prepared import Prepared, named_tensors
from dllm.runtime.state import RequestShape

from .package import FORMATS, PackageError, fill_specs, spec, state_lines, write_manifest


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


def weight_inputs(weights: Weights) -> dict[str, torch.Tensor]:
    """The weights an AOTI step program takes, each storage once (a tied head is the embedding); prepacked
    ones as the plain matrices they hold."""
    out: dict[str, torch.Tensor] = {}
    for name, t in named_tensors("w", packing.plain(weights)).items():
        if not any(t is u for u in out.values()):
            out[name] = t
    return out


class _AotiProgram(torch.nn.Module):
    """forward(*weights, *state) runs one step kind; forward(padded, n_pad, *state) is fill. Both update
    the state tensors passed in by the host, in place."""

    def __init__(self, engine, prep: Prepared, kind: str, weight_names: list[str], names: list[str]):
        super().__init__()
        self.engine_cfg, self.prep, self.kind = engine.cfg, prep, kind
        self.weight_names, self.names = weight_names, names
        if kind == "fill":
            state = prep.tensors()
            for name in prep.static_names():
                self.register_buffer("init_" + name, state[name].clone())

    def forward(self, *args):
        extra = 2 if self.kind == "fill" else len(self.weight_names)
        tensors = dict(zip(self.names, args[extra:]))
        p = self.prep
        view = replace(p, state=_rebind(p.state, "st", tensors), cache=_rebind(p.cache, "cache", tensors),
                       scratch=_rebind(p.scratch, "scratch", tensors))
        if self.kind == "fill":
            for name in p.static_names():
                tensors[name].copy_(getattr(self, "init_" + name))
            view.load(self.engine_cfg, args[0], args[1])
        else:
            given = dict(zip(self.weight_names, args[:extra]))
            w = Weights(**{n: given.get("w_" + n) for n in TENSOR_FIELDS})
            if self.engine_cfg.tied_head:
                w.head = w.embed
            p.policy.bodies(w, self.engine_cfg, view.state, view.cache, view.scratch)[self.kind]()
        return (tensors["st_step"] + 0,)


def _export_aoti(engine, w: Weights, prep: Prepared, kinds, out: Path, padded, n_pad) -> list:
    """Write aoti/<kind>.pt2, state.txt and weights.safetensors; returns plan.json's "weights"."""
    from safetensors.torch import save_file
    from torch._inductor import aoti_compile_and_package
    state = prep.tensors()
    names = list(state)
    weights = weight_inputs(w)
    (out / "aoti").mkdir()
    (out / "state.txt").write_text(state_lines(state))
    save_file({n: t.detach().contiguous().cpu() for n, t in weights.items()}, str(out / "weights.safetensors"))
    for kind in ["fill", *kinds]:
        prog = _AotiProgram(engine, prep, kind, list(weights), names)
        inputs = tuple(state[n] for n in names)
        args = (padded, n_pad, *inputs) if kind == "fill" else (*weights.values(), *inputs)
        ep = torch.export.export(prog, args, strict=False)
        head = (fill_specs(padded.shape[1]) if kind == "fill"
                else [spec(n, t.dtype, t.shape) for n, t in weights.items()])
        expects = "\n".join(head + [spec(n, t.dtype, t.shape) for n, t in state.items()])
        aoti_compile_and_package(ep, package_path=str(out / "aoti" / f"{kind}.pt2"),   # the inputs it was built for
                                 inductor_configs={"aot_inductor.metadata": {"dllm_inputs": expects}})
        prog(*args)                          # leave the state as after this kind, like a run would
    return [[n, str(t.dtype).replace("torch.", ""), list(t.shape)] for n, t in weights.items()]


def check_cuda_toolkit() -> None:
    """AOTInductor compiles CUDA kernels with nvcc: refuse up front (one line) when there is none."""
    from torch.utils.cpp_extension import CUDA_HOME
    if CUDA_HOME is None or not (Path(CUDA_HOME) / "bin" / "nvcc").is_file():
        raise RequestError(f"--format aoti --device cuda compiles CUDA kernels and needs the CUDA toolkit "
                           f"(nvcc) matching this torch build (CUDA {torch.version.cuda}): none found; install "
                           f"it and set CUDA_HOME, or export --format torchscript")


# ---------------------------------------------------------------- writing a package (all or nothing)

def check_out(out: Path, replace_existing: bool) -> None:
    if out.exists() and not out.is_dir():
        raise PackageError(f"--out {out} exists and is not a folder; choose a new folder for the package")
    if out.is_dir() and any(out.iterdir()) and not replace_existing:
        raise PackageError(f"--out {out} is not empty; pass --force (replace=True) to replace it, or choose a "
                           f"new folder")


@contextlib.contextmanager
def _io_errors(out: Path):
    """A write that fails (a full disk, a file-size limit, a read-only folder) is one PackageError line;
    the file-size signal is ignored while writing, so such a write fails instead of killing the process.
    Other failures (a step that cannot be traced) pass through as they are."""
    old = signal.signal(signal.SIGXFSZ, signal.SIG_IGN) if threading.current_thread() is threading.main_thread() \
        else None
    try:
        yield
    except Exception as e:
        cause = next((c for c in _chain(e) if isinstance(c, OSError)), None)
        if cause is None and not isinstance(e, SafetensorError):
            raise
        text = (cause.strerror or str(cause)) if cause is not None else str(e).splitlines()[0]
        raise PackageError(f"cannot write the package at {out}: {text[:200]}; the folder was left as it was") \
            from None
    finally:
        if old is not None:
            signal.signal(signal.SIGXFSZ, old)


def _chain(e: BaseException):
    """An exception and the ones it was raised from or during."""
    seen = []
    while e is not None and e not in seen:
        seen.append(e)
        e = e.__cause__ or e.__context__
    return seen


@contextlib.contextmanager
def _staging(out: Path):
    """A temporary folder beside `out`; on success it becomes `out` (an old package is replaced only
    then), on any failure it is removed and `out` is left as it was."""
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    except OSError as e:
        raise PackageError(f"cannot write the package at {out}: {e.strerror or e}") from None
    try:
        yield tmp
        old = None
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            out.rename(old / "pkg")
        try:
            tmp.rename(out)
        except BaseException:
            if old is not None:
                (old / "pkg").rename(out)
            raise
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def export(engine, out: str | Path, request: Request | None = None, *, fmt: str = "torchscript",
           replace: bool = False, **options) -> dict:
    """Write a package (plan.json, manifest.txt and the format's programs) for one request shape (a
    Request without a prompt, or its options as keywords: prompt_bucket, gen_length, steps, block_length,
    policy, remasking, alg, confidence_dtype, schedule); returns the plan. replace: allow replacing a non-empty
    `out` (only once the new one is complete)."""
    if fmt not in FORMATS:
        raise RequestError(f"unknown export format {fmt!r}; choose one of {', '.join(FORMATS)}")
    w = packing.plain(engine.weights)     # a package multiplies plain matrices (oneDNN's packing is the process's)
    shard = w.shard
    if shard.parallel:
        raise RequestError(f"a package runs on one device: export from an engine loaded with tp=1 (this one is "
                           f"rank {shard.rank} of a tensor-parallel group of {shard.world})")
    req = (request or Request(**options)).resolved(engine.defaults)
    cfg, policy = engine.cfg, req.policy
    if req.prompt_bucket is None:
        raise RequestError("a package holds one prompt bucket: give prompt_bucket (--prompt-bucket), the longest "
                           "prompt it accepts")
    dc = req.check(cfg)
    s = dc.structure
    if s.random_per_row or s.sampled or s.threshold:
        raise RequestError("exported packages decode greedily with a fixed schedule: temperature > 0, 'random' "
                           "remasking, Dream's 'origin' alg and threshold decoding need a random generator or a "
                           "data-dependent step count the package cannot carry")
    shape = RequestShape(1, req.prompt_bucket, req.gen_length, req.block_length, req.steps)
    engine.check_shape(shape)
    dev = engine.device
    if fmt == "aoti" and dev.type == "cuda":
        check_cuda_toolkit()
    out = Path(out)
    check_out(out, replace)
    prep = Prepared.allocate(w, cfg, shape, s, policy, dev, engine.dtype)
    plan = policy.plan(shape.steps, shape.steps // shape.n_blocks)
    kinds = [k for k in policy.kinds if k in plan]
    P = shape.prompt_bucket
    padded = torch.full((1, P), cfg.pad_id, dtype=torch.int64, device=dev)
    n_pad = torch.tensor([P - 1], device=dev)
    padded[0, -1] = 3 if cfg.mask_id != 3 else 4
    need = 2 * (sum(t.numel() * t.element_size() for t in w.tensors().values()) + prep.nbytes)
    free = shutil.disk_usage(out.parent if out.parent.exists() else Path.cwd()).free
    if need > free:
        raise PackageError(f"the package needs about {need / 2**30:.2f} GiB at {out.parent} but the disk has "
                           f"{free / 2**30:.2f} GiB free; free some space or choose another --out")
    with _staging(out) as tmp, _io_errors(out):
        t0 = time.perf_counter()
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")       # TorchScript is deprecated in torch >= 2.11 and says so per call
            if fmt == "aoti":
                weights = _export_aoti(engine, w, prep, kinds, tmp, padded, n_pad)
            else:
                weights = None
                tensors = {**named_tensors("w", w), **prep.tensors()}
                mod = _step_module(tensors, {"fill": lambda p, n: prep.load(cfg, p, n),
                                             **{k: (lambda b: lambda _dummy: b())(prep.bodies[k]) for k in kinds}})
                dummy = torch.zeros(1, device=dev)
                traced = torch.jit.trace_module(mod, {"fill": (padded, n_pad), **{k: (dummy,) for k in kinds}},
                                                check_trace=False)
                buffer = io.BytesIO()              # written by Python: a full disk is an OSError, not an abort
                torch.jit.save(traced, buffer)
                (tmp / "steps.pt").write_bytes(buffer.getvalue())
        info = {
            "format": fmt, "family": cfg.family, "batch": 1, "prompt_bucket": P,
            "gen_length": shape.gen_length, "block_length": shape.block_length, "steps": shape.steps,
            "vocab_size": cfg.vocab_size, "mask_id": cfg.mask_id, "pad_id": cfg.pad_id,
            "dtype": str(engine.dtype).replace("torch.", ""), "device": dev.type,
            "policy": {"name": policy.name, **policy.params()},
            "decoding": {"remasking": s.remasking, "alg": s.alg, "confidence_dtype": s.confidence_dtype,
                         "schedule": s.schedule},
            "kinds": kinds, "plan": plan, "tokens_buffer": "st_tokens", "export_seconds": time.perf_counter() - t0,
            "state_names": list(prep.tensors()) if fmt == "aoti" else None,
            "weights": weights,
        }
        (tmp / "plan.json").write_text(json.dumps(info, indent=1))
        write_manifest(tmp)
    return info


