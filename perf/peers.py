"""The CPU side by side with llama.cpp (`llama-diffusion-cli`), one interleaved run, one machine.

    python -m dllm.perf.peers --llama-cpp PATH/TO/llama.cpp [--rounds 3] [--threads 2]

Given a llama.cpp checkout with `llama-diffusion-cli`, `llama-quantize` and `llama-tokenize` built (without
one it prints how to build them and exits 2), it:

1. converts a LLaDA-format folder (default: the `small` preset of models/tiny.py, 8 layers, d 512, 32k
   vocabulary, written into --work) and the trained model (models/trained/arith-llada) with llama.cpp's own
   `convert_hf_to_gguf.py` to F32 and BF16, and with `llama-quantize` to Q8_0 (and Q4_0 with --gguf ... q4_0);
2. checks tokenization: `llama-tokenize` on each GGUF gives our tokenizer's ids for every prompt used;
3. checks argmax agreement on the trained model: one llama.cpp forward (one step that commits every position,
   greedy) against ours, on --agree-prompts held-out prompts, per GGUF type against our fp32 and bf16;
4. times both, interleaved (--rounds rounds going round every configuration; medians), per forward and end
   to end: llama.cpp per GGUF type, ours NoCache fp32 / bf16, dLLM-Cache and dual cache (bf16), and our
   int8 / int4 rows when `Engine.from_pretrained` accepts `quantize` (else they are skipped with a note);
5. prints a table with the ratios against llama.cpp BF16 (--baseline).

What llama.cpp's schedule does differently (examples/diffusion/diffusion.cpp, checked at 0c1e57098):
- The canvas is `-ub` tokens, prompt included, and its block schedule counts blocks over the whole canvas:
  n_blocks = (P + G) / block, starting at the prompt's end, with --diffusion-steps / n_blocks steps each. To
  commit one token per step (as our G steps do) the steps must be P + G; the blocks past the canvas's end
  still cost one forward each before finding no mask. At P=512, G=128, block 32: 20 blocks, 4 real ones of
  32 forwards and 16 empty ones of 1: 144 forwards for 128 tokens (`llama_forwards`). It also needs
  (P + G) % block == 0.
- Every step is a forward over the whole canvas (no cache of any kind).
- Its sampler has no greedy low-confidence mode: at temperature 0 it still samples from the softmax; greedy
  needs --top-k 1, and then every candidate's confidence is 1, so the ties commit left to right in position
  order. Tokens then differ from ours by commit order only, so agreement is checked on one forward (step 3).
- Every run is a new process; its reported "total time" excludes loading, ours excludes preparation.
- Its CPU threads are OpenMP threads that wait for each other at every barrier: on a busy machine its
  forwards ran 10x slower on 2 threads than on 1 (load average 10), so the command warns when the machine
  is not quiet.
Our side commits one token per step with low-confidence remasking, G steps, each a full forward (NoCache) or
a partial one (the caches). Both sides get the same prompt ids: llama-diffusion-cli always prepends BOS (the
converter sets add_bos_token for LLaDA and the CLI applies no metadata override), so our prompt is BOS + the
same text, P tokens in all.

The converter is llama.cpp's; what this command adds for it: our character tokenizers (models/tiny.py) are
not in its pre-tokenizer table, so it converts a staged copy of the folder (the weights and config.json as
they are; the same vocabulary as a byte-level BPE tokenizer.json, the form llama.cpp's "gpt2" tokenizer
reads, with one merge that never applies because llama.cpp needs at least one; a chat template that passes the
prompt through) and answers the pre-tokenizer question itself ("default"); step 2 checks the result. A
folder with any other tokenizer is converted as it is.
"""
from __future__ import annotations

import argparse
import inspect
import json
import os
import platform
import random
import re
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

TOOLS = ("llama-diffusion-cli", "llama-quantize", "llama-tokenize")
TESTED = "0c1e57098"
GGUF_TYPES = ("f32", "bf16", "q8_0", "q4_0")       # f32 / bf16 from the converter, the others by llama-quantize
DEFAULT_OURS = ("none@float32", "none@bfloat16", "dllm-cache:kp=100,kr=7,rho=0.25@bfloat16", "dual-cache@bfloat16",
                "none@bfloat16+int8", "none@bfloat16+int4")
