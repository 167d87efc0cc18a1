"""`dllm serve`: a single-stream OpenAI-compatible HTTP server over one Engine.

    dllm serve --model DIR [--host 127.0.0.1] [--port 8000] [--bucket P:G:STEPS[:BLOCK]]...
               [--queue N] [--threads N] [--policy ... and its options] [--remasking|--alg]
               [--threshold F] [--temperature F] [--backend ...] [--log-level warning]

Endpoints: POST /v1/completions, POST /v1/chat/completions (the folder's chat template), GET /v1/models,
GET /health, GET /metrics (Prometheus text).

Requests run one at a time on the engine, in arrival order, in one worker thread; the event loop only
parses, queues and streams. At most --queue requests wait behind the running one; one more is answered
429 (`queue_full`). A client that goes away while waiting frees its place; one that goes away while its
request runs cancels it (the engine's on_step observer raises).

`max_tokens` is the response length G (the canvas size); `steps` and `block_length` default to those of
the first --bucket with that G, else steps = G and one block. Per-request engine options travel as extra
top-level JSON fields (the openai client's `extra_body`): policy and its options (kp, kr, rho, k, sigma,
attn_budget, attn_p, quasi_l2r), threshold, steps, block_length, remasking, alg; `seed`, `temperature` and
`top_p` are the OpenAI fields. The response ends at the first end-of-text token or at a `stop` sequence.

Streaming (`stream: true`): text is sent as soon as it is final. A diffusion model commits positions in
any order, so text is final only when every position before it is committed: under semi-autoregressive
decoding (block_length < G) each block's text arrives when that block and all earlier ones are fully
committed; a single-block request sends its whole text when its last token is committed. The chunks
concatenate to the non-streamed text.
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import queue
import socket
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Callable

import anyio
import uvicorn
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from sse_starlette import EventSourceResponse, ServerSentEvent
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from dllm.graphs import BACKENDS, BackendError
from dllm.models.config import CheckpointError

from . import POLICIES, DecodeConfig, RequestError, make_policy
from .cli import model_args, policy_args, policy_from_args
from .engine import Bucket, Engine, Generation, StepEvent

STEP_BUCKETS = (.0005, .001, .0025, .005, .01, .025, .05, .1, .25, .5, 1.0, 2.5, 5.0)
REQUEST_BUCKETS = (.01, .025, .05, .1, .25, .5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
# OpenAI fields this server accepts only at their default (it has one sequence, no logprobs, no penalties)
INERT_FIELDS = {"n": (1,), "best_of": (1,), "echo": (False,), "logprobs": (None, False, 0),
                "top_logprobs": (None, 0), "presence_penalty": (0,), "frequency_penalty": (0,),
                "logit_bias": (None, {}), "suffix": (None, ""), "parallel_tool_calls": (None,),
                "tools": (None, []), "tool_choice": (None, "none"), "response_format": (None, {"type": "text"})}
IGNORED_FIELDS = ("user", "metadata", "store", "service_tier")
DECODING_FIELDS = ("threshold", "remasking", "alg")


# ---------------------------------------------------------------- errors

@dataclass
class ApiError(Exception):
    """An OpenAI-shaped error: {"error": {"message", "type", "param", "code"}} with an HTTP status."""
    status: int
    message: str
    param: str | None = None
    code: str | None = None
    type: str = "invalid_request_error"

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        headers = {"Retry-After": "1"} if self.status == 429 else None
        return JSONResponse(self.body(), status_code=self.status, headers=headers)


def bad(message: str, param: str | None = None, code: str | None = None) -> ApiError:
    return ApiError(400, message, param, code)


# ---------------------------------------------------------------- request parsing

@dataclass(frozen=True)
class ServeOptions:
    """What the server was started with; requests default to it."""
    model_name: str
    policy: Any                                   # the default Policy (make_policy)
    decoding: dict = field(default_factory=dict)  # default decoding options (remasking, alg, temperature, threshold)
    buckets: tuple[Bucket, ...] = ()
    queue: int = 32
    default_max_tokens: int = 16
    drain_seconds: float = 30.0
    policy_names: tuple[str, ...] = ("none",)


@dataclass(frozen=True)
class GenRequest:
    """One validated request, ready for Engine.generate."""
    chat: bool
    prompt_ids: list[int]
    gen_length: int
    steps: int
    block_length: int | None
    seed: int
    policy: Any
    decoding: dict
    stop: tuple[str, ...] = ()
    stream: bool = False
    include_usage: bool = False


def _int(body: dict, name: str, lowest: int, default: int | None) -> int | None:
    v = body.get(name, default)
    if v is None:
        return None
    if not isinstance(v, int) or isinstance(v, bool) or v < lowest:
        raise bad(f"{name} must be an integer >= {lowest}, got {v!r}", name)
    return v


def _number(body: dict, name: str, default=None):
    v = body.get(name, default)
    if v is not None and (not isinstance(v, (int, float)) or isinstance(v, bool)):
        raise bad(f"{name} must be a number, got {v!r}", name)
    return v


def _stops(body: dict) -> tuple[str, ...]:
    v = body.get("stop")
    if v is None:
        return ()
    stops = [v] if isinstance(v, str) else v
    if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops) or len(stops) > 4:
        raise bad("stop must be a non-empty string or a list of at most 4 non-empty strings", "stop")
    return tuple(stops)


def policy_options(names: tuple[str, ...]) -> dict[str, dict]:
    """Each policy's options with their defaults, by policy name."""
    return {name: make_policy(name).params() for name in names}


