"""Export the step functions of one request shape as a self-contained package (docs/ARCHITECTURE.md,
"Export"). A top-layer module: it uses the runtime, nothing in the runtime uses it.

    dllm export --model DIR --out PKG --prompt-bucket 64 --gen-length 128 --steps 128 --block-length 32
                [--policy none|dllm-cache|d2cache|dual-cache ...] [--dtype ...] [--device ...] [--force]

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
import hashlib
import json
import math
import os
import shutil
import tempfile
import time
import warnings
from dataclasses import dataclass, fields, replace
from pathlib import Path

import torch

from dllm import graphs
from dllm.models.checkpoint import Weights, available_bytes
from dllm.runtime.decoding import DecodeConfig, RequestError, check_shape
from dllm.runtime.policy import NoCache
from dllm.runtime.prepared import Prepared, named_tensors
from dllm.runtime.state import RequestShape

FORMATS = ("torchscript", "aoti")
MANIFEST = "manifest.txt"
DTYPES = {"int64": torch.int64, "float32": torch.float32, "bool": torch.bool, "bfloat16": torch.bfloat16,
          "float16": torch.float16, "float64": torch.float64}


class PackageError(RequestError):
    """An export package that is missing, damaged or inconsistent; one line says what is wrong."""


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


def _weight_inputs(weights: Weights) -> dict[str, torch.Tensor]:
    """The weights an AOTI step program takes, each storage once (a tied head is the embedding)."""
    out: dict[str, torch.Tensor] = {}
    for name, t in named_tensors("w", weights).items():
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
            w = Weights(**{f.name: given.get("w_" + f.name) for f in fields(Weights)})
            if self.engine_cfg.tied_head:
                w.head = w.embed
            p.policy.bodies(w, self.engine_cfg, view.state, view.cache, view.scratch)[self.kind]()
        return (tensors["st_step"] + 0,)


def _spec(name: str, dtype, shape) -> str:
    """One input as 'name dtype d0 d1 ...' (a state.txt line; what a program records it expects)."""
    return " ".join([name, str(dtype).replace("torch.", ""), *map(str, shape)])


def _state_lines(state: dict[str, torch.Tensor]) -> str:
    return "".join(_spec(n, t.dtype, t.shape) + "\n" for n, t in state.items())


def _fill_specs(prompt_bucket: int) -> list[str]:
    return [_spec("padded", "int64", [1, prompt_bucket]), _spec("n_pad", "int64", [1])]


def _export_aoti(engine, prep: Prepared, kinds, out: Path, padded, n_pad) -> list:
    """Write aoti/<kind>.pt2, state.txt and weights.safetensors; returns plan.json's "weights"."""
    from safetensors.torch import save_file
    from torch._inductor import aoti_compile_and_package
    state = prep.tensors()
    names = list(state)
    weights = _weight_inputs(engine.weights)
    (out / "aoti").mkdir()
    (out / "state.txt").write_text(_state_lines(state))
    save_file({n: t.detach().contiguous().cpu() for n, t in weights.items()}, str(out / "weights.safetensors"))
    for kind in ["fill", *kinds]:
        prog = _AotiProgram(engine, prep, kind, list(weights), names)
        inputs = tuple(state[n] for n in names)
        args = (padded, n_pad, *inputs) if kind == "fill" else (*weights.values(), *inputs)
        ep = torch.export.export(prog, args, strict=False)
        head = _fill_specs(padded.shape[1]) if kind == "fill" else [_spec(n, t.dtype, t.shape) for n, t in weights.items()]
        expects = "\n".join(head + [_spec(n, t.dtype, t.shape) for n, t in state.items()])
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

def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _package_files(folder: Path) -> list[str]:
    """Every file of a package but the manifest, as sorted posix paths relative to the folder."""
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*")
                  if p.is_file() and p.relative_to(folder).as_posix() != MANIFEST)


def write_manifest(folder: Path) -> None:
    (folder / MANIFEST).write_text("".join(f"{_sha256(folder / f)}  {f}\n" for f in _package_files(folder)))


def check_out(out: Path, replace_existing: bool) -> None:
    if out.exists() and not out.is_dir():
        raise PackageError(f"--out {out} exists and is not a folder; choose a new folder for the package")
    if out.is_dir() and any(out.iterdir()) and not replace_existing:
        raise PackageError(f"--out {out} is not empty; pass --force (replace=True) to replace it, or choose a "
                           f"new folder")


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


