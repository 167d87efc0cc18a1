"""One generation request: the prompt and every option, in one struct, validated once, here (as
llama.cpp's params struct). Every face builds one: the CLI from its flags, the server from a JSON body,
the lm-eval adapter from model arguments, perf from `name:k=v` specs (runtime/options.py parses all of
them by these fields' types). Checks that need nothing but the request run when it is made; the rest
need only config.json (`check(cfg)`), never the weights.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from .decoding import CONFIDENCE_DTYPES, DREAM_ALGS, LLADA_REMASKING, SCHEDULES, DecodeConfig, check_shape, check_values
from .errors import RequestError
from .policy import NoCache, Policy
from .state import RequestShape
from .text import prompt_parts

DEFAULT_GEN_LENGTH = 128            # without a request value or the model's generation_config.json


def _opt(help: str, **more) -> dict:
    return {"help": help, **more}


@dataclass(frozen=True)
class Request:
    """What to generate and how. Lengths left as None take the model's defaults (`resolved`). A Request
    without a prompt describes a shape and its options (a bucket to prepare, a package to export)."""
    prompt: Any = field(default=None, metadata=_opt(
        "text, a list of texts, token ids, or a list of token-id lists (a batch)"))
    gen_length: int | None = field(default=None, metadata=_opt(
        "response length G (default: the model folder's generation_config.json, else 128)"))
    steps: int | None = field(default=None, metadata=_opt(
        "denoising steps, a multiple of the block count (default: G, one token per step)"))
    block_length: int | None = field(default=None, metadata=_opt(
        "semi-autoregressive block length, divides G (default: G, a single block)"))
    prompt_bucket: int | None = field(default=None, metadata=_opt(
        "left-pad prompts to this length (default: the longest prompt's own length)"))
    remasking: str | None = field(default=None, metadata=_opt(
        "LLaDA token choice (default low_confidence)", choices=LLADA_REMASKING))
    alg: str | None = field(default=None, metadata=_opt("Dream token choice (default entropy)", choices=DREAM_ALGS))
    temperature: float = field(default=0.0, metadata=_opt("sampling temperature (0: greedy)"))
    top_p: float | None = field(default=None, metadata=_opt("Dream: nucleus sampling"))
    top_k: int | None = field(default=None, metadata=_opt("Dream: top-k sampling"))
    threshold: float | None = field(default=None, metadata=_opt(
        "commit every masked block token with p >= threshold (at least one) per step; the step count then "
        "depends on the data"))
    confidence_dtype: str = field(default="float64", metadata=_opt(
        "rank and threshold p(x0) in float64 (as Fast-dLLM; default) or in the logits' own dtype (as the "
        "official LLaDA sampler and dLLM-Cache: reproduces them tie for tie at bf16)", choices=CONFIDENCE_DTYPES))
    schedule: str | None = field(default=None, metadata=_opt(
        "tokens committed per step: uniform (a block's masks spread evenly over its steps, LLaDA's; the "
        "reference d2Cache's n per step for Dream too) or timesteps (Dream's linspace schedule); default: "
        "the family's own", choices=SCHEDULES))
    policy: Policy = field(default_factory=NoCache, metadata=_opt("cache policy (None: NoCache)"))
    seed: int | tuple[int, ...] = field(default=0, metadata=_opt(
        "seed of the sampling noise: one stream for the batch, or a list with one seed per prompt row"))
    chat: bool = field(default=False, metadata=_opt("wrap text prompts in the model folder's chat template"))
    stop: tuple[str, ...] = field(default=(), metadata=_opt("stop sequences: the text ends before the first one"))
    text_tokens: int | None = field(default=None, metadata=_opt(
        "response tokens the text is made of (default: all G; fewer when G was rounded up to whole blocks)"))

    def __post_init__(self):
        if self.prompt is not None:
            prompt_parts(self.prompt)                      # the prompt's type and shape (tokenizer-free)
        for name in ("gen_length", "steps", "block_length", "prompt_bucket", "text_tokens"):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
                raise RequestError(f"{name} must be an integer >= 1, got {v!r}", name)
        check_values(self.temperature, self.top_p, self.top_k, self.threshold, self.confidence_dtype, self.schedule)
        for name, allowed in (("remasking", LLADA_REMASKING), ("alg", DREAM_ALGS)):
            v = getattr(self, name)
            if v is not None and v not in allowed:
                raise RequestError(f"unknown {name} {v!r}; choose one of {', '.join(allowed)}", name)
        if self.policy is None:
            object.__setattr__(self, "policy", NoCache())
        if not isinstance(self.policy, Policy):
            hint = f"; use make_policy({self.policy!r})" if isinstance(self.policy, str) else ""
            raise RequestError(f"policy must be a Policy object (NoCache(), DllmCache(...), ...), got "
                               f"{type(self.policy).__name__} {self.policy!r}{hint}", "policy")
        seeds = self.seed if isinstance(self.seed, (list, tuple)) else [self.seed]
        if not seeds or any(isinstance(s, bool) or not isinstance(s, int) or not 0 <= s < 2 ** 64 for s in seeds):
            raise RequestError(f"seed must be an integer in [0, 2**64) or a list of them (one per prompt), got "
                               f"{self.seed!r}", "seed")
        if isinstance(self.seed, list):
            object.__setattr__(self, "seed", tuple(self.seed))
        if not isinstance(self.chat, bool):
            raise RequestError(f"chat must be True or False, got {self.chat!r}", "chat")
        stop = (self.stop,) if isinstance(self.stop, str) else self.stop
        if not isinstance(stop, (tuple, list)) or not all(isinstance(s, str) and s for s in stop):
            raise RequestError(f"stop must be a non-empty string or a list of them, got {self.stop!r}", "stop")
        object.__setattr__(self, "stop", tuple(stop))
        if self.lengths_given():
            self.shape_check()

    # ---------------------------------------------------------------- what needs more than the request

    def lengths_given(self) -> bool:
        return self.gen_length is not None and self.steps is not None and self.block_length is not None

    def shape_check(self) -> int:
        """gen/block/steps fit together; returns steps per block (lengths must be resolved)."""
        return check_shape(self.gen_length, self.block_length, self.steps)

    def resolved(self, defaults: "GenerationDefaults | None" = None) -> "Request":
        """This request with every length set: its own, else the model's defaults, else G = 128 in G steps
        of one block. The model's steps and block apply only to its own gen_length."""
        d = defaults or GenerationDefaults()
        G = self.gen_length or d.gen_length
        same = G == d.gen_length
        steps = self.steps or (d.steps if same and d.steps else G)
        block = self.block_length or (d.block_length if same and d.block_length else G)
        return replace(self, gen_length=G, steps=steps, block_length=block)

    def decode_config(self, family: str) -> DecodeConfig:
        return DecodeConfig.make(family, self.remasking, self.alg, self.temperature, self.top_p, self.top_k,
                                 self.threshold, self.confidence_dtype, self.schedule)

    def check(self, cfg) -> DecodeConfig:
        """Everything config.json decides (decoding options against the family, the policy against the
        decoding, the canvas against the model's length): before any weight is read."""
        dc = self.decode_config(cfg.family)
        self.policy.check(cfg, dc.structure)
        if self.lengths_given() and cfg.max_seq_len and self.gen_length + (self.prompt_bucket or 1) > cfg.max_seq_len:
            raise RequestError(f"prompt bucket {self.prompt_bucket or 1} + gen_length {self.gen_length} exceeds the "
                               f"model's maximum sequence length {cfg.max_seq_len}; shorten the prompt or the response")
        return dc

    def options(self) -> dict:
        """Every field but the prompt, by name (policy as its spec)."""
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name != "prompt"}