def _policy(body: dict, opts: ServeOptions, known: dict[str, dict]) -> Any:
    """The request's policy: its `policy` name (default the server's) with the option fields it names."""
    name = body.get("policy", opts.policy.name)
    if not isinstance(name, str):
        raise bad(f"policy must be a string, one of {', '.join(opts.policy_names)}", "policy")
    try:
        defaults = known[name] if name in known else make_policy(name).params()
    except RequestError as e:
        raise bad(str(e), "policy", "unknown_policy") from None
    params = dict(opts.policy.params()) if name == opts.policy.name else dict(defaults)
    all_options = {o for opts_ in known.values() for o in opts_}
    for key in all_options & set(body):
        if key not in params:
            raise bad(f"option {key!r} does not apply to policy {name} (its options: "
                      f"{', '.join(params) or 'none'})", key)
        default, v = defaults[key], body[key]
        if isinstance(default, bool):
            if not isinstance(v, bool):
                raise bad(f"{key} must be true or false, got {v!r}", key)
        elif isinstance(default, int):
            if not isinstance(v, int) or isinstance(v, bool):
                raise bad(f"{key} must be an integer, got {v!r}", key)
        elif v is not None and (not isinstance(v, (int, float)) or isinstance(v, bool)):
            raise bad(f"{key} must be a number, got {v!r}", key)
        params[key] = v
    try:
        return make_policy(name, **params)
    except RequestError as e:
        raise bad(str(e), "policy") from None


def _check_fields(body: dict, allowed: set[str], known: dict[str, dict]) -> None:
    policy_fields = {o for opts_ in known.values() for o in opts_}
    for key, value in body.items():
        if key in INERT_FIELDS:
            if value not in INERT_FIELDS[key]:
                raise bad(f"{key}={value!r} is not supported by this server (it runs one sequence without "
                          f"logprobs, penalties or tools); leave it out", key, "unsupported_parameter")
        elif key not in allowed and key not in policy_fields and key not in IGNORED_FIELDS:
            raise bad(f"unrecognized request argument {key!r}", key, "unknown_parameter")


