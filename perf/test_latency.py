"""Latency benchmarks: every step kind x backend x policy, and end-to-end generation, per preset.

Preparation (allocation, compile, CUDA-graph capture) and warm-up happen before timing; on CUDA every
timed call ends with a synchronize, so the numbers are device time plus launch overhead.
"""
import torch

from dllm.runtime.decoding import DecodeConfig

from .conftest import POLICIES


def _sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def test_step(benchmark, models, engines, rounds, step_case):
    preset, policy_name, backend, kind = step_case
    m, eng, policy = models(preset), engines(preset, backend), POLICIES[policy_name]
    dc = DecodeConfig.make(m.cfg.family).structure
    prepared = eng.prepared(m.shape, dc, policy)
    prep = eng.prepare_steps(prepared, policy.kinds)
    runners, st = prepared.steps, prepared.state
    with torch.inference_mode():
        prepared.fill(m.cfg, [m.prompt], seed=0)
        runners["full"]()                        # valid caches for the cached kinds
        _sync()

        def run():
            runners[kind]()
            _sync()
        timed, warmup = rounds(preset)
        benchmark.extra_info.update(preset=preset, policy=policy_name, backend=backend, kind=kind,
                                    prepare_seconds=prep, device=str(eng.device))
        benchmark.pedantic(run, setup=st.rewind, rounds=timed, warmup_rounds=warmup, iterations=1)


def test_e2e(benchmark, models, engines, rounds, e2e_case):
    preset, policy_name, backend = e2e_case
    m, eng, policy = models(preset), engines(preset, backend), POLICIES[policy_name]
    kw = dict(gen_length=m.shape.gen_length, steps=m.shape.steps, block_length=m.shape.block_length,
              prompt_bucket=m.shape.prompt_bucket, policy=policy)
    out = eng.generate(m.prompt, **kw)           # prepares (compile / capture) outside the timing

    def run():
        eng.generate(m.prompt, **kw)
        _sync()
    timed, warmup = rounds(preset)
    benchmark.extra_info.update(preset=preset, policy=policy_name, backend=backend, steps=out.steps,
                                tokens=m.shape.gen_length, step_kinds=out.step_kinds)
    benchmark.pedantic(run, rounds=max(1, timed // 4), warmup_rounds=min(1, warmup), iterations=1)
