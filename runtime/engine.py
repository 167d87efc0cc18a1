"""Engine: load once, generate many. The public Python API.

    from dllm.runtime import Engine
    eng = Engine.from_pretrained("LLaDA-8B-Instruct/", device="cuda", dtype=torch.bfloat16)
    out = eng.generate("What is 7*6?", chat=True, gen_length=128, steps=128, block_length=32)
    print(out.text[0], out.steps, out.seconds)
"""
from __future__ import annotations

import json
import logging
import numbers
import re
import threading
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from dllm.graphs import backends
from dllm.graphs.capture import GraphPool
from dllm.models.checkpoint import Weights, available_bytes, load_weights
from dllm.models.config import CheckpointError, ModelConfig, load_config

from . import scheduler
from .decoding import DecodeConfig, RequestError, check_shape
from .policy import NoCache, Policy
from .prepared import Prepared
from .state import RequestShape, StepState, request_bytes
from .steps import with_noise

log = logging.getLogger("dllm")      # progress of long work (loading, preparing); the CLI shows it on stderr
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model")
DECODING_OPTIONS = ("remasking", "alg", "temperature", "top_p", "top_k", "threshold", "confidence_dtype")
PROMPT_GRANULARITY = 64       # default prompt buckets on the compile / CUDA graph backends: multiples of this
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DTYPE_CHOICES = ("auto", *DTYPES)   # "auto": bfloat16 where the device computes it natively, else float32


def native_bf16(device) -> bool:
    """Whether `device` computes bfloat16 natively: a CUDA GPU that supports it (Ampere or later), or a
    CPU with AVX512-BF16 or AMX (Linux: from /proc/cpuinfo's flags)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return re.search(r"\b(avx512_bf16|amx_bf16)\b", flags) is not None


def resolve_dtype(dtype, device) -> torch.dtype:
    """A dtype name, "auto" or a torch dtype -> the torch dtype (RequestError for anything else)."""
    if isinstance(dtype, torch.dtype) and dtype in DTYPES.values():
        return dtype
    if dtype == "auto":
        return torch.bfloat16 if native_bf16(device) else torch.float32
    if isinstance(dtype, str) and dtype in DTYPES:
        return DTYPES[dtype]
    raise RequestError(f"dtype must be one of {', '.join(DTYPE_CHOICES)}, got {dtype!r}")


@dataclass
class Generation:
    tokens: list[list[int]]          # G response ids per sequence
    text: list[str] | None           # decoded responses when the folder has a tokenizer
    steps: int
    step_kinds: dict[str, int]
    seconds: float                   # end to end: load request, all steps, read back (capture excluded)
    backend: str = "eager"
    capture_seconds: float = 0.0     # compile/capture this request triggered (0 when already captured)
    prompt_tokens: list[int] = field(default_factory=list)

    @property
    def tokens_per_second(self) -> float:
        return sum(len(t) for t in self.tokens) / self.seconds if self.seconds > 0 else float("inf")

    def to_json(self) -> dict:
        return {"tokens": self.tokens, "text": self.text, "steps": self.steps,
                "step_kinds": dict(self.step_kinds), "seconds": self.seconds, "backend": self.backend,
                "capture_seconds": self.capture_seconds}


@dataclass(frozen=True)
class StepEvent:
    """What an on_step observer receives after each step of a generation."""
    index: int                      # 0-based step number within this generation
    kind: str                       # the step kind that ran ("full", "partial", ...)
    tokens: list[list[int]]         # [B][G] response canvas after the step; mask_id where still masked
    committed: list[list[int]]      # [B][*] response positions this step committed
    seconds: float                  # wall time of this step (device synchronised)
    mask_id: int


@dataclass(frozen=True)
class Bucket:
    """A request shape the engine prepares ahead: prompts up to `prompt` tokens (left-padded to it),
    `gen_length` response tokens in `steps` steps of blocks of `block_length` (default gen_length)."""
    prompt: int
    gen_length: int
    steps: int
    block_length: int | None = None
    batch: int = 1

    def shape(self) -> RequestShape:
        block = self.gen_length if self.block_length is None else self.block_length   # 0 is refused, not "one block"
        return RequestShape(self.batch, self.prompt, self.gen_length, block, self.steps)


def _is_id(t) -> bool:
    """A token id as a user may pass one: a python or numpy integer, never a bool."""
    return isinstance(t, numbers.Integral) and not isinstance(t, (bool, np.bool_))


def load_tokenizer(folder: Path, trust_remote_code: bool = False):
    """The folder's tokenizer, or None when it has none. Custom tokenizer code (Dream's) only runs
    when the caller says so; nothing is fetched from a hub."""
    if not any((folder / f).is_file() for f in TOKENIZER_FILES):
        return None
    tc = folder / "tokenizer_config.json"
    if tc.is_file() and not trust_remote_code:
        try:
            needs_code = "auto_map" in json.loads(tc.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError, TypeError) as e:
            raise CheckpointError(f"{tc}: not valid JSON ({e})") from None
        if needs_code:
            raise RemoteCodeRequired(f"{folder}: the tokenizer needs custom code (tokenizer_config.json has an "
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
    except Exception as e:                 # tokenizers/transformers raise many types for one broken folder
        raise CheckpointError(f"{folder}: cannot load the tokenizer ({type(e).__name__}: "
                              f"{str(e).splitlines()[0] if str(e) else 'no message'}); the tokenizer files "
                              f"are missing, empty or corrupt") from None
    finally:
        hf_logging.set_verbosity(level)


class RemoteCodeRequired(CheckpointError):
    """The folder's tokenizer needs custom code the caller did not allow."""