def parse_request(body: Any, *, chat: bool, opts: ServeOptions, engine: Engine,
                  known: dict[str, dict]) -> GenRequest:
    """Validate a /v1/completions or /v1/chat/completions body (ApiError with the field at fault)."""
    if not isinstance(body, dict):
        raise bad("the request body must be a JSON object")
    main = {"messages"} if chat else {"prompt"}
    allowed = main | {"model", "max_tokens", "stop", "stream", "stream_options", "seed", "temperature",
                      "top_p", "top_k", "steps", "block_length", "policy", *DECODING_FIELDS}
    if chat:
        allowed.add("max_completion_tokens")
    _check_fields(body, allowed, known)
    model = body.get("model", opts.model_name)
    if model != opts.model_name:
        raise ApiError(404, f"model {model!r} is not served here; this server serves {opts.model_name!r}",
                       "model", "model_not_found")
    ids = _chat_ids(engine, body.get("messages")) if chat else _prompt_ids(engine, body.get("prompt"))

    gen_length = _int(body, "max_completion_tokens", 1, None) if chat else None
    gen_length = _int(body, "max_tokens", 1, gen_length or opts.default_max_tokens)
    like = next((b for b in opts.buckets if b.gen_length == gen_length), None)
    steps = _int(body, "steps", 1, like.steps if like else gen_length)
    block = _int(body, "block_length", 1, like.block_length if like else None)
    seed = _int(body, "seed", 0, 0)

    decoding = dict(opts.decoding)
    for key in DECODING_FIELDS:
        if key in body:
            decoding[key] = body[key]
    temperature = _number(body, "temperature", decoding.get("temperature", 0.0))
    top_p = _number(body, "top_p")
    decoding["temperature"] = temperature
    if top_p is not None and top_p != 1:           # top_p 1 keeps the whole distribution: no filter
        decoding["top_p"] = top_p
    top_k = _int(body, "top_k", 1, None)           # Dream only (the engine says so for LLaDA)
    if top_k is not None:
        decoding["top_k"] = top_k
    _number(body, "threshold")
    for key in ("remasking", "alg"):
        if decoding.get(key) is not None and not isinstance(decoding[key], str):
            raise bad(f"{key} must be a string, got {decoding[key]!r}", key)
    try:
        DecodeConfig.make(engine.cfg.family, **decoding)
    except RequestError as e:
        raise bad(str(e)) from None

    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise bad(f"stream must be true or false, got {stream!r}", "stream")
    so = body.get("stream_options") or {}
    if not isinstance(so, dict) or not isinstance(so.get("include_usage", False), bool):
        raise bad("stream_options must be an object like {\"include_usage\": true}", "stream_options")
    return GenRequest(chat, ids, gen_length, steps, block, seed, _policy(body, opts, known), decoding,
                      _stops(body), stream, bool(so.get("include_usage", False)))


def _prompt_ids(engine: Engine, prompt) -> list[int]:
    if not isinstance(prompt, str) or not prompt:
        raise bad("prompt must be one non-empty string (this server runs one sequence per request)", "prompt")
    try:
        return engine.encode(prompt)
    except (RequestError, CheckpointError) as e:
        raise bad(str(e), "prompt") from None


def _chat_ids(engine: Engine, messages) -> list[int]:
    """The conversation through the folder's chat template, as Engine.encode(chat=True) does for one message."""
    if not isinstance(messages, list) or not messages:
        raise bad("messages must be a non-empty list of {role, content} objects", "messages")
    convo = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise bad(f"messages[{i}] must be an object with a string role", "messages")
        content = m.get("content")
        if isinstance(content, list):            # [{"type": "text", "text": ...}, ...]
            if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                       for p in content):
                raise bad(f"messages[{i}].content: only text parts are supported", "messages")
            content = "".join(p["text"] for p in content)
        if not isinstance(content, str):
            raise bad(f"messages[{i}].content must be a string", "messages")
        convo.append({"role": m["role"], "content": content})
    try:
        tok = engine.tokenizer
    except CheckpointError as e:
        raise bad(str(e), "messages") from None
    if tok is None or not getattr(tok, "chat_template", None):
        raise bad(f"model {engine.folder} has no chat template; use /v1/completions", "messages")
    try:
        text = tok.apply_chat_template(convo, add_generation_prompt=True, tokenize=False)
    except Exception as e:                       # the template itself refused the conversation
        raise bad(f"the chat template rejected these messages: {e}", "messages") from None
    ids = tok(text, add_special_tokens=False)["input_ids"]
    if not ids:
        raise bad("the chat template produced an empty prompt", "messages")
    return ids


