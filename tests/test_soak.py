"""Soak (slow; `pytest -m slow tests/test_soak.py -s`): 1,000 generations over 60 distinct request
shapes and sampling settings, on one engine in one process, with memory bounded: the engine keeps at
most MAX_PREPARED prepared requests (least recently used evicted), and the resident set may not grow
by more than RSS_LIMIT_MB between the end of the first pass over every setting and the end."""
import inspect
import itertools
import time
from pathlib import Path

import pytest

from dllm.runtime import D2Cache, DllmCache, DualCache, Engine, NoCache

GENERATIONS = 1000
MAX_PREPARED = 8
RSS_LIMIT_MB = 200


def _rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    pytest.skip("no /proc/self/status on this system: cannot read the resident set size")


def _settings():
    """60 distinct (request shape, decoding, policy) combinations over both families."""
    shapes = [dict(gen_length=g, block_length=b, steps=s, prompt_bucket=p)
              for g, b, s in [(4, 4, 4), (8, 8, 4), (8, 4, 8), (16, 8, 8), (16, 4, 16)]
              for p in (4, 10)]
    policies = [NoCache(), DllmCache(kp=3, kr=2, rho=0.25), D2Cache(k=2, attn_budget=2), DualCache()]
    decoding = [dict(temperature=0.0), dict(temperature=0.8), dict(threshold=0.9)]
    combos = []
    for i, (shape, pol, dec) in enumerate(itertools.product(shapes, policies, decoding)):
        if i % 2 == 0:
            combos.append(("llada" if i % 4 == 0 else "dream", shape, pol, dec, 1 + i % 2))
    return combos


@pytest.mark.slow
def test_soak_thousand_generations_memory_bounded(tiny_dirs):
    options = {"backend": "eager"}
    if "max_prepared" in inspect.signature(Engine.__init__).parameters:
        options["max_prepared"] = MAX_PREPARED
    engines = {f: Engine.from_pretrained(d, **options) for f, d in tiny_dirs.items()}
    combos = _settings()
    distinct = {(f, tuple(s.items()), p, tuple(d.items()), b) for f, s, p, d, b in combos}
    assert len(distinct) >= 50
    t0, rss_start, rss_warm = time.perf_counter(), _rss_mb(), None
    for n in range(GENERATIONS):
        family, shape, policy, dec, batch = combos[n % len(combos)]
        eng = engines[family]
        if family == "dream" and "threshold" not in dec:
            dec = {**dec, "alg": "maskgit_plus"}
        prompts = [[5 + (n + b) % 50, 9, 33][: 1 + (n + b) % 3] for b in range(batch)]
        out = eng.generate(prompts, policy=policy, seed=n, **shape, **dec)
        assert len(out.tokens) == batch and all(eng.cfg.mask_id not in row for row in out.tokens)
        if n == len(combos) - 1:
            rss_warm = _rss_mb()
    seconds, rss_end = time.perf_counter() - t0, _rss_mb()
    kept = {f: len(e._store) for f, e in engines.items()}
    print(f"\nsoak: {GENERATIONS} generations, {len(distinct)} distinct settings, {seconds:.1f} s; RSS start "
          f"{rss_start:.0f} MB, after the first pass {rss_warm:.0f} MB, end {rss_end:.0f} MB; prepared kept "
          f"{kept} (max_prepared {options.get('max_prepared', 'not available')})")
    assert rss_end - rss_warm < RSS_LIMIT_MB
    if "max_prepared" in options:
        assert all(k <= MAX_PREPARED for k in kept.values())
