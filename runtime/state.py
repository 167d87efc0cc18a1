"""The buffers every step touches, allocated once per request shape (docs/ARCHITECTURE.md, "Buffers").

A request shape is (batch B, prompt bucket P, response length G, block length, steps). The canvas is
[B, L] with L = P + G: prompts left-padded to P, responses starting as the mask id. The step reads
its per-step inputs (which block, how many tokens to commit) from schedule tensors indexed by the
device step counter `step`, which the step itself increments, so replaying a step needs no host input.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from dllm.models.config import ModelConfig
from dllm.models.layers import positions_and_mask, rope_tables

from .decoding import FAMILY_DECODING, DecodeStructure, DecodeValues, check_shape, commit_counts, dream_reveal_probs
from .errors import RequestError


@dataclass(frozen=True)
class RequestShape:
    batch: int
    prompt_bucket: int     # P: prompts are left-padded to this length
    gen_length: int        # G
    block_length: int
    steps: int

    def __post_init__(self):
        for name in ("batch", "prompt_bucket", "gen_length", "block_length", "steps"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise RequestError(f"{name} must be an integer >= 1, got {v!r}")

    @property
    def length(self) -> int:
        return self.prompt_bucket + self.gen_length

    @property
    def n_blocks(self) -> int:
        return self.gen_length // self.block_length


@dataclass
class StepState:
    shape: RequestShape
    structure: DecodeStructure      # what the steps were built for (their values live in the 0-dim tensors)
    kmax: int                       # most tokens any step commits (static top-k width)
    tokens: torch.Tensor            # [B, L] int64   the canvas
    n_pad: torch.Tensor             # [B] int64      left padding of each prompt
    key_mask: torch.Tensor          # [B, 1, 1, L] bool
    cos: torch.Tensor               # [B, 1, L, hd] fp32
    sin: torch.Tensor               # [B, 1, L, hd] fp32
    step: torch.Tensor              # [1] int64      device step counter, incremented by every step
    block: torch.Tensor             # [1] int64      current block, advanced by the step that empties it
    counts: torch.Tensor            # [steps] int64  tokens to commit at each step (fixed schedules)
    reveal_prob: torch.Tensor       # [steps] fp32   Dream 'origin' only (else unused)
    block_pos: torch.Tensor         # [n_blocks, Bl] int64  canvas positions of each block
    k_range: torch.Tensor           # [kmax] int64
    conf: torch.Tensor              # [B, Bl] fp32   the last step's candidate confidences
    p0: torch.Tensor                # [B, Bl] fp32   the last step's p(x0) per block position
    commit_pos: torch.Tensor        # [B, kmax] int64  canvas positions ranked for commit last step
    commit_valid: torch.Tensor      # [B, kmax] bool   which of them were committed
    noise: torch.Tensor | None      # [B, Bl, V] sampling noise (float64 for LLaDA, fp32 for Dream)
    unif: torch.Tensor | None       # [B, Bl] fp32   per-row uniforms (LLaDA random, Dream origin)
    generators: list[torch.Generator]   # [B] one per row (rows with their own seeds), or only [0] used
    # The request's decoding values, per row: one prepared request serves every value of its structure.
    temperature: torch.Tensor       # [B, 1, 1] float64
    top_p: torch.Tensor             # [B, 1, 1] fp32
    top_k: torch.Tensor             # [B, 1, 1] int64
    threshold: torch.Tensor         # [B, 1] float64
    row_seeds: bool = False         # the last fill gave each row its own seed (else one stream for the batch)
    STATIC: ClassVar[tuple[str, ...]] = ("counts", "reveal_prob", "block_pos", "k_range",   # no step writes these
                                         "temperature", "top_p", "top_k", "threshold")

    @staticmethod
    def allocate(cfg: ModelConfig, shape: RequestShape, s: DecodeStructure, device) -> "StepState":
        B, P, G, Bl = shape.batch, shape.prompt_bucket, shape.gen_length, shape.block_length
        L = shape.length
        counts = commit_counts(s, G, Bl, shape.steps)
        spb = check_shape(G, Bl, shape.steps)
        kmax = Bl if s.threshold else max(counts)   # threshold: up to a whole block per step
        i64 = dict(dtype=torch.int64, device=device)
        noise = None
        if s.random_per_vocab:
            noise = torch.empty(B, Bl, cfg.vocab_size, device=device,
                                dtype=FAMILY_DECODING[s.family].noise_dtype)
        reveal = dream_reveal_probs(spb, s.eps) * shape.n_blocks if s.reveals else [0.0] * shape.steps
        return StepState(
            shape=shape, structure=s, kmax=kmax,
            tokens=torch.full((B, L), cfg.mask_id, **i64),
            n_pad=torch.zeros(B, **i64),
            key_mask=torch.ones(B, 1, 1, L, dtype=torch.bool, device=device),
            cos=torch.empty(B, 1, L, cfg.head_dim, device=device),
            sin=torch.empty(B, 1, L, cfg.head_dim, device=device),
            step=torch.zeros(1, **i64),
            block=torch.zeros(1, **i64),
            counts=torch.tensor(counts, **i64),
            reveal_prob=torch.tensor(reveal, dtype=torch.float32, device=device),
            block_pos=P + torch.arange(G, **i64).view(shape.n_blocks, Bl),
            k_range=torch.arange(kmax, **i64),
            conf=torch.zeros(B, Bl, device=device),
            p0=torch.zeros(B, Bl, device=device),
            commit_pos=torch.zeros(B, kmax, **i64),
            commit_valid=torch.zeros(B, kmax, dtype=torch.bool, device=device),
            noise=noise,
            unif=torch.empty(B, Bl, device=device) if s.random_per_row else None,
            generators=[torch.Generator() if torch.device(device).type == "meta" else torch.Generator(device=device)
                        for _ in range(B)],
            temperature=torch.zeros(B, 1, 1, dtype=torch.float64, device=device),
            top_p=torch.ones(B, 1, 1, device=device),
            top_k=torch.zeros(B, 1, 1, **i64),
            threshold=torch.ones(B, 1, dtype=torch.float64, device=device),
        )

    def write_values(self, v: DecodeValues | list[DecodeValues]) -> None:
        """Write decoding values into the value tensors, in place: one for every row, or one per row."""
        rows = v if isinstance(v, list) else [v] * self.shape.batch
        if len(rows) != self.shape.batch:
            raise RequestError(f"{len(rows)} decoding values for a state of batch {self.shape.batch}")
        for name in ("temperature", "top_p", "top_k", "threshold"):
            t = getattr(self, name)
            t.copy_(torch.tensor([getattr(r, name) for r in rows], dtype=t.dtype).view(t.shape))

    def fill(self, cfg: ModelConfig, prompts: list[list[int]], seed: int | list[int]) -> None:
        """Load a request into the buffers in place: left-padded prompts, masked response, step 0. seed: one
        random stream for the whole batch (an int), or one per row (a list: each row then draws what it
        would draw alone, so rows of different requests can share a batch)."""
        B, P = self.shape.batch, self.shape.prompt_bucket
        if len(prompts) != B:
            raise RequestError(f"{len(prompts)} prompts for a state of batch {B}")
        seeds = seed if isinstance(seed, list) else [seed]
        if isinstance(seed, list) and len(seed) != B:
            raise RequestError(f"{len(seed)} seeds for a batch of {B} prompts")
        for sd in seeds:
            if isinstance(sd, bool) or not isinstance(sd, int) or not 0 <= sd < 2 ** 64:
                raise RequestError(f"seed must be an integer in [0, 2**64), got {sd!r}", "seed")
        padded = torch.full((B, P), cfg.pad_id, dtype=torch.int64)
        n_pad = torch.empty(B, dtype=torch.int64)
        for b, ids in enumerate(prompts):
            pad = P - len(ids)
            n_pad[b] = pad
            padded[b, pad:] = torch.tensor(ids, dtype=torch.int64)
        self.load(cfg, padded.to(self.tokens.device), n_pad.to(self.tokens.device))
        self.row_seeds = isinstance(seed, list)
        for g, sd in zip(self.generators, seeds):
            g.manual_seed(sd)

    def load(self, cfg: ModelConfig, padded: torch.Tensor, n_pad: torch.Tensor) -> None:
        """Tensor-only part of fill (traceable, so exported packages can load requests):
        padded [B, P] left-padded prompts, n_pad [B] pads per prompt."""
        P = self.shape.prompt_bucket
        self.tokens[:, :P].copy_(padded)
        self.tokens[:, P:].fill_(cfg.mask_id)
        self.n_pad.copy_(n_pad)
        positions, key_mask = positions_and_mask(self.tokens, self.n_pad)
        cos, sin = rope_tables(positions, cfg)
        self.key_mask.copy_(key_mask)
        self.cos.copy_(cos)
        self.sin.copy_(sin)
        self.rewind()
        self.conf.zero_()
        self.commit_valid.zero_()

    def rewind(self) -> None:
        """Back to step 0 of block 0 without touching the canvas: warm-up and timing loops call a step
        repeatedly and must stay inside the schedule."""
        self.step.zero_()
        self.block.zero_()

    def current_block(self) -> torch.Tensor:
        """Canvas positions [Bl] of the block the current step works on (device-side lookup)."""
        return self.block_pos.index_select(0, self.block.clamp(max=self.shape.n_blocks - 1)).squeeze(0)

    def draw_noise(self) -> None:
        """Refill this step's random numbers in place (no-op for greedy decoding): from the batch's one
        stream, or row by row from each row's own (a row then draws what it draws alone)."""
        rows = (list(zip(self.generators, range(self.shape.batch))) if self.row_seeds
                else [(self.generators[0], slice(None))])
        if self.noise is not None:
            uniform = FAMILY_DECODING[self.structure.family].noise_draw == "uniform"
            for g, r in rows:
                (self.noise[r].uniform_ if uniform else self.noise[r].exponential_)(generator=g)
        if self.unif is not None:
            for g, r in rows:
                self.unif[r].uniform_(generator=g)