# ---------------------------------------------------------------- text that is final

def final_prefix(row: list[int], mask_id: int, block: int) -> int:
    """How many leading positions of a response canvas are final: whole blocks, from the first, with no
    position still masked."""
    n = 0
    while n < len(row) and mask_id not in row[n:n + block]:
        n += block
    return min(n, len(row))


@dataclass
class TextCutter:
    """Response text as OpenAI clients expect it: up to the first end token, then cut at a stop sequence."""
    decode: Callable[[list[int]], str]
    end_ids: frozenset[int]
    stops: tuple[str, ...] = ()

    def text(self, ids: list[int], complete: bool) -> tuple[str, bool, int]:
        """(text safe to send, finished, tokens used) for the final prefix `ids`; `complete` when the
        whole response is in ids. Text that could still become a stop sequence is held back."""
        n = next((j for j, t in enumerate(ids) if t in self.end_ids), None)
        ended = n is not None
        used = n if ended else len(ids)
        text = self.decode(ids[:used])
        hits = [text.find(s) for s in self.stops if s in text]
        if hits:
            return text[:min(hits)], True, used
        if ended or complete:
            return text, ended, used
        return text[:len(text) - self.held_back(text)], False, used

    def held_back(self, text: str) -> int:
        """The longest tail of text that is the start of a stop sequence."""
        tails = [k for s in self.stops for k in range(min(len(s) - 1, len(text)), 0, -1) if s.startswith(text[-k:])]
        return max(tails, default=0)


# ---------------------------------------------------------------- metrics

@dataclass
class Metrics:
    """The server's Prometheus metrics, in a registry of its own."""
    registry: CollectorRegistry
    step_seconds: Histogram
    request_seconds: Histogram
    tokens_per_second: Gauge
    generated_tokens: Counter
    requests: Counter
    queue_length: Gauge
    running: Gauge
    prepared: Gauge
    capture_seconds: Gauge

    @classmethod
    def create(cls) -> "Metrics":
        r = CollectorRegistry()
        return cls(
            registry=r,
            step_seconds=Histogram("dllm_step_seconds", "Wall time of one denoising step, by step kind", ["kind"],
                                   buckets=STEP_BUCKETS, registry=r),
            request_seconds=Histogram("dllm_generation_seconds", "Engine time of one generation (all steps)",
                                      buckets=REQUEST_BUCKETS, registry=r),
            tokens_per_second=Gauge("dllm_tokens_per_second", "Response tokens per second of the last generation",
                                    registry=r),
            generated_tokens=Counter("dllm_generated_tokens", "Response tokens generated (canvas positions)",
                                     registry=r),
            requests=Counter("dllm_requests", "Requests by endpoint and outcome", ["endpoint", "outcome"], registry=r),
            queue_length=Gauge("dllm_queue_length", "Requests waiting for the engine", registry=r),
            running=Gauge("dllm_running_requests", "Requests the engine is running (0 or 1)", registry=r),
            prepared=Gauge("dllm_prepared_shape", "Shapes prepared at start-up (1 per shape)",
                           ["prompt", "gen_length", "steps", "block_length", "batch"], registry=r),
            capture_seconds=Gauge("dllm_capture_seconds", "Seconds spent preparing shapes at start-up", registry=r),
        )


# ---------------------------------------------------------------- the worker

class QueueFull(Exception):
    pass


class Cancelled(Exception):
    """Raised from on_step to stop a generation whose client went away."""


@dataclass(frozen=True)
class Finished:
    generation: Generation


@dataclass(frozen=True)
class Failed:
    error: BaseException


@dataclass
class Job:
    request: GenRequest
    endpoint: str
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue                  # StepEvent (streaming only), then one Finished | Failed
    state: str = "queued"                  # queued -> running -> done, or queued -> dropped
    cancel: threading.Event = field(default_factory=threading.Event)

    def post(self, item) -> None:
        """Hand an item to the request's coroutine (called from the worker thread)."""
        self.loop.call_soon_threadsafe(self.events.put_nowait, item)


