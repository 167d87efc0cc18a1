"""Accuracy under every cache policy and backend, on the trained model, beside each one's speedup.

    python -m dllm.perf.quality [--model models/trained/arith-llada] [--n 240] [--backends eager compile]
                                [--dtypes float32 bfloat16] [--quantize none int8 int4] [--repeats 3]
                                [--pads 0 1 2 3] [--markdown]

Generates the answers of --n held-out prompts (never seen in training: models.train_tiny.split) as one
padded batch per configuration, scores exact match (the response up to the first end-of-text), and
times each configuration against NoCache timed right after it (same batch, backend and machine load).

Accuracy is exact and repeatable on one machine; it is the one batch left-padded to its longest prompt.
The same batch padded a few columns wider (--pads: extra left padding, a no-op in exact arithmetic)
changes the float summation order only, the way Inductor or a different CPU kernel does; a prompt whose
answer flips under that sits on a near-tie. The range column is the accuracy over those paddings and
`flips` counts such prompts, so a cell that differs between backends or machines by one prompt shows up
as a range, not as a contradiction. --dtypes runs every configuration in each dtype (bfloat16: the
command line's default on CPUs with native bf16); --quantize runs them with each weight-only
quantization (docs/quantization.md). --markdown prints the README table (one column group
per backend and dtype).
"""
from __future__ import annotations

import argparse
import itertools
import time
from dataclasses import dataclass
from pathlib import Path

from dllm.models.train_tiny import GEN, held_out
from dllm.runtime import Engine, NoCache
from dllm.runtime.options import request_options

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_MODEL = ROOT / "models" / "trained" / "arith-llada"
CONFIGS = [  # (label, options as `dllm generate` / `dllm eval` model arguments, dashes as underscores)
    ("none", {}),
    ("none, threshold 0.9", {"threshold": 0.9}),
    ("dllm-cache kp 4 kr 2 rho 0.25", {"policy": "dllm-cache", "kp": 4, "kr": 2, "rho": 0.25}),
    ("dllm-cache kp 8 kr 4 rho 0.25", {"policy": "dllm-cache", "kp": 8, "kr": 4, "rho": 0.25}),
    ("dllm-cache kp 8 kr 4 rho 0.5", {"policy": "dllm-cache", "kp": 8, "kr": 4, "rho": 0.5}),
    ("dllm-cache kp 8 kr 8 rho 0", {"policy": "dllm-cache", "kp": 8, "kr": 8, "rho": 0.0}),
    ("d2cache k 4 attn 4", {"policy": "d2cache", "k": 4, "attn_budget": 4}),
    ("d2cache k 4 attn 4, quasi-l2r", {"policy": "d2cache", "k": 4, "attn_budget": 4, "quasi_l2r": True}),
    ("d2cache k 4 attn 4, block 4", {"policy": "d2cache", "k": 4, "attn_budget": 4, "block_length": 4}),
    ("dual-cache, block 4", {"policy": "dual-cache", "block_length": 4}),
    ("dual-cache, block 4, threshold 0.9", {"policy": "dual-cache", "block_length": 4, "threshold": 0.9}),
]


def configuration(options: dict):
    """(policy, generate options) of one CONFIGS entry (through the one option parser)."""
    opts = request_options(options)
    return opts.pop("policy", NoCache()), opts


def answer(eng: Engine, ids: list[int]) -> str:
    cut = ids.index(eng.cfg.eos_id) if eng.cfg.eos_id in ids else len(ids)
    return eng.tokenizer.decode(ids[:cut], skip_special_tokens=True)


def correct(eng: Engine, examples, policy, **opts) -> list[bool]:
    """Per example, whether one batch generation of all prompts answers it exactly."""
    prompts = [eng.encode(p + "\n") for p, _ in examples]
    kw = dict(gen_length=GEN, steps=GEN, block_length=GEN, policy=policy)
    kw.update(opts)
    out = eng.generate(prompts, **kw)
    return [answer(eng, ids) == a for ids, (_, a) in zip(out.tokens, examples)]


