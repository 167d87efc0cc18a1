"""Cache policies: each is a step plan on host integers plus a row selection rule.

The plan is a list of step-kind names, one per step, fixed before generation starts; the scheduler
replays it. A caching policy also fixes its row budget, so every step kind has one static shape.
"""
from __future__ import annotations

from dataclasses import dataclass

from .decoding import RequestError


@dataclass(frozen=True)
class NoCache:
    """Full refresh every step: the baseline and the exactness reference."""
    name = "none"
    uses_cache = False

    def plan(self, steps: int) -> list[str]:
        return ["full"] * steps

    def budget(self, gen_length: int) -> int:
        return 0


@dataclass(frozen=True)
class DllmCache:
    """dLLM-Cache: refresh the prompt every kp steps and the response every kr steps; in between,
    recompute the int(rho * G) response rows whose value vectors changed most (V-verify), per layer."""
    kp: int = 100
    kr: int = 7
    rho: float = 0.25
    name = "dllm-cache"
    uses_cache = True

    def __post_init__(self):
        for k in ("kp", "kr"):
            v = getattr(self, k)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise RequestError(f"dllm-cache {k} must be an integer >= 1 (refresh every {k} steps), got {v!r}")
        if not isinstance(self.rho, (int, float)) or not 0.0 <= self.rho <= 1.0:
            raise RequestError(f"dllm-cache rho must be in [0, 1] (the fraction of the response recomputed "
                               f"per step), got {self.rho!r}")

    def plan(self, steps: int) -> list[str]:
        out = []
        for n in range(1, steps + 1):       # n counts model forwards across blocks, as the reference does
            rp, rr = (n - 1) % self.kp == 0, (n - 1) % self.kr == 0
            out.append("full" if rp and rr else "prompt_refresh" if rp else "response_refresh" if rr
                       else "partial")
        return out

    def budget(self, gen_length: int) -> int:
        k = int(gen_length * self.rho)      # over the whole response, not the block (reference)
        if k > gen_length:
            raise RequestError(f"budget {k} exceeds the response length {gen_length}")
        return k


POLICIES = {"none": NoCache, "dllm-cache": DllmCache}


def make_policy(name: str, **params):
    if name not in POLICIES:
        raise RequestError(f"unknown policy {name!r}; choose one of {', '.join(POLICIES)}")
    try:
        return POLICIES[name](**params)
    except TypeError as e:
        raise RequestError(f"policy {name}: {e}") from None
