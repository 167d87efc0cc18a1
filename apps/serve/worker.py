"""The worker: one thread that runs queued jobs on the engine in arrival order; the event loop only
parses, queues and streams. Jobs already waiting that can share a batch with the oldest one (same
lengths, prompt bucket, policy and decoding structure) run with it as one batch of at most max_batch
rows (Engine.generate_batch: each row gets the tokens it gets alone); a lone job never waits for others.

Nothing reads the device per step: cancellation is a flag checked between steps (through the engine's
host-side progress hook), and a streaming job gets one read per finished block (on_block)."""
from __future__ import annotations

import asyncio
import threading
import time
import uuid
from collections import deque
from dataclasses import dataclass, field

from dllm.models.config import CheckpointError
from dllm.runtime import BlockEvent, Engine, Generation, RequestError

from .metrics import Metrics
from .protocol import ServeRequest


class QueueFull(Exception):
    pass


class Cancelled(Exception):
    """Raised from the progress hook to stop a generation whose clients all went away."""


class TimedOut(Exception):
    """A request that ran (or waited) past the server's --request-timeout."""


class ShuttingDown(Exception):
    """A request dropped because the server was told to stop at once (a second Ctrl-C)."""


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
    events: asyncio.Queue                  # BlockEvent (streaming only), then one Finished | Failed
    state: str = "queued"                  # queued -> running -> done, or queued -> dropped
    cancel: threading.Event = field(default_factory=threading.Event)
    id: str = field(default_factory=lambda: uuid.uuid4().hex[:16])
    queued_at: float = field(default_factory=time.perf_counter)
    started_at: float | None = None
    batch: int = 1                         # rows of the batch it ran in
    timeout: float = float("inf")          # seconds from arrival it may take
    ended: BaseException | None = None     # why it stops early (TimedOut, ShuttingDown), once decided

    def post(self, item) -> None:
        """Hand an item to the request's coroutine (called from the worker thread)."""
        self.loop.call_soon_threadsafe(self.events.put_nowait, item)

    @property
    def queue_seconds(self) -> float:
        return (self.started_at or time.perf_counter()) - self.queued_at

    def overdue(self) -> bool:
        if self.ended is None and time.perf_counter() - self.queued_at > self.timeout:
            self.ended = TimedOut(f"the request took longer than this server allows ({self.timeout:g} s, dllm serve "
                                  f"--request-timeout); ask for fewer tokens or steps, or retry")
        return self.ended is not None

    @property
    def gone(self) -> bool:
        """Nobody waits for its result any more (its client left, it timed out, or it was dropped)."""
        return self.cancel.is_set() or self.overdue()


def batch_key(job: Job) -> tuple:
    """What jobs must share to run as one batch."""
    r = job.request.request
    return (r.gen_length, r.steps, r.block_length, r.prompt_bucket, r.policy, job.request.structure)