class Worker:
    """One thread that runs queued jobs on the engine, one at a time, in arrival order."""

    def __init__(self, engine: Engine, capacity: int, metrics: Metrics):
        self.engine, self.capacity, self.metrics = engine, capacity, metrics
        self._jobs: queue.SimpleQueue[Job | None] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self.waiting = 0
        self._thread: threading.Thread | None = None
        metrics.queue_length.set_function(lambda: self.waiting)

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="dllm-engine", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Finish every job already queued, then end the thread."""
        if self._thread is not None:
            self._jobs.put(None)
            self._thread.join()
            self._thread = None

    def submit(self, request: GenRequest, endpoint: str) -> Job:
        job = Job(request, endpoint, asyncio.get_running_loop(), asyncio.Queue())
        with self._lock:
            if self.waiting >= self.capacity:
                raise QueueFull
            self.waiting += 1
        self._jobs.put(job)
        return job

    def cancel(self, job: Job) -> None:
        """The client went away: a waiting job gives its place back, a running one stops at its next step."""
        with self._lock:
            if job.state == "queued":
                job.state = "dropped"
                self.waiting -= 1
                self.metrics.requests.labels(job.endpoint, "cancelled").inc()
            elif job.state == "running":
                job.cancel.set()

    def _take(self, job: Job) -> bool:
        with self._lock:
            if job.state != "queued":
                return False
            job.state = "running"
            self.waiting -= 1
            return True

    def _loop(self) -> None:
        while (job := self._jobs.get()) is not None:
            if self._take(job):
                self._run(job)

    def _run(self, job: Job) -> None:
        m, r = self.metrics, job.request

        def on_step(event: StepEvent) -> None:
            m.step_seconds.labels(event.kind).observe(event.seconds)
            if job.cancel.is_set():
                raise Cancelled
            if r.stream:
                job.post(event)

        m.running.set(1)
        try:
            gen = self.engine.generate(r.prompt_ids, gen_length=r.gen_length, steps=r.steps,
                                       block_length=r.block_length, seed=r.seed, policy=r.policy,
                                       on_step=on_step, **r.decoding)
        except Cancelled as e:
            m.requests.labels(job.endpoint, "cancelled").inc()
            job.post(Failed(e))
        except Exception as e:                 # RequestError/CheckpointError: the request; others: ours
            bad_request = isinstance(e, (RequestError, CheckpointError))
            m.requests.labels(job.endpoint, "invalid" if bad_request else "error").inc()
            job.post(Failed(e))
        else:
            m.request_seconds.observe(gen.seconds)
            m.tokens_per_second.set(gen.tokens_per_second)
            m.generated_tokens.inc(sum(len(t) for t in gen.tokens))
            m.requests.labels(job.endpoint, "ok").inc()
            job.post(Finished(gen))
        finally:
            with self._lock:
                job.state = "done"
            m.running.set(0)


# ---------------------------------------------------------------- responses

def failure(error: BaseException) -> ApiError:
    if isinstance(error, (RequestError, CheckpointError)):
        return bad(str(error))
    return ApiError(500, f"the engine failed: {type(error).__name__}: {error}", type="server_error")


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


@dataclass
class Reply:
    """Builds the OpenAI objects of one request (completion or chat, whole or chunked)."""
    chat: bool
    model: str
    id: str = field(default_factory=lambda: uuid.uuid4().hex)
    created: int = field(default_factory=lambda: int(time.time()))

    def _head(self, obj: str) -> dict:
        prefix = "chatcmpl-" if self.chat else "cmpl-"
        return {"id": prefix + self.id, "object": obj, "created": self.created, "model": self.model}

    def whole(self, text: str, finish: str, use: dict, gen: Generation) -> dict:
        if self.chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish}
        else:
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}
        return {**self._head("chat.completion" if self.chat else "text_completion"), "choices": [choice],
                "usage": use, "dllm": {"steps": gen.steps, "step_kinds": gen.step_kinds, "seconds": gen.seconds,
                                       "tokens_per_second": gen.tokens_per_second}}

    def chunk(self, text: str | None, finish: str | None = None, first: bool = False) -> dict:
        if self.chat:
            delta = {"role": "assistant", "content": ""} if first else {}
            if text:
                delta["content"] = text
            choice = {"index": 0, "delta": delta, "finish_reason": finish}
        else:
            choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}
        return {**self._head("chat.completion.chunk" if self.chat else "text_completion"), "choices": [choice]}

    def usage_chunk(self, use: dict) -> dict:
        return {**self._head("chat.completion.chunk" if self.chat else "text_completion"), "choices": [],
                "usage": use}


# ---------------------------------------------------------------- the app

@dataclass
class Service:
    engine: Engine
    opts: ServeOptions
    metrics: Metrics
    worker: Worker
    known_policies: dict[str, dict]

    def cutter(self, stops: tuple[str, ...]) -> TextCutter:
        tok, cfg = self.engine.tokenizer, self.engine.cfg
        ends = frozenset(t for t in (cfg.eos_id, getattr(cfg, "eot_id", None)) if t is not None)
        return TextCutter(lambda ids: tok.decode(ids, skip_special_tokens=True), ends, stops)

    async def handle(self, request: Request, chat: bool) -> Response:
        endpoint = "chat" if chat else "completions"
        try:
            try:
                body = await request.json()
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise bad(f"the request body is not valid JSON: {e}") from None
            req = parse_request(body, chat=chat, opts=self.opts, engine=self.engine, known=self.known_policies)
            try:
                job = self.worker.submit(req, endpoint)
            except QueueFull:
                self.metrics.requests.labels(endpoint, "rejected").inc()
                raise ApiError(429, f"the server is busy: {self.opts.queue} requests are already waiting for "
                                    f"the engine (--queue {self.opts.queue}); retry later",
                               type="rate_limit_error", code="queue_full") from None
        except ApiError as e:
            if e.status != 429:
                self.metrics.requests.labels(endpoint, "invalid").inc()
            return e.response()
        first = await self.first_item(request, job)
        if first is None:                          # the client left while waiting
            return Response(status_code=499)
        if isinstance(first, Failed):
            return failure(first.error).response()
        reply = Reply(chat, self.opts.model_name)
        if req.stream:
            return EventSourceResponse(self.stream(job, first, reply), ping=15,
                                       shutdown_event=anyio.Event(),
                                       shutdown_grace_period=self.opts.drain_seconds)
        return JSONResponse(self.whole(job, first, reply))

    async def first_item(self, request: Request, job: Job):
        """The job's first event (a step when streaming, else the end), or None if the client left first."""
        result = None
        async with anyio.create_task_group() as tg:
            async def watch():
                while (await request.receive())["type"] != "http.disconnect":
                    pass
                self.worker.cancel(job)
                tg.cancel_scope.cancel()

            tg.start_soon(watch)
            item = await job.events.get()
            while not job.request.stream and isinstance(item, StepEvent):
                item = await job.events.get()
            result = item
            tg.cancel_scope.cancel()
        return result

    def whole(self, job: Job, end: Finished, reply: Reply) -> dict:
        gen, r = end.generation, job.request
        text, stopped, used = self.cutter(r.stop).text(gen.tokens[0], complete=True)
        return reply.whole(text, "stop" if stopped else "length", usage(len(r.prompt_ids), used), gen)

    async def stream(self, job: Job, item, reply: Reply):
        """Server-sent events: text as it becomes final, the finish reason, optional usage, [DONE]."""
        r, mask = job.request, self.engine.cfg.mask_id
        block = r.gen_length if r.block_length is None else r.block_length
        cut, sent, final = self.cutter(r.stop), "", 0
        try:
            if reply.chat:
                yield ServerSentEvent(json.dumps(reply.chunk(None, first=True)))
            while isinstance(item, StepEvent):
                n = final_prefix(item.tokens[0], mask, block)
                if n > final:
                    final = n
                    text, _, _ = cut.text(item.tokens[0][:n], complete=n == len(item.tokens[0]))
                    if text.startswith(sent) and len(text) > len(sent):
                        yield ServerSentEvent(json.dumps(reply.chunk(text[len(sent):])))
                        sent = text
                item = await job.events.get()
            if isinstance(item, Failed):
                yield ServerSentEvent(json.dumps(failure(item.error).body()))
                return
            gen = item.generation
            text, stopped, used = cut.text(gen.tokens[0], complete=True)
            rest = text[len(sent):] if text.startswith(sent) else ""
            yield ServerSentEvent(json.dumps(reply.chunk(rest, "stop" if stopped else "length")))
            if r.include_usage:
                yield ServerSentEvent(json.dumps(reply.usage_chunk(usage(len(r.prompt_ids), used))))
            yield ServerSentEvent("[DONE]")
        finally:
            self.worker.cancel(job)        # a no-op once the job is done; stops it if the client left

    # -------------------------------------------------------------- small endpoints

    async def completions(self, request: Request) -> Response:
        return await self.handle(request, chat=False)

    async def chat(self, request: Request) -> Response:
        return await self.handle(request, chat=True)

    async def models(self, request: Request) -> Response:
        return JSONResponse({"object": "list", "data": [{"id": self.opts.model_name, "object": "model",
                                                        "created": 0, "owned_by": "dllm-runtime"}]})

    async def health(self, request: Request) -> Response:
        return JSONResponse({"status": "ok", "model": self.opts.model_name, "queue": self.worker.waiting,
                             "queue_capacity": self.opts.queue})

    async def metrics_text(self, request: Request) -> Response:
        return Response(generate_latest(self.metrics.registry), media_type=CONTENT_TYPE_LATEST)


