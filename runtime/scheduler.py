"""Host-side step scheduler: replays the policy's step plan.

With a fixed schedule it decides with host integers only (the plan) and never reads a tensor value,
so the device runs ahead of the host for the whole generation. Threshold decoding is the one
exception: its step count depends on the data, so it reads one value per step (run_until_done).
"""
from __future__ import annotations

from collections import Counter
from typing import Callable


def run_until_done(kind_at: Callable[[int, int], str], steps: dict[str, Callable[[], None]],
                   block: Callable[[], int], n_blocks: int, max_steps_per_block: int,
                   block_done: Callable[[int], None] | None = None) -> Counter:
    """Threshold decoding: the number of steps per block depends on the data. After each step the host
    reads one value, the device's block counter (the step that empties a block advances it); that is
    the only read, and it is the price of a data-dependent step count. block_done(b) is called once
    block b is finished."""
    kinds: Counter = Counter()
    n = 0
    for b in range(n_blocks):
        for i in range(max_steps_per_block):
            n += 1
            kind = kind_at(n, i)
            steps[kind]()
            kinds[kind] += 1
            if block() > b:
                if block_done is not None:
                    block_done(b)
                break
        else:
            raise RuntimeError(f"block {b} still has masks after {max_steps_per_block} steps; every threshold "
                               f"step commits at least one token, so this is a bug")
    return kinds


def run(plan: list[str], steps: dict[str, Callable[[], None]], steps_per_block: int | None = None,
        block_done: Callable[[int], None] | None = None) -> Counter:
    """Run each step kind of the plan in order; returns how many steps of each kind ran. block_done(b),
    if given, is called after the last step of block b was launched (a fixed schedule empties a block
    in its steps_per_block steps)."""
    unknown = set(plan) - set(steps)
    if unknown:
        raise ValueError(f"plan uses step kinds {sorted(unknown)} with no step function")
    for n, kind in enumerate(plan, 1):
        steps[kind]()
        if block_done is not None and n % steps_per_block == 0:
            block_done(n // steps_per_block - 1)
    return Counter(plan)