QUANTIZE = ("int8", "int4")
PRESET_NAMES = ("small", "tiny")                   # models/tiny.py's PRESETS (named here: no torch before the checks)
PASS_THROUGH_TEMPLATE = "{% for message in messages %}{{ message['content'] }}{% endfor %}"


def build_help(llama_cpp: str | None, missing: list[str]) -> str:
    """The one message printed when there is no usable llama.cpp: what is missing and how to build it."""
    where = (f"{llama_cpp} lacks {', '.join(missing)}" if llama_cpp
             else "no --llama-cpp given")
    return f"""perf.peers needs a llama.cpp checkout with {', '.join(TOOLS)} built ({where}).
Build them (CPU only, Release; tested at llama.cpp {TESTED}; about 10 minutes on 2 cores):
  git clone https://github.com/ggml-org/llama.cpp && cd llama.cpp
  cmake -B build -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF \\
      -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_SERVER=OFF
  cmake --build build -j2 --target {' '.join(TOOLS)}
Its converter (convert_hf_to_gguf.py, which finds its gguf-py itself) needs numpy, torch, transformers and
safetensors: this Python has them; or give --convert-python a venv of its own
(python -m venv llama-venv && llama-venv/bin/pip install -e llama.cpp/gguf-py torch transformers sentencepiece).
Then: python -m dllm.perf.peers --llama-cpp llama.cpp"""


@dataclass(frozen=True)
class LlamaCpp:
    root: Path

    def tool(self, name: str) -> Path:
        return self.root / "build" / "bin" / name

    @property
    def converter(self) -> Path:
        return self.root / "convert_hf_to_gguf.py"

    def missing(self) -> list[str]:
        gone = [t for t in TOOLS if not os.access(self.tool(t), os.X_OK)]
        return gone + [p for p in ("convert_hf_to_gguf.py", "gguf-py") if not (self.root / p).exists()]


# ---------------------------------------------------------------- llama.cpp's schedule, as a model

def llama_steps(prompt_len: int, gen_length: int, block_length: int) -> int:
    """--diffusion-steps that make llama.cpp's block schedule commit one token per step: block_length
    steps in each of its (P + G) / block blocks."""
    return prompt_len + gen_length


def llama_forwards(prompt_len: int, gen_length: int, block_length: int, steps: int) -> int:
    """Forwards llama-diffusion-cli runs (examples/diffusion/diffusion.cpp, block schedule): the canvas
    P + G is cut into (P + G) / block blocks counted from the prompt's end; each gets steps / n_blocks steps.
    A block's step forwards first and then stops when the block has no mask left: a block of m masks
    costs its steps when they are <= m (the last one commits the last mask), m + 1 when they are more,
    and a block past the canvas's end (m = 0) one forward."""
    canvas = prompt_len + gen_length
    if block_length <= 0 or canvas % block_length:
        raise ValueError(f"llama.cpp's block schedule needs (P + G) % block == 0; P + G = {canvas}, "
                         f"block {block_length}")
    n_blocks = canvas // block_length
    if steps <= 0 or steps % n_blocks:
        raise ValueError(f"llama.cpp's block schedule needs steps to be a multiple of its {n_blocks} blocks; "
                         f"got {steps}")
    per_block, total = steps // n_blocks, 0
    for b in range(n_blocks):
        start = prompt_len + b * block_length
        masks = max(0, min(start + block_length, canvas) - start)
        total += per_block if per_block <= masks else masks + 1
    return total


# ---------------------------------------------------------------- staging and conversion

def byte_level_chars() -> dict[int, str]:
    """GPT-2's byte -> character table (the form llama.cpp's "gpt2" tokenizer stores tokens in):
    printable bytes stand for themselves, the others are shifted past 255 in byte order."""
    keep = set(range(33, 127)) | set(range(161, 173)) | set(range(174, 256))
    table, shifted = {}, 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + shifted)
            shifted += 1
    return table