def export(engine, out: str | Path, *, prompt_bucket: int, gen_length: int, steps: int,
           block_length: int | None = None, policy=None, remasking=None, alg=None,
           fmt: str = "torchscript", confidence_dtype: str = "float64", replace: bool = False) -> dict:
    """Write a package (plan.json, manifest.txt and the format's programs) for one request shape;
    returns the plan. replace: allow replacing a non-empty `out` (only once the new one is complete)."""
    if fmt not in FORMATS:
        raise RequestError(f"unknown export format {fmt!r}; choose one of {', '.join(FORMATS)}")
    cfg, policy = engine.cfg, policy or NoCache()
    dc = DecodeConfig.make(cfg.family, remasking, alg, confidence_dtype=confidence_dtype)
    if dc.random_per_row:
        raise RequestError("exported packages decode greedily; 'random' remasking and Dream's 'origin' alg "
                           "need a random generator the package cannot carry")
    shape = RequestShape(1, prompt_bucket, gen_length, gen_length if block_length is None else block_length, steps)
    engine._check_shape(shape)
    dev = engine.device
    if fmt == "aoti" and dev.type == "cuda":
        check_cuda_toolkit()
    out = Path(out)
    check_out(out, replace)
    prep = Prepared.allocate(engine.weights, cfg, shape, dc, policy, dev, engine.dtype)
    plan = policy.plan(steps, steps // shape.n_blocks)
    kinds = [k for k in policy.kinds if k in plan]
    padded = torch.full((1, prompt_bucket), cfg.pad_id, dtype=torch.int64, device=dev)
    n_pad = torch.tensor([prompt_bucket - 1], device=dev)
    padded[0, -1] = 3 if cfg.mask_id != 3 else 4
    with _staging(out) as tmp:
        t0 = time.perf_counter()
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")       # TorchScript is deprecated in torch >= 2.11 and says so per call
            if fmt == "aoti":
                weights = _export_aoti(engine, prep, kinds, tmp, padded, n_pad)
            else:
                weights = None
                tensors = {**named_tensors("w", engine.weights), **prep.tensors()}
                mod = _step_module(tensors, {"fill": lambda p, n: prep.load(cfg, p, n),
                                             **{k: (lambda b: lambda _dummy: b())(prep.bodies[k]) for k in kinds}})
                dummy = torch.zeros(1, device=dev)
                traced = torch.jit.trace_module(mod, {"fill": (padded, n_pad), **{k: (dummy,) for k in kinds}},
                                                check_trace=False)
                traced.save(str(tmp / "steps.pt"))
        info = {
            "format": fmt, "family": cfg.family, "batch": 1, "prompt_bucket": prompt_bucket,
            "gen_length": gen_length, "block_length": shape.block_length, "steps": steps,
            "vocab_size": cfg.vocab_size, "mask_id": cfg.mask_id, "pad_id": cfg.pad_id,
            "dtype": str(engine.dtype).replace("torch.", ""), "device": dev.type,
            "policy": {"name": policy.name, **policy.params()},
            "decoding": {"remasking": dc.remasking if cfg.family == "llada" else None,
                         "alg": dc.alg if cfg.family == "dream" else None, "confidence_dtype": dc.confidence_dtype},
            "kinds": kinds, "plan": plan, "tokens_buffer": "st_tokens", "export_seconds": time.perf_counter() - t0,
            "state_names": list(prep.tensors()) if fmt == "aoti" else None,
            "weights": weights,
        }
        (tmp / "plan.json").write_text(json.dumps(info, indent=1))
        write_manifest(tmp)
    return info


def build_runner(build_dir: str | Path | None = None) -> Path:
    """Configure and build graphs/cpp/dllm_run against the libtorch inside the installed torch wheel;
    returns the binary. Incremental: a no-op when nothing changed."""
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


# ---------------------------------------------------------------- loading a package (validated)

def check_manifest(pkg: Path) -> None:
    """Every file listed with its sha256, nothing unlisted, every hash matching."""
    path = pkg / MANIFEST
    if not path.is_file():
        raise PackageError(f"{pkg}: no {MANIFEST}; not a package written by `dllm export` (or written by an "
                           f"older version: export it again)")
    listed: dict[str, str] = {}
    for i, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
        digest, sep, name = line.partition("  ")
        if not sep or len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest) or not name \
                or name.startswith("/") or ".." in name.split("/") or name in listed:
            raise PackageError(f"{path}: line {i} is not '<sha256>  <relative path>'")
        listed[name] = digest
    present = _package_files(pkg)
    if sorted(listed) != present:
        extra, missing = sorted(set(present) - set(listed)), sorted(set(listed) - set(present))
        raise PackageError(f"{pkg}: files do not match {MANIFEST} (missing {missing[:3]}, unlisted {extra[:3]}); "
                           f"the package is incomplete or was changed, export it again")
    for name, digest in listed.items():
        if _sha256(pkg / name) != digest:
            raise PackageError(f"{pkg}/{name}: content does not match its sha256 in {MANIFEST}; the package "
                               f"was changed or damaged, export it again")


