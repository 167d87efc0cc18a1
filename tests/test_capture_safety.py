"""Capture safety without a GPU: what a CUDA graph needs from a step, checked on the CPU.

A captured step must (1) create no tensor on the host and read no tensor value on the host (a graph
cannot sync, and anything made on the CPU inside the step is frozen or breaks capture), (2) depend on no
Python state that changes between calls (a graph replays the launches it recorded), and (3) trace as
one graph (the compile backends use fullgraph=True). Three checks, one per property:

- meta-device watch: every step kind of every policy at the real LLaDA-8B / Dream-7B shapes in bf16,
  for the decoding options, runs on meta tensors under a dispatch watcher (StepWatch);
- emulated graph replay: each step kind is recorded once (make_fx of the body, the live buffers as
  constants) and the recording is replayed through Engine.generate; tokens must equal eager;
- fullgraph compile on meta: torch.compile(fullgraph=True) of every step kind at the real shapes, with
  a backend that only traces.
"""
from __future__ import annotations

import dataclasses

import pytest
import torch
from torch.fx.experimental.proxy_tensor import make_fx
from torch.utils._python_dispatch import TorchDispatchMode

from dllm.models.checkpoint import Weights
from dllm.models.config import parse_config
from dllm.models.quant import Quantization, device_shapes
from dllm.models.tiny import SHAPE_PRESETS, tiny_config
from dllm.runtime import POLICIES, Engine, NoCache
from dllm.runtime.decoding import DecodeConfig
from dllm.runtime.prepared import Prepared
from dllm.runtime.state import Cache, RequestShape, StepState
from dllm.runtime.steps import full_step

PRESET = {"llada": "llada-8b-shape", "dream": "dream-7b-shape"}
REAL_SHAPE = RequestShape(batch=1, prompt_bucket=512, gen_length=256, block_length=32, steps=256)
# Every token-choice path of each family: greedy, temperature with per-vocab noise, per-row uniforms
# (LLaDA random remasking, Dream origin), threshold decoding, Dream's algs with top-p / top-k.
DECODING = {
    "llada": [{}, {"temperature": 0.7}, {"remasking": "random"}, {"temperature": 0.5, "remasking": "random"},
              {"threshold": 0.9}],
    "dream": [{}, {"alg": "origin"}, {"alg": "maskgit_plus", "temperature": 0.5, "top_p": 0.9, "top_k": 50},
              {"alg": "topk_margin", "threshold": 0.9}, {"alg": "entropy", "temperature": 0.7, "top_p": 0.95}],
}


def _label(dkw: dict) -> str:
    return ",".join(f"{k}={v}" for k, v in dkw.items()) or "greedy"


# ---------------------------------------------------------------- real shapes on meta tensors

def meta_model(family: str, n_layers: int | None = None, dtype=torch.bfloat16, quant: Quantization | None = None,
               packed_for: str = "cpu"):
    """(ModelConfig, Weights) of the real-dimension preset, every weight an empty meta tensor; n_layers
    (default: the real count) shortens the stack only: every layer runs the same code. quant: the
    quantized matrices as `load_weights` lays them out for a `packed_for` device (cpu | cuda: int4 packs
    differently), on meta."""
    preset = SHAPE_PRESETS[PRESET[family]]
    if n_layers is not None:
        preset = dataclasses.replace(preset, n_layers=n_layers)
    cfg = parse_config(tiny_config(family, preset))
    d, q, kv, F, V, nL = cfg.d_model, cfg.q_width, cfg.kv_width, cfg.mlp_hidden, cfg.vocab_size, cfg.n_layers

    def empty(*shape):
        return torch.empty(shape, device="meta", dtype=dtype)
    w = Weights(embed=empty(V, d), attn_norm=empty(nL, d), wqkv=empty(nL, q + 2 * kv, d),
                bqkv=empty(nL, q + 2 * kv) if cfg.qkv_bias else None, wo=empty(nL, d, q),
                ffn_norm=empty(nL, d), w_gate_up=empty(nL, 2 * F, d), w_down=empty(nL, d, F),
                final_norm=empty(d), head=empty(V, d))
    if quant is not None:
        w = dataclasses.replace(w, **{k: torch.empty(s, device="meta", dtype=dt)
                                      for k, (s, dt) in device_shapes(cfg, quant, packed_for, dtype).items()})
    return cfg, w