class Worker:
    def __init__(self, engine: Engine, capacity: int, metrics: Metrics, max_batch: int = 1,
                 timeout: float = float("inf"), lockstep=None):
        """lockstep (tensor parallel): every batch is sent to the other ranks first, and a batch, once
        started, runs to its end on every rank (a cancelled or timed-out job's result is dropped after)."""
        self.engine, self.capacity, self.metrics, self.max_batch = engine, capacity, metrics, max_batch
        self.timeout, self.lockstep = timeout, lockstep
        self._running: list[Job] = []
        self._queue: deque[Job | None] = deque()
        self._cv = threading.Condition()
        self.waiting = 0
        self._thread: threading.Thread | None = None
        metrics.queue_length.set_function(lambda: self.waiting)

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="dllm-engine", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Finish every job already queued, then end the thread."""
        if self._thread is not None:
            with self._cv:
                self._queue.append(None)
                self._cv.notify()
            self._thread.join()
            self._thread = None

    def submit(self, request: ServeRequest, endpoint: str) -> Job:
        job = Job(request, endpoint, asyncio.get_running_loop(), asyncio.Queue(), timeout=self.timeout)
        with self._cv:
            if self.waiting >= self.capacity:
                raise QueueFull
            self.waiting += 1
            self._queue.append(job)
            self._cv.notify()
        return job

    def cancel(self, job: Job) -> None:
        """The client went away: a waiting job gives its place back, a running one is dropped from its batch
        (the batch stops at its next step once every job in it is gone)."""
        with self._cv:
            if job.state == "queued":
                job.state = "dropped"
                self.waiting -= 1
                self.metrics.requests.labels(job.endpoint, "cancelled").inc()
            elif job.state == "running":
                job.cancel.set()

    def drop_all(self, why: ShuttingDown) -> int:
        """Stop now: every queued and running job ends with `why` (its client gets an error at once; a
        running batch stops at its next step). Returns how many were dropped."""
        with self._cv:
            dropped = [j for j in self._queue if j is not None and j.state == "queued"] + \
                [j for j in self._running if j.ended is None and not j.cancel.is_set()]
            for job in dropped:
                if job.state == "queued":
                    job.state = "dropped"
                    self.waiting -= 1
                job.ended = why
                job.post(Failed(why))
            return len(dropped)

    def _next_batch(self) -> list[Job] | None:
        """The oldest queued job and the queued jobs that can share its batch (None: stop)."""
        with self._cv:
            while True:
                self._cv.wait_for(lambda: bool(self._queue))
                head = self._queue.popleft()
                if head is None:
                    return None
                if head.state != "queued":
                    continue
                if head.overdue():                     # waited past its timeout: never run it
                    head.state = "dropped"
                    self.waiting -= 1
                    head.post(Failed(head.ended))
                    continue
                batch, key = [head], batch_key(head)
                for job in list(self._queue):
                    if len(batch) == self.max_batch:
                        break
                    if job is not None and job.state == "queued" and batch_key(job) == key:
                        self._queue.remove(job)
                        batch.append(job)
                now = time.perf_counter()
                for job in batch:
                    job.state, job.started_at, job.batch = "running", now, len(batch)
                self.waiting -= len(batch)
                self._running = batch
                return batch

    def _loop(self) -> None:
        while (batch := self._next_batch()) is not None:
            self._run(batch)
        if self.lockstep is not None:
            self.lockstep.send(None)

    def _run(self, batch: list[Job]) -> None:
        m = self.metrics

        def progress(launched: int, planned: int) -> None:     # host-side only: no device read
            if all(job.gone for job in batch):
                raise Cancelled

        def on_block(event: BlockEvent) -> None:
            for row, job in enumerate(batch):
                if job.request.stream and not job.gone:
                    job.post(BlockEvent(event.index, [event.tokens[row]]))

        streaming = any(job.request.stream for job in batch)
        m.running.set(len(batch))
        m.batch_size.observe(len(batch))
        requests = [job.request.request for job in batch]
        try:
            if self.lockstep is not None:            # the ranks run the same steps: no stop in the middle
                self.lockstep.send(requests)
            gens = self.engine.generate_batch(requests, progress=None if self.lockstep else progress,
                                              on_block=on_block if streaming else None)
        except Cancelled as e:
            for job in batch:
                self._end(job, e)
        except Exception as e:                 # RequestError/CheckpointError: the request; others: ours
            bad_request = isinstance(e, (RequestError, CheckpointError))
            for job in batch:
                m.requests.labels(job.endpoint, "invalid" if bad_request else "error").inc()
                job.post(Failed(e))
        else:
            gen = gens[0]
            m.request_seconds.observe(gen.seconds)
            m.step_seconds.observe(gen.seconds / max(gen.steps, 1))
            for kind, count in gen.step_kinds.items():
                m.steps.labels(kind).inc(count)
            m.tokens_per_second.set(sum(len(g.tokens[0]) for g in gens) / gen.seconds if gen.seconds > 0 else 0)
            for job, g in zip(batch, gens):
                m.generated_tokens.inc(len(g.tokens[0]))
                if job.gone:
                    self._end(job, Cancelled())
                else:
                    m.requests.labels(job.endpoint, "ok").inc()
                    job.post(Finished(g))
        finally:
            with self._cv:
                for job in batch:
                    job.state = "done"
                self._running = []
            m.running.set(0)

    def _end(self, job: Job, e: BaseException) -> None:
        """A job that stops without its result: timed out, dropped (already told), or cancelled."""
        if isinstance(job.ended, ShuttingDown):
            self.metrics.requests.labels(job.endpoint, "dropped").inc()
            return
        outcome = "timeout" if isinstance(job.ended, TimedOut) else "cancelled"
        self.metrics.requests.labels(job.endpoint, outcome).inc()
        job.post(Failed(job.ended or e))
