"""dllm.apps.evaluate: the runtime as lm-eval model `dllm`. lm-eval's own evaluator on the in-repo task
(perf/eval_tasks/arith) agrees prompt for prompt with perf.quality; the Monte-Carlo log-likelihood is
exact where it can be and ranks the right answer first; bad model arguments are one clear error."""
import json
from collections import Counter
from pathlib import Path

import pytest
import torch

lm_eval = pytest.importorskip("lm_eval")

from lm_eval import evaluator  # noqa: E402
from lm_eval.tasks import TaskManager  # noqa: E402

from dllm.apps.evaluate import DllmLM, EvalConfig, gen_shape  # noqa: E402
from dllm.apps.main import main as cli_main  # noqa: E402
from dllm.models.layers import forward  # noqa: E402
from dllm.models.train_tiny import held_out  # noqa: E402
from dllm.perf.evaltable import DATA, task_rows  # noqa: E402
from dllm.perf.quality import CONFIGS, answer, configuration, evaluate  # noqa: E402
from dllm.runtime import Engine, RequestError  # noqa: E402
from dllm.runtime.decoding import check_shape  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
TRAINED = ROOT / "models" / "trained" / "arith-llada"
TASKS = str(ROOT / "perf" / "eval_tasks")
N = 48                                            # held-out prompts per configuration
OPTIONS = dict(CONFIGS)


@pytest.fixture(scope="module", autouse=True)
def offline():
    """lm-eval and datasets must not reach for a hub: the task reads its local data file."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_DATASETS_OFFLINE", "1")
        mp.setenv("HF_HUB_OFFLINE", "1")
        yield


@pytest.fixture(scope="module")
def engine():
    return Engine.from_pretrained(TRAINED, backend="eager")


@pytest.fixture(scope="module")
def tasks():
    return TaskManager(include_path=TASKS, include_defaults=False)    # the in-repo tasks only: fast to index


def run_task(engine, tasks, task: str, limit: int, chat: bool = False, **model_args):
    """lm-eval's evaluator (lm_eval.evaluator.evaluate, what simple_evaluate runs) on one task."""
    lm = DllmLM(engine=engine, gen_length=8, steps=8, batch_size=N, report=False, **model_args)
    res = evaluator.evaluate(lm, tasks.load([task]), limit=limit, bootstrap_iters=0, log_samples=True,
                             apply_chat_template=chat, fewshot_as_multiturn=False)
    return res, lm


def responses(res, task: str) -> list[str]:
    return [s["filtered_resps"][0] for s in sorted(res["samples"][task], key=lambda s: s["doc_id"])]


def test_task_data_is_the_held_out_split():
    rows = [json.loads(line) for line in DATA.read_text().splitlines()]
    assert rows == task_rows(), \
        "perf/eval_tasks/arith/held_out.jsonl is stale: python -m dllm.perf.evaltable --write-data"
    assert all(r["wrong"] != r["answer"] and len(r["wrong"]) == len(r["answer"]) for r in rows)


@pytest.mark.parametrize("label", ["none", "dllm-cache kp 8 kr 4 rho 0.25", "dual-cache, block 4, threshold 0.9"])
def test_lm_eval_accuracy_equals_perf_quality(engine, tasks, label):
    options = OPTIONS[label]
    res, lm = run_task(engine, tasks, "arith", N, **options)
    examples = held_out(N)
    policy, opts = configuration(options)
    acc, _, steps = evaluate(engine, examples, policy, **opts)
    assert res["results"]["arith"]["exact_match,none"] == acc
    # prompt for prompt: lm-eval's responses are perf.quality's answers (up to the first end-of-text)
    out = engine.generate([engine.encode(p + "\n") for p, _ in examples], gen_length=8, steps=8, policy=policy,
                          **{"block_length": 8, **opts})
    got = responses(res, "arith")
    assert got == [answer(engine, ids) for ids in out.tokens]
    eff = lm.efficiency["arith"]
    assert eff.requests == N and eff.tokens == sum(map(len, got))     # char tokenizer: one token per character
    assert eff.forwards == out.steps * N and sum(eff.step_kinds.values()) == out.steps
    assert eff.speedup is not None and eff.tokens_per_second > 0


