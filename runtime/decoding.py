"""On-device token choice (docs/ARCHITECTURE.md, "Decoding"): LLaDA remasking, Dream algs, their commit schedules.

Schedules are computed on the host once per request (they depend only on shapes), uploaded as
tensors, and indexed inside the step by the device step counter, so a step never reads a tensor
value on the host. Commit counts are applied as "top-kmax, keep the first k": kmax is the largest
count in the schedule (a static shape), k is read from the schedule tensor.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Callable

import torch

from .errors import RequestError

LLADA_REMASKING = ("low_confidence", "random")
DREAM_ALGS = ("origin", "maskgit_plus", "topk_margin", "entropy")
# The dtype confidences are ranked (and thresholds compared) in: float64 as Fast-dLLM; "logits" = the
# logits' own dtype, as the official LLaDA sampler and dLLM-Cache (bf16 on a GPU, with its exact ties).
CONFIDENCE_DTYPES = ("float64", "logits")
# Tokens committed per step: "uniform" spreads a block's masks evenly over its steps (LLaDA's rule, the
# reference d2Cache's n per step for both families), "timesteps" follows Dream's linspace(1, eps) schedule.
SCHEDULES = ("uniform", "timesteps")
MAX_TEMPERATURE = 10.0   # sampling temperatures above this overflow LLaDA's float64 Gumbel race


@dataclass(frozen=True)
class DecodeStructure:
    """What a prepared step depends on: which code the step contains. Requests with one structure share
    one prepared (compiled, captured) step set, whatever their values (DecodeValues)."""
    family: str
    remasking: str | None          # LLaDA's token-choice rule (None for Dream)
    alg: str | None                # Dream's (None for LLaDA)
    sampled: bool                  # temperature > 0
    top_p: bool                    # a top-p filter (top_p < 1)
    top_k: bool                    # a top-k filter
    threshold: bool                # threshold decoding: a data-dependent number of steps
    confidence_dtype: str
    eps: float                     # Dream: linspace(1, eps, steps + 1)
    schedule: str                  # SCHEDULES: how many tokens each step commits

    @property
    def random_per_row(self) -> bool:      # needs one uniform per candidate row per step
        return FAMILY_DECODING[self.family].random_rule in (self.remasking, self.alg)

    @property
    def random_per_vocab(self) -> bool:    # needs one random number per candidate row and vocab entry
        return self.sampled

    @property
    def reveals(self) -> bool:             # Dream 'origin': rows revealed at random, no ranking
        return self.alg is not None and self.alg == FAMILY_DECODING[self.family].reveal_rule


@dataclass(frozen=True)
class DecodeValues:
    """The numbers a request writes into its prepared state's 0-dim tensors (neutral where unused)."""
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0                 # 0: no top-k
    threshold: float = 1.0

    @property
    def sampling(self) -> tuple[float, float, int]:
        """(temperature, top_p, top_k): what decoding.choose takes."""
        return self.temperature, self.top_p, self.top_k


