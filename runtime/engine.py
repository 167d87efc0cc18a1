"""Engine: load once, generate many. The public Python API.

    from dllm.runtime import Engine, Request
    eng = Engine.from_pretrained("LLaDA-8B-Instruct/", device="cuda", dtype="bfloat16")
    out = eng.generate("What is 7*6?", chat=True, gen_length=128, block_length=32)   # or eng.generate(Request(...))
    print(out.text[0], out.steps, out.seconds)
"""
from __future__ import annotations

import contextlib
import logging
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from dllm.graphs import backends
from dllm.graphs.capture import GraphPool
from dllm.models import parallel
from dllm.models import prepack as packing
from dllm.models.checkpoint import Weights, load_weights, rank_shapes
from dllm.models.config import ModelConfig, load_config
from dllm.models.hub import resolve_model
from dllm.models.memory import available_bytes
from dllm.models.quant import Quantization, weight_mode

from . import scheduler
from .decoding import DecodeConfig, DecodeStructure, check_shape
from .device import resolve_device, resolve_dtype
from .errors import RequestError
from .observe import BlockEvent, BlockReader, ProgressBar, StepEvent, counted, observed, ticking
from .policy import NoCache, Policy
from .prepared import Prepared
from .request import DECODING_OPTIONS, Bucket, GenerationDefaults, Request
from .state import RequestShape, request_bytes
from .steps import with_noise
from .store import PreparedStore
from .text import Text

log = logging.getLogger("dllm")      # progress of long work (loading, preparing); the CLI shows it on stderr
PROMPT_GRANULARITY = 64       # default prompt buckets on the compile / CUDA graph backends: multiples of this


@dataclass
class Generation:
    tokens: list[list[int]]          # [B][G] response ids
    text: list[str] | None           # per row, cut at the first end-of-text and stop sequence (None: no tokenizer)
    steps: int
    step_kinds: dict[str, int]
    seconds: float                   # end to end: load request, all steps, read back (preparation excluded)
    backend: str = "eager"
    prepare_seconds: float = 0.0     # compile/capture this request triggered (0 when already prepared)
    finish_reasons: list[str] | None = None   # per row: "stop" (end-of-text or a stop sequence) | "length"
    completion_tokens: list[int] | None = None  # per row: response tokens before the end-of-text

    @property
    def tokens_per_second(self) -> float:
        return sum(len(t) for t in self.tokens) / self.seconds if self.seconds > 0 else float("inf")

    def to_json(self) -> dict:
        return {"tokens": self.tokens, "text": self.text, "steps": self.steps,
                "step_kinds": dict(self.step_kinds), "seconds": self.seconds, "backend": self.backend,
                "prepare_seconds": self.prepare_seconds}


def check_request(cfg: ModelConfig, defaults: GenerationDefaults, text: Text, request: Request):
    """What needs only the model's config, generation defaults and tokenizer: the lengths, the decoding
    options and the policy against the family, the prompt against the vocabulary and the model's length
    -> (the resolved request, its decoding structure, its prompt rows)."""
    req = request.resolved(defaults)
    req.shape_check()
    s = req.check(cfg).structure
    prompts = text.prompt_ids(req.prompt, req.chat)
    longest = max(len(p) for p in prompts)
    if cfg.max_seq_len and longest + req.gen_length > cfg.max_seq_len:
        raise RequestError(f"the prompt's {longest} tokens + gen_length {req.gen_length} exceed the model's maximum "
                           f"sequence length {cfg.max_seq_len}; shorten the prompt or the response", "prompt")
    return req, s, prompts