@dataclass(frozen=True)
class _Field:
    key: str
    kind: type
    low: int | None = None


_PLAN_FIELDS = (_Field("format", str), _Field("family", str), _Field("batch", int, 1), _Field("prompt_bucket", int, 1),
                _Field("gen_length", int, 1), _Field("block_length", int, 1), _Field("steps", int, 1),
                _Field("vocab_size", int, 1), _Field("mask_id", int, 0), _Field("pad_id", int, 0),
                _Field("dtype", str), _Field("device", str), _Field("kinds", list), _Field("plan", list))


def check_plan(plan, pkg: Path) -> dict:
    """plan.json's fields: types, ranges and how they fit together."""
    where = f"{pkg}/plan.json"
    if not isinstance(plan, dict):
        raise PackageError(f"{where}: must be a JSON object")
    for f in _PLAN_FIELDS:
        v = plan.get(f.key)
        if not isinstance(v, f.kind) or isinstance(v, bool) or (f.low is not None and v < f.low):
            want = f"an integer >= {f.low}" if f.low is not None else f"a {f.kind.__name__}"
            raise PackageError(f"{where}: '{f.key}' must be {want}, got {v!r}")
    P, G, V = plan["prompt_bucket"], plan["gen_length"], plan["vocab_size"]
    problems = []
    if plan["format"] not in FORMATS:
        problems.append(f"unknown format {plan['format']!r}")
    if plan["family"] not in ("llada", "dream"):
        problems.append(f"unknown family {plan['family']!r}")
    if plan["batch"] != 1:
        problems.append(f"batch {plan['batch']} (packages hold batch 1)")
    try:
        check_shape(G, plan["block_length"], plan["steps"])
    except RequestError as e:
        problems.append(str(e))
    for key in ("mask_id", "pad_id"):
        if plan[key] >= V:
            problems.append(f"{key} {plan[key]} is outside the vocabulary [0, {V})")
    if plan["dtype"] not in DTYPES or plan["device"] not in ("cpu", "cuda"):
        problems.append(f"dtype {plan['dtype']!r} / device {plan['device']!r} unknown")
    kinds = plan["kinds"]
    if not kinds or not all(isinstance(k, str) and k.isidentifier() for k in kinds) or len(set(kinds)) != len(kinds):
        problems.append(f"'kinds' must be distinct step kind names, got {kinds!r}")
    if len(plan["plan"]) != plan["steps"] or not all(k in kinds for k in plan["plan"]):
        problems.append(f"'plan' must list {plan['steps']} steps, each one of {kinds!r}")
    if plan["format"] == "aoti":
        names = plan.get("state_names")
        if not isinstance(names, list) or "st_tokens" not in names or not all(isinstance(n, str) for n in names):
            problems.append("'state_names' must list the state tensors, st_tokens among them")
        w = plan.get("weights")
        if not isinstance(w, list) or not w or not all(
                isinstance(e, list) and len(e) == 3 and isinstance(e[0], str) and e[1] in DTYPES
                and isinstance(e[2], list) and all(isinstance(d, int) and d >= 1 for d in e[2]) for e in w):
            problems.append("'weights' must list [name, dtype, shape] of every weight input")
    if problems:
        raise PackageError(f"{where}: " + "; ".join(problems))
    if plan["device"] == "cuda" and not torch.cuda.is_available():
        raise PackageError(f"{pkg}: the package was exported for cuda but this machine has no CUDA device; "
                           f"export it again with --device cpu")
    return plan


