"""The server's Prometheus metrics, in a registry of its own."""
from __future__ import annotations

from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

STEP_BUCKETS = (.0005, .001, .0025, .005, .01, .025, .05, .1, .25, .5, 1.0, 2.5, 5.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64)
REQUEST_BUCKETS = (.01, .025, .05, .1, .25, .5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


@dataclass
class Metrics:
    """The server's Prometheus metrics, in a registry of its own."""
    registry: CollectorRegistry
    step_seconds: Histogram
    steps: Counter
    batch_size: Histogram
    request_seconds: Histogram
    tokens_per_second: Gauge
    generated_tokens: Counter
    requests: Counter
    queue_length: Gauge
    running: Gauge
    prepared: Gauge
    prepare_seconds: Gauge

    @classmethod
    def create(cls) -> "Metrics":
        r = CollectorRegistry()
        return cls(
            registry=r,
            step_seconds=Histogram("dllm_step_seconds", "Mean wall time of a denoising step, one observation per "
                                   "generation (steps are not timed one by one: that would sync the device)",
                                   buckets=STEP_BUCKETS, registry=r),
            steps=Counter("dllm_steps", "Denoising steps run, by step kind", ["kind"], registry=r),
            batch_size=Histogram("dllm_batch_size", "Requests run together in one batch", buckets=BATCH_BUCKETS,
                                 registry=r),
            request_seconds=Histogram("dllm_generation_seconds", "Engine time of one generation (all steps)",
                                      buckets=REQUEST_BUCKETS, registry=r),
            tokens_per_second=Gauge("dllm_tokens_per_second", "Response tokens per second of the last generation",
                                    registry=r),
            generated_tokens=Counter("dllm_generated_tokens", "Response tokens generated (canvas positions)",
                                     registry=r),
            requests=Counter("dllm_requests", "Requests by endpoint and outcome", ["endpoint", "outcome"], registry=r),
            queue_length=Gauge("dllm_queue_length", "Requests waiting for the engine", registry=r),
            running=Gauge("dllm_running_requests", "Requests the engine is running (the batch's size)", registry=r),
            prepared=Gauge("dllm_prepared_shape", "Shapes prepared at start-up (1 per shape)",
                           ["prompt", "gen_length", "steps", "block_length", "batch"], registry=r),
            prepare_seconds=Gauge("dllm_prepare_seconds", "Seconds spent preparing shapes at start-up", registry=r),
        )