@dataclass(frozen=True)
class DecodeConfig:
    """A request's decoding options, validated against the model family, with the family defaults."""
    family: str                    # a key of FAMILY_DECODING
    remasking: str = "low_confidence"   # LLaDA
    alg: str = "entropy"           # Dream
    temperature: float = 0.0
    top_p: float | None = None     # Dream only
    top_k: int | None = None       # Dream only
    eps: float = 1e-3              # Dream: linspace(1, eps, steps + 1)
    threshold: float | None = None  # commit every masked block row with p(x0) >= threshold (at least one)
    confidence_dtype: str = "float64"  # CONFIDENCE_DTYPES: what p(x0) and the confidences are computed in
    schedule: str | None = None    # SCHEDULES; None: the family's own (LLaDA uniform, Dream timesteps)

    @staticmethod
    def make(family: str, remasking=None, alg=None, temperature=0.0, top_p=None, top_k=None,
             threshold=None, confidence_dtype: str = "float64", schedule: str | None = None) -> "DecodeConfig":
        """Validate user options against the model family and fill the family defaults."""
        check_values(temperature, top_p, top_k, threshold, confidence_dtype, schedule)
        fam = FAMILY_DECODING[family]
        given = {"remasking": remasking, "alg": alg}
        rule = given.pop(fam.option) or fam.default
        (foreign, value), = given.items()
        if value is not None:
            raise RequestError(f"--{foreign} {value} is a {FAMILY_DECODING_LABEL[foreign]} option; "
                               f"{fam.label} chooses tokens with --{fam.option} {'|'.join(fam.rules)}", foreign)
        if not fam.filters and (top_p is not None or top_k is not None):
            raise RequestError(f"top-p / top-k are {FAMILY_DECODING_LABEL['alg']} options; {fam.label} samples "
                               f"with --temperature only (Gumbel-max over the full vocabulary)",
                               "top_p" if top_p is not None else "top_k")
        if rule not in fam.rules:
            raise RequestError(f"unknown {fam.option} {rule!r}; choose one of {', '.join(fam.rules)}", fam.option)
        if rule == fam.reveal_rule and threshold is not None:
            raise RequestError(f"threshold decoding ranks rows by confidence; {fam.label}'s {rule!r} "
                               f"{fam.option} reveals rows at random. Use --{fam.option} "
                               f"{', '.join(r for r in fam.rules if r != rule)} with --threshold", "threshold")
        if rule == fam.reveal_rule and schedule not in (None, fam.schedule):
            raise RequestError(f"{fam.label}'s {rule!r} {fam.option} reveals each row with the probability of the "
                               f"{fam.schedule} schedule; --schedule {schedule} needs --{fam.option} "
                               f"{', '.join(r for r in fam.rules if r != rule)}", "schedule")
        kw = {fam.option: rule}
        if fam.filters:
            kw.update(top_p=top_p, top_k=top_k)
        return DecodeConfig(family, temperature=float(temperature), threshold=threshold,
                            confidence_dtype=confidence_dtype, schedule=schedule, **kw)

    @property
    def structure(self) -> DecodeStructure:
        fam = FAMILY_DECODING[self.family]
        rule = getattr(self, fam.option)
        return DecodeStructure(self.family, rule if fam.option == "remasking" else None,
                               rule if fam.option == "alg" else None, self.temperature > 0,
                               self.top_p is not None and self.top_p < 1, self.top_k is not None,
                               self.threshold is not None, self.confidence_dtype, self.eps,
                               self.schedule or fam.schedule)

    @property
    def values(self) -> DecodeValues:
        return DecodeValues(self.temperature, 1.0 if self.top_p is None else self.top_p,
                            0 if self.top_k is None else self.top_k, 1.0 if self.threshold is None else self.threshold)


def check_values(temperature=0.0, top_p=None, top_k=None, threshold=None, confidence_dtype="float64",
                 schedule=None) -> None:
    """The decoding numbers' types and ranges (RequestError), whatever the family."""
    if confidence_dtype not in CONFIDENCE_DTYPES:
        raise RequestError(f"unknown confidence_dtype {confidence_dtype!r}; choose one of "
                           f"{', '.join(CONFIDENCE_DTYPES)}", "confidence_dtype")
    if schedule is not None and schedule not in SCHEDULES:
        raise RequestError(f"unknown schedule {schedule!r}; choose one of {', '.join(SCHEDULES)}", "schedule")

    def real(name, v, ok, message):                    # a finite number for which ok(v) holds
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or not ok(v):
            raise RequestError(f"{message}, got {v!r}", name)
    if threshold is not None:
        real("threshold", threshold, lambda t: 0.0 < t <= 1.0, "threshold must be in (0, 1] (a probability)")
    real("temperature", temperature, lambda t: 0.0 <= t <= MAX_TEMPERATURE,   # higher: the Gumbel race overflows
         f"temperature must be >= 0 and at most {MAX_TEMPERATURE:g} (a finite number)")
    if top_p is not None:
        real("top_p", top_p, lambda p: 0.0 < p <= 1.0, "top_p must be in (0, 1]")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
        raise RequestError(f"top_k must be an integer >= 1, got {top_k!r}", "top_k")


# ---------------------------------------------------------------- schedules (host, once per request)

