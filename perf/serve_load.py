"""Serving throughput: `dllm serve` with --max-batch 1 against --max-batch 8, under 1, 8 and 32 concurrent
clients, in one run, interleaved (round by round, each configuration in turn).

    python -m dllm.perf.serve_load [--model models/trained/arith-llada] [--clients 1 8 32] [--batches 1 8]
                                   [--requests 64] [--rounds 3]

Each server runs the shipped trained model on the eager backend with one bucket (32:8:8); each client
sends held-out prompts one after the other (greedy, or sampled with its own seed for odd requests), so
`clients` requests are in flight at once. Every answer is checked against the same request run alone on
a local engine (the caller's own answer, not another's). Reports requests/s and p50 / p99 latency per
configuration (medians over the rounds), and what the cost model says the same batching buys on a GPU,
where a batch-1 step streams every weight and B rows cost about one row until the step turns
compute-bound.
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_MODEL = ROOT / "models" / "trained" / "arith-llada"
# the prediction uses perf.roofline's nominal datasheet peaks; measured ones are what perf.roofline prints
# on a machine that has the device


def start(model: Path, max_batch: int, threads: int | None) -> tuple[subprocess.Popen, str]:
    cmd = [sys.executable, "-m", "dllm.apps.main", "serve", "--model", str(model), "--port", "0", "--backend",
           "eager", "--bucket", "32:8:8", "--max-batch", str(max_batch), "--queue", "256", "--no-access-log"]
    if threads:
        cmd += ["--threads", str(threads)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                            env={**os.environ, "NO_PROXY": "127.0.0.1,localhost"})
    ready = proc.stdout.readline()
    if "ready on http://" not in ready:
        proc.kill()
        raise SystemExit(f"perf.serve_load: the server did not start: {ready!r}")
    return proc, ready.split("ready on ")[1].split()[0]


def load(url: str, prompts: list[tuple[str, dict]], clients: int, want: list[str]) -> dict:
    """Send every prompt, `clients` at a time; -> requests/s, p50/p99 seconds, wrong answers."""
    import openai
    client = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=300)

    def one(i):
        prompt, kw = prompts[i]
        t0 = time.perf_counter()
        out = client.completions.create(model=Path(DEFAULT_MODEL).name, prompt=prompt, max_tokens=8, **kw)
        return time.perf_counter() - t0, out.choices[0].text == want[i]

    t0 = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        results = list(pool.map(one, range(len(prompts))))
    wall = time.perf_counter() - t0
    lat = sorted(r[0] for r in results)
    return {"rps": len(prompts) / wall, "p50": lat[len(lat) // 2], "p99": lat[min(len(lat) - 1, int(len(lat) * 0.99))],
            "wrong": sum(not r[1] for r in results)}


def gpu_prediction(batches: list[int]) -> list[str]:
    """The cost model (perf.roofline) for LLaDA-8B's dual-cache block step, P=512 G=256 block 32, bf16."""
    import torch

    from dllm.models.config import parse_config
    from dllm.models.tiny import SHAPE_PRESETS, tiny_config
    from dllm.runtime import DualCache
    from dllm.runtime.state import RequestShape

    from .roofline import NOMINAL, kind_cost
    cfg = parse_config(tiny_config("llada", SHAPE_PRESETS["llada-8b-shape"]))
    lines = []
    for name, (flops, bw, _link) in NOMINAL.items():
        cells = []
        for B in batches:
            shape = RequestShape(B, 512, 256, 32, 256)
            cost = kind_cost(cfg, shape, 8, DualCache(), "block", torch.bfloat16)
            seconds = max(cost.flops / flops, cost.bytes / bw)
            cells.append(f"batch {B}: {seconds * 1e3:.2f} ms/step, {B / seconds:.0f} rows/s")
        lines.append(f"{name} (nominal {flops / 1e12:.0f} TFLOP/s, {bw / 1e12:.2f} TB/s): " + "; ".join(cells))
    return lines


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=str(DEFAULT_MODEL))
    ap.add_argument("--clients", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8], help="--max-batch of each server")
    ap.add_argument("--requests", type=int, default=64, help="requests per configuration and round")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None, help="the servers' torch threads")
    a = ap.parse_args(argv)

    from dllm.models.train_tiny import held_out
    from dllm.runtime import Engine
    examples = held_out(a.requests)
    prompts = [(p + "\n", dict(temperature=0.7, seed=i) if i % 2 else {}) for i, (p, _) in enumerate(examples)]
    solo = Engine.from_pretrained(a.model, dtype="auto")           # the servers' dtype (--dtype auto)
    want = [solo.generate(p, gen_length=8, steps=8, **kw).text[0] for p, kw in prompts]

    servers = {b: start(Path(a.model), b, a.threads) for b in a.batches}
    runs: dict[tuple[int, int], list[dict]] = {}
    try:
        for r in range(a.rounds):
            for clients in a.clients:
                for b in a.batches:
                    res = load(servers[b][1], prompts, clients, want)
                    runs.setdefault((clients, b), []).append(res)
                    print(f"[round {r + 1}] clients {clients} max-batch {b}: {res['rps']:.1f} req/s, p50 "
                          f"{res['p50'] * 1e3:.0f} ms, p99 {res['p99'] * 1e3:.0f} ms, wrong {res['wrong']}",
                          file=sys.stderr, flush=True)
    finally:
        for proc, _ in servers.values():
            proc.send_signal(2)
            proc.wait(60)
    med = lambda xs: statistics.median(xs)  # noqa: E731
    print(f"`python -m dllm.perf.serve_load {' '.join(argv if argv is not None else sys.argv[1:])}`: "
          f"{a.requests} requests per configuration (odd ones sampled), medians of {a.rounds} interleaved rounds; "
          f"every answer equal to the same request run alone: "
          f"{'yes' if all(x['wrong'] == 0 for v in runs.values() for x in v) else 'NO'}")
    print()
    print("| clients | --max-batch | requests/s | p50 latency | p99 latency |")
    print("|---|---|---|---|---|")
    for (clients, b), res in runs.items():
        print(f"| {clients} | {b} | {med([x['rps'] for x in res]):.1f} | {med([x['p50'] for x in res]) * 1e3:.0f} ms | "
              f"{med([x['p99'] for x in res]) * 1e3:.0f} ms |")
    print()
    print("Cost model on a GPU (LLaDA-8B dual-cache block step, P=512, G=256, block 32, bf16; perf.roofline "
          "floors at nominal peaks):")
    for line in gpu_prediction(sorted(set([1, *a.batches]))):
        print("- " + line)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
