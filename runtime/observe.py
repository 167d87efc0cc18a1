"""Watching a generation from the host: a host-side count of launched steps (progress: no device read;
raising from it stops the generation between two steps), a BlockEvent per finished block (on_block: one
read per block, without stalling the device where it can), or a StepEvent after each step (on_step: the
canvas is read back, the device synchronised, after every step)."""
from __future__ import annotations

import contextlib
import sys
import threading
import time
from dataclasses import dataclass
from typing import Callable

import torch

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


@dataclass(frozen=True)
class BlockEvent:
    """What an on_block observer receives once a block is final (every position of it committed)."""
    index: int                      # the block (0-based)
    tokens: list[list[int]]         # [B][(index + 1) * block_length] the response up to the end of that block


class BlockReader:
    """Reads each finished block back once. On CUDA the copy goes into pinned host memory on the device's
    stream and is delivered when its event has passed, checked after each later step launch, so the host
    never waits for the device mid-generation; elsewhere the copy is immediate."""

    def __init__(self, st: StepState, rows: int, on_block: Callable[[BlockEvent], None]):
        self.st, self.rows, self.on_block = st, rows, on_block
        self.cuda = st.tokens.device.type == "cuda"
        self.host = torch.empty(st.shape.batch, st.shape.gen_length, dtype=torch.int64, pin_memory=self.cuda)
        self.pending: list[tuple[int, object]] = []

    def block_done(self, b: int) -> None:
        Bl, P = self.st.shape.block_length, self.st.shape.prompt_bucket
        self.host[:, b * Bl:(b + 1) * Bl].copy_(self.st.tokens[:, P + b * Bl:P + (b + 1) * Bl],
                                                  non_blocking=self.cuda)
        event = None
        if self.cuda:
            event = torch.cuda.Event()
            event.record()
        self.pending.append((b, event))
        self.deliver(wait=False)

    def deliver(self, wait: bool) -> None:
        """Hand over every pending block whose copy has landed (all of them when wait)."""
        while self.pending:
            b, event = self.pending[0]
            if event is not None and not wait and not event.query():
                return
            if event is not None:
                event.synchronize()
            self.pending.pop(0)
            self.on_block(BlockEvent(b, self.host[:self.rows, :(b + 1) * self.st.shape.block_length].tolist()))

    def watched(self, step_fns: dict) -> dict:
        """Step functions that deliver landed blocks after each launch."""
        def wrap(fn):
            def step():
                fn()
                self.deliver(wait=False)
            return step
        return {k: wrap(fn) for k, fn in step_fns.items()}


class ProgressBar:
    """A progress(launched, planned) hook drawing a tqdm bar on stderr (Engine.generate(progress=True)).
    The bar appears only once a generation has run for DELAY seconds, and never when stderr is not a
    terminal (there it is noise)."""
    DELAY = 2.0

    def __init__(self, enabled: bool = True):
        self.enabled, self.bar = enabled and sys.stderr.isatty(), None

    def __call__(self, launched: int, planned: int) -> None:
        if not self.enabled:
            return
        if self.bar is None:
            from tqdm import tqdm
            self.bar = tqdm(total=planned, desc="dllm: denoising", unit="step", delay=self.DELAY, leave=False,
                            file=sys.stderr, dynamic_ncols=True)
        self.bar.update(launched - self.bar.n)
        if launched >= planned:
            self.close()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


@contextlib.contextmanager
def ticking(log, what: str, every: float = 15.0):
    """Log "<what> ... N s" every `every` seconds until the block ends: a compile that takes minutes
    shows it is alive."""
    stop, t0 = threading.Event(), time.perf_counter()

    def tick():
        while not stop.wait(every):
            log.info("%s ... %.0f s", what, time.perf_counter() - t0)
    thread = threading.Thread(target=tick, name="dllm-ticker", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
