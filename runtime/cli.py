"""`dllm generate`: the command-line face of Engine.generate.

    dllm generate --model DIR (--prompt TEXT | --prompt-ids 1,2,3) [--gen-length N (128)] [--steps N (G)]
                  [--block-length N (G)] [--remasking ...] [--alg ...] [--temperature F] [--top-p F] [--top-k N]
                  [--seed N] [--dtype auto|float32|bfloat16|float16] [--device cpu|cuda] [--chat] [--json | --quiet]
                  [--threshold F] [--policy none|dllm-cache|d2cache|dual-cache --kp N --kr N --rho F
                   --k N --sigma F --attn-budget N [--attn-p F] [--quasi-l2r]]
                  [--backend eager|compile|cudagraph|compile+cudagraph]

With --json, stdout carries exactly one JSON object; errors go to stderr with exit status 2. Progress of
long work (loading, compiling, denoising) goes to stderr, except under --json and --quiet.
"""
from __future__ import annotations

import argparse
import importlib
import json
import logging
import subprocess
import sys
from collections.abc import Callable
from dataclasses import fields
from pathlib import Path

from dllm.graphs import BACKENDS, BackendError
from dllm.models.config import CheckpointError

from .decoding import CONFIDENCE_DTYPES, DREAM_ALGS, LLADA_REMASKING, RequestError
from .engine import DTYPE_CHOICES
from .policy import POLICIES, make_policy

EXPORT_FORMATS = ("torchscript", "aoti")
ONE_SHOT_BACKEND = {"cpu": "eager", "cuda": "cudagraph"}    # one generation: no minutes-long compile
APPS = {"eval": ("evaluate", "eval"), "serve": ("serve", "serve")}   # subcommand -> (module, pip extra)


def _ids(text: str) -> list[int]:
    try:
        ids = [int(t) for t in text.replace(" ", "").split(",") if t]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--prompt-ids takes comma-separated integers, got {text!r}") from None
    if not ids:
        raise argparse.ArgumentTypeError("--prompt-ids is empty")
    return ids


def policy_args(g) -> None:
    """--policy and every policy's options, from the registry (each option is a policy dataclass field)."""
    g.add_argument("--policy", choices=list(POLICIES), default="none",
                   help="cache policy: " + ", ".join(POLICIES) + " (none: full refresh every step)")
    for cls in POLICIES.values():
        for f in fields(cls):
            flag = "--" + f.name.replace("_", "-")
            if f.type in (bool, "bool"):
                g.add_argument(flag, action="store_true", help=f.metadata.get("help"))
            else:
                kind = f.metadata.get("type") or type(f.default)
                g.add_argument(flag, type=kind, default=f.default, help=f.metadata.get("help"))


def policy_from_args(a):
    """The policy chosen on the command line, with its own options only."""
    cls = POLICIES[a.policy]
    return make_policy(a.policy, **{f.name: getattr(a, f.name) for f in fields(cls)})


def model_args(g) -> None:
    g.add_argument("--model", required=True, help="checkpoint folder (config.json + safetensors)")
    g.add_argument("--dtype", choices=list(DTYPE_CHOICES), default="auto",
                   help="auto (default): bfloat16 where the device computes it natively (a CPU with AVX512-BF16 "
                        "or AMX, a CUDA GPU since Ampere), else float32; float32 reproduces the reference "
                        "implementations token for token")
    g.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    g.add_argument("--remasking", choices=LLADA_REMASKING, default=None, help="LLaDA (default low_confidence)")
    g.add_argument("--alg", choices=DREAM_ALGS, default=None, help="Dream (default entropy)")


DEFAULT_GEN_LENGTH = 128
SHIPPED_MODEL_EPILOG = """\
defaults: --gen-length 128; --steps the gen length (one token per step); --block-length the gen length.

The model shipped in the repository, models/trained/arith-llada, answers one line: a task word
(reverse or sort), a space, 3-6 digits, and a newline; it was trained with --gen-length 8. From the
repository root:
  .venv/bin/dllm generate --model models/trained/arith-llada --prompt $'reverse 48213\\n' --gen-length 8
  .venv/bin/dllm generate --model models/trained/arith-llada --prompt 'sort 93142' --chat --gen-length 8
print 31284 and 12349 (--chat: its template adds the newline to a single user message).
"""