class FifoLock:
    """A lock granted in arrival order (threading.Lock makes no ordering promise): callers of one engine
    are served one at a time, first come first served. A thread that asks again while it holds it (a
    callback of a running generation calling generate) is refused: both would share one prepared
    request's buffers."""

    def __init__(self):
        self._cv = threading.Condition()
        self._next = self._serving = 0
        self._owner: int | None = None

    def __enter__(self):
        me = threading.get_ident()
        with self._cv:
            if self._owner == me:
                raise RequestError("generate was called from inside a callback (on_step / progress) of a "
                                   "generation running on the same engine; finish that generation first, or use "
                                   "a second Engine")
            ticket, self._next = self._next, self._next + 1
            self._cv.wait_for(lambda: self._serving == ticket)
            self._owner = me
        return self

    def __exit__(self, *exc):
        with self._cv:
            self._owner, self._serving = None, self._serving + 1
            self._cv.notify_all()


ON_DEMAND = ("nothing", "options", "shapes")


def on_demand_mode(v) -> str:
    """prepare_on_demand as one of ON_DEMAND (True is "shapes", False "nothing")."""
    if isinstance(v, bool):
        return "shapes" if v else "nothing"
    if v not in ON_DEMAND:
        raise RequestError(f"prepare_on_demand must be True, False or one of {', '.join(ON_DEMAND)}, got {v!r}")
    return v


