"""NoCache: a full refresh every step, the baseline and the exactness reference."""
from __future__ import annotations

from dataclasses import dataclass

from ..steps import full_step
from .base import Policy


@dataclass(frozen=True)
class NoCache(Policy):
    name = "none"
    kinds = ("full",)
    uses_cache = False

    def kind_at(self, n: int, i: int) -> str:
        return "full"

    def bodies(self, w, cfg, st, cache, scratch):
        return {"full": lambda: full_step(w, cfg, st)}