def request_bytes(cfg: ModelConfig, shape: RequestShape, s: DecodeStructure, uses_cache: bool,
                  dtype: torch.dtype) -> int:
    """An upper estimate of the memory one prepared request needs: its state, its cache, and what one
    step holds at its peak (activations, attention scores, the [B, Bl, V] logits, probabilities and
    noise). Policies' scratch is small next to these (rows x d or rows x L) and is covered by a margin."""
    B, L, Bl, V, d = shape.batch, shape.length, shape.block_length, cfg.vocab_size, cfg.d_model
    act = torch.empty(0, dtype=dtype).element_size()
    state = B * L * (8 + 1 + 2 * cfg.head_dim * 4) + B * Bl * 8 * 4
    noise = B * Bl * V * 8 if s.random_per_vocab else 0                       # [B, Bl, V] float64
    cache = 2 * cfg.n_layers * B * L * (cfg.kv_width + d) * act if uses_cache else 0
    step = (B * L * (cfg.q_width + 2 * cfg.kv_width + 3 * d + 2 * cfg.mlp_hidden) * act   # one layer's activations
            + B * cfg.n_heads * L * L * 4                                       # attention scores [B, H, L, L]
            + 4 * B * Bl * V * 8)                                               # logits, softmax, float64 copies
    return int(1.25 * (state + noise + cache + step))