def test_registered_model_runs_under_simple_evaluate(engine, tasks):
    """By name, as `dllm eval` builds it: model args as one string, lm-eval's --batch_size/--device added
    (its default device cuda:0 means cpu on a machine without CUDA)."""
    assert lm_eval.api.registry.get_model("dllm") is DllmLM
    res = lm_eval.simple_evaluate(model="dllm", model_args=f"model={TRAINED},gen_length=8,steps=8,report=false",
                                  batch_size=16, device="cuda:0" if not torch.cuda.is_available() else None,
                                  tasks=["arith"], task_manager=tasks, limit=16, bootstrap_iters=0)
    direct, _ = run_task(engine, tasks, "arith", 16, baseline=False)
    assert res["results"]["arith"]["exact_match,none"] == direct["results"]["arith"]["exact_match,none"]
    assert responses(res, "arith") == responses(direct, "arith")


def test_chat_template_task_gives_the_same_answers(engine, tasks):
    plain, _ = run_task(engine, tasks, "arith", 16, baseline=False)
    chat, _ = run_task(engine, tasks, "arith_chat", 16, chat=True, baseline=False)
    assert chat["samples"]["arith_chat"][0]["arguments"][0][0] == "reverse 101901\n"   # the template's newline
    assert responses(chat, "arith_chat") == responses(plain, "arith")


def test_gen_length_of_a_request_rounds_up_to_the_policy_shape():
    cfg = EvalConfig.parse({"model": "x", "gen_length": 256, "steps": 128, "block_length": 32})
    shapes = {m: gen_shape(cfg.request, m) for m in (1, 31, 32, 33, 100, 256, 300)}
    assert [(s.gen_length, s.steps) for s in shapes.values()] == [
        (32, 16), (32, 16), (32, 16), (64, 32), (128, 64), (256, 128), (320, 160)]
    one_block = EvalConfig.parse({"model": "x", "gen_length": 64, "steps": 16})
    assert gen_shape(one_block.request, 10) == gen_shape(one_block.request, 10).__class__(10, 3, 10)
    uneven = EvalConfig.parse({"model": "x", "gen_length": 64, "steps": 2, "block_length": 32})
    for m in (1, 40, 64, 65, 200):
        s = gen_shape(uneven.request, m)
        assert s.gen_length >= m and check_shape(s.gen_length, s.block_length, s.steps) >= 1


def exact_nll(engine, prefix: list[int], answer: list[int], masked: tuple[int, ...]) -> torch.Tensor:
    """-log p of each masked answer token given the canvas with those positions masked: [len(masked)]."""
    cfg = engine.cfg
    canvas = torch.tensor(prefix + [cfg.mask_id if j in masked else t for j, t in enumerate(answer)])
    logits = forward(engine.weights, cfg, canvas[None], torch.zeros(1, dtype=torch.int64))[0].float()  # [L, V]
    rows = [len(prefix) + j - (1 if cfg.shift_logits else 0) for j in masked]
    return -torch.log_softmax(logits[rows], -1)[torch.arange(len(masked)), [answer[j] for j in masked]]


@pytest.mark.parametrize("family", ["arith-llada", "dream"])
def test_mc_loglikelihood_is_exact_for_a_one_token_answer(engine, engines, family):
    eng = engine if family == "arith-llada" else engines["dream"]
    lm = DllmLM(engine=eng, gen_length=8, steps=8, mc_num=8, report=False)
    for prompt, ans in held_out(6):
        prefix = eng.encode(prompt + "\n")
        for token in (eng.encode(ans)[0], eng.encode("7")[0]):          # the right first digit, and a 7
            exact = -float(exact_nll(eng, prefix, [token], (0,))[0])
            assert lm.mc_loglikelihood(prefix, [token]) == pytest.approx(exact, abs=1e-5)


