"""`dllm generate`: the command-line face of Engine.generate.

    dllm generate --model DIR (--prompt TEXT | --prompt-ids 1,2,3) --gen-length N --steps N
                  --block-length N [--remasking ...] [--alg ...] [--temperature F] [--top-p F] [--top-k N]
                  [--seed N] [--dtype float32|bfloat16|float16] [--device cpu|cuda] [--chat] [--json]
                  [--threshold F] [--policy none|dllm-cache|d2cache|dual-cache --kp N --kr N --rho F
                   --k N --sigma F --attn-budget N [--attn-p F] [--quasi-l2r]]
                  [--backend eager|compile|cudagraph|compile+cudagraph]

With --json, stdout carries exactly one JSON object; errors go to stderr with exit status 2.
"""
from __future__ import annotations

import argparse
import importlib
import json
import subprocess
import sys
from dataclasses import fields

from dllm.graphs import BACKENDS, BackendError
from dllm.models.config import CheckpointError

from .decoding import DREAM_ALGS, LLADA_REMASKING, RequestError
from .engine import DTYPES
from .policy import POLICIES, make_policy

EXPORT_FORMATS = ("torchscript", "aoti")
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
    g.add_argument("--dtype", choices=list(DTYPES), default="float32")
    g.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    g.add_argument("--remasking", choices=LLADA_REMASKING, default=None, help="LLaDA (default low_confidence)")
    g.add_argument("--alg", choices=DREAM_ALGS, default=None, help="Dream (default entropy)")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="dllm", description="Static-shape inference for diffusion LMs "
                                                          "(LLaDA, Dream).")
    sub = ap.add_subparsers(dest="command", required=True)
    g = sub.add_parser("generate", help="denoise a response for one prompt")
    model_args(g)
    src = g.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="prompt text (needs tokenizer files in the folder)")
    src.add_argument("--prompt-ids", type=_ids, help="prompt token ids, comma-separated")
    g.add_argument("--gen-length", type=int, required=True, help="response length G")
    g.add_argument("--steps", type=int, required=True, help="denoising steps (a multiple of the block count)")
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
    g.add_argument("--backend", choices=BACKENDS, default=None,
                   help="how steps run (default: the fastest on the device for cached plans: eager on "
                        "CPU, compile+cudagraph on CUDA)")
    g.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    g.add_argument("--live", action="store_true",
                   help="redraw the canvas in place after every step (falls back to plain output when stdout "
                        "is not a terminal)")

    sub.add_parser("bench", help="the headline latency report for this machine (perf.report)", add_help=False)
    e = sub.add_parser("export", help="write the step modules of one shape as a package a C++ host runs")
    model_args(e)
    e.add_argument("--out", required=True, help="package folder to write (steps.pt + plan.json)")
    e.add_argument("--format", choices=list(EXPORT_FORMATS), default="torchscript")
    e.add_argument("--prompt-bucket", type=int, default=64, help="longest prompt the package accepts")
    e.add_argument("--gen-length", type=int, default=64)
    e.add_argument("--steps", type=int, default=64)
    e.add_argument("--block-length", type=int, default=None)
    policy_args(e)
    return ap


def cmd_generate(a) -> int:
    from .engine import Engine
    if a.chat and a.prompt is None:
        raise RequestError("--chat applies a chat template to --prompt text; it cannot wrap --prompt-ids")
    policy = policy_from_args(a)
    eng = Engine.from_pretrained(a.model, device=a.device, dtype=a.dtype, trust_remote_code=a.trust_remote_code,
                                 backend=a.backend)
    view = None
    if a.live and not a.json and sys.stdout.isatty():
        from .live import LiveView
        view = LiveView(eng, out=sys.stdout)
    out = eng.generate(a.prompt if a.prompt is not None else a.prompt_ids, gen_length=a.gen_length,
                       steps=a.steps, block_length=a.block_length, remasking=a.remasking, alg=a.alg,
                       temperature=a.temperature, top_p=a.top_p, top_k=a.top_k, seed=a.seed, chat=a.chat,
                       prompt_bucket=a.prompt_bucket, policy=policy, threshold=a.threshold, on_step=view)
    if view is not None:
        view.finish(out)
        return 0
    if a.json:
        print(json.dumps(out.to_json()))
        return 0
    for b, ids in enumerate(out.tokens):
        print(out.text[b] if out.text is not None else ",".join(map(str, ids)))
    kinds = ", ".join(f"{k} {n}" for k, n in out.step_kinds.items())
    print(f"[{eng.cfg.family}: {sum(map(len, out.tokens))} tokens, {out.steps} steps ({kinds}), "
          f"{out.seconds:.3f} s, {out.tokens_per_second:.1f} tok/s, backend {out.backend}, "
          f"capture {out.capture_seconds:.1f} s]", file=sys.stderr)
    return 0


def cmd_export(a) -> int:
    from .engine import Engine
    from .export import export
    eng = Engine.from_pretrained(a.model, device=a.device, dtype=a.dtype, backend="eager")
    info = export(eng, a.out, prompt_bucket=a.prompt_bucket, gen_length=a.gen_length, steps=a.steps,
                  block_length=a.block_length, policy=policy_from_args(a), remasking=a.remasking, alg=a.alg, fmt=a.format)
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
        print(f"dllm: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