def evaluate(eng: Engine, examples, policy, repeats: int = 1, **opts) -> tuple[float, float, int]:
    """(exact-match accuracy, median seconds for the batch, steps) of one configuration."""
    prompts = [eng.encode(p + "\n") for p, _ in examples]
    kw = dict(gen_length=GEN, steps=GEN, block_length=GEN, policy=policy)
    kw.update(opts)
    eng.generate(prompts, **kw)                                   # prepare / compile, untimed
    times, out = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = eng.generate(prompts, **kw)
        times.append(time.perf_counter() - t0)
    right = sum(answer(eng, ids) == a for ids, (_, a) in zip(out.tokens, examples))
    return right / len(examples), sorted(times)[len(times) // 2], out.steps


@dataclass
class Cell:
    accuracy: float        # the batch padded to its longest prompt
    low: float             # lowest / highest accuracy over the extra paddings
    high: float
    flips: int             # prompts whose correctness depends on the padding
    seconds: float
    speedup: float
    steps: int

    def accuracy_text(self) -> str:
        if self.low == self.high:
            return f"{self.accuracy:.1%}".replace("%", " %")
        return f"{self.accuracy:.1%} ({self.low:.1%}–{self.high:.1%})".replace("%", " %")


def measure(eng: Engine, examples, options: dict, repeats: int, pads, timed: bool = True) -> Cell:
    """One configuration; its speedup is against NoCache timed right after it (same batch, same load).
    timed=False: one untimed generation per padding (accuracy only; seconds and speedup are nan)."""
    policy, opts = configuration(options)
    if not timed:
        longest = max(len(eng.encode(p + "\n")) for p, _ in examples)
        runs = [correct(eng, examples, policy, prompt_bucket=longest + pad, **opts) for pad in pads]
        accs = [sum(r) / len(r) for r in runs]
        return Cell(accs[0], min(accs), max(accs), sum(len(set(col)) > 1 for col in zip(*runs)),
                    float("nan"), float("nan"), 0)
    acc, sec, steps = evaluate(eng, examples, policy, repeats, **opts)
    base = evaluate(eng, examples, configuration({})[0], repeats)[1] if options else sec
    longest = max(len(eng.encode(p + "\n")) for p, _ in examples)
    runs = [correct(eng, examples, policy, **opts)] + [
        correct(eng, examples, policy, prompt_bucket=longest + pad, **opts) for pad in pads if pad]
    accs = [sum(r) / len(r) for r in runs]
    flips = sum(len(set(col)) > 1 for col in zip(*runs))
    return Cell(acc, min(accs), max(accs), flips, sec, base / sec, steps)


def markdown(cells: dict, backends, n: int, repeats: int, pads, dtypes=("float32",), quantize=("none",)) -> str:
    """backends: the column groups (a backend, then the dtype and the quantization where several are run)."""
    dt = f" --dtypes {' '.join(dtypes)}" if list(dtypes) != ["float32"] else ""
    dt += f" --quantize {' '.join(quantize)}" if list(quantize) != ["none"] else ""
    head = (f"`python -m dllm.perf.quality --backends {' '.join(dict.fromkeys(b.split()[0] for b in backends))}{dt} "
            f"--repeats {repeats} --pads "
            f"{' '.join(map(str, pads))} --markdown`: {n} held-out prompts never seen in training, exact match, one "
            f"batch of {n}, G={GEN}, {GEN} steps, greedy; seconds = median of {repeats}; each speedup against "
            f"NoCache on the same backend, timed right after the configuration. Accuracy: the batch padded to "
            f"its longest prompt; in "
            f"parentheses the range when padded {', '.join(map(str, [p for p in pads if p]))} columns wider "
            f"(a no-op in exact arithmetic, a different float summation order); flips = prompts whose answer "
            f"changes with the padding.")
    cols = "".join(f" {b}: accuracy | flips | seconds | speedup |" for b in backends)
    lines = [head, "", f"| configuration |{cols} steps |", "|---|" + "---|" * (4 * len(backends) + 1)]
    for label, _ in CONFIGS:
        row = "".join(f" {cells[b, label].accuracy_text()} | {cells[b, label].flips} | {cells[b, label].seconds:.3f} | "
                      f"{cells[b, label].speedup:.2f}× |" for b in backends)
        lines.append(f"| {label.replace('rho', 'ρ')} |{row} {cells[backends[0], label].steps} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=str(DEFAULT_MODEL))
    ap.add_argument("--n", type=int, default=240)
    ap.add_argument("--backends", nargs="+", default=["eager", "compile"])
    ap.add_argument("--dtypes", nargs="+", choices=["float32", "bfloat16", "float16"], default=["float32"])
    ap.add_argument("--quantize", nargs="+", choices=["none", "int8", "int4", "int8+head", "int4+head"],
                    default=["none"], help="weight-only quantization modes to run each configuration in (+head: "
                    "the LM head quantized too)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--pads", type=int, nargs="+", default=[0, 1, 2, 3],
                    help="extra left padding (columns) to measure accuracy at; 0 is the canonical run")
    ap.add_argument("--markdown", action="store_true", help="print the README table when done")
    ap.add_argument("--accuracy-only", action="store_true",
                    help="one untimed generation per configuration and padding (seconds, speedup, steps: nan / 0)")
    a = ap.parse_args(argv)
    examples = held_out(a.n)
    print(f"# {a.model}: {a.n} held-out prompts (never trained on), exact match, batch of {a.n}, "
          f"G={GEN}, {GEN} steps, greedy; seconds = median of {a.repeats} batch generations; range = accuracy "
          f"over extra paddings {a.pads}, flips = prompts that change with the padding")
    print(f"{'configuration':<38} {'backend':<8} {'accuracy':>9} {'range':>15} {'flips':>5} {'seconds':>8} "
          f"{'speedup':>8} {'steps':>6}")
    cells, columns = {}, []
    for backend, dtype, quant in itertools.product(a.backends, a.dtypes, a.quantize):
        col = " ".join([backend] + ([dtype] if a.dtypes != ["float32"] else [])
                       + ([quant] if a.quantize != ["none"] else []))
        columns.append(col)
        eng = Engine.from_pretrained(a.model, backend=backend, dtype=dtype, quantize=quant.split("+")[0],
                                     quantize_head=quant.endswith("+head"))
        for label, options in CONFIGS:
            c = cells[col, label] = measure(eng, examples, options, a.repeats, a.pads, not a.accuracy_only)
            print(f"{label:<38} {col:<8} {c.accuracy:>9.1%} {f'{c.low:.1%}–{c.high:.1%}':>15} {c.flips:>5} "
                  f"{c.seconds:>8.3f} {c.speedup:>7.2f}x {c.steps:>6}", flush=True)
    if a.markdown:
        print()
        print(markdown(cells, columns, a.n, a.repeats, a.pads, a.dtypes, a.quantize))


if __name__ == "__main__":
    main()
