"""`dllm serve`: a single-stream OpenAI-compatible HTTP server over one Engine.

    dllm serve --model DIR [--host 127.0.0.1] [--port 8000] [--bucket P:G:STEPS[:BLOCK]]...
               [--queue N] [--threads N] [Request's options as flags: the requests' defaults]
               [--backend ...] [--log-level warning]

Endpoints: POST /v1/completions, POST /v1/chat/completions (the folder's chat template), GET /v1/models,
GET /health, GET /metrics (Prometheus text).

Requests run one at a time on the engine, in arrival order, in one worker thread; the event loop only
parses, queues and streams. At most --queue requests wait behind the running one; one more is answered
429 (`queue_full`). A client that goes away while waiting frees its place; one that goes away while its
request runs cancels it.

`max_tokens` is the response length G (the canvas size); `steps` and `block_length` default to those of
the first --bucket with that G, else steps = G and one block. Every other Request option travels as an
extra top-level JSON field (the openai client's `extra_body`) under its own name: policy and its options,
threshold, steps, block_length, remasking, alg, confidence_dtype, prompt_bucket, ...; `seed`,
`temperature`, `top_p` and `stop` are the OpenAI fields. The response ends at the first end-of-text
token or at a `stop` sequence.

Streaming (`stream: true`): text is sent as soon as it is final. A diffusion model commits positions in
any order, so text is final only when every position before it is committed: under semi-autoregressive
decoding (block_length < G) each block's text arrives when that block and all earlier ones are fully
committed; a single-block request sends its whole text when its last token is committed. The chunks
concatenate to the non-streamed text.
"""
from __future__ import annotations

import argparse
import os
import socket
import sys
from dataclasses import replace

import uvicorn

from dllm.apps.common import engine_args, engine_from_args, expected_errors, request_args, request_from_args
from dllm.runtime import Bucket, RequestError
from dllm.runtime.request import DECODING_OPTIONS

from .app import create_app
from .protocol import ServeOptions


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
                                                      "(one request at a time, in arrival order). The request "
                                                      "options below are the defaults of every request.")
    engine_args(ap)
    request_args(ap, skip=("chat", "text_tokens"))
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=8000, help="0: a free port chosen by the OS (printed when ready)")
    ap.add_argument("--bucket", type=bucket_spec, action="append", default=[], metavar="P:G:STEPS[:BLOCK]",
                    help="a shape prepared at start-up: prompts up to P tokens, G response tokens in STEPS "
                         "steps (blocks of BLOCK, default G); repeatable. With buckets, requests that fit none "
                         "are refused (400); without, shapes are prepared on first use")
    ap.add_argument("--queue", type=int, default=32, help="requests that may wait behind the running one; "
                                                          "more get 429")
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
    return "; ".join(f"prompt<={b.prompt} gen {b.gen_length} steps {b.steps} block {b.block}" for b in buckets)


def main(argv: list[str]) -> int:
    parser = build_parser()
    a = parser.parse_args(argv)
    if a.queue < 0:
        parser.error(f"--queue must be >= 0, got {a.queue}")
    if a.threads:
        import torch
        torch.set_num_threads(a.threads)
    try:
        base = request_from_args(a, None, skip=("chat", "text_tokens"))
        decoding = {k: getattr(base, k) for k in DECODING_OPTIONS}
        engine = engine_from_args(a, buckets=a.bucket or None, policies=[base.policy], decoding=decoding)
        if engine.tokenizer is None:                       # fail now, not on the first request
            raise RequestError(f"{a.model} has no tokenizer files; the server needs text prompts")
        if base.gen_length is None and a.bucket:           # the first bucket's length is the default
            b = a.bucket[0]
            base = replace(base, gen_length=b.gen_length, steps=base.steps or b.steps,
                           block_length=base.block_length or b.block)
        base = base.resolved(engine.defaults)
        base.shape_check()
        base.check(engine.cfg)
        sock = socket.socket(socket.AF_INET6 if ":" in a.host else socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((a.host, a.port))
    except (*expected_errors(), OSError) as e:
        print(f"dllm serve: error: {e}", file=sys.stderr)
        return 2
    opts = ServeOptions(model_name=os.path.basename(os.path.normpath(a.model)), request=base,
                        buckets=tuple(a.bucket), queue=a.queue, drain_seconds=a.drain_seconds)
    host, port = sock.getsockname()[:2]
    ready = (f"dllm serve: ready on http://{host}:{port} (model {opts.model_name}, policy {base.policy.name}, "
             f"queue {a.queue}, prepared: {describe(opts.buckets)}, prepare {engine.prepare_seconds:.1f} s)")
    config = uvicorn.Config(create_app(engine, opts), log_level=a.log_level,
                            access_log=a.log_level in ("info", "debug"), timeout_graceful_shutdown=None)
    server = ReadyServer(config, ready)
    try:
        server.run(sockets=[sock])
    except KeyboardInterrupt:          # uvicorn re-raises the Ctrl-C it handled after draining: a clean stop
        pass
    finally:
        sock.close()
    return 0