def char_tokenizer(folder: Path) -> dict | None:
    """The folder's tokenizer.json when it is a character tokenizer of models/tiny.py (WordLevel, every
    non-special token one ASCII character), else None."""
    path = folder / "tokenizer.json"
    if not path.is_file():
        return None
    tok = json.loads(path.read_text())
    model = tok.get("model", {})
    specials = {a["content"] for a in tok.get("added_tokens", [])}
    vocab = model.get("vocab", {})
    if model.get("type") != "WordLevel" or not all(len(t) == 1 and ord(t) < 128 for t in vocab if t not in specials):
        return None
    return tok


def stage_for_llama(folder: Path, out: Path, vocab_size: int) -> tuple[Path, str | None]:
    """(folder to convert, pre-tokenizer name to answer or None). A character tokenizer is staged as the
    byte-level BPE tokenizer llama.cpp reads, with the same ids; any other folder is converted as it is."""
    tok = char_tokenizer(folder)
    if tok is None:
        return folder, None
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    for name in os.listdir(folder):
        if name.endswith(".safetensors") or name in ("config.json", "model.safetensors.index.json"):
            (out / name).symlink_to((folder / name).resolve())
    specials = [a["content"] for a in sorted(tok["added_tokens"], key=lambda a: a["id"])]
    table = byte_level_chars()
    vocab = {(t if t in specials else "".join(table[b] for b in t.encode())): i
             for t, i in tok["model"]["vocab"].items()}
    spare = next((i for i in range(vocab_size - 1, -1, -1) if i not in vocab.values()), None)
    if spare is None:
        raise SystemExit(f"{folder}: no unused id below vocab_size {vocab_size} for llama.cpp's required merge")
    # llama.cpp refuses a BPE vocabulary without merges; this one joins two special tokens, which both
    # tokenizers split off before BPE runs, so it never applies.
    a = specials[0]
    vocab[a + a] = spare
    bpe = Tokenizer(models.BPE(vocab=vocab, merges=[(a, a)]))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.add_special_tokens(specials)
    bpe.save(str(out / "tokenizer.json"))
    config = json.loads((folder / "tokenizer_config.json").read_text())
    keep = {k: config[k] for k in ("bos_token", "eos_token", "pad_token", "unk_token", "mask_token") if k in config}
    (out / "tokenizer_config.json").write_text(json.dumps({**keep, "tokenizer_class": "PreTrainedTokenizerFast"}))
    (out / "chat_template.jinja").write_text(PASS_THROUGH_TEMPLATE)
    return out, "default"


# Runs under --convert-python: llama.cpp's converter, with the pre-tokenizer answer for a staged folder.
CONVERT_DRIVER = """
import sys
root, pre, args = sys.argv[1], sys.argv[2], sys.argv[3:]
sys.path.insert(0, root)
import convert_hf_to_gguf
if pre != "-":
    from conversion.base import ModelBase
    from conversion.llada import LLaDAModel

    @ModelBase.register("LLaDAModelLM")
    class StagedLLaDA(LLaDAModel):
        model_arch = LLaDAModel.model_arch

        def get_vocab_base_pre(self, tokenizer):
            return pre
sys.argv = [str(root) + "/convert_hf_to_gguf.py", *args]
convert_hf_to_gguf.main()
"""


def run(cmd: list, *, what: str, stdin: str | None = None, timeout: float = 3600) -> str:
    """stdout + stderr of a command; SystemExit naming the command and its last lines when it fails."""
    res = subprocess.run([str(c) for c in cmd], input=stdin, capture_output=True, text=True, timeout=timeout)
    out = res.stdout + res.stderr
    if res.returncode:
        tail = "\n".join(out.strip().splitlines()[-8:])
        raise SystemExit(f"perf.peers: {what} failed (exit {res.returncode}): {' '.join(map(str, cmd))[:300]}\n{tail}")
    return res.stdout + "\n" + res.stderr