@dataclass
class Cache:
    """Per-layer features of every canvas row, written by full and partial steps (the caching policies).

    Since a layer's output is x + A + M, the hidden state of any row at any layer is the embedding
    plus a running sum of cached deltas: rows that are not recomputed still carry exact-as-cached
    states into the next layer and into the head."""
    k: torch.Tensor            # [nL, B, Hkv, L, hd]  post-RoPE keys (positions never change)
    v: torch.Tensor            # [nL, B, Hkv, L, hd]
    a: torch.Tensor            # [nL, B, L, d]        attention-branch delta (after the output projection)
    m: torch.Tensor            # [nL, B, L, d]        FFN-branch delta
    prompt_rows: torch.Tensor  # [B, P] int64  0..P-1
    resp_rows: torch.Tensor    # [B, G] int64  P..L-1
    layer_ids: torch.Tensor    # [nL] int64      } index tensors of the row writes (put_kv, put_deltas)
    batch_ids: torch.Tensor    # [B, 1] int64    }
    head_ids: torch.Tensor     # [Hkv, 1] int64  }
    STATIC: ClassVar[tuple[str, ...]] = ("prompt_rows", "resp_rows", "layer_ids", "batch_ids", "head_ids")

    @staticmethod
    def allocate(cfg: ModelConfig, shape: RequestShape, device, dtype) -> "Cache":
        nL, B, L, P, G = cfg.n_layers, shape.batch, shape.length, shape.prompt_bucket, shape.gen_length
        kv = (nL, B, cfg.n_kv_heads, L, cfg.head_dim)
        i64 = dict(dtype=torch.int64, device=device)
        return Cache(k=torch.zeros(kv, device=device, dtype=dtype), v=torch.zeros(kv, device=device, dtype=dtype),
                     a=torch.zeros(nL, B, L, cfg.d_model, device=device, dtype=dtype),
                     m=torch.zeros(nL, B, L, cfg.d_model, device=device, dtype=dtype),
                     prompt_rows=torch.arange(P, **i64).expand(B, P).contiguous(),
                     resp_rows=(P + torch.arange(G, **i64)).expand(B, G).contiguous(),
                     layer_ids=torch.arange(nL, **i64), batch_ids=torch.arange(B, **i64)[:, None],
                     head_ids=torch.arange(cfg.n_kv_heads, **i64)[:, None])

    # Row writes are one index_put_ on the whole buffer. A scatter_ or copy_ into a view of it (one
    # layer, some rows) is the same in eager, but Inductor turns a write into a view of a graph input
    # into a copy of the whole buffer (every layer's K, V, A or M) per write; index_put_ it keeps in place.

    def put_kv(self, i: int, rows: torch.Tensor, k: torch.Tensor | None = None,
               v: torch.Tensor | None = None) -> None:
        """Layer i's keys and/or values k, v [B, Hkv, S, hd] at the canvas rows [B, S]."""
        idx = (self.layer_ids[i], self.batch_ids[:, :, None], self.head_ids, rows[:, None, :])   # -> [B, Hkv, S]
        if k is not None:
            self.k.index_put_(idx, k)
        if v is not None:
            self.v.index_put_(idx, v)

    def put_layer(self, i: int, k: torch.Tensor, v: torch.Tensor, a: torch.Tensor, m: torch.Tensor) -> None:
        """All of layer i: k, v [B, Hkv, L, hd], a, m [B, L, d] (a full step)."""
        idx = (self.layer_ids[i],)
        self.k.index_put_(idx, k)
        self.v.index_put_(idx, v)
        self.a.index_put_(idx, a)
        self.m.index_put_(idx, m)

    def put_deltas(self, i: int, rows: torch.Tensor, a: torch.Tensor, m: torch.Tensor) -> None:
        """Layer i's attention and FFN deltas a, m [B, S, d] at the canvas rows [B, S]."""
        idx = (self.layer_ids[i], self.batch_ids, rows)                                            # -> [B, S]
        self.a.index_put_(idx, a)
        self.m.index_put_(idx, m)

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"k": self.k, "v": self.v, "a": self.a, "m": self.m}
