"""pytest-benchmark suite options and fixtures (`pytest perf/ --benchmark-json=run.json`).

    --presets tiny,small            model presets (GPU presets: llada-8b-shape, dream-7b-shape; CUDA only)
    --backends eager,compile        default: every backend available on the device
    --policies none,dllm-cache,...  default: all four
    --family llada|dream            default llada
    --rounds N                      timed rounds per step benchmark (default: per preset, ROUNDS); the
                                    suite times with benchmark.pedantic, which ignores --benchmark-min-rounds
"""
from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

from dllm.graphs import available
from dllm.models.tiny import SHAPE_PRESETS
from dllm.runtime import D2Cache, DllmCache, DualCache, Engine, NoCache
from dllm.runtime.state import RequestShape

from .e2e import preset_engine, random_prompt

POLICIES = {"none": NoCache(), "dllm-cache": DllmCache(kp=100, kr=7, rho=0.25),
            "d2cache": D2Cache(k=32, attn_budget=32), "dual-cache": DualCache()}
# request shape per preset: (prompt bucket, response, block); steps = response
SHAPES = {"tiny": (32, 32, 8), "small": (512, 128, 32), "llada-8b-shape": (512, 256, 32),
          "dream-7b-shape": (512, 256, 32)}
ROUNDS = {"tiny": (20, 3), "small": (5, 1), "llada-8b-shape": (20, 3), "dream-7b-shape": (20, 3)}


def pytest_addoption(parser):
    g = parser.getgroup("dllm perf")
    g.addoption("--presets", default="tiny", help="comma-separated: " + ", ".join(SHAPES))
    g.addoption("--backends", default=None, help="comma-separated (default: all available on the device)")
    g.addoption("--policies", default=",".join(POLICIES), help="comma-separated: " + ", ".join(POLICIES))
    g.addoption("--family", default="llada", choices=["llada", "dream"])
    g.addoption("--rounds", type=int, default=None, help="timed rounds per step benchmark (default: per preset); "
                                                          "end-to-end benchmarks run a quarter of them")


def _device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _split(config, name, allowed):
    raw = config.getoption(name)
    items = [x for x in raw.split(",") if x] if raw else list(allowed)
    bad = [x for x in items if x not in allowed]
    if bad:
        raise pytest.UsageError(f"--{name.lstrip('-')}: unknown {bad}; choose from {', '.join(allowed)}")
    return items


def pytest_generate_tests(metafunc):
    cfg = metafunc.config
    presets = _split(cfg, "--presets", SHAPES)
    backends = _split(cfg, "--backends", available(_device()))
    policies = _split(cfg, "--policies", POLICIES)
    if "step_case" in metafunc.fixturenames:
        cases = [(pr, po, b, k) for pr in presets for po in policies for b in backends
                 for k in POLICIES[po].kinds]
        metafunc.parametrize("step_case", cases, ids=["-".join(c) for c in cases])
    if "e2e_case" in metafunc.fixturenames:
        cases = [(pr, po, b) for pr in presets for po in policies for b in backends]
        metafunc.parametrize("e2e_case", cases, ids=["-".join(c) for c in cases])


@dataclass
class Model:
    cfg: object
    weights: object
    prompt: list
    shape: RequestShape


@pytest.fixture(scope="session")
def models(request):
    """Preset -> weights made once per session (GPU presets directly on the device, never on disk)."""
    cache, family, dev = {}, request.config.getoption("--family"), _device()

    def get(preset: str) -> Model:
        if preset not in cache:
            if preset in SHAPE_PRESETS and dev.type != "cuda":
                pytest.skip(f"{preset} has real dimensions: GPU only")
            dtype = torch.bfloat16 if preset in SHAPE_PRESETS else torch.float32
            eng = preset_engine(family, preset, device=dev, dtype=dtype)
            cfg, w = eng.cfg, eng.weights
            P, G, Bl = SHAPES[preset]
            cache[preset] = Model(cfg, w, random_prompt(cfg, P), RequestShape(1, P, G, Bl, G))
        return cache[preset]
    return get


@pytest.fixture(scope="session")
def engines(models):
    """(preset, backend) -> Engine sharing the preset's weights; steps prepared lazily, kept all session."""
    cache = {}

    def get(preset: str, backend: str) -> Engine:
        if (preset, backend) not in cache:
            m = models(preset)
            dtype = torch.bfloat16 if preset in SHAPE_PRESETS else torch.float32
            cache[(preset, backend)] = Engine(m.cfg, m.weights, device=_device(), dtype=dtype, backend=backend)
        return cache[(preset, backend)]
    return get


@pytest.fixture(scope="session")
def rounds(request):
    """preset -> (timed rounds, warm-up rounds) for benchmark.pedantic (--rounds overrides the timed ones)."""
    override = request.config.getoption("--rounds")

    def get(preset: str) -> tuple[int, int]:
        timed, warmup = ROUNDS[preset]
        return (override or timed), warmup
    return get


def pytest_benchmark_update_machine_info(config, machine_info):
    machine_info["torch"] = torch.__version__
    machine_info["threads"] = torch.get_num_threads()
    machine_info["gpu"] = torch.cuda.get_device_name() if torch.cuda.is_available() else None
