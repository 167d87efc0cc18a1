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

from dllm.apps.common import (
    engine_args,
    engine_from_args,
    error_exit,
    expected_errors,
    request_args,
    request_from_args,
    setup_output,
)

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


class StepBar:
    """Engine.generate's progress(launched, planned) hook as a tqdm bar on stderr. The bar appears only
    once a generation has run for 2 s, and never when stderr is not a terminal (there it is noise)."""

    def __init__(self, enabled: bool):
        self.enabled, self.bar = enabled and sys.stderr.isatty(), None

    def __call__(self, launched: int, planned: int) -> None:
        if not self.enabled:
            return
        if self.bar is None:
            from tqdm import tqdm
            self.bar = tqdm(total=planned, desc="dllm: denoising", unit="step", delay=2, leave=False,
                            file=sys.stderr, dynamic_ncols=True)
        self.bar.update(launched - self.bar.n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def build_parser() -> argparse.ArgumentParser:
    g = argparse.ArgumentParser(prog="dllm generate", description="denoise a response for one prompt",
                                epilog=SHIPPED_MODEL_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    engine_args(g, backend_help="how steps run (default for this one-shot command: eager on CPU, cudagraph on "
                                "CUDA, which captures in seconds; compile+cudagraph is faster per step but compiles "
                                "for minutes per shape: worth it for a server, not for one generation)")
    src = g.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="prompt text (needs tokenizer files in the folder)")
    src.add_argument("--prompt-ids", type=_ids, help="prompt token ids, comma-separated")
    request_args(g, skip=("text_tokens",))
    g.add_argument("--json", action="store_true",
                   help="print one JSON object on stdout and no progress on stderr (errors still go there)")
    g.add_argument("--quiet", action="store_true",
                   help="print only the response: no progress on stderr, no summary line")
    g.add_argument("--live", action="store_true",
                   help="redraw the canvas in place after every step (falls back to plain output when stdout "
                        "is not a terminal)")
    return g


def run(a) -> int:
    request = request_from_args(a, a.prompt if a.prompt is not None else a.prompt_ids, skip=("text_tokens",))
    eng = engine_from_args(a, backend=ONE_SHOT_BACKEND.get(a.device))
    view = None
    if a.live and not a.json and sys.stdout.isatty():
        from .live import LiveView
        view = LiveView(eng, out=sys.stdout)
    bar = StepBar(enabled=not (a.quiet or a.json) and view is None)   # the live view is its own progress
    try:
        out = eng.generate(request, on_step=view, progress=bar)
    finally:
        bar.close()
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
    restore = setup_output(quiet=a.quiet or a.json)
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
