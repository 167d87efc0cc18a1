"""The worker: one thread that runs queued jobs on the engine, one at a time, in arrival order; the
event loop only parses, queues and streams."""
from __future__ import annotations

import asyncio
import queue
import threading
from dataclasses import dataclass, field

from dllm.models.config import CheckpointError
from dllm.runtime import Engine, Generation, RequestError, StepEvent

from .metrics import Metrics
from .protocol import ServeRequest


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
    request: ServeRequest
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

    def submit(self, request: ServeRequest, endpoint: str) -> Job:
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
            gen = self.engine.generate(r.request, on_step=on_step)
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
