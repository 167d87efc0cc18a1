"""CPU weight prepacking (models/prepack.py): the equalities the runtime's steps rest on hold for packed
matrices, packing round-trips bit for bit, engines pack exactly where it applies, and on the recorded
cases (the trained model's held-out prompts and the small random model, every policy) packed and plain
weights commit the same tokens."""
from pathlib import Path

import pytest
import torch

from dllm.models import prepack
from dllm.models.layers import forward
from dllm.models.tiny import write_tiny
from dllm.models.train_tiny import held_out
from dllm.perf.e2e import random_prompt
from dllm.perf.quality import answer
from dllm.runtime import Engine
from dllm.runtime.options import parse_policy

pytestmark = pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="this torch has no oneDNN")
TRAINED = Path(__file__).resolve().parent.parent / "models" / "trained" / "arith-llada"
POLICIES = ("none", "dllm-cache:kp=4,kr=2,rho=0.25", "d2cache:k=4,attn_budget=4", "dual-cache",
            "dual-cache+threshold")          # +threshold: the request's threshold 0.9 too


@pytest.mark.parametrize("K,N", [(128, 384), (512, 2816), (1408, 512)])
def test_packed_rows_and_ranges_are_the_whole_products(K, N):
    """A partial step multiplies a few rows, a whole-canvas step all of them: each row must come out the
    same bits either way (2 rows up), and a packed row range must give the whole product's columns."""
    torch.manual_seed(0)
    w, x = torch.randn(N, K), torch.randn(1, 640, K)
    lo = N - N // 6
    p = prepack.pack(w, ((lo, N),))
    whole = prepack.matmul(x, p)                                       # [1, 640, N]
    for M in (2, 3, 17, 32, 33, 129, 639):
        assert torch.equal(prepack.matmul(x[:, :M], p), whole[:, :M]), f"{M} rows differ from the whole product's"
    assert torch.equal(prepack.matmul(x, p, lo, N), whole[..., lo:])    # packed alone
    assert torch.equal(prepack.matmul(x, p, 0, lo), whole[..., :lo])    # cut from the whole product
    # the same product in another summation order: a K-term float32 sum of unit-normal products (|y| ~ sqrt(K))
    # differs by rounding, far below 1e-6 * K
    torch.testing.assert_close(whole, x @ w.t(), rtol=1e-5, atol=1e-6 * K)


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    return write_tiny(tmp_path_factory.mktemp("small") / "m", "llada", "tiny", tokenizer=False)


def test_engines_pack_where_it_applies_and_plain_round_trips(small):
    eager = Engine.from_pretrained(small, backend="eager")
    assert prepack.is_packed(eager.weights)
    back = prepack.plain(eager.weights)
    ref = Engine.from_pretrained(small, backend="eager", prepack=False).weights
    assert not prepack.is_packed(ref)
    for name, t in ref.tensors().items():
        assert torch.equal(back.tensors()[name], t), name
    for other in (Engine(eager.cfg, eager.weights, backend="compile"),          # Inductor cannot lower oneDNN's
                  Engine(eager.cfg, eager.weights, dtype=torch.bfloat16),       # float32 only
                  Engine(eager.cfg, eager.weights, prepack=False)):
        assert not prepack.is_packed(other.weights)
    assert prepack.is_packed(Engine(eager.cfg, ref).weights)                    # plain weights in, packed out


def test_packed_forward_matches_the_plain_one_within_float_error(small):
    packed = Engine.from_pretrained(small, backend="eager")
    plain = Engine.from_pretrained(small, backend="eager", prepack=False)
    tokens = torch.randint(0, packed.cfg.vocab_size, (2, 24))
    with torch.inference_mode():
        a, b = forward(packed.weights, packed.cfg, tokens), forward(plain.weights, plain.cfg, tokens)
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)   # float32 rounding only (another summation order)


@pytest.mark.parametrize("policy", POLICIES)
def test_trained_model_tokens_are_unchanged_by_packing(policy):
    """The recorded quality case (perf.quality's held-out prompts, G=8): identical tokens, packed or not."""
    packed = Engine.from_pretrained(TRAINED, backend="eager")
    plain = Engine.from_pretrained(TRAINED, backend="eager", prepack=False)
    examples = held_out(60)
    prompts = [packed.encode(p + "\n") for p, _ in examples]
    spec, _, threshold = policy.partition("+")
    kw = dict(gen_length=8, steps=8, block_length=4 if spec == "dual-cache" else 8, policy=parse_policy(spec),
              **({"threshold": 0.9} if threshold else {}))
    a, b = packed.generate(prompts, **kw), plain.generate(prompts, **kw)
    assert a.tokens == b.tokens
    assert sum(answer(packed, t) == ans for t, (_, ans) in zip(a.tokens, examples)) >= 50


@pytest.mark.parametrize("policy", ["none", "dllm-cache:kp=100,kr=7,rho=0.25", "dual-cache"])
def test_random_small_model_tokens_are_unchanged_by_packing(tmp_path, policy):
    """The recorded latency case's shape family (random weights: near-flat confidences, the most fragile
    ranking there is), a shorter canvas: identical tokens, packed or not."""
    folder = write_tiny(tmp_path / "m", "llada", "small", tokenizer=False)
    packed = Engine.from_pretrained(folder, backend="eager")
    plain = Engine(packed.cfg, packed.weights, prepack=False)
    prompt = random_prompt(packed.cfg, 64)
    kw = dict(gen_length=32, steps=32, block_length=16, policy=parse_policy(policy))
    assert packed.generate([prompt], **kw).tokens == plain.generate([prompt], **kw).tokens