async def _http_error(request: Request, exc: HTTPException) -> Response:
    code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
    return ApiError(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}", code=code).response()


def create_app(engine: Engine, opts: ServeOptions) -> Starlette:
    """The ASGI app over one engine; the worker thread lives from start-up to shutdown (lifespan)."""
    metrics = Metrics.create()
    metrics.capture_seconds.set(engine.capture_seconds)
    for b in opts.buckets:
        metrics.prepared.labels(b.prompt, b.gen_length, b.steps, b.block_length or b.gen_length, b.batch).set(1)
    service = Service(engine, opts, metrics, Worker(engine, opts.queue, metrics), policy_options(opts.policy_names))

    @contextlib.asynccontextmanager
    async def lifespan(app):
        service.worker.start()
        try:
            yield
        finally:
            await anyio.to_thread.run_sync(service.worker.stop)

    routes = [Route("/v1/completions", service.completions, methods=["POST"]),
              Route("/v1/chat/completions", service.chat, methods=["POST"]),
              Route("/v1/models", service.models, methods=["GET"]),
              Route("/health", service.health, methods=["GET"]),
              Route("/metrics", service.metrics_text, methods=["GET"])]
    app = Starlette(routes=routes, lifespan=lifespan, exception_handlers={HTTPException: _http_error})
    app.state.service = service
    return app