def convert(llama: LlamaCpp, python: str, folder: Path, work: Path, name: str, types: list[str]) -> dict[str, Path]:
    """{type: GGUF path} for the folder: f32 and bf16 by the converter, quantized types from f32 by
    llama-quantize. Files already there are reused (delete --work to convert again)."""
    from dllm.models.config import load_config
    cfg = load_config(folder)
    out: dict[str, Path] = {}
    staged, pre = None, None
    for t in ["f32"] + [t for t in types if t != "f32"]:
        path = work / f"{name}-{t}.gguf"
        out[t] = path
        if path.is_file():
            continue
        if t in ("f32", "bf16"):
            if staged is None:
                staged, pre = stage_for_llama(folder, work / f"{name}-staged", cfg.vocab_size)
            run([python, "-c", CONVERT_DRIVER, llama.root, pre or "-", staged, "--outtype", t, "--outfile", path],
                what=f"converting {name} to {t.upper()}")
        else:
            run([llama.tool("llama-quantize"), out["f32"], path, t.upper()], what=f"quantizing {name} to {t.upper()}")
        print(f"  {path.name}: {path.stat().st_size / 1e6:.1f} MB", flush=True)
    return {t: out[t] for t in types}


# ---------------------------------------------------------------- running llama.cpp

def llama_tokenize(llama: LlamaCpp, gguf: Path, text: str) -> list[int]:
    """llama-tokenize's ids for the text, as llama-diffusion-cli tokenizes its prompt (BOS added, special
    tokens parsed; the text goes through stdin, no escape processing)."""
    out = run([llama.tool("llama-tokenize"), "-m", gguf, "--stdin", "--ids", "--no-escape", "--log-disable"],
              what="llama-tokenize", stdin=text)
    found = re.search(r"^\[([0-9, ]*)\]$", out, re.M)
    if not found:
        raise SystemExit(f"perf.peers: llama-tokenize printed no id list: {out[-300:]!r}")
    return [int(t) for t in found.group(1).split(",") if t.strip()]


@dataclass
class LlamaRun:
    text: str
    seconds: float            # llama.cpp's own "total time" of the generation (loading excluded)
    forwards: int             # progress lines printed: one per forward
    lost: int = 0             # earlier runs whose output lost its last lines (repeated)


TOTAL = re.compile(r"total time: ([0-9.]+)ms, time per step: [0-9.]+ms, sampling time per step: [0-9.]+ms\n")


def parse_llama_output(out: str) -> LlamaRun:
    """LlamaRun from llama-diffusion-cli's output: the forwards counted from its per-step progress lines,
    the total time line, and the generated text that follows it ("\\n" TEXT "\\n")."""
    found = TOTAL.search(out)
    if not found:
        raise ValueError(f"no 'total time' line in llama-diffusion-cli's output: {out[-300:]!r}")
    rest = out[found.end():]
    text = rest[1:] if rest.startswith("\n") else rest
    text = text[:text.index("\n")] if "\n" in text else text
    return LlamaRun(text=text, seconds=float(found.group(1)) / 1e3,
                    forwards=len(re.findall(r"diffusion step: \d+/\d+", out)))


