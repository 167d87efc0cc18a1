"""The model trained in this repo (models/train_tiny.py), shipped in models/trained/arith-llada: it loads
with the real loader, keeps its accuracy (a regression in model code or decoding shows up here), and
training is reproducible."""
from pathlib import Path

import pytest
from safetensors.torch import load_file

from dllm.models import load_checkpoint
from dllm.models.train_tiny import TASKS, held_out, make_example, split, train, training_examples
from dllm.perf.quality import answer, evaluate
from dllm.runtime import DllmCache, Engine, NoCache

TRAINED = Path(__file__).resolve().parent.parent / "models" / "trained" / "arith-llada"
# Floor for NoCache exact match on the first 60 held-out prompts. The shipped model scores 100 % there
# (97.9 % on all 240, python -m dllm.perf.quality); the margin covers float differences across machines, and a
# real regression (a wrong RoPE, norm or schedule) collapses accuracy far below it.
FLOOR = 0.90


@pytest.fixture(scope="module")
def engine():
    return Engine.from_pretrained(TRAINED, backend="eager")


def test_shipped_checkpoint_is_real_llada_format():
    cfg, w = load_checkpoint(TRAINED)
    assert cfg.family == "llada" and cfg.n_layers == 4 and cfg.d_model == 128
    assert (TRAINED / "tokenizer.json").is_file() and (TRAINED / "training.json").is_file()


def test_no_cache_accuracy_stays_above_the_floor(engine):
    acc, _, _ = evaluate(engine, held_out(60), NoCache())
    assert acc >= FLOOR, f"NoCache exact match {acc:.1%} fell below {FLOOR:.0%}"


def test_answers_real_prompts(engine):
    prompts = [("reverse 48213", "31284"), ("sort 90417", "01479")]
    out = engine.generate([engine.encode(p + "\n") for p, _ in prompts], gen_length=8, steps=8)
    assert [answer(engine, ids) for ids in out.tokens] == [a for _, a in prompts]


def test_cached_policy_runs_on_the_trained_model(engine):
    acc, _, _ = evaluate(engine, held_out(30), DllmCache(kp=4, kr=2, rho=0.25))
    assert acc >= FLOOR - 0.1


def test_held_out_prompts_are_never_trained_on():
    import random
    held = {p for p, _ in held_out(240)}
    assert len(held) == 240 and all(split(p) == "test" for p in held)
    trained = {p for p, _ in training_examples(random.Random(0), 20000)}
    assert not trained & held
    # the filter is what keeps them apart: the raw task sampler does produce held-out prompts
    rng = random.Random(0)
    assert {make_example(rng, TASKS[i % 2])[0] for i in range(20000)} & held


def test_training_is_reproducible(tmp_path):
    a = train(tmp_path / "a", minutes=5, seed=3, max_steps=4)
    b = train(tmp_path / "b", minutes=5, seed=3, max_steps=4)
    assert a["steps"] == b["steps"] == 4
    ta, tb = load_file(str(tmp_path / "a" / "model.safetensors")), load_file(str(tmp_path / "b" / "model.safetensors"))
    assert ta.keys() == tb.keys() and all((ta[k] == tb[k]).all() for k in ta)