def _counted(step_fns: dict, progress: Callable[[int, int], None], planned: int) -> dict:
    """Step functions that report (steps launched, steps planned) after each launch."""
    launched = [0]

    def wrap(fn):
        def step():
            fn()
            launched[0] += 1
            progress(launched[0], planned)
        return step
    return {k: wrap(fn) for k, fn in step_fns.items()}


class FifoLock:
    """A re-entrant lock granted in arrival order (threading.Lock makes no ordering promise): callers
    of one engine are served one at a time, first come first served."""

    def __init__(self):
        self._cv = threading.Condition()
        self._next = self._serving = self._depth = 0
        self._owner: int | None = None

    def __enter__(self):
        me = threading.get_ident()
        with self._cv:
            if self._owner == me:
                self._depth += 1
                return self
            ticket, self._next = self._next, self._next + 1
            self._cv.wait_for(lambda: self._serving == ticket)
            self._owner, self._depth = me, 1
        return self

    def __exit__(self, *exc):
        with self._cv:
            self._depth -= 1
            if self._depth == 0:
                self._owner, self._serving = None, self._serving + 1
                self._cv.notify_all()


class Engine:
    def __init__(self, cfg: ModelConfig, weights: Weights, *, folder: Path | None = None,
                 device="cpu", dtype=torch.float32, trust_remote_code: bool = False, backend: str | None = None,
                 buckets=None, policies=None, decoding: dict | None = None, capture_on_demand: bool | None = None,
                 max_prepared: int | None = 32, max_prepared_bytes: int | None = None, keep_faster: bool = True):
        """backend: eager | compile | cudagraph | compile+cudagraph (default: the fastest on the device).
        buckets: Bucket list prepared (compiled / captured) now, for each policy in `policies` (default
        NoCache) and the `decoding` options (default greedy); `capture_seconds` reports the time.
        capture_on_demand: prepare unseen shapes at request time (default: only when no buckets given);
        when False, a request that fits no prepared bucket is refused.
        max_prepared / max_prepared_bytes: bound what the engine keeps: beyond either limit the least
        recently used prepared request (buffers, compiled and captured steps) is released; declared
        buckets are never evicted (Engine.free releases everything).
        keep_faster: on CPU, each compiled step kind keeps whichever of the compiled step and the eager
        body ran faster right after compiling (graphs.backends.keep_faster); False always runs compiled."""
        self.cfg, self.weights = cfg, weights
        self.keep_faster = keep_faster
        self.folder, self.device, self.dtype = folder, torch.device(device), dtype
        self.trust_remote_code = trust_remote_code
        self.backend = backends.check(backend or backends.default_backend(self.device), self.device)
        self.capture_on_demand = buckets is None if capture_on_demand is None else capture_on_demand
        self._tokenizer = None
        self._lock = FifoLock()                        # generate/capture: one at a time, in order
        self._prepared: dict[tuple, Prepared] = {}    # (shape, decoding, policy key) -> its buffers and steps,
        self._pinned: set[tuple] = set()               # least recently used first; declared buckets' keys
        for name, v in (("max_prepared", max_prepared), ("max_prepared_bytes", max_prepared_bytes)):
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
                raise RequestError(f"{name} must be an integer >= 1 or None (no limit), got {v!r}")
        self.max_prepared, self.max_prepared_bytes = max_prepared, max_prepared_bytes
        self._pool = GraphPool(self.device) if "cudagraph" in self.backend else None
        self.buckets: list[Bucket] = []
        self.capture_seconds = 0.0
        for b in buckets or []:
            for pol in policies or [NoCache()]:
                self.capture_seconds += self.capture(b, pol, **(decoding or {}))

    @classmethod
    def from_pretrained(cls, folder, *, device="cpu", dtype=torch.float32, trust_remote_code: bool = False,
                        **engine_options):
        """Load a checkpoint folder; engine_options are Engine's (backend, buckets, policies, ...).
        dtype: float32 (the default here: exact reference tokens), bfloat16, float16, or "auto" (bfloat16
        where the device computes it natively, else float32: the command line's default)."""
        if not isinstance(folder, (str, Path)):
            raise RequestError(f"folder must be a path (str or pathlib.Path), got {type(folder).__name__}")
        folder = Path(folder)
        try:
            device = torch.device(device)
        except (RuntimeError, TypeError) as e:
            raise RequestError(f"device must be 'cpu', 'cuda' or 'cuda:N' (or a torch.device), got {device!r} "
                               f"({str(e).splitlines()[0]})") from None
        dtype = resolve_dtype(dtype, device)
        if device.type not in ("cpu", "cuda"):
            raise RequestError(f"device {device} is not supported; use cpu or cuda")
        if device.type == "cuda" and not torch.cuda.is_available():
            raise RequestError("device cuda requested but this torch build sees no CUDA device; use --device cpu")
        cfg = load_config(folder)
        t0 = time.perf_counter()
        log.info("loading weights from %s (%s, %d layers, d %d) to %s %s", folder, cfg.family, cfg.n_layers,
                 cfg.d_model, device, str(dtype).replace("torch.", ""))
        weights = load_weights(folder, cfg, dtype=dtype, device=device)
        nbytes = sum(t.numel() * t.element_size() for t in weights.tensors().values())
        size = f"{nbytes / 1e9:.2f} GB" if nbytes >= 1e8 else f"{nbytes / 1e6:.1f} MB"
        log.info("loaded %s of weights in %.1f s", size, time.perf_counter() - t0)
        return cls(cfg, weights, folder=folder, device=device, dtype=dtype, trust_remote_code=trust_remote_code,
                   **engine_options)

    # ------------------------------------------------------------------ prompts

    @property
    def tokenizer(self):
        if self._tokenizer is None and self.folder is not None:
            self._tokenizer = load_tokenizer(self.folder, self.trust_remote_code)
        return self._tokenizer

    def _tokenizer_if_usable(self):
        """For decoding an id prompt's output: no tokenizer (or one that needs custom code the caller
        did not allow) means no text, not an error; the caller asked for ids. A broken one is an error."""
        try:
            return self.tokenizer
        except RemoteCodeRequired:
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

    def _encode_checked(self, text: str, chat: bool) -> list[int]:
        """encode, with text that is not valid Unicode and tokenizer/template failures as RequestError."""
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as e:
            raise RequestError(f"the prompt is not valid UTF-8 text (character {e.start}: {text[e.start]!r}); "
                               f"pass UTF-8 text or token ids") from None
        try:
            return self.encode(text, chat)
        except (RequestError, CheckpointError):
            raise
        except Exception as e:              # a broken chat template (jinja) or tokenizer code
            raise RequestError(f"{self.folder}: the tokenizer failed on this prompt ({type(e).__name__}: "
                               f"{str(e).splitlines()[0] if str(e) else 'no message'}); its chat template or "
                               f"tokenizer files are broken") from None

    def _prompt_ids(self, prompt, chat: bool) -> list[list[int]]:
        """prompt: text, a list of texts, token ids (list, tuple, 1-D numpy array or tensor, numpy
        integers), or a batch of them (2-D array / tensor, list of lists) -> [B][P_b] python ints."""
        if hasattr(prompt, "tolist") and not isinstance(prompt, (str, bytes)):   # numpy array / torch tensor
            prompt = prompt.tolist()
        if isinstance(prompt, bytes):
            try:
                prompt = prompt.decode("utf-8")
            except UnicodeDecodeError:
                raise RequestError("the prompt bytes are not valid UTF-8; pass text or token ids") from None
        texts = [prompt] if isinstance(prompt, str) else prompt
        is_text = isinstance(texts, (list, tuple)) and bool(texts) and all(isinstance(p, str) for p in texts)
        if is_text:
            prompts = [self._encode_checked(p, chat) for p in texts]
        elif isinstance(prompt, (list, tuple)) and prompt and all(_is_id(t) for t in prompt):
            prompts = [[int(t) for t in prompt]]
        elif isinstance(prompt, (list, tuple)) and prompt and all(
                isinstance(p, (list, tuple)) or hasattr(p, "tolist") for p in prompt):
            prompts = [list(p.tolist() if hasattr(p, "tolist") else p) for p in prompt]
            for b, ids in enumerate(prompts):
                if not all(_is_id(t) for t in ids):
                    raise RequestError(f"prompt {b}: token ids must be integers, got "
                                       f"{[t for t in ids if not _is_id(t)][:5]}")
            prompts = [[int(t) for t in ids] for ids in prompts]
        else:
            raise RequestError(f"prompt must be a string, a list of strings, a list of integer token ids "
                               f"(or a 1-D integer array/tensor), or a list of token-id lists; got "
                               f"{type(prompt).__name__} {str(prompt)[:60]!r}")
        if not is_text:                     # ids: a broken tokenizer is refused now, not after generating
            self._tokenizer_if_usable()
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

    def prepared(self, shape: RequestShape, dc: DecodeConfig, policy: Policy) -> Prepared:
        """The prepared request for this shape, decoding options and policy (allocated on first use)."""
        key = (shape, dc.structure(), policy.key(shape))       # one prepared request serves every value
        if key not in self._prepared:
            need, free = request_bytes(self.cfg, shape, dc, policy.uses_cache, self.dtype), available_bytes(self.device)
            if free is not None and need > free:
                raise RequestError(f"this request (batch {shape.batch}, prompt bucket {shape.prompt_bucket}, gen "
                                   f"{shape.gen_length}, block {shape.block_length}, policy {policy.name}) needs about "
                                   f"{need / 2**30:.2f} GiB but {self.device} has {free / 2**30:.2f} GiB available; "
                                   f"use a shorter prompt or response, a smaller batch or block")
            self._evict(keep=1)
            self._prepared[key] = Prepared.allocate(self.weights, self.cfg, shape, dc, policy, self.device, self.dtype)
        self._prepared[key] = self._prepared.pop(key)                # most recently used last
        self._evict(current=key)
        return self._prepared[key]

    def _evict(self, keep: int = 0, current: tuple | None = None) -> None:
        """Drop least-recently-used prepared requests (never a declared bucket's, never the one being
        served) until at most max_prepared - keep remain and they hold at most max_prepared_bytes."""
        def over() -> bool:
            if self.max_prepared is not None and len(self._prepared) > self.max_prepared - keep:
                return True
            return self.max_prepared_bytes is not None and \
                sum(p.nbytes for p in self._prepared.values()) > self.max_prepared_bytes
        for key in [k for k in self._prepared if k not in self._pinned and k != current]:
            if not over():
                break
            self._release(self._prepared.pop(key))

    def _release(self, prep: Prepared) -> None:
        if self._pool is not None:
            self._pool.release(prep.steps.values())
        prep.steps.clear()

    def free(self) -> None:
        """Release every prepared request (buffers, compiled and captured steps), declared buckets included;
        later requests prepare again as needed."""
        with self._lock:
            for prep in self._prepared.values():
                self._release(prep)
            self._prepared.clear()
            self._pinned.clear()
            self.buckets.clear()
            if self.device.type == "cuda":
                torch.cuda.empty_cache()

    def prepare_steps(self, prep: Prepared, kinds) -> float:
        """Make the given step kinds runnable (compile / capture the missing ones on this engine's
        backend); returns the seconds spent now."""
        missing = [k for k in prep.bodies if k in kinds and k not in prep.steps]
        if not missing:
            return 0.0
        # warm-up needs a sane canvas; generate() refills it with the real request afterwards
        prep.fill(self.cfg, [[self.cfg.pad_id] * prep.shape.prompt_bucket] * prep.shape.batch, seed=0)

        def reset():
            prep.state.rewind()
            prep.state.draw_noise()
        s = prep.shape
        if self.backend != "eager":
            log.info("preparing %s (%s) for batch %d, prompt bucket %d, gen %d, %d steps, policy %s ...",
                     ", ".join(missing), self.backend, s.batch, s.prompt_bucket, s.gen_length, s.steps,
                     prep.policy.name)
        with torch.inference_mode():
            new, seconds = backends.prepare(self.backend, {k: prep.bodies[k] for k in missing}, reset, self._pool,
                                            keep_faster_on_cpu=self.keep_faster and self.device.type == "cpu")
        if self.backend != "eager":
            log.info("prepared %s in %.1f s", ", ".join(missing), seconds)
        prep.steps.update(new)
        prep.prepare_seconds += seconds
        return seconds

    def capture(self, bucket: Bucket, policy=None, **decoding) -> float:
        """Prepare every step kind of `policy` for a bucket now; returns the seconds it took."""
        policy = policy or NoCache()
        shape = bucket.shape()
        self._check_shape(shape)
        unknown = set(decoding) - set(DECODING_OPTIONS)
        if unknown:
            raise RequestError(f"unknown decoding options {sorted(unknown)}; use {', '.join(DECODING_OPTIONS)}")
        dc = DecodeConfig.make(self.cfg.family, **decoding)
        with self._lock:
            self._pinned.add((shape, dc.structure(), policy.key(shape)))
            seconds = self.prepare_steps(self.prepared(shape, dc, policy), policy.kinds)
            if bucket not in self.buckets:
                self.buckets.append(bucket)
        return seconds

    def _default_bucket(self, longest: int, gen_length: int) -> int:
        """The prompt bucket of a request that names none: on eager the prompt's own length (nothing to
        reuse); on the compiling / capturing backends the length rounded up to PROMPT_GRANULARITY, so
        prompts of similar length share one compiled or captured shape (same tokens in any bucket)."""
        if self.backend == "eager":
            return longest
        rounded = -(-longest // PROMPT_GRANULARITY) * PROMPT_GRANULARITY
        fits = not self.cfg.max_seq_len or rounded + gen_length <= self.cfg.max_seq_len
        return rounded if fits else longest

    def _check_shape(self, shape: RequestShape) -> None:
        check_shape(shape.gen_length, shape.block_length, shape.steps)
        if self.cfg.max_seq_len and shape.length > self.cfg.max_seq_len:
            raise RequestError(f"prompt bucket {shape.prompt_bucket} + gen_length {shape.gen_length} exceeds the "
                               f"model's maximum sequence length {self.cfg.max_seq_len}; shorten the prompt or "
                               f"the response")

    def _pick_shape(self, prompts, gen_length, steps, block_length, prompt_bucket, dc, policy) -> RequestShape:
        if not isinstance(policy, Policy):
            hint = f"; use make_policy({policy!r})" if isinstance(policy, str) else ""
            raise RequestError(f"policy must be a Policy object (NoCache(), DllmCache(...), ...) or None, got "
                               f"{type(policy).__name__} {policy!r}{hint}")
        for name, v in (("prompt_bucket", prompt_bucket), ("block_length", block_length)):
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
                raise RequestError(f"{name} must be an integer >= 1 or None, got {v!r}")
        longest = max(len(p) for p in prompts)
        block = gen_length if block_length is None else block_length
        if prompt_bucket is not None and longest > prompt_bucket:
            raise RequestError(f"prompt has {longest} tokens but the prompt bucket holds {prompt_bucket}; "
                               f"use a bucket of at least {longest} or shorten the prompt")
        # the smallest prepared bucket that fits, if any
        fits = [b for b in self.buckets if b.batch == len(prompts) and b.gen_length == gen_length
                and b.steps == steps and (b.gen_length if b.block_length is None else b.block_length) == block and b.prompt >= longest
                and prompt_bucket in (None, b.prompt)]
        for b in sorted(fits, key=lambda b: b.prompt):
            shape = b.shape()
            if (shape, dc.structure(), policy.key(shape)) in self._prepared or self.capture_on_demand:
                return shape
        shape = RequestShape(len(prompts), prompt_bucket or self._default_bucket(longest, gen_length), gen_length,
                             block, steps)
        self._check_shape(shape)
        if not self.capture_on_demand:
            have = ", ".join(f"(prompt<={b.prompt}, gen {b.gen_length}, steps {b.steps}, block "
                             f"{b.gen_length if b.block_length is None else b.block_length}, batch {b.batch})" for b in self.buckets) or "none"
            raise RequestError(
                f"no prepared bucket fits this request (batch {len(prompts)}, prompt {longest} tokens, gen "
                f"{gen_length}, steps {steps}, block {block}, policy {policy.name}, {dc}); prepared buckets: "
                f"{have}. Add a bucket for it (Engine(buckets=[Bucket(...)], policies=[...], decoding={{...}})) "
                f"or allow on-demand capture (capture_on_demand=True)")
        return shape

    def generate(self, prompt, *, gen_length: int, steps: int, block_length: int | None = None,
                 remasking: str | None = None, alg: str | None = None, temperature: float = 0.0,
                 top_p: float | None = None, top_k: int | None = None, seed: int = 0, chat: bool = False,
                 prompt_bucket: int | None = None, policy=None, threshold: float | None = None,
                 confidence_dtype: str = "float64", on_step: Callable[[StepEvent], None] | None = None,
                 progress: Callable[[int, int], None] | None = None) -> Generation:
        """threshold: commit every masked row of the block whose p(x0) >= threshold (at least one per
        step); the number of steps then depends on the data (steps only has to divide into blocks).
        confidence_dtype: rank and threshold p(x0) in "float64" (Fast-dLLM) or "logits" (the logits' own
        dtype, as the official LLaDA sampler and dLLM-Cache).
        on_step: called after every step with a StepEvent; only then is the canvas read back per step.
        progress(launched, planned): called after each step is launched, host-side only (no device read;
        on a GPU the device may still be working on it); planned is the most steps the request can take.
        Safe to call from many threads: requests run one at a time, in arrival order."""
        with self._lock:
            return self._generate(prompt, gen_length, steps, block_length, remasking, alg, temperature, top_p,
                                  top_k, seed, chat, prompt_bucket, policy, threshold, confidence_dtype, on_step,
                                  progress)

    def _generate(self, prompt, gen_length, steps, block_length, remasking, alg, temperature, top_p, top_k, seed,
                  chat, prompt_bucket, policy, threshold, confidence_dtype, on_step, progress) -> Generation:
        cfg = self.cfg
        policy = policy or NoCache()
        dc = DecodeConfig.make(cfg.family, remasking, alg, temperature, top_p, top_k, threshold, confidence_dtype)
        prompts = self._prompt_ids(prompt, chat)
        shape = self._pick_shape(prompts, gen_length, steps, block_length, prompt_bucket, dc, policy)
        prep = self.prepared(shape, dc, policy)
        plan = None if threshold is not None else policy.plan(steps, steps // shape.n_blocks)
        kinds_needed = [k for k in policy.kinds if plan is None or k in plan]
        capture_seconds = self.prepare_steps(prep, kinds_needed)
        st = prep.state
        step_fns = {k: with_noise(st, prep.steps[k]) for k in kinds_needed}
        if on_step is not None:
            step_fns = self._observed(step_fns, st, on_step)
        if progress is not None:
            step_fns = _counted(step_fns, progress, steps if plan is None else len(plan))

        with torch.inference_mode():
            self._sync()
            t0 = time.perf_counter()
            prep.fill(cfg, prompts, seed)
            st.with_values(dc)
            if plan is None:
                kinds = scheduler.run_until_done(policy.kind_at, step_fns, lambda: int(st.block.item()),
                                                 shape.n_blocks, shape.block_length)
            else:
                kinds = scheduler.run(plan, step_fns)
            out = st.tokens[:, shape.prompt_bucket:].cpu().tolist()
            t1 = time.perf_counter()
        tok = self._tokenizer_if_usable()
        text = None if tok is None else [tok.decode(ids, skip_special_tokens=True) for ids in out]
        return Generation(tokens=out, text=text, steps=sum(kinds.values()), step_kinds=dict(kinds),
                          seconds=t1 - t0,
                          backend=self.backend, capture_seconds=capture_seconds,
                          prompt_tokens=[len(p) for p in prompts])

    def _observed(self, step_fns: dict, st: StepState, on_step) -> dict:
        """Step functions that, after each step, read the response back and tell the observer."""
        P, mask = st.shape.prompt_bucket, self.cfg.mask_id
        seen = {"n": 0, "prev": None, "t": 0.0}

        def wrap(kind, fn):
            def step():
                if seen["prev"] is None:
                    self._sync()
                    seen["prev"] = st.tokens[:, P:].tolist()
                    seen["t"] = time.perf_counter()
                fn()
                self._sync()
                now, canvas = time.perf_counter(), st.tokens[:, P:].tolist()
                committed = [[j for j, (a, b) in enumerate(zip(old, new)) if a == mask and b != mask]
                             for old, new in zip(seen["prev"], canvas)]
                on_step(StepEvent(seen["n"], kind, canvas, committed, now - seen["t"], mask))
                seen["n"] += 1
                seen["prev"], seen["t"] = canvas, time.perf_counter()
            return step
        return {k: wrap(k, fn) for k, fn in step_fns.items()}

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