def meta_state(cfg, shape: RequestShape, dc: DecodeConfig) -> StepState:
    """StepState.allocate's state with every tensor on meta. StepState.allocate(device="meta") itself
    fails on torch.Generator(device="meta") (not an accelerator); the generator only feeds draw_noise,
    which runs outside the step bodies, so the CPU one allocate makes here is never used."""
    st = StepState.allocate(cfg, shape, dc.structure, "cpu")
    st.write_values(dc.values)
    return dataclasses.replace(st, **{f.name: torch.empty_like(getattr(st, f.name), device="meta")
                                      for f in dataclasses.fields(st) if isinstance(getattr(st, f.name), torch.Tensor)})


def meta_prepared(w, cfg, shape: RequestShape, dc: DecodeConfig, policy) -> Prepared:
    """Prepared.allocate(..., device="meta", dtype=bf16), step by step, with the state from meta_state."""
    policy.check(cfg, dc.structure)
    st = meta_state(cfg, shape, dc)
    cache = Cache.allocate(cfg, shape, "meta", w.embed.dtype) if policy.uses_cache else None
    scratch = policy.scratch(cfg, shape, st, "meta")
    return Prepared(shape, dc.structure, policy, st, cache, scratch, policy.bodies(w, cfg, st, cache, scratch))


class StepWatch(TorchDispatchMode):
    """Fails on anything a CUDA graph cannot hold: a tensor on the CPU (created in the step, or read by
    it), a host read of a value (.item(), .tolist(), bool(t)), or an op whose output shape depends on
    tensor values (nonzero, masked_select, unique, boolean-mask indexing). Counts the ops it saw."""
    HOST_READS = {"_local_scalar_dense", "item", "is_nonzero", "equal", "allclose", "tolist"}

    def __init__(self):
        super().__init__()
        self.ops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func.overloadpacket.__name__
        if name in self.HOST_READS or torch.Tag.data_dependent_output in func.tags:
            raise AssertionError(f"host read inside a step: {func}")
        if torch.Tag.dynamic_output_shape in func.tags and not self._integer_indexing(name, args):
            raise AssertionError(f"data-dependent output shape inside a step: {func}")
        self._no_cpu_tensors(func, list(args) + list(kwargs.values()), "reads")
        if isinstance(kwargs.get("device"), torch.device) and kwargs["device"].type == "cpu":
            raise AssertionError(f"{func} creates a CPU tensor inside a step (a copy to the host)")
        out = func(*args, **kwargs)
        self._no_cpu_tensors(func, [out], "creates")
        self.ops += 1
        return out

    @staticmethod
    def _integer_indexing(name: str, args) -> bool:
        """aten.index / index_put are tagged data-dependent for boolean masks; with integer index tensors
        their output shape is static."""
        if name not in ("index", "index_put", "index_put_", "_index_put_impl_"):
            return False
        indices = args[1] if len(args) > 1 else []
        return all(i is None or i.dtype not in (torch.bool, torch.uint8) for i in indices)

    @staticmethod
    def _no_cpu_tensors(func, values, verb: str) -> None:
        for v in values:
            items = v if isinstance(v, (list, tuple)) else [v]
            for t in items:
                if isinstance(t, torch.Tensor) and t.device.type == "cpu":
                    raise AssertionError(f"{func} {verb} a CPU tensor {tuple(t.shape)} {t.dtype} inside a step")


SHORT = 2     # layers of the shortened stack: real widths, heads, vocab and request shape


@pytest.fixture(scope="module")
def meta_models():
    """(family, n_layers or None for the real count) -> (cfg, weights) on meta."""
    return {(fam, n): meta_model(fam, n) for fam in PRESET for n in (None, SHORT)}


def _planted(kind: str):
    x = torch.zeros(4, 8, device="meta")
    return {"item": lambda: x.sum().item(),
            "tolist": lambda: x[0].tolist(),
            "cpu tensor": lambda: x.add_(torch.ones(8).sum()),
            "to cpu": lambda: x.cpu(),
            "nonzero": lambda: x.nonzero(),
            "bool mask": lambda: x[x > 0],
            "bool condition": lambda: bool((x > 0).any())}[kind]


@pytest.mark.parametrize("kind", ["item", "tolist", "cpu tensor", "to cpu", "nonzero", "bool mask", "bool condition"])
def test_watch_catches_a_planted_violation(kind):
    """The watcher can fail: each planted violation raises the watcher's own error."""
    with pytest.raises(AssertionError, match="inside a step"), StepWatch():
        _planted(kind)()


def test_watch_allows_static_integer_indexing():
    x, idx = torch.zeros(4, 8, device="meta"), torch.zeros(3, dtype=torch.int64, device="meta")
    with StepWatch() as w:
        x[idx] = 1.0
        x[:, idx].sum(0)
    assert w.ops > 0