def _state_specs(pkg: Path, plan: dict) -> list[tuple[str, torch.dtype, list[int]]]:
    """state.txt, checked against the plan: the names in order, known dtypes, sane dims, the canvas
    [1, P + G] int64, and a total that fits in memory."""
    where, out = pkg / "state.txt", []
    for i, line in enumerate(where.read_text(errors="replace").splitlines(), 1):
        name, dtype, *dims = line.split()
        if dtype not in DTYPES or not all(d.isdigit() for d in dims):
            raise PackageError(f"{where}: line {i} ({line[:60]!r}) is not 'name dtype dims...'")
        out.append((name, DTYPES[dtype], [int(d) for d in dims]))
    if [n for n, _, _ in out] != plan["state_names"]:
        raise PackageError(f"{where}: the tensors do not match plan.json's state_names")
    canvas = dict((n, (t, s)) for n, t, s in out)["st_tokens"]
    if canvas != (torch.int64, [1, plan["prompt_bucket"] + plan["gen_length"]]):
        raise PackageError(f"{where}: st_tokens is {canvas}, expected int64 [1, {plan['prompt_bucket']} + "
                           f"{plan['gen_length']}] from plan.json")
    total = sum(math.prod(s) * torch.empty(0, dtype=t).element_size() for _, t, s in out)
    free = available_bytes(torch.device(plan["device"]))
    if free is not None and total > free:
        raise PackageError(f"{where}: the state needs {total / 2**30:.2f} GiB, {free / 2**30:.2f} GiB available")
    return out


def _load_weights(pkg: Path, plan: dict, device) -> list[torch.Tensor]:
    from safetensors import safe_open
    path, out = pkg / "weights.safetensors", []
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            for name, dtype, shape in plan["weights"]:
                t = f.get_tensor(name)
                if t.dtype != DTYPES[dtype] or list(t.shape) != shape:
                    raise PackageError(f"{path}: '{name}' is {t.dtype} {list(t.shape)}, plan.json says {dtype} {shape}")
                out.append(t.to(device))
    except PackageError:
        raise
    except Exception as e:   # safetensors' own error types
        raise PackageError(f"{path}: cannot read the weights ({str(e).splitlines()[0]})") from None
    return out


@dataclass
class AotiRunnable:
    """A loaded AOTI package: its programs, the weights (loaded once) and the state (allocated once)."""
    progs: dict
    weights: list[torch.Tensor]
    state: list[torch.Tensor]


def load(pkg: str | Path):
    """(runnable, plan) of a package, for running it from Python; PackageError when the package is
    missing, damaged or inconsistent."""
    pkg = Path(pkg)
    if not (pkg / "plan.json").is_file():
        raise PackageError(f"{pkg}: no plan.json; PKG must be a folder written by `dllm export`")
    check_manifest(pkg)
    try:
        plan = check_plan(json.loads((pkg / "plan.json").read_text()), pkg)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise PackageError(f"{pkg}/plan.json: not valid JSON ({e})") from None
    device = torch.device(plan["device"])
    programs = ["fill", *plan["kinds"]]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if plan["format"] == "torchscript":
            try:
                mod = torch.jit.load(str(pkg / "steps.pt"), map_location=device)
            except Exception as e:
                raise PackageError(f"{pkg}/steps.pt: cannot load ({str(e).splitlines()[0]})") from None
            _check_script(mod, plan, pkg, programs)
            return mod, plan
        from torch._inductor import aoti_load_package
        specs = _state_specs(pkg, plan)
        progs = {}
        for k in programs:
            try:
                progs[k] = aoti_load_package(str(pkg / "aoti" / f"{k}.pt2"))
            except Exception as e:
                raise PackageError(f"{pkg}/aoti/{k}.pt2: cannot load ({str(e).splitlines()[0]})") from None
        weights = _load_weights(pkg, plan, device)
        _check_program_inputs(pkg, plan, progs, specs)
        state = [torch.zeros(s, dtype=t, device=device) for _, t, s in specs]
        return AotiRunnable(progs, weights, state), plan