def test_mc_loglikelihood_weights_by_the_inverse_mask_ratio(engine):
    lm = DllmLM(engine=engine, gen_length=8, steps=8, mc_num=4000, report=False)
    prefix, ans = engine.encode("reverse 48213\n"), engine.encode("97")      # a wrong answer: large losses
    draws = lm.mask_draws(2)
    freq = {k: v / 4000 for k, v in draws.items()}
    assert set(freq) == {(0,), (1,), (0, 1)}                         # l ~ U{1, 2}, then l of the 2 positions
    assert freq[(0, 1)] == pytest.approx(0.5, abs=0.03) and freq[(0,)] == pytest.approx(0.25, abs=0.03)
    by_hand = sum(n * 2 / len(m) * float(exact_nll(engine, prefix, ans, m).sum()) for m, n in draws.items()) / 4000
    assert lm.mc_loglikelihood(prefix, ans) == pytest.approx(-by_hand, rel=1e-5)
    expected = sum(p * 2 / len(m) * float(exact_nll(engine, prefix, ans, m).sum())
                   for m, p in {(0,): 0.25, (1,): 0.25, (0, 1): 0.5}.items())
    assert lm.mc_loglikelihood(prefix, ans) == pytest.approx(-expected, rel=0.05)
    assert DllmLM(engine=engine, gen_length=8, steps=8, mc_num=64, seed=3, report=False).mask_draws(5) == \
        DllmLM(engine=engine, gen_length=8, steps=8, mc_num=64, seed=3, report=False).mask_draws(5)


def test_loglikelihood_ranks_the_right_answer_first(engine, tasks):
    res, _ = run_task(engine, tasks, "arith_choice", 32, mc_num=16)
    assert res["results"]["arith_choice"]["acc,none"] >= 0.9
    samples = res["samples"]["arith_choice"]
    right_greedy = [s["resps"][0][0][1] for s in samples]
    wrong_greedy = [s["resps"][1][0][1] for s in samples]
    assert sum(right_greedy) >= 0.9 * len(samples) and not any(wrong_greedy)


@pytest.mark.parametrize("args, message", [
    ({"polciy": "none"}, "unknown model argument polciy; valid: model, dtype, device"),
    ({"policy": "fast"}, "unknown policy 'fast'; choose one of none, dllm-cache"),
    ({"kp": 8}, "option kp belongs to policy dllm-cache, not none"),            # the one option parser's words
    ({"policy": "dllm-cache", "rho": "high"}, "rho must be a number, got 'high'"),
    ({"gen_length": 10, "block_length": 4}, "gen_length 10 is not a multiple of block_length 4"),
    ({"alg": "entropy"}, "--alg entropy is a Dream option"),
    ({"dtype": "fp8"}, "unknown dtype 'fp8'"),
])
def test_bad_model_arguments_are_one_clear_error(engine, capsys, args, message):
    with pytest.raises(RequestError, match="^" + message.replace("(", r"\(").replace("?", r"\?")):
        DllmLM(engine=engine, **args)
    arg_string = ",".join([f"model={TRAINED}"] + [f"{k}={v}" for k, v in args.items()])
    assert cli_main(["eval", "--model", "dllm", "--model_args", arg_string, "--tasks", "arith",
                     "--include_path", TASKS]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"dllm: error: {message}"), err


def test_mask_draws_cover_all_lengths(engine):
    lm = DllmLM(engine=engine, gen_length=8, steps=8, mc_num=600, report=False)
    lengths = Counter(len(m) for m, n in lm.mask_draws(3).items() for _ in range(n))
    assert set(lengths) == {1, 2, 3} and min(lengths.values()) > 150
