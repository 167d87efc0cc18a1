"""The policy protocol: everything a cache policy owns, in one class per file (docs/ARCHITECTURE.md,
"Policies").

A policy is a frozen dataclass whose fields are its user options (each field's metadata carries the
CLI help; the CLI builds --flags from them). It owns:
- `kinds`: its step kinds, in capture order (largest graph first, so smaller ones reuse the pool);
- `kind_at(n, i)`: the host-side plan, the kind of model forward n (1-based, counted across blocks)
  when it is step i (0-based) of its block;
- `key(shape)`: what besides the request shape and decoding options tells two prepared step sets apart;
- `scratch(...)`: its own buffers beyond the shared state and cache (or None), and `reset` to clear
  them when a request is loaded;
- `bodies(...)`: its zero-argument step bodies by kind, bound to one prepared request's buffers;
- `work(...)`: how many rows each layer of a step kind recomputes, and `head_rows(...)` how many rows
  it computes logits for (the FLOP / byte floors in perf/ are computed from them, so a policy's cost
  model lives next to its step bodies).
The engine, the backends, export and the CLI only talk to this protocol, never to a policy's name.
"""
from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Callable, ClassVar

from dllm.models.checkpoint import Weights
from dllm.models.config import ModelConfig

from ..decoding import DecodeStructure
from ..errors import RequestError
from ..state import Cache, RequestShape, StepState


@dataclass(frozen=True)
class LayerWork:
    """What one layer of a step kind computes, per batch row."""
    rows: int               # rows through the Q/K projection, attention over all L keys, output projection, FFN
    v_rows: int             # rows whose value vectors are projected
    probs: bool = False     # the rows' head-averaged attention probabilities are formed too (d2Cache)


def full_work(cfg: ModelConfig, shape: RequestShape, probs: bool = False) -> list[LayerWork]:
    """Every row through every layer (a full step)."""
    return [LayerWork(shape.length, shape.length, probs)] * cfg.n_layers


class Policy:
    name: ClassVar[str]
    kinds: ClassVar[tuple[str, ...]]
    uses_cache: ClassVar[bool] = True

    def kind_at(self, n: int, i: int) -> str:
        raise NotImplementedError

    def plan(self, steps: int, steps_per_block: int | None = None) -> list[str]:
        """The fixed-schedule plan: kind_at for every step, blocks of steps_per_block (default: one block)."""
        spb = steps_per_block or steps
        return [self.kind_at(n, (n - 1) % spb) for n in range(1, steps + 1)]

    def params(self) -> dict:
        """The user options, by name (what export records and the CLI sets)."""
        return {f.name: getattr(self, f.name) for f in fields(self)}

    def key(self, shape: RequestShape) -> tuple:
        return (self.name, *self.params().values())

    def check(self, cfg: ModelConfig, s: DecodeStructure) -> None:
        """Refuse decoding the policy cannot serve (RequestError)."""

    def scratch(self, cfg: ModelConfig, shape: RequestShape, st: StepState, device):
        return None

    def reset(self, scratch) -> None:
        """Clear the scratch when a new request is loaded."""

    def work(self, cfg: ModelConfig, shape: RequestShape, kmax: int, kind: str) -> list[LayerWork]:
        """Per layer, what step `kind` recomputes (kmax: the most tokens a step commits); the logits it
        computes are head_rows'."""
        if kind == "full":
            return full_work(cfg, shape)
        raise NotImplementedError(f"{self.name} does not describe the work of its {kind!r} steps")

    def head_rows(self, shape: RequestShape, kind: str) -> int:
        """Rows step `kind` computes logits for (default: the current block's)."""
        return shape.block_length

    def bodies(self, w: Weights, cfg: ModelConfig, st: StepState, cache: Cache | None,
               scratch) -> dict[str, Callable[[], None]]:
        raise NotImplementedError


def check_int(policy: str, name: str, value, lowest: int, meaning: str) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < lowest:
        raise RequestError(f"{policy} {name} must be an integer >= {lowest} ({meaning}), got {value!r}", name)