def _check_program_inputs(pkg: Path, plan: dict, progs: dict, specs) -> None:
    """Each AOTI program recorded (at export, inside its compiled library) the inputs it was built for;
    the state from state.txt and the weights from plan.json must be exactly those."""
    state = [_spec(n, t, s) for n, t, s in specs]
    weights = [_spec(n, d, s) for n, d, s in plan["weights"]]
    for kind, prog in progs.items():
        head = _fill_specs(plan["prompt_bucket"]) if kind == "fill" else weights
        recorded = prog.get_metadata().get("dllm_inputs")
        if recorded != "\n".join(head + state):
            raise PackageError(f"{pkg}/aoti/{kind}.pt2 was built for other inputs than state.txt and plan.json "
                               f"describe; the package is inconsistent, export it again")


def _check_script(mod, plan: dict, pkg: Path, programs: list[str]) -> None:
    """A TorchScript package's module against its plan: methods, canvas, vocabulary, device."""
    missing = [k for k in programs if not hasattr(mod, k)]
    tokens, embed = getattr(mod, "st_tokens", None), getattr(mod, "w_embed", None)
    L = plan["prompt_bucket"] + plan["gen_length"]
    if missing or not isinstance(tokens, torch.Tensor) or not isinstance(embed, torch.Tensor):
        raise PackageError(f"{pkg}/steps.pt: lacks {missing or 'the st_tokens / w_embed buffers'}")
    if tokens.dtype != torch.int64 or list(tokens.shape) != [1, L] or embed.shape[0] != plan["vocab_size"]:
        raise PackageError(f"{pkg}/steps.pt: canvas {list(tokens.shape)} / vocabulary {embed.shape[0]} do not "
                           f"match plan.json (canvas [1, {L}], vocabulary {plan['vocab_size']})")


@contextlib.contextmanager
def _checked_inputs():
    """AOTI programs check their inputs' shapes and dtypes while this is set (else a wrong tensor is
    undefined behaviour); the previous environment is restored after."""
    old = os.environ.get("AOTI_RUNTIME_CHECK_INPUTS")
    os.environ["AOTI_RUNTIME_CHECK_INPUTS"] = "1"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("AOTI_RUNTIME_CHECK_INPUTS", None)
        else:
            os.environ["AOTI_RUNTIME_CHECK_INPUTS"] = old


def _check_prompt(plan: dict, prompt) -> list[int]:
    P, V, mask = plan["prompt_bucket"], plan["vocab_size"], plan["mask_id"]
    if hasattr(prompt, "tolist"):
        prompt = prompt.tolist()
    if not isinstance(prompt, (list, tuple)) or not prompt:
        raise RequestError("the prompt must be a non-empty list of token ids")
    if not all(isinstance(t, int) and not isinstance(t, bool) and 0 <= t < V for t in prompt):
        raise RequestError(f"prompt token ids must be integers in the vocabulary [0, {V})")
    if mask in prompt:
        raise RequestError(f"token id {mask} is the mask id; a prompt cannot contain masks")
    if len(prompt) > P:
        raise RequestError(f"prompt has {len(prompt)} tokens but the package's prompt bucket holds {P}; "
                           f"export with a larger --prompt-bucket")
    return list(prompt)


def run(mod, plan: dict, prompt: list[int]) -> list[int]:
    """Generate with a loaded package from Python (the C++ runner does the same)."""
    prompt = _check_prompt(plan, prompt)
    P, device = plan["prompt_bucket"], torch.device(plan["device"])
    padded = torch.full((1, P), plan["pad_id"], dtype=torch.int64)                     # [1, P]
    padded[0, P - len(prompt):] = torch.tensor(prompt)
    padded, n_pad = padded.to(device), torch.tensor([P - len(prompt)], device=device)  # [1]
    try:
        with torch.no_grad(), _checked_inputs():
            if plan["format"] == "aoti":
                progs, w, state = mod.progs, mod.weights, mod.state
                progs["fill"](padded, n_pad, *state)
                for kind in plan["plan"]:
                    progs[kind](*w, *state)
                out = state[plan["state_names"].index("st_tokens")][0, P:].tolist()
            else:
                dummy = torch.zeros(1, device=device)
                mod.fill(padded, n_pad)
                for kind in plan["plan"]:
                    getattr(mod, kind)(dummy)
                out = mod.st_tokens[0, P:].tolist()
    except RuntimeError as e:
        raise PackageError(f"the package's programs refused their inputs ({str(e).strip().splitlines()[0]}); "
                           f"the package is inconsistent, export it again") from None
    if plan["mask_id"] in out:
        raise PackageError("the package finished with masked positions left; its plan does not fit its "
                           "programs, export it again")
    return out
