"""The FLOP / byte model of perf.roofline against what the step bodies really do."""
import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from dllm.perf.roofline import Peaks, kind_cost, layer_cost, markdown, roofline_rows
from dllm.runtime import POLICIES
from dllm.runtime.decoding import DecodeConfig
from dllm.runtime.policy.base import LayerWork
from dllm.runtime.state import RequestShape

FAMILIES = ("llada", "dream")


@pytest.fixture(scope="module")
def plain(tiny_dirs):
    """Engines with plain weights: torch's FLOP counter sees aten matmuls, not oneDNN's prepacked ones
    (models/prepack.py; the FLOPs are the same products)."""
    from dllm.runtime import Engine
    return {f: Engine.from_pretrained(d, backend="eager", prepack=False) for f, d in tiny_dirs.items()}


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("name", sorted(POLICIES))
def test_counted_flops_equal_the_model(plain, family, name):
    """Every kind of every policy: the FLOPs torch's counter sees in one step body equal the model's
    (SDPA on the math kernel, which the counter decomposes into matmuls). d2Cache also multiplies its
    small row-selection matrices (certainty density, rollout), which the model leaves out: <= 0.2 %.
    A partial step that did whole-canvas work would count more than its rows."""
    eng = plain[family]
    shape = RequestShape(1, 24, 16, 8 if family == "llada" else 16, 16)
    policy = POLICIES[name]()
    prep = eng.prepared(shape, DecodeConfig.make(family).structure, policy)
    with torch.inference_mode():
        prep.fill(eng.cfg, [list(range(8, 32))], seed=0)
        for kind in policy.kinds:
            prep.state.rewind()
            with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as fc:
                prep.bodies[kind]()
            want = kind_cost(eng.cfg, shape, prep.state.kmax, policy, kind, torch.float32).flops
            got = fc.get_total_flops()
            tol = 0.002 if name == "d2cache" else 0.0
            assert want <= got <= want * (1 + tol), (kind, got, want)


def test_partial_kinds_cost_a_fraction_of_the_full_step(engines):
    """On the benchmark shape (P=512, G=128, block 32) of an 8-layer model the cached kinds do what
    their row counts say: the V-verify step about a tenth of a full step's FLOPs."""
    cfg = engines["llada"].cfg
    shape = RequestShape(1, 512, 128, 32, 128)
    pol = POLICIES["dllm-cache"]()
    full = kind_cost(cfg, shape, 1, pol, "full", torch.float32)
    verify = kind_cost(cfg, shape, 1, pol, "verify", torch.float32)
    assert verify.flops < full.flops / 4
    assert verify.bytes < full.bytes                          # fewer weights: no Q/K/O/FFN where no row is recomputed
    # the byte model is per dtype: bf16 moves half of fp32
    assert kind_cost(cfg, shape, 1, pol, "verify", torch.bfloat16).bytes * 2 == verify.bytes


def test_a_batch_reads_the_weights_once_and_every_row_its_cache(engines):
    cfg = engines["llada"].cfg
    pol = POLICIES["dual-cache"]()
    one, eight = (kind_cost(cfg, RequestShape(B, 24, 16, 8, 16), 1, pol, "block", torch.float32) for B in (1, 8))
    assert eight.flops == 8 * one.flops and one.cache > 0
    assert eight.bytes - eight.cache == one.bytes - one.cache and eight.cache == 8 * one.cache


def test_layer_cost_by_hand(engines):
    cfg = engines["llada"].cfg                                 # d 64, 4 heads (q width 64), F 160, MHA
    d, F, qw = cfg.d_model, cfg.mlp_hidden, cfg.q_width
    c = layer_cost(cfg, 10, LayerWork(rows=2, v_rows=3), 4)
    assert c.flops == 2 * 2 * d * 2 * qw + 2 * 3 * d * qw + 4 * 2 * 10 * qw + 2 * 2 * qw * d + 6 * 2 * d * F
    assert layer_cost(cfg, 10, LayerWork(0, 0), 4) == layer_cost(cfg, 10, LayerWork(0, 0), 2)   # nothing to move


def test_floor_is_the_roofline_and_the_fraction_floor_over_measured(engines):
    cfg = engines["llada"].cfg
    shape = RequestShape(1, 24, 16, 8, 16)
    pol = POLICIES["dual-cache"]()
    peaks = Peaks(flops=1e9, bandwidth=1e12, device="test", dtype="float32")   # compute-bound here
    rows = roofline_rows(cfg, shape, 1, pol, torch.float32, {"full": 0.01, "block": 0.004}, peaks)
    full = kind_cost(cfg, shape, 1, pol, "full", torch.float32)
    assert rows[0]["bound"] == "compute" and rows[0]["floor_ms"] == pytest.approx(full.flops / 1e9 * 1e3)
    assert rows[0]["fraction"] == pytest.approx(full.flops / 1e9 / 0.01)
    slow_memory = Peaks(flops=1e15, bandwidth=1e6, device="test", dtype="float32")
    assert slow_memory.floor(full) == (full.bytes / 1e6, "memory")
    table = markdown(rows)
    assert table[0].startswith("| policy | step kind") and len(table) == 2 + 2 and "| dual-cache | block |" in table[3]


def test_tensor_parallel_cost_per_rank(engines):
    """Per rank at TP=2: half of every matmul's FLOPs and of the weights, the K/V cache halved but the
    cached attention / FFN deltas whole (every rank holds the whole residual stream), two all-reduces a
    layer (a ring sends 2(N-1)/N of each) and the head's all-gather."""
    from dllm.perf.roofline import predicted_seconds
    cfg = engines["llada"].cfg                                 # d 64, q width 64, MHA (kv width 64)
    shape = RequestShape(1, 24, 16, 8, 16)
    pol = POLICIES["none"]()
    one, two = (kind_cost(cfg, shape, 1, pol, "full", torch.float32, tp=tp) for tp in (1, 2))
    assert two.flops == one.flops / 2
    L, d, nL = shape.length, cfg.d_model, cfg.n_layers
    deltas = nL * 2 * L * d * 4                                # A and M rows written, whole on every rank
    assert two.cache == (one.cache - deltas) / 2 + deltas
    assert two.bytes - two.cache == (one.bytes - one.cache) / 2     # weights (and the head) halved
    assert two.collectives == 2 * nL + 1 and one.collectives == 0 and one.link == 0
    assert two.link == nL * 2 * (2 * L * d * 4) / 2 + shape.block_length * cfg.vocab_size * 4 / 2
    assert predicted_seconds(two, 1e9, 1e12, 1e9, latency=1e-3) == pytest.approx(
        max(two.flops / 1e9, two.bytes / 1e12) + two.link / 1e9 + two.collectives * 1e-3)


def test_the_documented_tp_tables_are_what_the_command_prints():
    """docs/parallel.md and the README quote `python -m dllm.perf.roofline --tp-table`; a change to the cost
    model that leaves them stale fails here."""
    from pathlib import Path

    from dllm.perf.roofline import tp_table
    root = Path(__file__).resolve().parent.parent
    table = tp_table()

    def quoted(path: str, marker: str) -> list[str]:
        text = (root / path).read_text()
        return text.split(f"<!-- {marker}:begin -->\n")[1].split(f"<!-- {marker}:end -->")[0].strip().splitlines()
    assert quoted("docs/parallel.md", "tp") == table
    readme = quoted("README.md", "tp-readme")
    assert readme[:2] == table[:2] and set(readme[2:]) <= set(table[2:]) and len(readme) >= 4
