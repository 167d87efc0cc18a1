"""Engine: load once, generate many. The public Python API.

    from runtime import Engine
    eng = Engine.from_pretrained("LLaDA-8B-Instruct/", device="cuda", dtype=torch.bfloat16)
    out = eng.generate("What is 7*6?", chat=True, gen_length=128, steps=128, block_length=32)
    print(out.text[0], out.steps, out.seconds)
"""
from __future__ import annotations

import json
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch

from models.checkpoint import Weights, load_weights
from models.config import CheckpointError, ModelConfig, load_config

from . import scheduler
from .buffers import Cache, RequestShape, StepState
from .decoding import DecodeConfig, RequestError
from .policies import NoCache
from .steps import make_steps

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class Generation:
    tokens: list[list[int]]          # G response ids per sequence
    text: list[str] | None           # decoded responses when the folder has a tokenizer
    steps: int
    step_kinds: dict[str, int]
    seconds: float                   # end to end: load request, all steps, read back
    prompt_tokens: list[int] = field(default_factory=list)

    @property
    def tokens_per_second(self) -> float:
        return sum(len(t) for t in self.tokens) / self.seconds if self.seconds > 0 else float("inf")

    def to_json(self) -> dict:
        return {"tokens": self.tokens, "text": self.text, "steps": self.steps,
                "step_kinds": dict(self.step_kinds), "seconds": self.seconds}


def load_tokenizer(folder: Path, trust_remote_code: bool = False):
    """The folder's tokenizer, or None when it has none. Custom tokenizer code (Dream's) only runs
    when the caller says so; nothing is fetched from a hub."""
    if not any((folder / f).is_file() for f in TOKENIZER_FILES):
        return None
    tc = folder / "tokenizer_config.json"
    if tc.is_file() and not trust_remote_code:
        try:
            needs_code = "auto_map" in json.loads(tc.read_text())
        except json.JSONDecodeError as e:
            raise CheckpointError(f"{tc}: not valid JSON ({e})") from None
        if needs_code:
            raise CheckpointError(f"{folder}: the tokenizer needs custom code (tokenizer_config.json has an "
                                  f"auto_map, as Dream's does); pass --trust-remote-code "
                                  f"(trust_remote_code=True) if you trust this folder, or use --prompt-ids")
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging
    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()       # AutoTokenizer reads config.json too; its notices about the
    try:                                   # unknown model type are noise for a tokenizer load
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            return AutoTokenizer.from_pretrained(str(folder), trust_remote_code=trust_remote_code,
                                                 local_files_only=True)
    finally:
        hf_logging.set_verbosity(level)


