"""`dllm serve`: an OpenAI-compatible HTTP server over one Engine.

    dllm serve --model DIR [--host 127.0.0.1] [--port 8000] [--bucket P:G:STEPS[:BLOCK]]... [--max-batch N]
               [--queue N] [--threads N] [--api-key KEY] [--prepare-on-demand options|shapes|nothing]
               [Request's options as flags: the requests' defaults] [--backend ...] [--log-level warning]

Endpoints: POST /v1/completions, POST /v1/chat/completions (the folder's chat template), GET /v1/models,
POST /tokenize, POST /detokenize, GET /health, GET /metrics (Prometheus text).

Requests run on the engine in arrival order, in one worker thread; the event loop only parses, queues
and streams. Waiting requests that share lengths, policy and decoding structure run with the oldest as
one batch (--max-batch; each row gets the tokens it gets alone). At most --queue requests wait; one
more is answered 429 (`queue_full`). A client that goes away frees its place or leaves its batch.

At start-up every --bucket is prepared for batch sizes 1, 2, 4 ... --max-batch and for greedy and
sampled decoding (Dream: also top-p) under the server's policy; any other decoding option or policy is
prepared on a declared shape when first asked for (--prepare-on-demand options, the default with
buckets; `shapes` also prepares new shapes, the default without buckets).

`max_tokens` is the response length G (the canvas size); steps and block_length default to those of the
first --bucket with that G; a max_tokens no bucket has runs in the smallest longer bucket, its text cut
at max_tokens. Every other Request option travels as an extra top-level JSON field (the openai client's
`extra_body`) under its own name: policy and its options, threshold, steps, block_length, remasking,
alg, confidence_dtype, schedule, prompt_bucket, top_k, ...; `seed`, `temperature`, `top_p` and `stop` are the
OpenAI fields. The response ends at the first end-of-text token or at a `stop` sequence.

Streaming (`stream: true`): text is sent as soon as it is final, one read of the device per finished
block: under semi-autoregressive decoding (block_length < G) each block's text arrives when that block is
fully committed; a single-block request sends its whole text at the end. The chunks concatenate to the
non-streamed text.
"""
from __future__ import annotations

import argparse
import asyncio
import os
import signal
import socket
import sys
from dataclasses import replace

import uvicorn

from dllm.apps.common import (
    engine_args,
    engine_from_args,
    expected_errors,
    follower,
    request_args,
    request_from_args,
    setup_output,
    tp_arg,
)
from dllm.runtime import Bucket, Request, RequestError
from dllm.runtime.engine import ON_DEMAND
from dllm.runtime.request import DECODING_OPTIONS

from .app import create_app
from .lockstep import Lockstep
from .protocol import ServeOptions
from .worker import ShuttingDown


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
    ap = OneLineParser(prog="dllm serve", description="OpenAI-compatible HTTP server over one engine. The request "
                                                      "options below are the defaults of every request.")
    engine_args(ap)
    tp_arg(ap)
    request_args(ap, skip=("chat", "text_tokens"))
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=8000, help="0: a free port chosen by the OS (printed when ready)")
    ap.add_argument("--bucket", type=bucket_spec, action="append", default=[], metavar="P:G:STEPS[:BLOCK]",
                    help="a shape prepared at start-up: prompts up to P tokens, G response tokens in STEPS "
                         "steps (blocks of BLOCK, default G); repeatable")
    ap.add_argument("--max-batch", type=int, default=1,
                    help="requests that may run together as one batch (default 1); batch buckets 1, 2, 4 ... "
                         "up to it are prepared for every --bucket")
    ap.add_argument("--prepare-on-demand", choices=ON_DEMAND, default=None,
                    help="what a request may prepare when it first needs it: options (any decoding option or "
                         "policy on a declared --bucket; the default with buckets), shapes (anything; the "
                         "default without buckets) or nothing")
    ap.add_argument("--queue", type=int, default=32, help="requests that may wait for the engine; more get 429")
    ap.add_argument("--max-tokens-limit", type=int, default=None,
                    help="the most max_tokens a request may ask for (default: where new shapes are "
                         "prepared on demand, 4 x the model's default length or the largest --bucket's, if more; "
                         "else the buckets bound it)")
    ap.add_argument("--request-timeout", type=float, default=600.0,
                    help="seconds from arrival after which a request is stopped and answered 504 (default 600)")
    ap.add_argument("--max-body-bytes", type=int, default=1 << 20,
                    help="larger request bodies are refused with 413 before they are read in full (default 1 MiB)")
    ap.add_argument("--api-key", default=None,
                    help="require `Authorization: Bearer KEY` on every endpoint but /health and /metrics "
                         "(default: $DLLM_API_KEY when set, else no key)")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    ap.add_argument("--drain-seconds", type=float, default=30.0,
                    help="on Ctrl-C, how long running streams may take to finish")
    ap.add_argument("--no-access-log", action="store_true", help="no line per request on stderr")
    ap.add_argument("--log-level", default="warning", choices=["critical", "error", "warning", "info", "debug"],
                    help="uvicorn's log level")
    return ap


def batch_sizes(max_batch: int) -> list[int]:
    """1, 2, 4 ... and max_batch itself: the batch buckets prepared for every declared shape."""
    sizes = [1]
    while sizes[-1] * 2 < max_batch:
        sizes.append(sizes[-1] * 2)
    return sorted(set(sizes + [max_batch]))


def startup_decodings(family: str, base: Request) -> list[dict]:
    """The decoding options prepared for every bucket at start-up: the server's own, and its greedy or
    sampled twin (most clients send a temperature; Dream clients often a top-p too)."""
    own = {k: getattr(base, k) for k in DECODING_OPTIONS}
    twin = {**own, "temperature": 0.0 if base.temperature > 0 else 1.0}
    out = [own, twin]
    if family == "dream" and own.get("top_p") is None:
        out.append({**own, "temperature": own["temperature"] or 1.0, "top_p": 0.95})
    return out