@pytest.mark.parametrize("family", list(PRESET))
@pytest.mark.parametrize("policy_name", list(POLICIES))
def test_every_step_kind_is_capture_safe_at_real_shape(meta_models, family, policy_name, record_property):
    """Every kind of the policy, for every decoding option it serves, at the real shape in bf16 on meta:
    the first (greedy) option through all 32 / 28 layers, the others (which differ only in the commit
    after the last layer) through a 2-layer stack of the real widths, to keep the test quick."""
    policy, ran = POLICIES[policy_name](), []
    for n, dkw in enumerate(DECODING[family]):
        cfg, w = meta_models[(family, None if n == 0 else SHORT)]
        dc = DecodeConfig.make(family, **dkw)
        if policy_name == "d2cache" and dkw.get("alg") == "origin":
            continue                                 # d2cache refuses origin (policy.check): not servable
        prep = meta_prepared(w, cfg, REAL_SHAPE, dc, policy)
        for kind in policy.kinds:
            with torch.inference_mode(), StepWatch() as watch:
                prep.bodies[kind]()
            ran.append(f"{_label(dkw)}/{kind}/{cfg.n_layers} layers:{watch.ops} ops")
    record_property("watched", "; ".join(ran))
    assert len(ran) >= len(policy.kinds) * (len(DECODING[family]) - 1)


# Quantized weights (models/quant.py): int8, and int4 as packed for the CPU kernel. The CUDA packing cannot be
# checked off a GPU: torch 2.13's meta kernel of aten._weight_int4pack_mm reads `w.fake_device`, an attribute
# no meta tensor has (AttributeError, eager and under Dynamo alike); the `cuda` tests in test_quant.py run it.
QUANTIZED = [("int8", "cpu"), ("int4", "cpu")]


@pytest.mark.parametrize("family", list(PRESET))
@pytest.mark.parametrize("mode,packed_for", QUANTIZED)
def test_quantized_step_kinds_are_capture_safe_at_real_shape(family, mode, packed_for, record_property):
    """Every kind of every policy with quantized weights (the head too: every matmul of the step runs a
    quantized kernel) at the real shape in bf16 on meta, greedy, under the watcher: the quantized matmuls
    create nothing on the host and read no value. All layers for int8, the real widths in 2 layers for int4."""
    quant = Quantization(mode, head=True)
    cfg, w = meta_model(family, None if mode == "int8" else SHORT, quant=quant, packed_for=packed_for)
    dc, ran = DecodeConfig.make(family), []
    for policy_cls in POLICIES.values():
        prep = meta_prepared(w, cfg, REAL_SHAPE, dc, policy_cls())
        for kind in prep.policy.kinds:
            with torch.inference_mode(), StepWatch() as watch:
                prep.bodies[kind]()
            ran.append(f"{prep.policy.name}/{kind}:{watch.ops} ops")
    record_property("watched", "; ".join(ran))
    assert len(ran) == sum(len(p.kinds) for p in POLICIES.values())


@pytest.mark.parametrize("mode,packed_for", QUANTIZED)
def test_quantized_step_kinds_compile_as_one_graph_at_real_shape(mode, packed_for):
    """torch.compile(fullgraph=True) traces every kind of every policy with quantized weights (LLaDA's
    real widths, 2 layers, greedy): PyTorch's weight-only matmul ops are no graph break."""
    cfg, w = meta_model("llada", SHORT, quant=Quantization(mode, head=True), packed_for=packed_for)
    dc = DecodeConfig.make("llada")
    torch._dynamo.reset()
    with torch._dynamo.config.patch(recompile_limit=64, accumulated_recompile_limit=1 << 12):
        for policy_cls in POLICIES.values():
            prep = meta_prepared(w, cfg, REAL_SHAPE, dc, policy_cls())
            for body in prep.bodies.values():
                torch.compile(body, fullgraph=True, dynamic=False, backend=_trace_only)()
    torch._dynamo.reset()


# ---------------------------------------------------------------- fullgraph compile at real shapes on meta

def _trace_only(gm: torch.fx.GraphModule, example_inputs):
    return gm.forward


@pytest.mark.parametrize("family", list(PRESET))
def test_every_step_kind_compiles_as_one_graph_at_real_shape(meta_models, family):
    """torch.compile(fullgraph=True) traces every kind of every policy at the real shape on meta tensors:
    a graph break raises. A 2-layer stack of the real widths (Dynamo unrolls the layer loop, and every
    layer is the same code: 32 layers only cost minutes). One decoding option per family: the richest
    (noise, top-p/top-k or random remasking); the others differ only inside decoding.choose."""
    cfg, w = meta_models[(family, SHORT)]
    dkw = {"temperature": 0.5, "remasking": "random"} if family == "llada" else \
        {"alg": "maskgit_plus", "temperature": 0.5, "top_p": 0.9, "top_k": 50}
    dc = DecodeConfig.make(family, **dkw)
    torch._dynamo.reset()
    with torch._dynamo.config.patch(recompile_limit=64, accumulated_recompile_limit=1 << 12):
        for policy_cls in POLICIES.values():
            prep = meta_prepared(w, cfg, REAL_SHAPE, dc, policy_cls())
            for kind, body in prep.bodies.items():
                torch.compile(body, fullgraph=True, dynamic=False, backend=_trace_only)()
    torch._dynamo.reset()