def llama_generate(llama: LlamaCpp, gguf: Path, text: str, n_input: int, gen_length: int, threads: int, *,
                   block_length: int | None = None, steps: int = 1, tries: int = 6,
                   quiet_exit: bool = False) -> LlamaRun:
    """One llama-diffusion-cli generation, greedy (--top-k 1). block_length: its block schedule with
    `steps`; None: one step of the timestep schedule, which commits every position from one forward
    (the argmax of one forward). Its log is written by a thread that the process does not wait for at
    exit (llama.cpp issue 22142), so on a busy machine the last lines (the total time, the text) are
    sometimes lost: such a run is repeated, up to `tries` runs; LlamaRun.lost counts them. quiet_exit (for
    runs that are not timed): OpenMP threads that sleep instead of spinning, so the log thread gets a core."""
    canvas = n_input + gen_length
    schedule = (["--diffusion-block-length", block_length] if block_length else ["--diffusion-eps", "0.001"])
    cmd = [llama.tool("llama-diffusion-cli"), "-m", gguf, "-p", text, "--no-escape", "-ub", canvas, "-b", canvas,
           "-c", canvas, "-t", threads, "-tb", threads, "--diffusion-steps", steps, *schedule, "--top-k", 1,
           "--temp", 0, "--seed", 0, "--no-log-prefix", "--no-log-timestamps", "--log-colors", "off"]
    for lost in range(tries):
        env = {**os.environ, "OMP_WAIT_POLICY": "passive"} if quiet_exit else None
        res = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=3600, env=env)
        out = res.stdout + "\n" + res.stderr
        if res.returncode:              # the prompt text is in the command line: keep it out of the message
            tail = "\n".join(out.strip().splitlines()[-8:])
            raise SystemExit(f"perf.peers: llama-diffusion-cli failed (exit {res.returncode}) on {gguf.name}:\n{tail}")
        if TOTAL.search(out):
            run = parse_llama_output(out)
            run.lost = lost
            return run
    raise SystemExit(f"perf.peers: llama-diffusion-cli's output lost its last lines {tries} times in a row on "
                     f"{gguf.name} (its log thread is not waited for at exit); run again on a quieter machine")


# ---------------------------------------------------------------- the table

@dataclass
class Row:
    label: str
    forwards: int
    full: bool                          # every forward is over the whole canvas (per-forward ratios apply)
    seconds: list = field(default_factory=list)

    @property
    def total(self) -> float:
        return statistics.median(self.seconds)

    @property
    def per_forward(self) -> float:
        return self.total / self.forwards


def ratio(base: Row, row: Row, per_forward: bool) -> float | None:
    """How many times faster row is than base (base time / row time); per forward only when both rows
    are full forwards (a cached policy's steps are not forwards of the same work)."""
    if per_forward:
        return base.per_forward / row.per_forward if base.full and row.full else None
    return base.total / row.total


def table(rows: list[Row], baseline: str) -> str:
    base = next(r for r in rows if r.label == baseline)
    x = lambda v: "–" if v is None else f"{v:.2f}×"  # noqa: E731
    lines = [f"| | forwards | per forward / step ms | end to end s | vs {baseline}: per forward | end to end |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r.label} | {r.forwards} | {r.per_forward * 1e3:.1f} | {r.total:.2f} | "
                     f"{x(ratio(base, r, True))} | {x(ratio(base, r, False))} |")
    return "\n".join(lines)


# ---------------------------------------------------------------- ours

@dataclass(frozen=True)
class Ours:
    spec: str            # POLICY[:key=value,...] as perf's other commands take it
    dtype: str
    quantize: str | None

    @staticmethod
    def parse(text: str) -> "Ours":
        """'SPEC@DTYPE[+QUANT]', e.g. none@float32, dual-cache@bfloat16, none@bfloat16+int8."""
        spec, at, rest = text.rpartition("@")
        dtype, _, quant = rest.partition("+")
        if not at or not spec or dtype not in ("float32", "bfloat16"):
            raise argparse.ArgumentTypeError(f"{text!r}: want SPEC@DTYPE[+QUANT], DTYPE float32 or bfloat16, "
                                             f"e.g. none@float32 or dual-cache@bfloat16")
        if quant and quant not in QUANTIZE:
            raise argparse.ArgumentTypeError(f"{text!r}: the quantization is one of {', '.join(QUANTIZE)}")
        return Ours(spec, dtype, quant or None)

    @property
    def label(self) -> str:
        names = {"none": "NoCache", "dllm-cache": "dLLM-Cache", "dual-cache": "dual cache", "d2cache": "d²Cache"}
        name, _, opts = self.spec.partition(":")
        quant = f" {self.quantize}" if self.quantize else ""
        return f"ours {names.get(name, name)}{' ' + opts if opts else ''} {self.dtype}{quant}"


def quantize_supported() -> bool:
    """Whether the engine takes `quantize` (being added beside this command; int8/int4 rows need it)."""
    from dllm.runtime import Engine
    return any("quantize" in inspect.signature(f).parameters for f in (Engine.__init__, Engine.from_pretrained))


