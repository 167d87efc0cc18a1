"""Cache policies: each is a step plan on host integers (plus, for caching policies, a row selector).

The plan is a list of step-kind names, one per step, fixed before generation starts.
"""
from __future__ import annotations

from dataclasses import dataclass

from .decoding import RequestError


@dataclass(frozen=True)
class NoCache:
    """Full refresh every step: the baseline and the exactness reference."""
    name = "none"

    def plan(self, steps: int) -> list[str]:
        return ["full"] * steps


POLICIES = {"none": NoCache}


def make_policy(name: str, **params):
    if name not in POLICIES:
        raise RequestError(f"unknown policy {name!r}; choose one of {', '.join(POLICIES)}")
    return POLICIES[name](**params)
