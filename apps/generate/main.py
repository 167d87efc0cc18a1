"""`dllm generate`: the command-line face of Engine.generate.

    dllm generate --model DIR (--prompt TEXT | --prompt-ids 1,2,3) [Request's options as flags:
                  --gen-length N --steps N --block-length N --temperature F ... --policy NAME --kp N ...]
                  [--dtype auto|float32|bfloat16|float16] [--device cpu|cuda] [--backend ...] [--json | --quiet]

Every request flag comes from a Request field (runtime/request.py) or a registered policy's field; a
flag left out takes the Request's default, or the model folder's generation_config.json for the lengths.
With --json, stdout carries exactly one JSON object; errors go to stderr with exit status 2. Progress of
long work (loading, compiling, denoising) goes to stderr, except under --json and --quiet.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from dllm.apps.common import (
    engine_args,
    engine_from_args,
    error_exit,
    expected_errors,
    follower,
    request_args,
    request_from_args,
    setup_output,
    tp_arg,
)
from dllm.runtime import ProgressBar, RequestError

ONE_SHOT_BACKEND = {"cpu": "eager", "cuda": "cudagraph"}    # one generation: no minutes-long compile
SHIPPED_MODEL_EPILOG = """\
defaults: --gen-length the model folder's generation_config.json, else 128; --steps the gen length (one
token per step); --block-length the gen length (default G, a single block).

The model shipped in the repository, models/trained/arith-llada, answers one line: a task word
(reverse or sort), a space, 3-6 digits, and a newline; it was trained with --gen-length 8. From the
repository root:
  .venv/bin/dllm generate --model models/trained/arith-llada --prompt $'reverse 48213\\n' --gen-length 8
  .venv/bin/dllm generate --model models/trained/arith-llada --prompt 'sort 93142' --chat --gen-length 8
print 31284 and 12349 (--chat: its template adds the newline to a single user message).
"""


def _ids(text: str) -> list[int]:
    try:
        ids = [int(t) for t in text.replace(" ", "").split(",") if t]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--prompt-ids takes comma-separated integers, got {text!r}") from None
    if not ids:
        raise argparse.ArgumentTypeError("--prompt-ids is empty")
    return ids


def build_parser() -> argparse.ArgumentParser:
    g = argparse.ArgumentParser(prog="dllm generate", description="denoise a response for one prompt",
                                epilog=SHIPPED_MODEL_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    engine_args(g, backend_help="how steps run (default for this one-shot command: eager on CPU, cudagraph on "
                                "CUDA, which captures in seconds; compile+cudagraph is faster per step but compiles "
                                "for minutes per shape: worth it for a server, not for one generation)")
    src = g.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", action="append", help="prompt text (needs tokenizer files in the folder); '-' reads "
                     "it from stdin; repeat it for a batch (one output line per prompt)")
    src.add_argument("--prompt-file", action="append", help="read a prompt from this file (its whole text); "
                     "repeatable like --prompt")
    src.add_argument("--prompt-ids", type=_ids, action="append", help="prompt token ids, comma-separated; repeatable")
    g.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    tp_arg(g)
    request_args(g, skip=("text_tokens",))
    g.add_argument("--json", action="store_true",
                   help="print one JSON object on stdout and no progress on stderr (errors still go there)")
    g.add_argument("--quiet", action="store_true",
                   help="print only the response: no progress on stderr, no summary line")
    g.add_argument("--live", action="store_true",
                   help="redraw the canvas in place after every step (falls back to plain output when stdout "
                        "is not a terminal)")
    return g


def prompts_of(a) -> list:
    """The prompts the flags name: texts (--prompt, '-' for stdin, --prompt-file) or id lists."""
    if a.prompt_ids is not None:
        return a.prompt_ids
    if a.prompt_file is not None:
        try:
            return [Path(f).read_text(encoding="utf-8") for f in a.prompt_file]
        except (OSError, UnicodeDecodeError) as e:
            raise RequestError(f"--prompt-file: cannot read it as UTF-8 text ({e})", "prompt") from None
    texts = [sys.stdin.read() if p == "-" else p for p in a.prompt]
    if a.prompt.count("-") > 1:
        raise RequestError("--prompt - reads stdin once; give it at most once", "prompt")
    return texts


def run(a) -> int:
    if a.threads:
        if a.threads < 1:
            raise RequestError(f"--threads must be >= 1, got {a.threads}")
        torch.set_num_threads(a.threads)
    prompts = prompts_of(a)
    request = request_from_args(a, prompts[0] if len(prompts) == 1 else prompts, skip=("text_tokens",))
    eng = engine_from_args(a, backend=ONE_SHOT_BACKEND.get(a.device), check=[request])   # checked before loading
    view = None
    if a.live and not a.json and sys.stdout.isatty():
        from .live import LiveView
        view = LiveView(eng, out=sys.stdout)
    quiet = a.quiet or a.json or follower(a)
    bar = ProgressBar(enabled=not quiet and view is None)               # the live view is its own progress
    try:
        out = eng.generate(request, on_step=view, progress=bar)
    finally:
        bar.close()
    if follower(a):
        return 0
    if view is not None:
        view.finish(out)
        return 0
    if a.json:
        print(json.dumps(out.to_json()))
        return 0
    for b, ids in enumerate(out.tokens):
        print(out.text[b] if out.text is not None else ",".join(map(str, ids)))
    if a.quiet:
        return 0
    kinds = ", ".join(f"{k} {n}" for k, n in out.step_kinds.items())
    print(f"[{eng.cfg.family}: {sum(map(len, out.tokens))} tokens, {out.steps} steps ({kinds}), "
          f"{out.seconds:.3f} s, {out.tokens_per_second:.1f} tok/s, backend {out.backend}, "
          f"prepare {out.prepare_seconds:.1f} s]", file=sys.stderr)
    return 0


def main(argv: list[str]) -> int:
    a = build_parser().parse_args(argv)
    restore = setup_output(quiet=a.quiet or a.json or follower(a))
    try:
        return run(a)
    except expected_errors() as e:
        return error_exit(str(e))
    except OSError as e:                      # an unreadable model folder, ...
        return error_exit(f"{e.filename + ': ' if e.filename else ''}{e.strerror or e}")
    except MemoryError:
        return error_exit("out of memory; use a shorter prompt or response, a smaller batch or block, or a smaller "
                          "dtype")
    except KeyboardInterrupt:
        print("dllm: interrupted", file=sys.stderr)
        return 130
    finally:
        restore()