# ---------------------------------------------------------------- command line

class OneLineParser(argparse.ArgumentParser):
    """argparse whose usage errors are one line on stderr (exit 2)."""

    def error(self, message):
        self.exit(2, f"dllm serve: error: {message}\n")


def bucket_spec(text: str) -> Bucket:
    parts = text.split(":")
    try:
        nums = [int(p) for p in parts]
    except ValueError:
        nums = []
    if len(nums) not in (3, 4) or any(n < 1 for n in nums):
        raise argparse.ArgumentTypeError(f"--bucket takes PROMPT:GEN:STEPS[:BLOCK] (positive integers), "
                                         f"got {text!r}")
    return Bucket(*nums)


def build_parser() -> argparse.ArgumentParser:
    ap = OneLineParser(prog="dllm serve", description="OpenAI-compatible HTTP server over one engine "
                                                      "(one request at a time, in arrival order).")
    model_args(ap)
    policy_args(ap)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=8000, help="0: a free port chosen by the OS (printed when ready)")
    ap.add_argument("--bucket", type=bucket_spec, action="append", default=[], metavar="P:G:STEPS[:BLOCK]",
                    help="a shape prepared at start-up: prompts up to P tokens, G response tokens in STEPS "
                         "steps (blocks of BLOCK, default G); repeatable. With buckets, requests that fit none "
                         "are refused (400); without, shapes are prepared on first use")
    ap.add_argument("--queue", type=int, default=32, help="requests that may wait behind the running one; "
                                                          "more get 429")
    ap.add_argument("--threshold", type=float, default=None, help="default threshold decoding for requests")
    ap.add_argument("--temperature", type=float, default=0.0, help="default temperature for requests")
    ap.add_argument("--max-tokens", type=int, default=None,
                    help="default max_tokens (default: the first bucket's G, else 16)")
    ap.add_argument("--backend", choices=BACKENDS, default=None)
    ap.add_argument("--trust-remote-code", action="store_true")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    ap.add_argument("--drain-seconds", type=float, default=30.0,
                    help="on Ctrl-C, how long running streams may take to finish")
    ap.add_argument("--log-level", default="warning", choices=["critical", "error", "warning", "info", "debug"])
    return ap


