"""Host-side step scheduler: replays the policy's step plan.

It decides with host integers only (the plan); it never reads a tensor value, so the device runs
ahead of the host for the whole generation.
"""
from __future__ import annotations

from collections import Counter
from typing import Callable


def run(plan: list[str], steps: dict[str, Callable[[], None]]) -> Counter:
    """Run each step kind of the plan in order; returns how many steps of each kind ran."""
    unknown = set(plan) - set(steps)
    if unknown:
        raise ValueError(f"plan uses step kinds {sorted(unknown)} with no step function")
    for kind in plan:
        steps[kind]()
    return Counter(plan)