class ReadyServer(uvicorn.Server):
    """uvicorn's server that prints one line once it accepts connections and knows how it stopped: the
    first Ctrl-C or SIGTERM drains (running and queued requests finish), a second one drops them, each
    client answered 503, half a second before the server goes."""

    def __init__(self, config: uvicorn.Config, ready_line: str):
        super().__init__(config)
        self.ready_line = ready_line
        self.signals: list[str] = []
        self.dropped = 0

    async def startup(self, sockets=None) -> None:
        await super().startup(sockets=sockets)
        if not self.should_exit:
            print(self.ready_line, flush=True)

    def handle_exit(self, sig, frame) -> None:
        self.signals.append(signal.Signals(sig).name)
        if not self.should_exit:
            print(f"dllm serve: {self.signals[-1]}: draining (again to stop at once)", file=sys.stderr, flush=True)
            self.should_exit = True
            return
        service = self.config.app.state.service
        self.dropped += service.worker.drop_all(ShuttingDown("the server was stopped before this request finished "
                                                             "(a second Ctrl-C / SIGTERM); retry it"))
        asyncio.get_event_loop().call_later(0.5, setattr, self, "force_exit", True)


def main(argv: list[str]) -> int:
    parser = build_parser()
    a = parser.parse_args(argv)
    if a.queue < 0:
        parser.error(f"--queue must be >= 0, got {a.queue}")
    for name in ("max_batch", "max_body_bytes", "max_tokens_limit"):
        if getattr(a, name) is not None and getattr(a, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(a, name)}")
    if not a.request_timeout > 0:
        parser.error(f"--request-timeout must be > 0 seconds, got {a.request_timeout}")
    if a.threads:
        import torch
        torch.set_num_threads(a.threads)
    restore = setup_output(quiet=a.no_access_log or follower(a))
    try:
        base = request_from_args(a, None, skip=("chat", "text_tokens"))
        buckets = [replace(b, batch=n) for b in a.bucket for n in batch_sizes(a.max_batch)]
        engine = engine_from_args(a, prepare_on_demand=a.prepare_on_demand or ("options" if buckets else "shapes"))
        lockstep = Lockstep() if a.tp > 1 else None
        if engine.tokenizer is None:                       # fail now, not on the first request
            raise RequestError(f"{a.model} has no tokenizer files; the server needs text prompts")
        if base.gen_length is None and a.bucket and not engine.defaults.from_file:
            b = a.bucket[0]                                # no generation_config.json: the first bucket's length
            base = replace(base, gen_length=b.gen_length, steps=base.steps or b.steps,
                           block_length=base.block_length or b.block)
        base = base.resolved(engine.defaults)
        base.shape_check()
        base.check(engine.cfg)
        decodings = startup_decodings(engine.cfg.family, base)
        for b in buckets:
            for decoding in decodings:
                engine.prepare(b, base.policy, **decoding)
        if follower(a):                                    # tensor parallel: rank 0 serves, the others follow it
            lockstep.follow(engine)
            restore()
            return 0
        sock = socket.socket(socket.AF_INET6 if ":" in a.host else socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((a.host, a.port))
    except (*expected_errors(), OSError) as e:
        print(f"dllm serve: error: {e}", file=sys.stderr)
        restore()
        return 2
    limit = a.max_tokens_limit or (max([4 * base.gen_length] + [b.gen_length for b in a.bucket])
                                   if engine.prepare_on_demand == "shapes" else float("inf"))
    opts = ServeOptions(model_name=os.path.basename(os.path.normpath(a.model)), request=base,
                        buckets=tuple(buckets), queue=a.queue, drain_seconds=a.drain_seconds,
                        max_batch=a.max_batch, api_key=a.api_key or os.environ.get("DLLM_API_KEY") or None,
                        max_tokens_limit=max(limit, base.gen_length), request_timeout=a.request_timeout,
                        max_body_bytes=a.max_body_bytes, lockstep=lockstep)
    host, port = sock.getsockname()[:2]
    prepared = (f"{len(a.bucket)} bucket(s) x batch {', '.join(map(str, batch_sizes(a.max_batch)))} x "
                f"{len(decodings)} decodings in {engine.prepare_seconds:.1f} s" if a.bucket else
                "none (shapes are prepared on first use)")
    ready = (f"dllm serve: ready on http://{host}:{port} (model {opts.model_name}, policy {base.policy.name}, "
             f"max_tokens {base.gen_length} (limit {opts.max_tokens_limit:g}), max batch {a.max_batch}, "
             f"queue {a.queue}, prepared: {prepared}"
             f"{', API key required' if opts.api_key else ''})")
    config = uvicorn.Config(create_app(engine, opts), log_level=a.log_level,
                            access_log=a.log_level in ("info", "debug"), timeout_graceful_shutdown=None)
    server = ReadyServer(config, ready)
    for sig in (signal.SIGINT, signal.SIGTERM):    # uvicorn re-raises the signals it handled once it has
        signal.signal(sig, lambda *_: None)          # stopped: with these they end nothing more
    try:
        server.run(sockets=[sock])
    finally:
        sock.close()
        restore()
    how = f" by {' then '.join(server.signals)}" if server.signals else ""
    if server.dropped:
        print(f"dllm serve: stopped{how}: {server.dropped} request(s) dropped, their clients answered 503",
              file=sys.stderr, flush=True)
        return 1
    print(f"dllm serve: stopped{how}: every request finished", file=sys.stderr, flush=True)
    return 0
