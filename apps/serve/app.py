"""The ASGI app: routes, one request's life (parse, queue, wait or stream, reply), the small endpoints,
the bearer-token check and one access-log line per request."""
from __future__ import annotations

import contextlib
import dataclasses
import hmac
import json
import logging

import anyio
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from sse_starlette import EventSourceResponse, ServerSentEvent
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from dllm.models.config import CheckpointError
from dllm.runtime import BlockEvent, Engine, RequestError

from .metrics import Metrics
from .protocol import ApiError, Reply, ServeOptions, bad, chat_ids, parse_request, prompt_ids, refused, usage
from .worker import Failed, Finished, Job, QueueFull, ShuttingDown, TimedOut, Worker

access = logging.getLogger("dllm.serve.access")     # one line per request; dllm serve shows it on stderr
OPEN_PATHS = ("/health", "/metrics")                 # answered without the API key


def failure(error: BaseException) -> ApiError:
    if isinstance(error, (RequestError, CheckpointError)):
        return refused(error)
    if isinstance(error, TimedOut):
        return ApiError(504, str(error), type="timeout_error", code="request_timeout")
    if isinstance(error, ShuttingDown):
        return ApiError(503, str(error), type="server_error", code="shutting_down")
    return ApiError(500, f"the engine failed: {type(error).__name__}: {error}", type="server_error")


@dataclasses.dataclass
class Service:
    engine: Engine
    opts: ServeOptions
    metrics: Metrics
    worker: Worker

    async def handle(self, request: Request, chat: bool) -> Response:
        endpoint = "chat" if chat else "completions"
        job = None
        try:
            body = await self.body(request)
            # tokenizing a long prompt takes seconds: off the event loop, so /health and streams keep going
            req = await anyio.to_thread.run_sync(
                lambda: parse_request(body, chat=chat, opts=self.opts, engine=self.engine))
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
            self.log(endpoint, e.status, None)
            return e.response()
        first = await self.first_item(request, job)
        if first is None:                          # the client left while waiting or running
            self.log(endpoint, 499, job)
            return Response(status_code=499)
        if isinstance(first, Failed):
            err = failure(first.error)
            self.log(endpoint, err.status, job)
            return err.response()
        reply = Reply(chat, self.opts.model_name)
        if req.stream:
            return EventSourceResponse(self.stream(job, first, reply, endpoint), ping=15,
                                       shutdown_event=anyio.Event(),
                                       shutdown_grace_period=self.opts.drain_seconds)
        self.log(endpoint, 200, job, first.generation)
        return JSONResponse(self.whole(job, first, reply))

    async def body(self, request: Request):
        """The JSON body, read up to --max-body-bytes (413 beyond: nothing larger is held or parsed)."""
        limit = self.opts.max_body_bytes
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            raise _too_large(int(declared), limit)
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise _too_large(size, limit)
            chunks.append(chunk)
        try:
            return json.loads(b"".join(chunks))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise bad(f"the request body is not valid JSON: {e}") from None
        except RecursionError:
            raise bad("the request body is nested too deeply to parse") from None

    def log(self, endpoint: str, status: int, job: Job | None, gen=None) -> None:
        """The access line: id, status, endpoint, tokens, steps, seconds, queue wait, batch."""
        if job is None:
            access.info("- %d %s", status, endpoint)
            return
        tokens = gen.completion_tokens[0] if gen is not None else 0
        steps, seconds = (gen.steps, gen.seconds) if gen is not None else (0, 0.0)
        access.info("%s %d %s tokens=%d steps=%d seconds=%.3f queued=%.3f batch=%d", job.id, status, endpoint,
                    tokens, steps, seconds, job.queue_seconds, job.batch)

    async def first_item(self, request: Request, job: Job):
        """The job's first event (a block when streaming, else the end), or None if the client left first."""
        result = None
        async with anyio.create_task_group() as tg:
            async def watch():
                while (await request.receive())["type"] != "http.disconnect":
                    pass
                self.worker.cancel(job)
                tg.cancel_scope.cancel()

            tg.start_soon(watch)
            item = await job.events.get()
            while not job.request.stream and isinstance(item, BlockEvent):
                item = await job.events.get()
            result = item
            tg.cancel_scope.cancel()
        return result

    def whole(self, job: Job, end: Finished, reply: Reply) -> dict:
        gen = end.generation
        return reply.whole(gen, usage(len(job.request.prompt_ids), gen.completion_tokens[0]))

    async def stream(self, job: Job, item, reply: Reply, endpoint: str):
        """Server-sent events: text as it becomes final (a block at a time), the finish reason, optional
        usage, [DONE]."""
        r, text = job.request, self.engine.text
        keep, stops, sent = r.request.text_tokens, r.request.stop, ""
        try:
            if reply.chat:
                yield ServerSentEvent(json.dumps(reply.chunk(None, first=True)))
            while isinstance(item, BlockEvent):
                ids = item.tokens[0][:keep]
                now, _, _ = text.cut(ids, stops, complete=len(ids) == (keep or r.request.gen_length))
                if now.startswith(sent) and len(now) > len(sent):
                    yield ServerSentEvent(json.dumps(reply.chunk(now[len(sent):])))
                    sent = now
                item = await job.events.get()
            if isinstance(item, Failed):
                err = failure(item.error)
                self.log(endpoint, err.status, job)
                yield ServerSentEvent(json.dumps(err.body()))
                return
            gen = item.generation
            self.log(endpoint, 200, job, gen)
            whole = gen.text[0]
            rest = whole[len(sent):] if whole.startswith(sent) else ""
            yield ServerSentEvent(json.dumps(reply.chunk(rest, gen.finish_reasons[0])))
            if r.include_usage:
                yield ServerSentEvent(json.dumps(reply.usage_chunk(usage(len(r.prompt_ids),
                                                                         gen.completion_tokens[0]))))
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

    async def tokenize(self, request: Request) -> Response:
        """{"prompt": text} or {"messages": [...]} (the chat template) -> the ids the server would run."""
        try:
            body = await self.body(request)
            if not isinstance(body, dict):
                raise bad("the request body must be a JSON object")
            text = self.engine.text
            encode = (lambda: chat_ids(text, body["messages"])) if "messages" in body else \
                (lambda: prompt_ids(text, body.get("prompt")))
            ids = await anyio.to_thread.run_sync(encode)
        except ApiError as e:
            return e.response()
        return JSONResponse({"tokens": ids, "count": len(ids), "max_model_len": self.engine.cfg.max_seq_len})

    async def detokenize(self, request: Request) -> Response:
        """{"tokens": [ids]} -> {"prompt": text} (special tokens kept, as vLLM's)."""
        try:
            body = await self.body(request)
            if not isinstance(body, dict):
                raise bad("the request body must be a JSON object")
            ids, V = body.get("tokens"), self.engine.cfg.vocab_size
            if not isinstance(ids, list) or not all(isinstance(t, int) and not isinstance(t, bool) and 0 <= t < V
                                                    for t in ids):
                raise bad(f"tokens must be a list of token ids in [0, {V})", "tokens")
        except ApiError as e:
            return e.response()
        return JSONResponse({"prompt": self.engine.tokenizer.decode(ids)})


