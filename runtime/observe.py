"""Watching a generation from the host: a StepEvent after each step (on_step: the canvas is read back
then), or a host-side count of launched steps (progress: no device read)."""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

from .state import StepState


@dataclass(frozen=True)
class StepEvent:
    """What an on_step observer receives after each step of a generation."""
    index: int                      # 0-based step number within this generation
    kind: str                       # the step kind that ran ("full", "verify", "block", ...)
    tokens: list[list[int]]         # [B][G] response canvas after the step; mask_id where still masked
    committed: list[list[int]]      # [B][*] response positions this step committed
    seconds: float                  # wall time of this step (device synchronised)
    mask_id: int


def counted(step_fns: dict, progress: Callable[[int, int], None], planned: int) -> dict:
    """Step functions that report (steps launched, steps planned) after each launch."""
    launched = [0]

    def wrap(fn):
        def step():
            fn()
            launched[0] += 1
            progress(launched[0], planned)
        return step
    return {k: wrap(fn) for k, fn in step_fns.items()}


def observed(step_fns: dict, st: StepState, on_step: Callable[[StepEvent], None], mask_id: int,
             sync: Callable[[], None]) -> dict:
    """Step functions that, after each step, read the response back and tell the observer."""
    P = st.shape.prompt_bucket
    seen = {"n": 0, "prev": None, "t": 0.0}

    def wrap(kind, fn):
        def step():
            if seen["prev"] is None:
                sync()
                seen["prev"] = st.tokens[:, P:].tolist()
                seen["t"] = time.perf_counter()
            fn()
            sync()
            now, canvas = time.perf_counter(), st.tokens[:, P:].tolist()
            committed = [[j for j, (a, b) in enumerate(zip(old, new)) if a == mask_id and b != mask_id]
                         for old, new in zip(seen["prev"], canvas)]
            on_step(StepEvent(seen["n"], kind, canvas, committed, now - seen["t"], mask_id))
            seen["n"] += 1
            seen["prev"], seen["t"] = canvas, time.perf_counter()
        return step
    return {k: wrap(k, fn) for k, fn in step_fns.items()}