class ReadyServer(uvicorn.Server):
    """uvicorn's server that prints one line once it accepts connections."""

    def __init__(self, config: uvicorn.Config, ready_line: str):
        super().__init__(config)
        self.ready_line = ready_line

    async def startup(self, sockets=None) -> None:
        await super().startup(sockets=sockets)
        if not self.should_exit:
            print(self.ready_line, flush=True)


def describe(buckets) -> str:
    if not buckets:
        return "none (shapes are prepared on first use)"
    return "; ".join(f"prompt<={b.prompt} gen {b.gen_length} steps {b.steps} block {b.block_length or b.gen_length}"
                     for b in buckets)


def main(argv: list[str]) -> int:
    parser = build_parser()
    a = parser.parse_args(argv)
    if a.queue < 0:
        parser.error(f"--queue must be >= 0, got {a.queue}")
    if a.threads:
        import torch
        torch.set_num_threads(a.threads)
    decoding = {k: v for k, v in (("remasking", a.remasking), ("alg", a.alg), ("threshold", a.threshold),
                                  ("temperature", a.temperature)) if v is not None}
    try:
        policy = policy_from_args(a)
        engine = Engine.from_pretrained(a.model, device=a.device, dtype=a.dtype, trust_remote_code=a.trust_remote_code,
                                        backend=a.backend, buckets=a.bucket or None, policies=[policy],
                                        decoding=decoding)
        if engine.tokenizer is None:                       # fail now, not on the first request
            raise RequestError(f"{a.model} has no tokenizer files; the server needs text prompts")
        sock = socket.socket(socket.AF_INET6 if ":" in a.host else socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((a.host, a.port))
    except (CheckpointError, RequestError, BackendError, OSError) as e:
        print(f"dllm serve: error: {e}", file=sys.stderr)
        return 2
    opts = ServeOptions(model_name=os.path.basename(os.path.normpath(a.model)), policy=policy, decoding=decoding,
                        buckets=tuple(a.bucket), queue=a.queue,
                        default_max_tokens=a.max_tokens or (a.bucket[0].gen_length if a.bucket else 16),
                        drain_seconds=a.drain_seconds, policy_names=tuple(POLICIES))
    host, port = sock.getsockname()[:2]
    ready = (f"dllm serve: ready on http://{host}:{port} (model {opts.model_name}, policy {policy.name}, "
             f"queue {a.queue}, prepared: {describe(opts.buckets)}, capture {engine.capture_seconds:.1f} s)")
    config = uvicorn.Config(create_app(engine, opts), log_level=a.log_level, access_log=a.log_level in ("info", "debug"),
                            timeout_graceful_shutdown=None)
    server = ReadyServer(config, ready)
    try:
        server.run(sockets=[sock])
    except KeyboardInterrupt:          # uvicorn re-raises the Ctrl-C it handled after draining: a clean stop
        pass
    finally:
        sock.close()
    return 0
