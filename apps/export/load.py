"""Loading export packages, validated: the manifest, plan.json, state.txt and the weights against each
other and against the inputs each program was compiled for, before anything runs (PackageError: one line);
`run` generates with a loaded package from Python, as apps/export/cpp/dllm_run does from C++."""
from __future__ import annotations

import contextlib
import json
import math
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from dllm.models.memory import available_bytes
from dllm.runtime import RequestError
from dllm.runtime.decoding import check_shape

from .package import (
    CRLF,
    DTYPES,
    FORMATS,
    MANIFEST,
    SYMLINK,
    PackageError,
    fill_specs,
    format_files,
    package_files,
    sha256,
    spec,
)


def check_manifest(pkg: Path) -> None:
    """Every file listed with its sha256, nothing unlisted, every hash matching."""
    path = pkg / MANIFEST
    if not path.is_file():
        raise PackageError(f"{pkg}: no {MANIFEST}; not a package written by `dllm export` (or written by an "
                           f"older version: export it again)")
    for root, dirs, files in os.walk(pkg):              # os.walk never follows a link: each is seen, once
        for name in dirs + files:
            if Path(root, name).is_symlink():
                raise PackageError(f"{Path(root, name)}: {SYMLINK}")
    listed: dict[str, str] = {}
    data = path.read_bytes()
    for i, raw in enumerate(data.split(b"\n")[:-1] if data.endswith(b"\n") else data.split(b"\n"), 1):
        if raw.endswith(b"\r"):
            raise PackageError(f"{path}: line {i} {CRLF}")
        line = raw.decode("utf-8", errors="replace")
        digest, sep, name = line.partition("  ")
        if not sep or len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest) or not name \
                or name.startswith("/") or ".." in name.split("/") or name in listed:
            raise PackageError(f"{path}: line {i} is not '<sha256>  <relative path>'")
        listed[name] = digest
    present = package_files(pkg)
    if sorted(listed) != present:
        extra, missing = sorted(set(present) - set(listed)), sorted(set(listed) - set(present))
        raise PackageError(f"{pkg}: files do not match {MANIFEST} (missing {missing[:3]}, unlisted {extra[:3]}); "
                           f"the package is incomplete or was changed, export it again")
    for name, digest in listed.items():
        if sha256(pkg / name) != digest:
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
    G, V = plan["gen_length"], plan["vocab_size"]
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
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
        raise PackageError(f"{pkg}/plan.json: not valid JSON ({str(e)[:80]})") from None
    missing = [f for f in format_files(plan) if not (pkg / f).is_file()]
    if missing:
        raise PackageError(f"{pkg}: plan.json says format {plan['format']}, whose {missing[0]} the package lacks; "
                           f"the package is inconsistent, export it again")
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
    state = [spec(n, t, s) for n, t, s in specs]
    weights = [spec(n, d, s) for n, d, s in plan["weights"]]
    for kind, prog in progs.items():
        head = fill_specs(plan["prompt_bucket"]) if kind == "fill" else weights
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