class Engine:
    def __init__(self, cfg: ModelConfig, weights: Weights, *, folder: Path | None = None,
                 device="cpu", dtype=torch.float32, trust_remote_code: bool = False, backend: str | None = None,
                 buckets=None, policies=None, decoding: dict | None = None, prepare_on_demand: bool | str | None = None,
                 max_prepared: int | None = 32, max_prepared_bytes: int | None = None, keep_faster: bool = True,
                 defaults: GenerationDefaults | None = None, prepack: bool = True):
        """backend: eager | compile | cudagraph | compile+cudagraph (default: the fastest on the device).
        buckets: Bucket list prepared (compiled / captured) now, for each policy in `policies` (default
        NoCache) and the `decoding` options (default greedy); `prepare_seconds` reports the time.
        prepare_on_demand: what a request may prepare when it needs it: "shapes" (anything: True), "options"
        (a declared bucket's shape with any decoding structure or policy, kept while the LRU bounds allow)
        or "nothing" (False: only what the buckets prepared). Default: "shapes" without buckets, else
        "nothing". A request it does not allow is refused, naming what to declare.
        max_prepared / max_prepared_bytes: bound what the engine keeps: beyond either limit the least
        recently used prepared request (buffers, compiled and captured steps) is released; declared
        buckets are never evicted (Engine.free releases everything).
        keep_faster: on CPU, each compiled step kind keeps whichever of the compiled step and the eager
        body ran faster right after compiling (graphs.backends.keep_faster); False always runs compiled.
        defaults: the lengths a request that names none gets (from_pretrained reads generation_config.json).
        prepack: on CPU in float32 under the eager backend, hold the matrices packed once for oneDNN
        (models/prepack.py: partial steps 1.2-1.6x faster); False keeps plain weights (MKL packs them on every call)."""
        self.cfg = cfg
        self.rank_cfg = weights.shard.local(cfg)       # what this rank computes: its heads and FFN columns
        self.keep_faster = keep_faster
        self.folder, self.device, self.dtype = folder, torch.device(device), dtype
        self.defaults = defaults or GenerationDefaults()
        self.text = Text(cfg, folder, trust_remote_code, self.defaults)
        self.backend = backends.check(backend or backends.default_backend(self.device), self.device)
        # CPU float32 eager: matrices prepacked for oneDNN once (models/prepack.py), else plain
        self.weights = packing.for_engine(weights, self.rank_cfg, self.device, dtype, self.backend, on=prepack)
        self.prepare_on_demand = on_demand_mode(buckets is None if prepare_on_demand is None else prepare_on_demand)
        self._lock = FifoLock()                        # generate / prepare: one at a time, in order
        self._pool = GraphPool(self.device) if "cudagraph" in self.backend else None
        self._store = PreparedStore(max_prepared, max_prepared_bytes, self._release)
        self.buckets: list[Bucket] = []
        self.prepare_seconds = 0.0
        for b in buckets or []:
            for pol in policies or [NoCache()]:
                self.prepare(b, pol, **(decoding or {}))

    @classmethod
    def from_pretrained(cls, folder, *, device="cpu", dtype=torch.float32, trust_remote_code: bool = False,
                        check: list[Request] = (), tp: int = 1, quantize: str = "none",
                        quantize_group: int | None = None, quantize_head: bool = False, **engine_options):
        """Load a checkpoint folder or a Hugging Face hub id (org/name: the local cache first);
        engine_options are Engine's (backend, buckets, policies, ...). dtype: float32 (the default here:
        exact reference tokens), bfloat16, float16, or "auto" (bfloat16 where the device computes it
        natively, else float32: the command line's default). check: requests to validate against the
        folder's config, generation defaults and tokenizer before a weight is read (RequestError).
        tp: tensor-parallel ranks (one process each, launched by torchrun; docs/parallel.md): this process
        loads and computes only its rank's heads, FFN columns and vocabulary rows.
        quantize: none | int8 | int4, weight-only (docs/quantization.md); quantize_group: int4's group size
        (default 128, smaller where a width needs it); quantize_head: quantize the LM head too. A folder
        written by `dllm quantize` loads quantized as it was written."""
        if not isinstance(folder, (str, Path)):
            raise RequestError(f"folder must be a path (str or pathlib.Path), got {type(folder).__name__}")
        device = resolve_device(device)
        dtype = resolve_dtype(dtype, device)
        quant = Quantization(quantize, None if quantize_group is None else int(quantize_group), bool(quantize_head))
        folder = resolve_model(folder)
        cfg = load_config(folder)
        parallel.check_launch(tp, cfg)
        quant.check(rank_shapes(cfg, parallel.Shard(0, tp)))       # the widths this rank's matrices have
        if quant.on and torch.device(device).type == "cpu" and dtype == torch.float32:
            log.warning("--quantize %s with float32 activations runs PyTorch's generic CPU kernel, tens of times "
                        "slower than float32 itself; use bfloat16 (--dtype auto / bfloat16)", quant.mode)
        defaults = GenerationDefaults.read(folder)
        text = Text(cfg, folder, trust_remote_code)
        for r in check:
            check_request(cfg, defaults, text, r)
        t0 = time.perf_counter()
        shard = parallel.join(tp, device)
        log.info("loading weights from %s (%s, %d layers, d %d) to %s %s%s", folder, cfg.family, cfg.n_layers,
                 cfg.d_model, device, str(dtype).replace("torch.", ""),
                 f", tensor-parallel rank {shard.rank} of {shard.world}" if shard.parallel else "")
        weights = load_weights(folder, cfg, dtype=dtype, device=device, quant=quant, shard=shard)
        nbytes = sum(t.numel() * t.element_size() for t in weights.tensors().values())
        size = f"{nbytes / 1e9:.2f} GB" if nbytes >= 1e8 else f"{nbytes / 1e6:.1f} MB"
        mode = weight_mode(weights)
        log.info("loaded %s of weights%s in %.1f s", size, f" ({mode})" if mode != "none" else "",
                 time.perf_counter() - t0)
        return cls(cfg, weights, folder=folder, device=device, dtype=dtype, trust_remote_code=trust_remote_code,
                   defaults=defaults, **engine_options)

    # ------------------------------------------------------------------ text

    @property
    def tokenizer(self):
        return self.text.tokenizer

    def encode(self, text: str, chat: bool = False) -> list[int]:
        return self.text.encode(text, chat)

    # ------------------------------------------------------------------ prepared requests

    def prepared(self, shape: RequestShape, s: DecodeStructure, policy: Policy) -> Prepared:
        """The prepared request for this shape, decoding structure and policy (allocated on first use)."""
        def make() -> Prepared:
            need = request_bytes(self.rank_cfg, shape, s, policy.uses_cache, self.dtype)
            free = available_bytes(self.device)
            if free is not None and need > free:
                raise RequestError(f"this request (batch {shape.batch}, prompt bucket {shape.prompt_bucket}, gen "
                                   f"{shape.gen_length}, block {shape.block_length}, policy {policy.name}) needs about "
                                   f"{need / 2**30:.2f} GiB but {self.device} has {free / 2**30:.2f} GiB available; "
                                   f"use a shorter prompt or response, a smaller batch or block")
            return Prepared.allocate(self.weights, self.rank_cfg, shape, s, policy, self.device, self.dtype)
        return self._store.get((shape, s, policy.key(shape)), make)

    def _release(self, prep: Prepared) -> None:
        if self._pool is not None:
            self._pool.release(prep.steps.values())
        prep.steps.clear()

    def free(self) -> None:
        """Release every prepared request (buffers, compiled and captured steps), declared buckets included;
        later requests prepare again as needed."""
        with self._lock:
            self._store.clear()
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
        alive = ticking(log, f"preparing {', '.join(missing)} ({self.backend})") if self.backend != "eager" \
            else contextlib.nullcontext()
        with torch.inference_mode(), alive:
            new, seconds = backends.prepare(self.backend, {k: prep.bodies[k] for k in missing}, reset, self._pool,
                                            keep_faster_on_cpu=self.keep_faster and self.device.type == "cpu",
                                            on_kind=lambda k, t: log.info("compiled %s in %.1f s", k, t))
        if self.backend != "eager":
            log.info("prepared %s in %.1f s", ", ".join(missing), seconds)
        prep.steps.update(new)
        prep.prepare_seconds += seconds
        return seconds

    def prepare(self, bucket: Bucket, policy: Policy | None = None, **decoding) -> float:
        """Prepare every step kind of `policy` for a bucket now (it is never evicted); returns the seconds."""
        policy = policy or NoCache()
        shape = bucket.shape()
        self.check_shape(shape)
        unknown = set(decoding) - set(DECODING_OPTIONS)
        if unknown:
            raise RequestError(f"unknown decoding options {sorted(unknown)}; use {', '.join(DECODING_OPTIONS)}")
        s = DecodeConfig.make(self.cfg.family, **decoding).structure
        with self._lock:
            self._store.pinned.add((shape, s, policy.key(shape)))
            seconds = self.prepare_steps(self.prepared(shape, s, policy), policy.kinds)
            if bucket not in self.buckets:
                self.buckets.append(bucket)
        self.prepare_seconds += seconds
        return seconds

    # ------------------------------------------------------------------ shapes

    def _default_bucket(self, longest: int, gen_length: int) -> int:
        """The prompt bucket of a request that names none: on eager the prompt's own length (nothing to
        reuse); on the compiling / capturing backends the length rounded up to PROMPT_GRANULARITY, so
        prompts of similar length share one compiled or captured shape (same tokens in any bucket)."""
        if self.backend == "eager":
            return longest
        rounded = -(-longest // PROMPT_GRANULARITY) * PROMPT_GRANULARITY
        fits = not self.cfg.max_seq_len or rounded + gen_length <= self.cfg.max_seq_len
        return rounded if fits else longest

    def check_shape(self, shape: RequestShape) -> None:
        """A request shape this model can run (RequestError otherwise)."""
        check_shape(shape.gen_length, shape.block_length, shape.steps)
        if self.cfg.max_seq_len and shape.length > self.cfg.max_seq_len:
            raise RequestError(f"prompt bucket {shape.prompt_bucket} + gen_length {shape.gen_length} exceeds the "
                               f"model's maximum sequence length {self.cfg.max_seq_len}; shorten the prompt or "
                               f"the response")

    def _pick_shape(self, batch: int, longest: int, req: Request, s: DecodeStructure) -> RequestShape:
        """The shape a request of `batch` rows runs in: the smallest prepared bucket that fits (a batch
        bucket may be larger: the rows are then padded), else a new shape when preparing on demand."""
        G, P = req.gen_length, req.prompt_bucket
        if P is not None and longest > P:
            raise RequestError(f"prompt has {longest} tokens but the prompt bucket holds {P}; "
                               f"use a bucket of at least {longest} or shorten the prompt", "prompt_bucket")
        fits = [b for b in self.buckets if b.batch >= batch and b.gen_length == G and b.steps == req.steps
                and b.block == req.block_length and b.prompt >= longest and P in (None, b.prompt)]
        for b in sorted(fits, key=lambda b: (b.batch, b.prompt)):      # the smallest prepared bucket that fits
            shape = b.shape()
            if (shape, s, req.policy.key(shape)) in self._store or self.prepare_on_demand != "nothing":
                return shape
        shape = RequestShape(batch, P or self._default_bucket(longest, G), G, req.block_length, req.steps)
        self.check_shape(shape)
        if self.prepare_on_demand != "shapes":
            have = "; ".join(f"prompt<={b.prompt} gen {b.gen_length} steps {b.steps} block {b.block} batch {b.batch}"
                             for b in self.buckets) or "none"
            what, allow = (("its decoding options or policy", '"options"') if fits else ("its shape", "True"))
            raise RequestError(
                f"no prepared bucket fits this request ({what}: batch {batch}, prompt {longest} tokens, gen {G}, "
                f"steps {req.steps}, block {req.block_length}, policy {req.policy.name}); prepared buckets: {have}. "
                f"Add a bucket for it (Engine(buckets=[Bucket(...)], policies=[...], decoding={{...}})) or allow "
                f"preparing on demand (prepare_on_demand={allow})", "decoding" if fits else "gen_length")
        return shape

    def check(self, request: Request) -> RequestShape:
        """Everything generate would refuse before running, without running or allocating anything:
        returns the shape the request would run in."""
        req, s, prompts = check_request(self.cfg, self.defaults, self.text, request)
        return self._pick_shape(len(prompts), max(len(p) for p in prompts), req, s)

    # ------------------------------------------------------------------ generation

    def generate(self, prompt=None, /, *, on_step: Callable[[StepEvent], None] | None = None,
                 progress: Callable[[int, int], None] | None = None,
                 on_block: Callable[[BlockEvent], None] | None = None, **options) -> Generation:
        """Generate for a Request, or for a prompt and Request's options as keywords (gen_length, steps,
        block_length, prompt_bucket, remasking, alg, temperature, top_p, top_k, threshold,
        confidence_dtype, schedule, policy, seed, chat, stop, text_tokens); lengths left out take the model's
        defaults.
        progress(launched, planned): called after each step is launched, host-side only (no device read;
        on a GPU the device may still be working on it); planned is the most steps the request can take.
        Raising from it stops the generation between two steps. progress=True: a bar on stderr (a
        terminal only, after 2 s).
        on_block: called with a BlockEvent once each block is final (one read per block; on CUDA without
        waiting for the device). on_step: called after every step with a StepEvent (the canvas is read
        back and the device synchronised after every step: for watching, not for serving).
        Safe to call from many threads: requests run one at a time, in arrival order."""
        if isinstance(prompt, Request):
            if options:
                raise RequestError(f"generate(request) takes no other options (got {', '.join(options)}); set "
                                   f"them on the Request")
            request = prompt
        else:
            request = Request(prompt, **options)
        with self._lock:
            return self._run([request], on_step, progress, on_block)[0]

    def generate_batch(self, requests: list[Request], *, progress: Callable[[int, int], None] | None = None,
                       on_block: Callable[[BlockEvent], None] | None = None) -> list[Generation]:
        """Run single-prompt requests together as one batch, one Generation each: each row keeps its own
        prompt, seed and decoding values, and gets the tokens it gets alone. They must share lengths,
        prompt bucket, policy and decoding structure (RequestError otherwise). on_block events hold one
        row per request, in order."""
        if not requests or not all(isinstance(r, Request) for r in requests):
            raise RequestError("generate_batch takes a non-empty list of Request objects")
        with self._lock:
            return self._run(list(requests), None, progress, on_block)

    def _rows(self, checked: list) -> tuple[list[list[int]], int | list[int], list, list[int]]:
        """(prompt rows, seed(s), decoding values per row, rows per request) of checked requests that may
        share one batch; a batch of several requests gives every row its own seed."""
        first, s0, _ = checked[0]
        same = ("gen_length", "steps", "block_length", "prompt_bucket", "policy")
        rows, values, counts = [], [], []
        for r, s, ids in checked:
            if any(getattr(r, k) != getattr(first, k) for k in same) or s != s0:
                raise RequestError(f"requests run as one batch must share {', '.join(same)} and the decoding "
                                   f"structure (sampling, top-p, top-k, threshold on or off)")
            if len(checked) > 1 and (len(ids) != 1 or not isinstance(r.seed, int)):
                raise RequestError("generate_batch runs single-prompt requests, each with one integer seed")
            rows += ids
            values += [r.decode_config(self.cfg.family).values] * len(ids)
            counts.append(len(ids))
        seed = first.seed if len(checked) == 1 else [r.seed for r, _, _ in checked]
        return rows, list(seed) if isinstance(seed, tuple) else seed, values, counts

    def _run(self, requests: list[Request], on_step, progress, on_block) -> list[Generation]:
        cfg = self.cfg
        checked = [check_request(cfg, self.defaults, self.text, r) for r in requests]
        (first, s, _), reqs = checked[0], [c[0] for c in checked]
        prompts, seed, values, counts = self._rows(checked)
        n = len(prompts)
        shape = self._pick_shape(n, max(len(p) for p in prompts), first, s)
        pad = shape.batch - n                       # a larger batch bucket: rows copied from the first one
        prompts, values = prompts + [prompts[0]] * pad, values + [values[0]] * pad
        if isinstance(seed, list):
            seed = seed + [seed[0]] * pad
        prep = self.prepared(shape, s, first.policy)
        spb = first.steps // shape.n_blocks
        plan = None if s.threshold else first.policy.plan(first.steps, spb)
        kinds_needed = [k for k in first.policy.kinds if plan is None or k in plan]
        prepare_seconds = self.prepare_steps(prep, kinds_needed)
        st = prep.state
        step_fns = {k: with_noise(st, prep.steps[k]) for k in kinds_needed}
        reader = BlockReader(st, n, on_block) if on_block is not None else None
        if reader is not None:
            step_fns = reader.watched(step_fns)
        if on_step is not None:
            step_fns = observed(step_fns, st, on_step, cfg.mask_id, self._sync)
        if progress is True:
            progress = ProgressBar()
        if progress is not None:
            step_fns = counted(step_fns, progress, first.steps if plan is None else len(plan))

        with torch.inference_mode():
            self._sync()
            t0 = time.perf_counter()
            prep.fill(cfg, prompts, seed)
            st.write_values(values)
            done = reader.block_done if reader is not None else None
            if plan is None:
                kinds = scheduler.run_until_done(first.policy.kind_at, step_fns, lambda: int(st.block.item()),
                                                 shape.n_blocks, shape.block_length, done)
            else:
                kinds = scheduler.run(plan, step_fns, spb, done)
            out = st.tokens[:n, shape.prompt_bucket:].cpu().tolist()
            t1 = time.perf_counter()
            if reader is not None:
                reader.deliver(wait=True)
        gens, lo = [], 0
        for r, c in zip(reqs, counts):
            rows = out[lo:lo + c]
            lo += c
            gen = Generation(tokens=rows, text=None, steps=sum(kinds.values()), step_kinds=dict(kinds),
                             seconds=t1 - t0, backend=self.backend, prepare_seconds=prepare_seconds)
            if self.text.usable() is not None:
                texts = [self.text.response(ids[:r.text_tokens], r.stop) for ids in rows]
                gen.text = [t.text for t in texts]
                gen.finish_reasons = [t.finish_reason for t in texts]
                gen.completion_tokens = [t.tokens for t in texts]
            gens.append(gen)
        return gens

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
