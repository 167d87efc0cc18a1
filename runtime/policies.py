"""Cache policies: each is a step plan on host integers plus a row selection rule.

`kind_at(n, i)` names the step kind of model forward n (1-based, counted across blocks) when it is
step i (0-based) of its block. With a fixed schedule the whole plan is known before generation
(`plan`); with threshold decoding the scheduler asks step by step. A caching policy also fixes its
row budget, so every step kind has one static shape.
"""
from __future__ import annotations

from dataclasses import dataclass

from .decoding import RequestError


@dataclass(frozen=True)
class NoCache:
    """Full refresh every step: the baseline and the exactness reference."""
    name = "none"
    uses_cache = False

    def kind_at(self, n: int, i: int) -> str:
        return "full"

    def plan(self, steps: int, steps_per_block: int | None = None) -> list[str]:
        return plan(self, steps, steps_per_block)

    def budget(self, gen_length: int) -> int:
        return 0

    def kinds(self) -> list[str]:
        return ["full"]

    def step_key(self, gen_length: int) -> tuple:
        return ("none",)


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

    def kind_at(self, n: int, i: int) -> str:
        rp, rr = (n - 1) % self.kp == 0, (n - 1) % self.kr == 0   # n runs across blocks, as the reference
        return "full" if rp and rr else "prompt_refresh" if rp else "response_refresh" if rr else "partial"

    def plan(self, steps: int, steps_per_block: int | None = None) -> list[str]:
        return plan(self, steps, steps_per_block)

    def budget(self, gen_length: int) -> int:
        k = int(gen_length * self.rho)      # over the whole response, not the block (reference)
        if k > gen_length:
            raise RequestError(f"budget {k} exceeds the response length {gen_length}")
        return k

    def kinds(self) -> list[str]:
        return ["full", "prompt_refresh", "response_refresh", "partial"]

    def step_key(self, gen_length: int) -> tuple:
        return ("dllm-cache", self.budget(gen_length))


@dataclass(frozen=True)
class D2Cache:
    """d2Cache with a fixed budget: the first step is a full refresh; every later step recomputes
    exactly k + (most commits per step) + attn_budget rows chosen on the device from the last step:
    the k masked rows of highest certainty x density (current block first; Dream: the row before),
    the rows committed last step, and the attn_budget rows of highest attention-rollout importance
    (attn_p additionally masks the picks beyond the reference's top-p nucleus)."""
    k: int = 32
    sigma: float = 10.0
    attn_budget: int = 32
    attn_p: float | None = None
    quasi_l2r: bool = False
    name = "d2cache"
    uses_cache = True

    def __post_init__(self):
        for f in ("k", "attn_budget"):
            v = getattr(self, f)
            if not isinstance(v, int) or isinstance(v, bool) or v < (1 if f == "k" else 0):
                raise RequestError(f"d2cache {f} must be an integer >= {1 if f == 'k' else 0}, got {v!r}")
        if not isinstance(self.sigma, (int, float)) or not self.sigma > 0:
            raise RequestError(f"d2cache sigma (the certainty-density kernel width) must be > 0, got {self.sigma!r}")
        if self.attn_p is not None and not 0.0 < self.attn_p <= 1.0:
            raise RequestError(f"d2cache attn_p must be in (0, 1], got {self.attn_p!r}")

    def kind_at(self, n: int, i: int) -> str:
        return "full" if n == 1 else "partial"

    def plan(self, steps: int, steps_per_block: int | None = None) -> list[str]:
        return plan(self, steps, steps_per_block)

    def budget(self, gen_length: int) -> int:
        return min(self.k, gen_length)      # stage 1; the full row budget also depends on the schedule

    def kinds(self) -> list[str]:
        return ["full", "partial"]

    def step_key(self, gen_length: int) -> tuple:
        return ("d2cache", self.k, float(self.sigma), self.attn_budget, self.attn_p, self.quasi_l2r)


@dataclass(frozen=True)
class DualCache:
    """Fast-dLLM dual cache: a full refresh at each block start, then steps that recompute only the
    current block's rows (for Dream also the row before it, whose logits decode the block's first
    position); the prefix and the suffix reuse their cached K/V and deltas."""
    name = "dual-cache"
    uses_cache = True

    def kind_at(self, n: int, i: int) -> str:
        return "full" if i == 0 else "block"

    def plan(self, steps: int, steps_per_block: int | None = None) -> list[str]:
        return plan(self, steps, steps_per_block)

    def budget(self, gen_length: int) -> int:
        return 0

    def kinds(self) -> list[str]:
        return ["full", "block"]

    def step_key(self, gen_length: int) -> tuple:
        return ("dual-cache",)


def plan(policy, steps: int, steps_per_block: int | None = None) -> list[str]:
    """The fixed-schedule plan: kind_at for every step, blocks of steps_per_block (default: one block)."""
    spb = steps_per_block or steps
    return [policy.kind_at(n, (n - 1) % spb) for n in range(1, steps + 1)]


POLICIES = {"none": NoCache, "dllm-cache": DllmCache, "d2cache": D2Cache, "dual-cache": DualCache}


def make_policy(name: str, **params):
    if name not in POLICIES:
        raise RequestError(f"unknown policy {name!r}; choose one of {', '.join(POLICIES)}")
    try:
        return POLICIES[name](**params)
    except TypeError as e:
        raise RequestError(f"policy {name}: {e}") from None