OPTION_FIELDS = tuple(f for f in fields(Request) if f.name != "prompt")
DECODING_OPTIONS = ("remasking", "alg", "temperature", "top_p", "top_k", "threshold", "confidence_dtype", "schedule")


@dataclass(frozen=True)
class GenerationDefaults:
    """A model's generation defaults: its folder's generation_config.json (the HF file, with this
    runtime's keys: gen_length / max_new_tokens, steps, block_length, and dllm_prompt_pattern /
    dllm_prompt_hint: the prompt format it was trained on, warned about when a text prompt misses it),
    else G = 128."""
    gen_length: int = DEFAULT_GEN_LENGTH
    steps: int | None = None
    block_length: int | None = None
    from_file: bool = False         # read from the folder's generation_config.json (else the built-in 128)
    prompt_pattern: str | None = None   # a regular expression every plain-text prompt should match
    prompt_hint: str | None = None      # that format in words

    @staticmethod
    def read(folder: Path | None) -> "GenerationDefaults":
        path = None if folder is None else Path(folder) / "generation_config.json"
        if path is None or not path.is_file():
            return GenerationDefaults()
        from dllm.models.config import CheckpointError
        try:
            raw = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
            raise CheckpointError(f"{path}: not valid JSON ({str(e)[:80]})") from None
        if not isinstance(raw, dict):
            raise CheckpointError(f"{path}: must be a JSON object")
        got = {"gen_length": raw.get("gen_length", raw.get("max_new_tokens")), "steps": raw.get("steps"),
               "block_length": raw.get("block_length")}
        for k, v in got.items():
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
                raise CheckpointError(f"{path}: '{k}' must be an integer >= 1, got {v!r}")
        G = got["gen_length"] or DEFAULT_GEN_LENGTH
        try:
            check_shape(G, got["block_length"] or G, got["steps"] or G)
        except RequestError as e:
            raise CheckpointError(f"{path}: {e}") from None
        pattern, hint = raw.get("dllm_prompt_pattern"), raw.get("dllm_prompt_hint")
        if pattern is not None:
            try:
                re.compile(pattern)
            except (re.error, TypeError) as e:
                raise CheckpointError(f"{path}: 'dllm_prompt_pattern' is not a regular expression ({e})") from None
        return GenerationDefaults(G, got["steps"], got["block_length"], from_file=True, prompt_pattern=pattern,
                                  prompt_hint=hint if isinstance(hint, str) else None)


@dataclass(frozen=True)
class Bucket:
    """A request shape the engine prepares ahead: prompts up to `prompt` tokens (left-padded to it),
    `gen_length` response tokens in `steps` steps of blocks of `block_length` (default gen_length)."""
    prompt: int
    gen_length: int
    steps: int
    block_length: int | None = None
    batch: int = 1

    @property
    def block(self) -> int:
        return self.gen_length if self.block_length is None else self.block_length   # 0 is refused, not "one block"

    def shape(self) -> RequestShape:
        return RequestShape(self.batch, self.prompt, self.gen_length, self.block, self.steps)