def check_shape(gen_length: int, block_length: int, steps: int) -> int:
    """Validate gen/block/steps; returns steps per block."""
    for name, v in (("gen_length", gen_length), ("block_length", block_length), ("steps", steps)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise RequestError(f"{name} must be an integer >= 1, got {v!r}", name)
    if gen_length % block_length:
        raise RequestError(f"gen_length {gen_length} is not a multiple of block_length {block_length}; "
                           f"choose a block_length that divides it", "block_length")
    n_blocks = gen_length // block_length
    if steps % n_blocks:
        raise RequestError(f"steps {steps} is not a multiple of the number of blocks {n_blocks} "
                           f"(gen_length {gen_length} / block_length {block_length}); use a multiple of {n_blocks}",
                           "steps")
    if steps // n_blocks > block_length:     # a step that can commit nothing is wasted work
        raise RequestError(f"steps {steps} is more than the {gen_length} tokens to generate ({steps // n_blocks} "
                           f"steps per block of {block_length}); use at most {gen_length} steps", "steps")
    return steps // n_blocks


def llada_block_counts(block_length: int, steps_per_block: int) -> list[int]:
    """LLaDA: spread a block's masks evenly over its steps, the first (n % s) steps one more."""
    base, rem = divmod(block_length, steps_per_block)
    return [base + (i < rem) for i in range(steps_per_block)]


def dream_timesteps(steps: int, eps: float) -> torch.Tensor:
    return torch.linspace(1, eps, steps + 1)          # fp32, as the reference


def dream_block_counts(block_length: int, steps_per_block: int, eps: float = 1e-3) -> list[int]:
    """Dream: k = int(n_mask * (1 - s/t)) in fp32 tensor arithmetic, all remaining masks on the last step."""
    ts = dream_timesteps(steps_per_block, eps)
    left, out = block_length, []
    for i in range(steps_per_block):
        if i < steps_per_block - 1:
            k = int(torch.tensor(float(left)) * (1 - ts[i + 1] / ts[i]))
        else:
            k = left
        out.append(k)
        left -= k
    return out


def dream_reveal_probs(steps_per_block: int, eps: float = 1e-3) -> list[float]:
    """Dream 'origin': each masked row is revealed with probability 1 - s/t (1 on the last step)."""
    ts = dream_timesteps(steps_per_block, eps)
    return [float(1 - ts[i + 1] / ts[i]) if i < steps_per_block - 1 else 1.0 for i in range(steps_per_block)]


def commit_counts(s: "DecodeStructure | DecodeConfig", gen_length: int, block_length: int, steps: int) -> list[int]:
    """Tokens committed at each of the request's steps (over all blocks)."""
    spb = check_shape(gen_length, block_length, steps)
    schedule = s.schedule or FAMILY_DECODING[s.family].schedule      # a DecodeConfig may leave it to the family
    return SCHEDULE_COUNTS[schedule](block_length, spb, s.eps) * (gen_length // block_length)


# ---------------------------------------------------------------- token choice (device, inside a step)

def _top_p_filter(logits: torch.Tensor, top_p) -> torch.Tensor:
    """Keep the smallest prefix of the sorted distribution whose mass exceeds top_p (always the top
    token); top_p a float or a tensor broadcastable to [B, R, 1]."""
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    cum = sorted_logits.softmax(-1).cumsum(-1)
    drop_sorted = torch.cat([torch.zeros_like(cum[..., :1], dtype=torch.bool), (cum > top_p)[..., :-1]], dim=-1)
    drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, torch.finfo(logits.dtype).min)


def _top_k_filter(logits: torch.Tensor, top_k) -> torch.Tensor:
    """Keep the logits >= the top_k-th largest; top_k an int or an int64 tensor broadcastable to [B, R, 1]
    (then the k-th value is read from a full sort by rank, so one static shape serves every k)."""
    if isinstance(top_k, torch.Tensor):
        ranked = logits.sort(dim=-1, descending=True).values                       # [B, R, V]
        k = (top_k.clamp(1, logits.shape[-1]) - 1).expand(*logits.shape[:-1], 1)
        kth = ranked.gather(-1, k)
    else:
        kth = logits.topk(min(top_k, logits.shape[-1]), dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, torch.finfo(logits.dtype).min)


def _choose_llada(s: DecodeStructure, logits, noise, unif, raw, values, cdtype):
    temperature = values[0]
    if s.sampled:   # Gumbel-max in float64: argmax exp(l) / (-log u)^T samples softmax(l / T)
        x0 = (logits.double().exp() / (-noise.log()).pow(temperature)).argmax(-1)
    else:
        x0 = logits.argmax(-1)
    src = raw if raw is not None and s.confidence_dtype == "logits" else logits
    p0 = src.to(cdtype).softmax(-1).gather(-1, x0[..., None]).squeeze(-1)
    return x0, (unif.to(cdtype) if s.remasking == "random" else p0), p0


def _choose_dream(s: DecodeStructure, logits, noise, unif, raw, values, cdtype):
    temperature, top_p, top_k = values
    if s.sampled:
        logits = logits / (temperature.to(logits.dtype) if isinstance(temperature, torch.Tensor) else temperature)
    if s.top_p:
        logits = _top_p_filter(logits, top_p)
    if s.top_k:
        logits = _top_k_filter(logits, top_k)
    probs = logits.softmax(-1)                                        # [B, R, V] fp32: the sampler's
    # exponential race: argmax p / E with E ~ Exp(1) is a categorical sample; greedy: the most probable
    x0 = (probs / noise).argmax(-1) if s.sampled else probs.argmax(-1)
    if cdtype != probs.dtype:
        probs = logits.to(cdtype).softmax(-1)                         # the same, in the confidence dtype
    conf = probs.gather(-1, x0[..., None]).squeeze(-1)
    p0 = conf
    if s.alg == "topk_margin":
        top2 = probs.topk(2, dim=-1).values
        conf = top2[..., 0] - top2[..., 1]
    elif s.alg == "entropy":
        conf = (probs * (probs + 1e-10).log()).sum(-1)
    return x0, conf, p0


def choose(s: DecodeStructure, logits: torch.Tensor, noise: torch.Tensor | None, unif: torch.Tensor | None,
           raw: torch.Tensor | None, values):
    """logits [B, R, V] fp32 for the candidate rows -> (x0 [B, R] int64, confidence [B, R], p(x0) [B, R]),
    the last two in the confidence dtype (float64, or raw's dtype for "logits"). The confidence ranks
    commits (it depends on the alg); p(x0) is the certainty prior d2Cache ranks rows by, whatever the alg.
    Tokens are chosen from the fp32 logits as before; only the ranking precision follows the option.

    noise [B, R, V]: uniforms (LLaDA Gumbel, float64) or Exp(1) draws (Dream sampling), refilled by the
    caller each step; unif [B, R]: uniforms for LLaDA 'random' remasking. raw [B, R, V]: the logits in
    the model's dtype (None: logits), used when confidence_dtype is "logits". values: the request's
    (temperature, top_p, top_k), numbers or per-row tensors [B, 1, 1] (a StepState's); s only decides
    which paths exist."""
    cdtype = torch.float64 if s.confidence_dtype == "float64" else (raw if raw is not None else logits).dtype
    return FAMILY_DECODING[s.family].choose(s, logits, noise, unif, raw, values, cdtype)


def top_p0(s: DecodeStructure, logits: torch.Tensor, raw: torch.Tensor | None, values) -> torch.Tensor:
    """p(x0) [B, R] of each row's most likely token, as `choose` computes it at temperature 0 with the
    request's filters and confidence dtype: the certainty of rows a step does not commit from (d2Cache's
    rows outside the block; the reference keeps the p of a token it drew and discarded there)."""
    greedy = replace(s, sampled=False, remasking=s.remasking and "low_confidence", alg=s.alg and "maskgit_plus")
    return choose(greedy, logits, None, None, raw, values)[2]


@dataclass(frozen=True)
class FamilyDecoding:
    """A model family's decoding: the option naming its token-choice rule, its schedule, its sampler."""
    label: str
    option: str                      # "remasking" | "alg"
    rules: tuple[str, ...]
    default: str
    random_rule: str                 # the rule that draws one uniform per row
    reveal_rule: str | None          # the rule that reveals rows at random instead of ranking them
    filters: bool                    # top-p / top-k
    schedule: str                    # its own schedule (SCHEDULES), when the request names none
    choose: Callable
    noise_dtype: torch.dtype         # sampling noise per vocabulary entry: LLaDA's Gumbel uniforms in float64,
    noise_draw: str                  # Dream's Exp(1) race in fp32 ("uniform" | "exponential")


FAMILY_DECODING = {
    "llada": FamilyDecoding("LLaDA", "remasking", LLADA_REMASKING, "low_confidence", "random", None, False,
                            "uniform", _choose_llada, torch.float64, "uniform"),
    "dream": FamilyDecoding("Dream", "alg", DREAM_ALGS, "entropy", "origin", "origin", True,
                            "timesteps", _choose_dream, torch.float32, "exponential"),
}
SCHEDULE_COUNTS: dict[str, Callable[[int, int, float], list[int]]] = {   # (block, steps per block, eps) -> commits
    "uniform": lambda block, spb, eps: llada_block_counts(block, spb),
    "timesteps": dream_block_counts,
}
FAMILY_DECODING_LABEL = {f.option: f.label for f in FAMILY_DECODING.values()}   # option -> the family it belongs to
