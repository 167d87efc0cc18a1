"""CUDA graph capture of step functions (docs/ARCHITECTURE.md, "Backends"). Depends on torch only.

Every tensor a step reads or writes (canvas, schedules, caches, noise) is allocated before capture and
updated in place, so a graph holds no live outputs in its memory pool. That makes it safe for all the
graphs of an engine to share one pool and to be replayed in any order (full and partial steps
interleave). Warm-up runs on a side stream first, as the PyTorch docs require, so that lazy
initialisation (cuBLAS handles, autotuning) is not captured. Kinds are captured largest first.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch


@dataclass
class GraphPool:
    """One memory pool and one capture stream per engine: every graph captures into both."""
    device: torch.device
    handle: tuple = field(init=False)
    stream: torch.cuda.Stream = field(init=False)
    graphs: list = field(default_factory=list)

    def __post_init__(self):
        self.handle = torch.cuda.graph_pool_handle()
        self.stream = torch.cuda.Stream(self.device)

    def release(self, replays) -> None:
        """Drop the graphs behind these replay functions (their blocks return to the pool)."""
        gone = list(replays)
        self.graphs = [(kind, g) for kind, g in self.graphs if g.replay not in gone]


def capture(fns: dict[str, Callable[[], None]], reset: Callable[[], None], pool: GraphPool,
            warmup: int = 2) -> dict[str, Callable[[], None]]:
    """Capture each zero-argument step function as a CUDA graph; returns replay functions by kind.

    reset() puts the state back to a valid step (step counter inside the schedule) before each
    warm-up call; it runs outside the graphs."""
    current = torch.cuda.current_stream(pool.device)
    pool.stream.wait_stream(current)
    with torch.cuda.stream(pool.stream):
        for fn in fns.values():
            for _ in range(warmup):
                reset()
                fn()
    current.wait_stream(pool.stream)
    torch.cuda.synchronize(pool.device)
    replays = {}
    for kind, fn in fns.items():
        reset()
        torch.cuda.synchronize(pool.device)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g, pool=pool.handle, stream=pool.stream):
            fn()
        pool.graphs.append((kind, g))
        replays[kind] = g.replay
    torch.cuda.synchronize(pool.device)
    return replays