def usable(ours: list[Ours], quantize_ok: bool) -> tuple[list[Ours], str | None]:
    """(rows to run, note about the skipped ones): int8/int4 rows need an engine that takes `quantize`."""
    kept = [o for o in ours if quantize_ok or not o.quantize]
    if len(kept) == len(ours):
        return kept, None
    return kept, ("note: Engine.from_pretrained takes no `quantize` here, so the rows "
                  f"{', '.join(o.label for o in ours if o.quantize)} are skipped")


def engine_for(folder: Path, dtype: str, quantize: str | None, cache: dict):
    import torch

    from dllm.runtime import Engine
    key = (dtype, quantize)
    if key not in cache:
        extra = {"quantize": quantize} if quantize else {}
        cache[key] = Engine.from_pretrained(folder, dtype=getattr(torch, dtype), **extra)
    return cache[key]


# ---------------------------------------------------------------- main

def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m dllm.perf.peers", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--llama-cpp", help="a llama.cpp checkout with llama-diffusion-cli, llama-quantize and "
                                        "llama-tokenize built in build/bin (without it: how to build them)")
    ap.add_argument("--convert-python", default=sys.executable,
                    help="the Python that runs llama.cpp's converter (numpy, torch, transformers; default: this one)")
    ap.add_argument("--model", help="a LLaDA-format folder to time (default: the small preset, written into --work)")
    ap.add_argument("--preset", choices=PRESET_NAMES, default="small",
                    help="models/tiny.py preset when --model is not given (default small)")
    ap.add_argument("--trained", help="the trained model for argmax agreement (default models/trained/arith-llada)")
    ap.add_argument("--agree-prompts", type=int, default=36, help="held-out prompts for argmax agreement (0: skip)")
    ap.add_argument("--work", default="build/peers", help="folder for the models and GGUF files, reused between "
                                                          "runs (default build/peers)")
    ap.add_argument("--gguf", nargs="+", choices=GGUF_TYPES, default=["f32", "bf16", "q8_0"],
                    help="llama.cpp types to time (default f32 bf16 q8_0; q4_0 beside our int4)")
    ap.add_argument("--baseline", default="bf16", choices=GGUF_TYPES, help="the llama.cpp row ratios are against")
    ap.add_argument("--ours", nargs="+", type=Ours.parse, default=[Ours.parse(s) for s in DEFAULT_OURS],
                    help="our rows, SPEC@DTYPE[+int8|+int4] (default: " + " ".join(DEFAULT_OURS) + ")")
    ap.add_argument("--prompt-len", type=int, default=512, help="P, prompt tokens with BOS (default 512)")
    ap.add_argument("--gen-length", type=int, default=128, help="G (default 128; one token per step)")
    ap.add_argument("--block-length", type=int, default=32, help="block length, both sides (default 32)")
    ap.add_argument("--threads", type=int, default=2, help="threads, both sides (default 2)")
    ap.add_argument("--rounds", type=int, default=3, help="timed rounds over every row; medians (0: checks only)")
    a = ap.parse_args(argv)
    P, G, B = a.prompt_len, a.gen_length, a.block_length
    if P < 2 or G < 1 or B < 1 or G % B or (P + G) % B:
        ap.error(f"want P >= 2, G % block == 0 (ours) and (P + G) % block == 0 (llama.cpp's block schedule); "
                 f"got P {P}, G {G}, block {B}")
    if a.baseline not in a.gguf:
        ap.error(f"--baseline {a.baseline} is not among --gguf {' '.join(a.gguf)}")
    if a.threads < 1 or a.rounds < 0 or a.agree_prompts < 0:
        ap.error("--threads must be >= 1, --rounds and --agree-prompts >= 0")
    return a


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def random_text(n: int, seed: int = 0) -> str:
    """n characters of the tiny tokenizer's alphabet (one token each), no special token."""
    from dllm.models.tiny import CHARS
    rng = random.Random(seed)
    return "".join(rng.choice(CHARS) for _ in range(n))


