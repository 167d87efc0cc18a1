"""Accuracy under every cache policy and backend, on the trained model, beside each one's speedup.

    python -m dllm.perf.quality [--model models/trained/arith-llada] [--n 240] [--backends eager compile]

Generates the answers of --n held-out prompts (never seen in training: models.train_tiny.split) as one
padded batch per configuration, scores exact match (the response up to the first end-of-text), and
times each configuration against NoCache in the same run.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

from dllm.models.train_tiny import GEN, held_out
from dllm.runtime import D2Cache, DllmCache, DualCache, Engine, NoCache

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_MODEL = ROOT / "models" / "trained" / "arith-llada"
CONFIGS = [  # (label, policy, generate options)
    ("none", NoCache(), {}),
    ("none, threshold 0.9", NoCache(), {"threshold": 0.9}),
    ("dllm-cache kp 4 kr 2 rho 0.25", DllmCache(kp=4, kr=2, rho=0.25), {}),
    ("dllm-cache kp 8 kr 4 rho 0.25", DllmCache(kp=8, kr=4, rho=0.25), {}),
    ("dllm-cache kp 8 kr 4 rho 0.5", DllmCache(kp=8, kr=4, rho=0.5), {}),
    ("dllm-cache kp 8 kr 8 rho 0", DllmCache(kp=8, kr=8, rho=0.0), {}),
    ("d2cache k 4 attn 4", D2Cache(k=4, attn_budget=4), {}),
    ("d2cache k 4 attn 4, quasi-l2r", D2Cache(k=4, attn_budget=4, quasi_l2r=True), {}),
    ("dual-cache, block 4", DualCache(), {"block_length": 4}),
    ("dual-cache, block 4, threshold 0.9", DualCache(), {"block_length": 4, "threshold": 0.9}),
]


def answer(eng: Engine, ids: list[int]) -> str:
    cut = ids.index(eng.cfg.eos_id) if eng.cfg.eos_id in ids else len(ids)
    return eng.tokenizer.decode(ids[:cut], skip_special_tokens=True)


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
    correct = sum(answer(eng, ids) == a for ids, (_, a) in zip(out.tokens, examples))
    return correct / len(examples), sorted(times)[len(times) // 2], out.steps


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=str(DEFAULT_MODEL))
    ap.add_argument("--n", type=int, default=240)
    ap.add_argument("--backends", nargs="+", default=["eager", "compile"])
    ap.add_argument("--repeats", type=int, default=3)
    a = ap.parse_args(argv)
    examples = held_out(a.n)
    print(f"# {a.model}: {a.n} held-out prompts (never trained on), exact match, batch of {a.n}, "
          f"G={GEN}, {GEN} steps, greedy; seconds = median of {a.repeats} batch generations")
    print(f"{'configuration':<38} {'backend':<8} {'accuracy':>9} {'seconds':>8} {'speedup':>8} {'steps':>6}")
    for backend in a.backends:
        eng = Engine.from_pretrained(a.model, backend=backend)
        base = None
        for label, policy, opts in CONFIGS:
            acc, sec, steps = evaluate(eng, examples, policy, a.repeats, **opts)
            base = base or sec
            print(f"{label:<38} {backend:<8} {acc:>9.1%} {sec:>8.3f} {base / sec:>7.2f}x {steps:>6}", flush=True)


if __name__ == "__main__":
    main()
