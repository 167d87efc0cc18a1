"""Tensor parallelism over torch.distributed (NCCL on GPUs, gloo on CPUs), as gpt-fast does it: each rank
holds 1/N of the attention heads and of the FFN columns, so a layer's Q/K/V and gate/up projections are
column-parallel and its output and down projections row-parallel, with one all-reduce each; the LM head
is split over the vocabulary and its logits gathered. Every rank then holds the same residual stream,
caches the same per-layer deltas and commits the same tokens: the host plan is identical on every rank.

The collectives are torch's functional ones (torch.distributed._functional_collectives): traced by
torch.compile and recorded in CUDA graphs on NCCL, so a step stays one graph.
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from typing import Any

import torch

from .config import CheckpointError, ModelConfig

# Weights fields split over the ranks -> the dimension of one checkpoint tensor (one layer's q_proj, attn_out,
# ...) that is split: output rows of the column-parallel projections and of the head, input columns of the
# row-parallel ones. The embedding and the norms are whole on every rank.
SPLIT = {"wqkv": 0, "bqkv": 0, "w_gate_up": 0, "head": 0, "wo": 1, "w_down": 1}


@dataclass(frozen=True)
class Shard:
    """This rank's part of a tensor-parallel group (world 1: no parallelism, every call a no-op)."""
    rank: int = 0
    world: int = 1
    group: Any = None                  # the torch.distributed ProcessGroup of the ranks (None at world 1)

    @property
    def parallel(self) -> bool:
        return self.world > 1

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """The sum of every rank's x (row-parallel matmul outputs, partial sums over split heads)."""
        if not self.parallel:
            return x
        from torch.distributed import _functional_collectives as funcol
        return funcol.all_reduce(x, "sum", self.group)

    def average(self, x: torch.Tensor) -> torch.Tensor:
        """The mean of every rank's x (a mean over heads, each rank holding the same number of them)."""
        return self.all_reduce(x) / self.world if self.parallel else x

    def all_gather(self, x: torch.Tensor, dim: int) -> torch.Tensor:
        """Every rank's x concatenated along dim, in rank order (the vocabulary-parallel logits)."""
        if not self.parallel:
            return x
        from torch.distributed import _functional_collectives as funcol
        gather = getattr(funcol, "all_gather_single", None) or funcol.all_gather_tensor   # the name since torch 2.13
        return gather(x.contiguous(), dim % x.dim(), self.group)

    def local(self, cfg: ModelConfig) -> ModelConfig:
        """The configuration one rank computes with: its heads and its FFN columns (the model width, the
        vocabulary and the ids stay whole)."""
        if not self.parallel:
            return cfg
        self.check(cfg)
        return dataclasses.replace(cfg, n_heads=cfg.n_heads // self.world, n_kv_heads=cfg.n_kv_heads // self.world,
                                   mlp_hidden=cfg.mlp_hidden // self.world)

    def check(self, cfg: ModelConfig) -> None:
        """Refuse a split the model's dimensions do not allow (one line, before anything is read)."""
        bad = [f"{what} {n}" for what, n in (("heads", cfg.n_heads), ("key/value heads", cfg.n_kv_heads),
                                             ("FFN width", cfg.mlp_hidden), ("vocabulary", cfg.vocab_size))
               if n % self.world]
        if bad:
            raise CheckpointError(f"--tp {self.world} must divide the model's {', '.join(bad)}; choose a tensor-"
                                  f"parallel size that divides them (this model: {_divisors(cfg)})")

    def rows(self, n_local: int) -> slice:
        """This rank's range of a split dimension whose local size is n_local."""
        return slice(self.rank * n_local, (self.rank + 1) * n_local)

    def read(self, stored, field: str, shape: tuple[int, ...]) -> torch.Tensor:
        """This rank's part of one checkpoint tensor of a Weights field: stored is a safetensors slice
        (get_slice: only the rank's rows or columns are read from disk), shape its full shape."""
        dim = SPLIT.get(field) if self.parallel else None
        if dim is None:
            return stored[:]
        part = self.rows(shape[dim] // self.world)
        return stored[part] if dim == 0 else stored[:, part]

    def local_rows(self, rows: slice | None) -> slice | None:
        """Where a segment (rows of the fused q|k|v or gate|up matrix) lands in this rank's fused matrix:
        each segment is split evenly, so the rank's fused matrix is q/N | k/N | v/N."""
        if rows is None or not self.parallel:
            return rows
        return slice(rows.start // self.world, rows.stop // self.world)


def _divisors(cfg: ModelConfig) -> str:
    ok = [n for n in range(1, 65) if not (cfg.n_heads % n or cfg.n_kv_heads % n or cfg.mlp_hidden % n
                                           or cfg.vocab_size % n)]
    return "--tp " + " / ".join(map(str, ok))


def check_launch(tp, cfg: ModelConfig) -> None:
    """Refuse, in one line and before anything is loaded, a tensor-parallel size that is not an integer
    >= 1, that the model's dimensions do not divide, or that this launch does not have the processes for."""
    if isinstance(tp, bool) or not isinstance(tp, int) or tp < 1:
        raise CheckpointError(f"--tp must be an integer >= 1, got {tp!r}")
    if tp == 1:
        return
    Shard(0, tp).check(cfg)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world != tp:
        raise CheckpointError(f"--tp {tp} needs {tp} processes, one per rank: launch it as `torchrun "
                              f"--nproc-per-node {tp} .venv/bin/dllm ... --tp {tp}` (this is {world} process"
                              f"{'es' if world != 1 else ''})")


def join(tp: int, device: torch.device) -> Shard:
    """This process's Shard in a torchrun launch of tp processes (the process group is started here
    unless the caller started one: NCCL on CUDA, one GPU per rank, gloo on the CPU). tp 1: no parallelism."""
    if tp == 1:
        return Shard()
    import torch.distributed as dist
    if not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    if dist.get_world_size() != tp:
        raise CheckpointError(f"--tp {tp} but the started process group has {dist.get_world_size()} ranks")
    return Shard(dist.get_rank(), tp, dist.group.WORLD)
