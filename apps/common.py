"""What the faces share, made for that: command-line flags built from the core's own fields (Request's,
each registered policy's, the engine's), the one way a face turns them into a Request and an Engine,
progress on stderr, and the one-line error exit. Faces import this, never each other."""
from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable
from dataclasses import fields

from dllm.graphs import BACKENDS
from dllm.models.quant import MODES, Quantization
from dllm.runtime import POLICIES, Engine, Request, RequestError
from dllm.runtime.device import DTYPE_CHOICES
from dllm.runtime.options import field_kind, request_options
from dllm.runtime.request import OPTION_FIELDS


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _add(g, f, help_extra: str = "") -> None:
    """One dataclass field as a flag. Values stay strings (None when not given) and are typed by the
    one option parser (runtime/options.py), so every face reports a bad value the same way."""
    kind = field_kind(f.type)[0]
    help_text = (f.metadata.get("help") or "") + help_extra
    if kind == "bool":
        g.add_argument(flag(f.name), action="store_const", const=True, default=None, help=help_text)
    elif kind.startswith("tuple"):
        g.add_argument(flag(f.name), action="append", default=None, help=help_text + " (repeatable)")
    else:
        g.add_argument(flag(f.name), default=None, choices=f.metadata.get("choices"), help=help_text,
                       metavar=None if f.metadata.get("choices") else f.name.upper())


def request_args(g, skip: tuple[str, ...] = ()) -> None:
    """Request's options (but the prompt) and every registered policy's, from their dataclass fields."""
    for f in OPTION_FIELDS:
        if f.name in skip:
            continue
        if f.name == "policy":
            g.add_argument("--policy", default=None,
                           help="cache policy: " + ", ".join(POLICIES) + " (default none: full refresh every step); "
                                "also NAME:key=value,... with its options")
        else:
            _add(g, f)
    seen = set()
    for name, cls in POLICIES.items():
        for f in fields(cls):
            if f.name not in seen:
                seen.add(f.name)
                _add(g, f, f" [policy {name}]")


def given_options(a: argparse.Namespace, skip: tuple[str, ...] = ()) -> dict:
    """The request and policy options given on the command line (flags left out are not passed, so
    the Request's and the model's defaults apply)."""
    names = [f.name for f in OPTION_FIELDS if f.name not in skip]
    names += [f.name for cls in POLICIES.values() for f in fields(cls)]
    out = {n: getattr(a, n) for n in dict.fromkeys(names) if getattr(a, n, None) is not None}
    if isinstance(out.get("policy"), str) and ":" in out["policy"]:     # NAME:k=v,... as one spec
        from dllm.runtime.options import parse_policy
        out["policy"] = parse_policy(out["policy"])
        extra = [k for k in out if k not in {f.name for f in OPTION_FIELDS}]
        if extra:
            raise RequestError(f"give the policy's options either in --policy NAME:key=value or as flags, not both "
                               f"({', '.join(flag(k) for k in extra)})")
    return out


def request_from_args(a: argparse.Namespace, prompt, skip: tuple[str, ...] = ()) -> Request:
    return Request(prompt, **request_options(given_options(a, skip), text=True))


def engine_args(g, *, backend_help: str = "how steps run (default: the fastest for this face on the device)") -> None:
    g.add_argument("--model", required=True, help="checkpoint folder (config.json + safetensors)")
    g.add_argument("--dtype", choices=list(DTYPE_CHOICES), default="auto",
                   help="auto (default): bfloat16 where the device computes it natively (a CPU with AVX512-BF16 "
                        "or AMX, a CUDA GPU since Ampere), else float32; float32 reproduces the reference "
                        "implementations token for token")
    g.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    g.add_argument("--backend", choices=BACKENDS, default=None, help=backend_help)
    g.add_argument("--trust-remote-code", action="store_true",
                   help="allow the folder's custom tokenizer code (Dream's tokenizer needs it)")
    g.add_argument("--quantize", choices=list(MODES), default="none",
                   help="weight-only quantization of the attention and FFN matrices while loading: int8 (per "
                        "output channel) or int4 (group-wise); activations stay in --dtype (docs/quantization.md)")
    g.add_argument("--quantize-group", type=int, default=None, metavar="G",
                   help="int4 group size: 32, 64, 128 or 256 (default 128, smaller where a width needs it)")
    g.add_argument("--quantize-head", action="store_true", help="quantize the LM head too (default: kept)")


def tp_arg(g) -> None:
    g.add_argument("--tp", type=int, default=1, metavar="N",
                   help="tensor-parallel ranks, one process each: launch as `torchrun --nproc-per-node N "
                        ".venv/bin/dllm ... --tp N` (docs/parallel.md); rank 0 prints")


def follower(a: argparse.Namespace) -> bool:
    """A tensor-parallel rank other than 0: it computes with the others and prints nothing."""
    return getattr(a, "tp", 1) > 1 and os.environ.get("RANK", "0") != "0"


def engine_from_args(a: argparse.Namespace, backend: str | None = None, **engine_options) -> Engine:
    """The engine the flags describe (engine_options: Engine's, and from_pretrained's `check`)."""
    return Engine.from_pretrained(a.model, device=a.device, dtype=a.dtype, trust_remote_code=a.trust_remote_code,
                                  backend=a.backend or backend, tp=getattr(a, "tp", 1), **quantize_options(a),
                                  **engine_options)


def quantize_options(a: argparse.Namespace) -> dict:
    """from_pretrained's quantize keywords from the flags, checked now (one line, before anything loads)."""
    Quantization(a.quantize, a.quantize_group, a.quantize_head)
    return dict(quantize=a.quantize, quantize_group=a.quantize_group, quantize_head=a.quantize_head)


# ---------------------------------------------------------------- output

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


def error_exit(message: str, prog: str = "dllm") -> int:
    """Every expected failure: one line on stderr, exit status 2."""
    print(f"{prog}: error: " + " ".join(str(message).split()), file=sys.stderr)
    return 2


def run_guarded(run: Callable[[argparse.Namespace], int], a: argparse.Namespace, quiet: bool) -> int:
    """A face's run(a) with progress on stderr and every expected failure as one line, exit 2 (Ctrl-C: 130)."""
    restore = setup_output(quiet=quiet)
    try:
        return run(a)
    except expected_errors() as e:
        return error_exit(str(e))
    except OSError as e:                      # an unreadable folder, an --out that cannot be written, ...
        return error_exit(f"{e.filename + ': ' if e.filename else ''}{e.strerror or e}")
    except KeyboardInterrupt:
        print("dllm: interrupted", file=sys.stderr)
        return 130
    finally:
        restore()


def expected_errors() -> tuple[type[BaseException], ...]:
    """The exception types that mean bad input, not a bug (one line, exit 2)."""
    from dllm.graphs import BackendError
    from dllm.models.config import CheckpointError
    return (CheckpointError, RequestError, BackendError)