def _too_large(size: int, limit: int) -> ApiError:
    return ApiError(413, f"the request body is {size} bytes or more; this server takes at most {limit} "
                         f"(dllm serve --max-body-bytes)", code="request_too_large")


async def _http_error(request: Request, exc: HTTPException) -> Response:
    code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
    return ApiError(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}", code=code).response()


async def _server_error(request: Request, exc: Exception) -> Response:
    """Anything unexpected is still an OpenAI-shaped JSON error, never a plain-text 500."""
    return ApiError(500, f"{request.method} {request.url.path} failed: {type(exc).__name__}: "
                         f"{str(exc).splitlines()[0][:200] if str(exc) else 'no message'}",
                    type="server_error").response()


class BearerAuth:
    """ASGI middleware: every path but OPEN_PATHS needs `Authorization: Bearer <key>` (constant-time
    compare); a missing or wrong key is a 401 OpenAI-shaped error."""

    def __init__(self, app, key: str):
        self.app, self.key = app, key.encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["path"] not in OPEN_PATHS:
            header = dict(scope.get("headers") or []).get(b"authorization", b"")
            scheme, _, token = header.partition(b" ")
            if scheme.lower() != b"bearer" or not hmac.compare_digest(token.strip(), self.key):
                err = ApiError(401, "missing or wrong API key: send `Authorization: Bearer <key>` with the key "
                                    "dllm serve was started with (--api-key)", type="authentication_error",
                               code="invalid_api_key")
                await err.response()(scope, receive, send)
                return
        await self.app(scope, receive, send)


def create_app(engine: Engine, opts: ServeOptions) -> Starlette:
    """The ASGI app over one engine; the worker thread lives from start-up to shutdown (lifespan)."""
    metrics = Metrics.create()
    metrics.prepare_seconds.set(engine.prepare_seconds)
    for b in opts.buckets:
        metrics.prepared.labels(b.prompt, b.gen_length, b.steps, b.block, b.batch).set(1)
    service = Service(engine, opts, metrics, Worker(engine, opts.queue, metrics, opts.max_batch, opts.request_timeout,
                                                          opts.lockstep))

    @contextlib.asynccontextmanager
    async def lifespan(app):
        service.worker.start()
        try:
            yield
        finally:
            waiting = service.worker.waiting + len(service.worker._running)
            if waiting:
                access.info("shutting down: finishing %d running and queued request(s)", waiting)
            await anyio.to_thread.run_sync(service.worker.stop)

    routes = [Route("/v1/completions", service.completions, methods=["POST"]),
              Route("/v1/chat/completions", service.chat, methods=["POST"]),
              Route("/v1/models", service.models, methods=["GET"]),
              Route("/tokenize", service.tokenize, methods=["POST"]),
              Route("/detokenize", service.detokenize, methods=["POST"]),
              Route("/health", service.health, methods=["GET"]),
              Route("/metrics", service.metrics_text, methods=["GET"])]
    app = Starlette(routes=routes, lifespan=lifespan,
                    exception_handlers={HTTPException: _http_error, Exception: _server_error})
    app.state.service = service
    if opts.api_key:
        app.add_middleware(BearerAuth, key=opts.api_key)
    return app