def visible(eng, ids: list[int]) -> str:
    """Response ids as llama-diffusion-cli prints them: special tokens dropped."""
    return eng.tokenizer.decode(ids, skip_special_tokens=True)


def main(argv=None) -> None:
    a = parse_args(argv)
    llama = LlamaCpp(Path(a.llama_cpp).resolve()) if a.llama_cpp else None
    missing = llama.missing() if llama else []
    if llama is None or missing:
        print(build_help(a.llama_cpp, missing), file=sys.stderr)
        sys.exit(2)
    import torch

    import dllm.models
    from dllm.models.tiny import write_tiny
    from dllm.models.train_tiny import GEN, held_out
    from dllm.runtime.options import parse_spec

    torch.set_num_threads(a.threads)
    t_start = time.perf_counter()
    P, G, B, T = a.prompt_len, a.gen_length, a.block_length, a.threads
    work = Path(a.work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    model = Path(a.model).resolve() if a.model else work / f"{a.preset}-llada"
    if not a.model and not (model / "config.json").is_file():
        write_tiny(model, "llada", a.preset)
    trained = Path(a.trained) if a.trained else Path(dllm.models.__file__).parent / "trained" / "arith-llada"
    ours, note = usable(a.ours, quantize_supported())
    version = run([llama.tool("llama-diffusion-cli"), "--version"], what="llama-diffusion-cli --version").split()
    print(f"# perf.peers on {cpu_name()}, {T} threads; torch {torch.__version__}; llama.cpp at {llama.root} "
          f"({' '.join(version[:6])})")
    print(f"# P={P} (BOS + {P - 1} characters) G={G} block {B}, greedy, one token per step; {a.rounds} "
          f"round{'' if a.rounds == 1 else 's'}, medians; model {model}")
    if note:
        print(f"# {note}")
    load = os.getloadavg()[0]
    if load > 0.5:
        print(f"# warning: the load average is {load:.1f} before this starts: on a busy machine llama.cpp's OpenMP "
              f"threads wait for each other at every barrier (its forwards ran 10x slower on 2 threads than on 1 "
              f"at a load of 10) and ours slow down too: the ratios mean little; time it on a quiet machine")

    print("converting with llama.cpp's convert_hf_to_gguf.py (and llama-quantize):", flush=True)
    ggufs = convert(llama, a.convert_python, model, work, model.name, list(a.gguf))
    trained_ggufs = convert(llama, a.convert_python, trained, work, "trained", list(a.gguf)) \
        if a.agree_prompts else {}

    # tokenization: llama-tokenize on the GGUF == BOS + our ids, for every prompt used below
    engines: dict = {}
    eng32 = engine_for(model, "float32", None, engines)
    text = random_text(P - 1)
    ids = [eng32.cfg.bos_id] + eng32.encode(text)
    checks = [(ggufs[a.baseline], text, ids)]
    examples = held_out(a.agree_prompts) if a.agree_prompts else []
    if examples:
        tr_engines: dict = {}
        t32 = engine_for(trained, "float32", None, tr_engines)
        t16 = engine_for(trained, "bfloat16", None, tr_engines)
        for p, _ in examples:
            checks.append((trained_ggufs[a.baseline], p + "\n", [t32.cfg.bos_id] + t32.encode(p + "\n")))
    bad = [(g.name, t[:40]) for g, t, want in checks if llama_tokenize(llama, g, t) != want]
    if len(ids) != P or bad:
        raise SystemExit(f"perf.peers: tokenization differs from llama-tokenize on {len(bad)} of {len(checks)} "
                         f"prompts (first: {bad[:1]}); the timings would not compare the same input")
    print(f"tokenization: llama-tokenize gives our ids (BOS + text) on all {len(checks)} prompts "
          f"({P} tokens for the timed one, {len(examples)} held-out prompts of the trained model)")

    # argmax agreement: one forward each side, every position committed from it
    if examples:
        prompts = [[t32.cfg.bos_id] + t32.encode(p + "\n") for p, _ in examples]
        one = dict(gen_length=GEN, steps=1, block_length=GEN)
        mine = {name: [visible(e, e.generate(ids_, **one).tokens[0]) for ids_ in prompts]
                for name, e in (("fp32", t32), ("bf16", t16))}
        print(f"argmax agreement on {trained.name} (one forward, G={GEN}, {len(examples)} held-out prompts "
              f"as BOS + text; prompts whose {GEN} argmax tokens are identical; llama.cpp on 1 thread):")
        same16 = sum(x == y for x, y in zip(mine["fp32"], mine["bf16"]))
        right = sum(x == answer for x, (_, answer) in zip(mine["fp32"], examples))
        print(f"  ours bf16 vs ours fp32: {same16}/{len(examples)} (ours fp32 gives the right answer on {right} of "
              f"them from this one forward)")
        for t, g in trained_ggufs.items():
            theirs = [llama_generate(llama, g, p + "\n", len(ids_), GEN, 1, quiet_exit=True).text
                      for (p, _), ids_ in zip(examples, prompts)]
            agree = {k: sum(x == y for x, y in zip(theirs, v)) for k, v in mine.items()}
            print(f"  llama.cpp {t.upper()}: vs ours fp32 {agree['fp32']}/{len(examples)}, "
                  f"vs ours bf16 {agree['bf16']}/{len(examples)}", flush=True)

    # forwards, both sides: the model of llama.cpp's schedule, checked against its progress lines below
    steps_l = llama_steps(P, G, B)
    fwd_l = llama_forwards(P, G, B, steps_l)
    print(f"llama.cpp's schedule: --diffusion-steps {steps_l} over {(P + G) // B} blocks of {B} -> {fwd_l} forwards "
          f"for {G} tokens; ours: {G} steps")
    rows = [Row(f"llama.cpp {t.upper()}", fwd_l, True) for t in a.gguf]
    runs = [(o, parse_spec(o.spec)) for o in ours]
    shape = dict(gen_length=G, steps=G, block_length=B)
    for o, opts in (runs if a.rounds else []):            # load and warm up (allocation, first touch)
        out = engine_for(model, o.dtype, o.quantize, engines).generate(ids, **{**shape, **opts})
        rows.append(Row(o.label, out.steps, set(out.step_kinds) == {"full"}))
    lost = 0
    for r in range(a.rounds):
        for t, row in zip(a.gguf, rows):
            res = llama_generate(llama, ggufs[t], text, P, G, T, block_length=B, steps=steps_l)
            if res.forwards != fwd_l:
                raise SystemExit(f"perf.peers: llama.cpp ran {res.forwards} forwards, its schedule's model says "
                                 f"{fwd_l}: the model (llama_forwards) no longer matches this llama.cpp")
            row.seconds.append(res.seconds)
            lost += res.lost
            print(f"  round {r + 1}: {row.label} {res.seconds:.2f} s", flush=True)
        for (o, opts), row in zip(runs, rows[len(a.gguf):]):
            out = engine_for(model, o.dtype, o.quantize, engines).generate(ids, **{**shape, **opts})
            row.seconds.append(out.seconds)
            print(f"  round {r + 1}: {row.label} {out.seconds:.2f} s", flush=True)
    if a.rounds:
        if lost:
            print(f"\n{lost} llama.cpp runs lost their last output lines and were repeated (llama.cpp issue 22142)")
        print(f"\n{model.name} (P={P}, G={G}, block {B}, {T} threads), medians of {a.rounds} interleaved rounds; "
              f"ratios = llama.cpp {a.baseline.upper()}'s time / the row's:\n")
        print(table(rows, f"llama.cpp {a.baseline.upper()}"))
        print("\nper forward / step: end to end / forwards (llama.cpp: its forwards; ours: our steps, a mean over "
              "the step kinds for the caches, so no per-forward ratio). llama.cpp's end to end includes its "
              f"{fwd_l - G} forwards on blocks past the canvas's end.")
    print(f"# {time.perf_counter() - t_start:.0f} s in all; load average {os.getloadavg()[0]:.1f} at the end")


if __name__ == "__main__":
    main()
