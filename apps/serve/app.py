"""The ASGI app: routes, one request's life (parse, queue, wait or stream, reply), the small endpoints."""
from __future__ import annotations

import contextlib
import dataclasses
import json

import anyio
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from sse_starlette import EventSourceResponse, ServerSentEvent
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from dllm.models.config import CheckpointError
from dllm.runtime import Engine, RequestError, StepEvent

from .metrics import Metrics
from .protocol import ApiError, Reply, ServeOptions, bad, final_prefix, parse_request, usage
from .worker import Failed, Finished, Job, QueueFull, Worker


def failure(error: BaseException) -> ApiError:
    if isinstance(error, (RequestError, CheckpointError)):
        return bad(str(error), getattr(error, "param", None))
    return ApiError(500, f"the engine failed: {type(error).__name__}: {error}", type="server_error")


@dataclasses.dataclass
class Service:
    engine: Engine
    opts: ServeOptions
    metrics: Metrics
    worker: Worker

    async def handle(self, request: Request, chat: bool) -> Response:
        endpoint = "chat" if chat else "completions"
        try:
            try:
                body = await request.json()
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise bad(f"the request body is not valid JSON: {e}") from None
            req = parse_request(body, chat=chat, opts=self.opts, text=self.engine.text)
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
        gen = end.generation
        return reply.whole(gen, usage(len(job.request.prompt_ids), gen.completion_tokens[0]))

    async def stream(self, job: Job, item, reply: Reply):
        """Server-sent events: text as it becomes final, the finish reason, optional usage, [DONE]."""
        r, mask, text = job.request, self.engine.cfg.mask_id, self.engine.text
        block, stops, sent, final = r.request.block_length, r.request.stop, "", 0
        try:
            if reply.chat:
                yield ServerSentEvent(json.dumps(reply.chunk(None, first=True)))
            while isinstance(item, StepEvent):
                n = final_prefix(item.tokens[0], mask, block)
                if n > final:
                    final = n
                    now, _, _ = text.cut(item.tokens[0][:n], stops, complete=n == len(item.tokens[0]))
                    if now.startswith(sent) and len(now) > len(sent):
                        yield ServerSentEvent(json.dumps(reply.chunk(now[len(sent):])))
                        sent = now
                item = await job.events.get()
            if isinstance(item, Failed):
                yield ServerSentEvent(json.dumps(failure(item.error).body()))
                return
            gen = item.generation
            whole = gen.text[0]
            rest = whole[len(sent):] if whole.startswith(sent) else ""
            yield ServerSentEvent(json.dumps(reply.chunk(rest, gen.finish_reasons[0])))
            if r.include_usage:
                yield ServerSentEvent(json.dumps(reply.usage_chunk(usage(len(r.prompt_ids), gen.completion_tokens[0]))))
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
    metrics.prepare_seconds.set(engine.prepare_seconds)
    for b in opts.buckets:
        metrics.prepared.labels(b.prompt, b.gen_length, b.steps, b.block_length or b.gen_length, b.batch).set(1)
    service = Service(engine, opts, metrics, Worker(engine, opts.queue, metrics))

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
