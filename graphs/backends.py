"""How a step function is executed: eager | compile | cudagraph | compile+cudagraph
(docs/ARCHITECTURE.md, "Backends"). Depends on torch only.

A backend takes the step bodies of one prepared request (zero-argument functions that update
preallocated buffers in place), in capture order, and returns runnable steps of the same kinds. The
scheduler replays them without knowing which backend it drives.

- eager:             the bodies as they are.
- compile:           torch.compile(fullgraph=True, dynamic=False): one graph per kind, no graph
                     breaks (a break raises). On CPU each kind then keeps whichever of the compiled
                     step and the eager body ran faster right after compiling (keep_faster), so
                     compile is never slower than eager on a kind.
- cudagraph:         each body captured once as a torch.cuda.CUDAGraph (graphs/capture.py).
- compile+cudagraph: the body compiled by Inductor with mode="max-autotune-no-cudagraphs", captured
                     inside our own CUDAGraph (SGLang's pattern: Inductor kernels, one graph launch,
                     none of reduce-overhead's per-call guard and cudagraph-tree checks).
"""
from __future__ import annotations

import logging
import statistics
import time
from typing import Callable

import torch

from .capture import GraphPool, capture

BACKENDS = ("eager", "compile", "cudagraph", "compile+cudagraph")


class BackendError(ValueError):
    """A backend that cannot run on this device or configuration."""


def available(device: torch.device) -> list[str]:
    return list(BACKENDS) if device.type == "cuda" else ["eager", "compile"]


def default_backend(device: torch.device) -> str:
    """The fastest backend on the device for cached plans (python -m dllm.perf.steps measures them).

    On CPU that is eager: compile is never slower per kind (keep_faster) but costs about a minute of
    compilation per step kind and shape, which a one-shot generation does not win back. On CUDA, one
    graph launch per step removes the hundreds of kernel launches that dominate a partial step."""
    return "compile+cudagraph" if device.type == "cuda" else "eager"


def check(name: str, device: torch.device) -> str:
    if name not in BACKENDS:
        raise BackendError(f"unknown backend {name!r}; choose one of {', '.join(BACKENDS)}")
    if name not in available(device):
        raise BackendError(f"backend {name} needs a CUDA device (this engine runs on {device.type}); "
                           f"use one of {', '.join(available(device))}")
    return name


def _compiled(body: Callable, mode: str | None) -> Callable:
    fn = torch.compile(body, fullgraph=True, dynamic=False, mode=mode)

    def run():
        fn()
    return run


def keep_faster(compiled: dict[str, Callable[[], None]], bodies: dict[str, Callable[[], None]],
                reset: Callable[[], None], rounds: int = 5) -> tuple[dict[str, Callable[[], None]], dict[str, float]]:
    """Per kind, the compiled step or the eager body, whichever is faster: the median of `rounds`
    alternating calls of each (host timing: CPU only). Returns (steps by kind, compiled speedup over
    eager by kind). Inductor fuses most kinds well; where a kind's fused kernels lose to eager's
    library calls on this machine, the eager body serves it (same tokens either way)."""
    steps, speedup = {}, {}
    for k in compiled:
        times = {"compiled": [], "eager": []}
        for _ in range(rounds):
            for variant, fn in (("compiled", compiled[k]), ("eager", bodies[k])):
                reset()
                t0 = time.perf_counter()
                fn()
                times[variant].append(time.perf_counter() - t0)
        speedup[k] = statistics.median(times["eager"]) / statistics.median(times["compiled"])
        steps[k] = compiled[k] if speedup[k] >= 1.0 else bodies[k]
    slower = [f"{k} ({speedup[k]:.2f}x)" for k in compiled if speedup[k] < 1.0]
    if slower:
        logging.getLogger("dllm").info("compile: eager is faster for %s; those kinds run eager", ", ".join(slower))
    return steps, speedup


def prepare(name: str, bodies: dict[str, Callable[[], None]], reset: Callable[[], None],
            pool: GraphPool | None = None, keep_faster_on_cpu: bool = False,
            on_kind: Callable[[str, float], None] | None = None) -> tuple[dict[str, Callable[[], None]], float]:
    """Compile / capture the bodies for a backend; returns (runnable steps by kind, seconds spent).

    `bodies` is in capture order (the policy's: largest graph first, so later, smaller graphs reuse
    the pool's blocks). Warm-up and capture run the steps on the live buffers, so the caller refills
    the state before the next generation (Engine.generate always does). on_kind(kind, seconds) is told
    as each kind finishes compiling."""
    kinds = list(bodies)
    if name == "eager":
        return dict(bodies), 0.0
    t0 = time.perf_counter()
    fns = bodies
    if name in ("compile", "compile+cudagraph"):
        mode = "max-autotune-no-cudagraphs" if name == "compile+cudagraph" else None
        fns = {k: _compiled(bodies[k], mode) for k in kinds}
        # Dynamo keeps compiled code per code object, shared by every engine state of a step kind;
        # a serving engine holds many (bucket x policy) states, so lift the recompile limit for
        # these compiles only (a scoped patch, not a global setting).
        with torch._dynamo.config.patch(recompile_limit=4096, accumulated_recompile_limit=1 << 16):
            for k in kinds:                   # first call compiles
                reset()
                t1 = time.perf_counter()
                fns[k]()
                if on_kind is not None:
                    on_kind(k, time.perf_counter() - t1)
            if name == "compile" and keep_faster_on_cpu:
                fns, _ = keep_faster(fns, bodies, reset)
    if name in ("cudagraph", "compile+cudagraph"):
        if pool is None:
            raise BackendError(f"backend {name} needs the engine's graph pool")
        fns = capture({k: fns[k] for k in kinds}, reset, pool)
    else:
        fns = {k: fns[k] for k in kinds}
    return fns, time.perf_counter() - t0