class _Stderr(logging.StreamHandler):
    """A handler that writes to whatever sys.stderr is when a record is emitted (callers may swap it)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, _value):
        pass


def setup_output(quiet: bool) -> Callable[[], None]:
    """Progress of long work on stderr: the 'dllm' logger's INFO lines (loading weights, preparing steps),
    prefixed 'dllm: '. quiet (--quiet, --json): warnings and errors only. Returns a function that puts
    the logger back as it was (for callers of main() inside a longer-lived process)."""
    log = logging.getLogger("dllm")
    before = (log.level, log.propagate)
    for h in [h for h in log.handlers if h.get_name() == "dllm-cli"]:
        log.removeHandler(h)
    handler = _Stderr()
    handler.set_name("dllm-cli")
    handler.setFormatter(logging.Formatter("dllm: %(message)s"))
    log.addHandler(handler)
    log.setLevel(logging.WARNING if quiet else logging.INFO)
    log.propagate = False

    def restore() -> None:
        log.removeHandler(handler)
        log.level, log.propagate = before
    return restore


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


def dllm_version() -> str:
    from importlib.metadata import PackageNotFoundError, version
    try:
        return version("dllm-runtime")
    except PackageNotFoundError:
        return "unknown (not installed: pip install -e .)"


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="dllm", description="Static-shape inference for diffusion LMs "
                                                          "(LLaDA, Dream).")
    ap.add_argument("--version", action="version", version=f"%(prog)s {dllm_version()}",
                    help="print the installed dllm-runtime version and exit")
    sub = ap.add_subparsers(dest="command", required=True)
    g = sub.add_parser("generate", help="denoise a response for one prompt", epilog=SHIPPED_MODEL_EPILOG,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    model_args(g)
    src = g.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="prompt text (needs tokenizer files in the folder)")
    src.add_argument("--prompt-ids", type=_ids, help="prompt token ids, comma-separated")
    g.add_argument("--gen-length", type=int, default=DEFAULT_GEN_LENGTH,
                   help=f"response length G (default {DEFAULT_GEN_LENGTH})")
    g.add_argument("--steps", type=int, default=None,
                   help="denoising steps, a multiple of the block count (default G: one token per step)")
    g.add_argument("--block-length", type=int, default=None,
                   help="semi-autoregressive block length (divides G; default G, a single block)")
    g.add_argument("--prompt-bucket", type=int, default=None,
                   help="left-pad the prompt to this length (default: the prompt's own length)")
    g.add_argument("--temperature", type=float, default=0.0)
    g.add_argument("--top-p", type=float, default=None, help="Dream")
    g.add_argument("--top-k", type=int, default=None, help="Dream")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--chat", action="store_true", help="wrap --prompt in the folder's chat template")
    g.add_argument("--trust-remote-code", action="store_true",
                   help="allow the folder's custom tokenizer code (Dream's tokenizer needs it)")
    policy_args(g)
    g.add_argument("--threshold", type=float, default=None,
                   help="commit every masked block token with p >= threshold (at least one) per step; the "
                        "step count then depends on the data")
    g.add_argument("--confidence-dtype", choices=CONFIDENCE_DTYPES, default="float64",
                   help="rank and threshold p(x0) in float64 (as Fast-dLLM; default) or in the logits' own dtype "
                        "(as the official LLaDA sampler and dLLM-Cache: reproduces them tie for tie at bf16)")
    g.add_argument("--backend", choices=BACKENDS, default=None,
                   help="how steps run (default for this one-shot command: eager on CPU, cudagraph on CUDA, "
                        "which captures in seconds; compile+cudagraph is faster per step but compiles for "
                        "minutes per shape: worth it for a server, not for one generation)")
    g.add_argument("--json", action="store_true",
                   help="print one JSON object on stdout and no progress on stderr (errors still go there)")
    g.add_argument("--quiet", action="store_true",
                   help="print only the response: no progress on stderr, no summary line")
    g.add_argument("--live", action="store_true",
                   help="redraw the canvas in place after every step (falls back to plain output when stdout "
                        "is not a terminal)")

    sub.add_parser("bench", help="the headline latency report for this machine (perf.report)", add_help=False)
    e = sub.add_parser("export", help="write the step modules of one shape as a package a C++ host runs")
    model_args(e)
    e.add_argument("--quiet", action="store_true", help="no progress on stderr (loading, compiling)")
    e.add_argument("--out", required=True, help="package folder to write (steps.pt + plan.json)")
    e.add_argument("--force", action="store_true",
                   help="replace a non-empty --out (only once the new package is complete)")
    e.add_argument("--format", choices=list(EXPORT_FORMATS), default="torchscript")
    e.add_argument("--prompt-bucket", type=int, default=64, help="longest prompt the package accepts")
    e.add_argument("--gen-length", type=int, default=64)
    e.add_argument("--steps", type=int, default=64)
    e.add_argument("--block-length", type=int, default=None)
    policy_args(e)
    e.add_argument("--confidence-dtype", choices=CONFIDENCE_DTYPES, default="float64",
                   help="rank p(x0) in float64 (default) or in the logits' own dtype (see dllm generate --help)")
    return ap


def cmd_generate(a) -> int:
    restore = setup_output(quiet=a.quiet or a.json)
    try:
        return _generate(a)
    finally:
        restore()


def _generate(a) -> int:
    from .engine import Engine
    if a.chat and a.prompt is None:
        raise RequestError("--chat applies a chat template to --prompt text; it cannot wrap --prompt-ids")
    policy = policy_from_args(a)
    eng = Engine.from_pretrained(a.model, device=a.device, dtype=a.dtype, trust_remote_code=a.trust_remote_code,
                                 backend=a.backend or ONE_SHOT_BACKEND.get(a.device))
    view = None
    if a.live and not a.json and sys.stdout.isatty():
        from .live import LiveView
        view = LiveView(eng, out=sys.stdout)
    bar = StepBar(enabled=not (a.quiet or a.json) and view is None)   # the live view is its own progress
    try:
        out = eng.generate(a.prompt if a.prompt is not None else a.prompt_ids, gen_length=a.gen_length,
                           steps=a.gen_length if a.steps is None else a.steps, block_length=a.block_length,
                           remasking=a.remasking, alg=a.alg,
                           temperature=a.temperature, top_p=a.top_p, top_k=a.top_k, seed=a.seed, chat=a.chat,
                           prompt_bucket=a.prompt_bucket, policy=policy, threshold=a.threshold,
                           confidence_dtype=a.confidence_dtype, on_step=view, progress=bar)
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
          f"capture {out.capture_seconds:.1f} s]", file=sys.stderr)
    return 0


def cmd_export(a) -> int:
    from .engine import Engine
    from .export import check_cuda_toolkit, check_out, export
    setup_output(quiet=a.quiet)
    check_out(Path(a.out), a.force)           # before minutes of loading: refuse a non-empty --out now
    if a.device == "cuda" and a.format == "aoti":
        check_cuda_toolkit()                  # AOTInductor compiles CUDA kernels with nvcc
    eng = Engine.from_pretrained(a.model, device=a.device, dtype=a.dtype, backend="eager")
    info = export(eng, a.out, prompt_bucket=a.prompt_bucket, gen_length=a.gen_length, steps=a.steps,
                  block_length=a.block_length, policy=policy_from_args(a), remasking=a.remasking, alg=a.alg, fmt=a.format,
                  confidence_dtype=a.confidence_dtype, replace=a.force)
    print(f"wrote {a.out}: {info['format']} {info['family']} prompt<={info['prompt_bucket']} gen {info['gen_length']} "
          f"steps {info['steps']} policy {info['policy']['name']} kinds {', '.join(info['kinds'])}")
    return 0


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["bench"]:                 # perf sits above the runtime: run it as its own program
        return subprocess.call([sys.executable, "-m", "dllm.perf.report", *argv[1:]])
    if argv[:1] in (["eval"], ["serve"]):     # each owns its command line; each needs its extra
        try:
            mod = importlib.import_module(f".{APPS[argv[0]][0]}", __package__)
        except ImportError as e:
            print(f"dllm: error: dllm {argv[0]} needs the {APPS[argv[0]][1]} extra ({e.name} is missing): "
                  f"pip install 'dllm-runtime[{APPS[argv[0]][1]}]'", file=sys.stderr)
            return 2
        return mod.main(argv[1:])
    a = build_parser().parse_args(argv)
    try:
        return cmd_export(a) if a.command == "export" else cmd_generate(a)
    except (CheckpointError, RequestError, BackendError) as e:
        return _error(str(e))
    except OSError as e:                      # unreadable model folder, an --out that cannot be written, ...
        return _error(f"{e.filename + ': ' if e.filename else ''}{e.strerror or e}")
    except MemoryError:
        return _error("out of memory; use a shorter prompt or response, a smaller batch or block, or a smaller dtype")
    except KeyboardInterrupt:
        print("dllm: interrupted", file=sys.stderr)
        return 130


def _error(message: str) -> int:
    """Every expected failure: one line on stderr, exit status 2."""
    print("dllm: error: " + " ".join(message.split()), file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