def test_fullgraph_compile_can_fail():
    x = torch.zeros(4, device="meta")

    def breaks():
        if x.sum() > 0:                               # a data-dependent branch: a graph break
            x.add_(1)
    torch._dynamo.reset()
    with pytest.raises(Exception, match="(?i)data-dependent|graph break|Unsupported|meta"):
        torch.compile(breaks, fullgraph=True, backend=_trace_only)()
    torch._dynamo.reset()


# ---------------------------------------------------------------- emulated graph replay (tiny checkpoints)

def record_steps(prep: Prepared, cfg) -> None:
    """Record each step kind once as an FX graph of aten ops whose constants are the live buffers
    (make_fx of the zero-argument body) and install the recordings as the prepared steps: from then on
    the engine replays the recording, frozen like a captured CUDA graph (same ops, same buffers, same
    Python values), instead of running the body."""
    prep.fill(cfg, [[cfg.pad_id] * prep.shape.prompt_bucket] * prep.shape.batch, seed=0)
    for kind in prep.policy.kinds:
        prep.state.rewind()
        prep.state.draw_noise()
        prep.steps[kind] = make_fx(prep.bodies[kind])()


def eager_and_replayed(eager: Engine, policy, dkw: dict, prompt, shape_kw: dict):
    """Tokens of the same request on an eager engine and on one (same weights) whose steps are recordings."""
    family = eager.cfg.family
    replay = Engine(eager.cfg, eager.weights, backend="eager")
    B, P = 1, shape_kw["prompt_bucket"]
    shape = RequestShape(B, P, shape_kw["gen_length"], shape_kw["block_length"], shape_kw["steps"])
    prep = replay.prepared(shape, DecodeConfig.make(family, **dkw).structure, policy)
    record_steps(prep, replay.cfg)
    kw = dict(policy=policy, seed=3, **dkw, **shape_kw)
    return eager.generate(prompt, **kw).tokens, replay.generate(prompt, **kw).tokens


REPLAY_SHAPE = dict(prompt_bucket=12, gen_length=16, steps=16, block_length=8)
PROMPT = [9, 10, 11, 12, 13, 14, 15]
# noise and per-row uniforms (fixed plan), and threshold decoding (the data-dependent plan)
REPLAY_DECODING = {"llada": [{"temperature": 0.8, "remasking": "random"}, {"threshold": 0.6}],
                   "dream": [{"alg": "origin", "temperature": 0.8},
                             {"alg": "maskgit_plus", "temperature": 0.8, "top_p": 0.9, "top_k": 20, "threshold": 0.6}]}


@pytest.mark.parametrize("family", list(PRESET))
@pytest.mark.parametrize("policy_name", list(POLICIES))
def test_replayed_recordings_give_the_eager_tokens(engines, family, policy_name):
    policy = POLICIES[policy_name](**({"kp": 4, "kr": 2, "rho": 0.5} if policy_name == "dllm-cache" else
                                      {"k": 4, "attn_budget": 4} if policy_name == "d2cache" else {}))
    for dkw in REPLAY_DECODING[family]:
        if policy_name == "d2cache" and dkw.get("alg") == "origin":
            continue
        eager, replayed = eager_and_replayed(engines[family], policy, dkw, PROMPT, REPLAY_SHAPE)
        assert replayed == eager, f"{_label(dkw)}: a recorded step diverged from eager"


@dataclasses.dataclass(frozen=True)
class PythonStateLeak(NoCache):
    """A planted bug: the full step also writes a Python-side call count into the canvas. Eager sees the
    count change; a recording (like a CUDA graph) freezes the value it saw while recording."""
    name = "leak"

    def bodies(self, w, cfg, st, cache, scratch):
        calls = [0]

        def body():
            calls[0] += 1
            full_step(w, cfg, st)
            st.tokens[:, -1].fill_(calls[0] % cfg.vocab_size)
        return {"full": body}


def test_replay_catches_a_step_that_depends_on_python_state(engines):
    eager, replayed = eager_and_replayed(engines["llada"], PythonStateLeak(), {}, PROMPT, REPLAY_SHAPE)
    assert replayed != eager
