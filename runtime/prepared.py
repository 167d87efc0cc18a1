"""One prepared request: everything a (request shape, decoding structure, policy) needs, allocated on
one path that the engine and export both use (docs/ARCHITECTURE.md, "Prepared requests")."""
from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Callable

import torch

from dllm.models.checkpoint import Weights
from dllm.models.config import ModelConfig

from .decoding import DecodeStructure
from .policy import Policy
from .state import Cache, RequestShape, StepState


def named_tensors(prefix: str, obj) -> dict[str, torch.Tensor]:
    if obj is None:
        return {}
    return {f"{prefix}_{f.name}": getattr(obj, f.name) for f in fields(obj)
            if isinstance(getattr(obj, f.name), torch.Tensor)}


@dataclass
class Prepared:
    shape: RequestShape
    structure: DecodeStructure
    policy: Policy
    state: StepState
    cache: Cache | None                       # per-layer K/V/A/M, for policies that cache
    scratch: object | None                    # the policy's own buffers (a dataclass of tensors) or None
    bodies: dict[str, Callable[[], None]]     # eager step bodies by kind, in the policy's capture order
    steps: dict[str, Callable[[], None]] = field(default_factory=dict)   # backend-prepared, by kind
    prepare_seconds: float = 0.0              # compile / capture time spent on this request so far

    @staticmethod
    def allocate(w: Weights, cfg: ModelConfig, shape: RequestShape, s: DecodeStructure, policy: Policy,
                 device, dtype) -> "Prepared":
        policy.check(cfg, s)
        st = StepState.allocate(cfg, shape, s, device)
        cache = Cache.allocate(cfg, shape, device, dtype) if policy.uses_cache else None
        scratch = policy.scratch(cfg, shape, st, device)
        return Prepared(shape, s, policy, st, cache, scratch, policy.bodies(w, cfg, st, cache, scratch))

    def fill(self, cfg: ModelConfig, prompts: list[list[int]], seed: int) -> None:
        """Load a request: prompts left-padded into the canvas, step 0, the policy's scratch cleared."""
        self.state.fill(cfg, prompts, seed)
        self.policy.reset(self.scratch)

    def load(self, cfg: ModelConfig, padded: torch.Tensor, n_pad: torch.Tensor) -> None:
        """The tensor-only part of fill (traceable: exported packages load requests with it)."""
        self.state.load(cfg, padded, n_pad)
        self.policy.reset(self.scratch)

    def tensors(self) -> dict[str, torch.Tensor]:
        """Every state tensor by export name: st_<field>, cache_<field>, scratch_<field>."""
        return {**named_tensors("st", self.state), **named_tensors("cache", self.cache),
                **named_tensors("scratch", self.scratch)}

    def static_names(self) -> list[str]:
        """Export names of the tensors no step writes (schedules, kernels): set once at load."""
        out = []
        for prefix, obj in (("st", self.state), ("cache", self.cache), ("scratch", self.scratch)):
            out += [f"{prefix}_{n}" for n in getattr(obj, "STATIC", ())]
        return out

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors().values())