class Engine:
    def __init__(self, cfg: ModelConfig, weights: Weights, *, folder: Path | None = None,
                 device="cpu", dtype=torch.float32, trust_remote_code: bool = False):
        self.cfg, self.weights = cfg, weights
        self.folder, self.device, self.dtype = folder, torch.device(device), dtype
        self.trust_remote_code = trust_remote_code
        self._tokenizer = None
        self._states: dict[tuple, StepState] = {}     # one preallocated state per request shape
        self._caches: dict[RequestShape, Cache] = {}  # one cache per request shape, for caching policies

    @classmethod
    def from_pretrained(cls, folder, *, device="cpu", dtype=torch.float32, trust_remote_code: bool = False):
        folder = Path(folder)
        if isinstance(dtype, str):
            if dtype not in DTYPES:
                raise RequestError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
            dtype = DTYPES[dtype]
        device = torch.device(device)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise RequestError("device cuda requested but this torch build sees no CUDA device; use --device cpu")
        cfg = load_config(folder)
        weights = load_weights(folder, cfg, dtype=dtype, device=device)
        return cls(cfg, weights, folder=folder, device=device, dtype=dtype, trust_remote_code=trust_remote_code)

    # ------------------------------------------------------------------ prompts

    @property
    def tokenizer(self):
        if self._tokenizer is None and self.folder is not None:
            self._tokenizer = load_tokenizer(self.folder, self.trust_remote_code)
        return self._tokenizer

    def _tokenizer_if_usable(self):
        """For decoding an id prompt's output: no tokenizer (or one that needs custom code the caller
        did not allow) means no text, not an error; the caller asked for ids."""
        try:
            return self.tokenizer
        except CheckpointError:
            return None

    def encode(self, text: str, chat: bool = False) -> list[int]:
        tok = self.tokenizer
        if tok is None:
            raise RequestError(f"{self.folder} has no tokenizer files ({', '.join(TOKENIZER_FILES)}); "
                               f"pass token ids instead (--prompt-ids 1,2,3)")
        if chat:
            if not getattr(tok, "chat_template", None):
                raise RequestError(f"{self.folder}: the tokenizer has no chat template; drop --chat")
            text = tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                           tokenize=False)
            return tok(text, add_special_tokens=False)["input_ids"]
        return tok(text)["input_ids"]

    def _prompt_ids(self, prompt, chat: bool) -> list[list[int]]:
        if isinstance(prompt, str):
            prompts = [self.encode(prompt, chat)]
        elif prompt and all(isinstance(p, str) for p in prompt):
            prompts = [self.encode(p, chat) for p in prompt]
        elif prompt and all(isinstance(t, int) for t in prompt):
            prompts = [list(prompt)]
        elif prompt and all(isinstance(p, (list, tuple)) for p in prompt):
            prompts = [list(p) for p in prompt]
        else:
            raise RequestError("prompt must be a string, a list of strings, a list of token ids, "
                               "or a list of token-id lists")
        V, mask = self.cfg.vocab_size, self.cfg.mask_id
        for b, ids in enumerate(prompts):
            if not ids:
                raise RequestError(f"prompt {b} is empty; give at least one token")
            bad = [t for t in ids if not isinstance(t, int) or not 0 <= t < V]
            if bad:
                raise RequestError(f"prompt {b}: token ids {bad[:5]} are outside the vocabulary [0, {V})")
            if mask in ids:
                raise RequestError(f"prompt {b}: token id {mask} is the mask id; a prompt cannot contain masks")
        return prompts

    # ------------------------------------------------------------------ generation

    def state_for(self, shape: RequestShape, dc: DecodeConfig) -> StepState:
        key = (shape, dc)
        if key not in self._states:
            self._states[key] = StepState.allocate(self.cfg, shape, dc, self.device)
        return self._states[key]

    def cache_for(self, shape: RequestShape) -> Cache:
        if shape not in self._caches:
            self._caches[shape] = Cache.allocate(self.cfg, shape, self.device, self.dtype)
        return self._caches[shape]

    def generate(self, prompt, *, gen_length: int, steps: int, block_length: int | None = None,
                 remasking: str | None = None, alg: str | None = None, temperature: float = 0.0,
                 top_p: float | None = None, top_k: int | None = None, seed: int = 0, chat: bool = False,
                 prompt_bucket: int | None = None, policy=None) -> Generation:
        cfg = self.cfg
        policy = policy or NoCache()
        dc = DecodeConfig.make(cfg.family, remasking, alg, temperature, top_p, top_k)
        prompts = self._prompt_ids(prompt, chat)
        longest = max(len(p) for p in prompts)
        bucket = longest if prompt_bucket is None else prompt_bucket
        if longest > bucket:
            raise RequestError(f"prompt has {longest} tokens but the prompt bucket holds {bucket}; "
                               f"use a bucket of at least {longest} or shorten the prompt")
        if cfg.max_seq_len and bucket + gen_length > cfg.max_seq_len:
            raise RequestError(f"prompt bucket {bucket} + gen_length {gen_length} exceeds the model's maximum "
                               f"sequence length {cfg.max_seq_len}; shorten the prompt or the response")
        shape = RequestShape(len(prompts), bucket, gen_length, block_length or gen_length, steps)
        st = self.state_for(shape, dc)
        cache = self.cache_for(shape) if policy.uses_cache else None
        step_fns = make_steps(self.weights, cfg, st, cache, policy.budget(gen_length))
        plan = policy.plan(steps)

        with torch.inference_mode():
            self._sync()
            t0 = time.perf_counter()
            st.fill(cfg, prompts, seed)
            kinds = scheduler.run(plan, step_fns)
            out = st.tokens[:, bucket:].cpu().tolist()
            t1 = time.perf_counter()
        tok = self._tokenizer_if_usable()
        text = None if tok is None else [tok.decode(ids, skip_special_tokens=True) for ids in out]
        return Generation(tokens=out, text=text, steps=steps, step_kinds=dict(kinds), seconds=t1 - t0,
                          prompt_tokens=[len(p) for p in prompts])

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
