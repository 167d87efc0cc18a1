"""Tensor parallelism (models/parallel.py) on this CPU: gloo, 2 processes of 1 thread each, launched by
torchrun as a user would; the sharded loader against the whole checkpoint; the capture-safety checks at
the real 8B shapes under TP=2 on meta tensors (a fake process group: the collectives trace and dispatch,
nothing is sent).

Tolerance: the tokens of every policy must equal TP=1 exactly. A tensor-parallel rank sums its half of
each row-parallel matmul and the all-reduce adds the halves, so logits differ from TP=1 by fp32
summation order only (measured below: within 2e-6 of logits of magnitude ~10, asserted at 1e-5). A token
can only change where two candidates' confidences tie within that, and none of these fixtures has such a
tie: if a new fixture has one, the forward check still holds and is the one to trust."""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from dllm.models import load_checkpoint
from dllm.models.checkpoint import Weights, load_weights
from dllm.models.config import CheckpointError, load_config, parse_config
from dllm.models.layers import forward
from dllm.models.parallel import Shard, check_launch
from dllm.models.tiny import SHAPE_PRESETS, tiny_config, write_tiny
from dllm.models.train_tiny import held_out
from dllm.runtime import POLICIES, Engine, Request
from dllm.runtime.decoding import DecodeConfig
from dllm.runtime.options import parse_policy

ROOT = Path(__file__).resolve().parent.parent
TRAINED = ROOT / "models" / "trained" / "arith-llada"
SPECS = ["none", "dllm-cache:kp=4,kr=2,rho=0.5", "d2cache", "dual-cache"]


def torchrun(args: list[str], tmp_path: Path, timeout: int = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", *args]
    res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert res.returncode == 0, res.stderr[-3000:]
    return res


# ---------------------------------------------------------------- refusals, before anything is loaded

def test_check_launch_refuses_in_one_line(monkeypatch):
    cfg = load_config(TRAINED)                                          # 4 heads, FFN 384, vocabulary 128
    for bad in (0, -1, 1.5, True, "2"):
        with pytest.raises(CheckpointError, match="--tp must be an integer >= 1"):
            check_launch(bad, cfg)
    with pytest.raises(CheckpointError, match=r"--tp 3 must divide the model's heads 4.*--tp 1 / 2 / 4"):
        check_launch(3, cfg)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with pytest.raises(CheckpointError, match=r"needs 2 processes.*torchrun --nproc-per-node 2 .*this is 1 process\)"):
        check_launch(2, cfg)
    monkeypatch.setenv("WORLD_SIZE", "2")
    check_launch(2, cfg)                                                 # the launch it asks for passes
    check_launch(1, cfg)


def test_the_cli_refuses_tp_without_its_processes_before_loading(tmp_path):
    missing = tmp_path / "no-weights"
    shutil.copytree(TRAINED, missing, ignore=shutil.ignore_patterns("*.safetensors"))
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK")}
    res = subprocess.run([sys.executable, "-m", "dllm.apps", "generate", "--model", str(missing), "--tp", "2",
                          "--prompt", "sort 123\n"], capture_output=True, text=True, env=env, timeout=120)
    assert res.returncode == 2 and "needs 2 processes" in res.stderr and len(res.stderr.strip().splitlines()) == 1


# ---------------------------------------------------------------- the sharded loader

def _tied(tmp_path: Path) -> Path:
    folder = write_tiny(tmp_path / "tied", "llada")
    raw = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**raw, "weight_tying": True}))
    t = load_file(folder / "model.safetensors")
    del t["model.transformer.ff_out.weight"]
    save_file(t, folder / "model.safetensors", metadata={"format": "pt"})
    return folder


@pytest.mark.parametrize("which", ["llada", "dream", "tied"])
def test_each_rank_loads_exactly_its_slices(tiny_dirs, tmp_path, which):
    folder = _tied(tmp_path) if which == "tied" else tiny_dirs[which]
    cfg, whole = load_checkpoint(folder)
    q, kv, F, V, N = cfg.q_width, cfg.kv_width, cfg.mlp_hidden, cfg.vocab_size, 2
    for r in range(N):
        part = load_weights(folder, cfg, shard=Shard(r, N))
        assert part.shard == Shard(r, N)

        def seg(a, b):                                                   # rank r's share of rows a:b
            n = (b - a) // N
            return slice(a + r * n, a + (r + 1) * n)
        qkv = [seg(0, q), seg(q, q + kv), seg(q + kv, q + 2 * kv)]
        assert torch.equal(part.wqkv, torch.cat([whole.wqkv[:, s] for s in qkv], 1))
        if cfg.qkv_bias:
            assert torch.equal(part.bqkv, torch.cat([whole.bqkv[:, s] for s in qkv], 1))
        assert torch.equal(part.w_gate_up, torch.cat([whole.w_gate_up[:, seg(0, F)],
                                                      whole.w_gate_up[:, seg(F, 2 * F)]], 1))
        assert torch.equal(part.wo, whole.wo[:, :, seg(0, q)])
        assert torch.equal(part.w_down, whole.w_down[:, :, seg(0, F)])
        assert torch.equal(part.head, whole.head[seg(0, V)])
        for name in ("embed", "attn_norm", "ffn_norm", "final_norm"):
            assert torch.equal(getattr(part, name), getattr(whole, name))
        if cfg.tied_head:                                                # a view of this rank's embedding rows
            assert part.head.data_ptr() == part.embed[seg(0, V)].data_ptr()
        local = sum(t.numel() for n, t in part.tensors().items() if not (cfg.tied_head and n == "head"))
        assert local < sum(t.numel() for n, t in whole.tensors().items() if not (cfg.tied_head and n == "head"))


# ---------------------------------------------------------------- gloo, 2 processes: tokens equal TP=1

def _runs(tiny_dirs) -> list[dict]:
    trained = [[int(i) for i in ids] for ids in
               (Engine.from_pretrained(TRAINED, backend="eager").encode(p + "\n") for p, _ in held_out(48))]
    runs = [dict(folder=str(TRAINED), policy=spec, prompts=trained,
                 options=dict(gen_length=8, steps=8, block_length=block))
            for spec in SPECS for block in (8, 4)]
    # int4 with groups of 32: the same groups on every rank as in one process (each rank quantizes its own
    # columns), so the same weights; int8's per-row scales of the row-parallel matrices are each rank's own
    runs += [dict(folder=str(TRAINED), policy=spec, prompts=trained, quantize=q,
                  options=dict(gen_length=8, steps=8, block_length=8))
             for spec in ("none", "dual-cache") for q in ({"quantize": "int4", "quantize_group": 32},
                                                          {"quantize": "int8"})]
    prompt = [[9, 10, 11, 12, 13, 14, 15], [20, 21, 22]]
    for family, folder in tiny_dirs.items():
        sampled = {"temperature": 0.8, "remasking": "random"} if family == "llada" else \
            {"alg": "maskgit_plus", "temperature": 0.8, "top_p": 0.9, "top_k": 20}
        for spec in SPECS:
            for opts in ({}, sampled):
                runs.append(dict(folder=str(folder), policy=spec, prompts=prompt,
                                 options=dict(gen_length=16, steps=16, block_length=8, seed=3, **opts)))
        runs.append(dict(folder=str(folder), forward=[5, 9, 10, 11, 12, 13, 14, 15, 2, 2, 2, 2]))
    return runs


def _tp1(runs: list[dict]) -> list:
    engines, out = {}, []
    for run in runs:
        quant = run.get("quantize", {})
        key = (run["folder"], run.get("backend", "eager"), run.get("device", "cpu"), json.dumps(quant))
        if key not in engines:
            engines[key] = Engine.from_pretrained(key[0], backend=key[1], device=key[2], **quant)
        eng = engines[key]
        if "forward" in run:
            with torch.inference_mode():
                out.append(forward(eng.weights, eng.cfg, torch.tensor([run["forward"]])).tolist())
        else:
            out.append(eng.generate(run["prompts"], policy=parse_policy(run["policy"]), **run["options"]).tokens)
    return out


def test_two_gloo_ranks_give_the_tokens_of_one_process(tiny_dirs, tmp_path):
    runs = _runs(tiny_dirs)
    (tmp_path / "runs.json").write_text(json.dumps(runs))
    torchrun([str(ROOT / "tests" / "tp_worker.py"), str(tmp_path / "runs.json"), str(tmp_path)], tmp_path)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert ranks[0] == ranks[1]                                  # the host plan and the tokens: identical ranks
    one = _tp1(runs)
    for run, got, want in zip(runs, ranks[0], one):
        if "forward" in run:
            torch.testing.assert_close(torch.tensor(got), torch.tensor(want), rtol=1e-5, atol=1e-5)
        elif run.get("quantize", {}).get("quantize") == "int8":     # other scales: judged by accuracy below
            continue
        else:
            assert got == want, (run["folder"], run["policy"], run["options"], run.get("quantize"))
    # the trained model's accuracy is then identical too (the same tokens); it is the shipped model's
    eng = Engine.from_pretrained(TRAINED, backend="eager")
    from dllm.perf.quality import answer
    answers = [a for _, a in held_out(48)]
    acc = [sum(answer(eng, ids) == a for ids, a in zip(toks, answers)) / len(answers)
           for run, toks in zip(runs, ranks[0]) if run["folder"] == str(TRAINED)]
    assert min(acc) >= 0.8, acc


@pytest.mark.cuda
def test_two_nccl_ranks_give_the_tokens_of_one_gpu(tmp_path):
    """On a node with 2 GPUs (make gpu-check's cuda-tests part runs it there): NCCL, CUDA graphs, every
    policy on the trained model, tokens equal one GPU's."""
    if torch.cuda.device_count() < 2:
        pytest.skip(f"needs 2 GPUs; this machine has {torch.cuda.device_count()}")
    eng = Engine.from_pretrained(TRAINED, backend="eager")
    prompts = [eng.encode(p + "\n") for p, _ in held_out(16)]
    runs = [dict(folder=str(TRAINED), policy=spec, prompts=prompts, backend="cudagraph", device="cuda",
                 options=dict(gen_length=8, steps=8, block_length=4)) for spec in SPECS]
    (tmp_path / "runs.json").write_text(json.dumps(runs))
    torchrun([str(ROOT / "tests" / "tp_worker.py"), str(tmp_path / "runs.json"), str(tmp_path)], tmp_path)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert ranks[0] == ranks[1] == _tp1(runs)


def test_dllm_generate_under_torchrun(tmp_path):
    """The documented launch: `torchrun --nproc-per-node 2 dllm generate --tp 2 ...`; rank 0 prints."""
    dllm = shutil.which("dllm", path=str(Path(sys.executable).parent))
    res = torchrun([dllm, "generate", "--model", str(TRAINED), "--tp", "2", "--prompt", "reverse 48213\n",
                    "--policy", "dllm-cache", "--backend", "eager"], tmp_path)
    assert res.stdout.strip().splitlines()[-1].strip() == "31284", res.stdout


# ---------------------------------------------------------------- real shapes on meta under TP=2

@pytest.fixture(scope="module")
def fake_group():
    """A two-rank fake process group in this process (torch's testing backend: collectives dispatch with
    their real signatures and shapes; nothing is sent)."""
    import torch.distributed as dist
    from torch.testing._internal.distributed.fake_pg import FakeStore
    if dist.is_initialized():
        pytest.skip("a process group is already started in this process")
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=2)
    yield dist.group.WORLD
    dist.destroy_process_group()


def meta_shard(family: str, group, n_layers: int | None = None):
    """Rank 0 of 2 of the real-dimension preset on meta: (the rank's config, its Weights)."""
    from test_capture_safety import PRESET
    preset = SHAPE_PRESETS[PRESET[family]]
    if n_layers is not None:
        preset = dataclasses.replace(preset, n_layers=n_layers)
    cfg, shard = parse_config(tiny_config(family, preset)), Shard(0, 2, group)
    lc = shard.local(cfg)
    d, q, kv, F, V, nL = cfg.d_model, lc.q_width, lc.kv_width, lc.mlp_hidden, cfg.vocab_size, cfg.n_layers

    def empty(*shape):
        return torch.empty(shape, device="meta", dtype=torch.bfloat16)
    return lc, Weights(embed=empty(V, d), attn_norm=empty(nL, d), wqkv=empty(nL, q + 2 * kv, d),
                       bqkv=empty(nL, q + 2 * kv) if cfg.qkv_bias else None, wo=empty(nL, d, q),
                       ffn_norm=empty(nL, d), w_gate_up=empty(nL, 2 * F, d), w_down=empty(nL, d, F),
                       final_norm=empty(d), head=empty(V // 2, d), shard=shard)


@pytest.mark.parametrize("family", ["llada", "dream"])
@pytest.mark.parametrize("policy_name", list(POLICIES))
def test_every_step_kind_is_capture_safe_under_tp2_at_real_shape(fake_group, family, policy_name):
    """The dispatch watcher of tests/test_capture_safety.py over every kind at the real shape, all layers,
    with rank 0's weights: no host read, no CPU tensor, no data-dependent shape; and the collectives are
    there (two all-reduces a layer, the head's gather), so the run is really the sharded one."""
    from test_capture_safety import REAL_SHAPE, StepWatch, meta_prepared

    class Collectives(StepWatch):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.seen.append(func.overloadpacket.__name__)
            return super().__torch_dispatch__(func, types, args, kwargs)
    cfg, w = meta_shard(family, fake_group)
    prep = meta_prepared(w, cfg, REAL_SHAPE, DecodeConfig.make(family), POLICIES[policy_name]())
    for kind in prep.policy.kinds:
        watch = Collectives()
        watch.seen = []
        with torch.inference_mode(), watch:
            prep.bodies[kind]()
        assert watch.seen.count("all_reduce") >= 2 * cfg.n_layers and "all_gather_into_tensor" in watch.seen, kind


@pytest.mark.parametrize("family", ["llada", "dream"])
def test_every_step_kind_compiles_as_one_graph_under_tp2(fake_group, family):
    """torch.compile(fullgraph=True) traces the functional collectives into every kind's one graph."""
    from test_capture_safety import REAL_SHAPE, SHORT, meta_prepared
    cfg, w = meta_shard(family, fake_group, SHORT)
    torch._dynamo.reset()
    with torch._dynamo.config.patch(recompile_limit=64, accumulated_recompile_limit=1 << 12):
        for policy_cls in POLICIES.values():
            prep = meta_prepared(w, cfg, REAL_SHAPE, DecodeConfig.make(family), policy_cls())
            for kind, body in prep.bodies.items():
                graphs = []

                def keep(gm, example_inputs):
                    graphs.append(gm)
                    return gm.forward
                torch.compile(body, fullgraph=True, dynamic=False, backend=keep)()
                ops = {str(n.target) for g in graphs for n in g.graph.nodes}
                assert any("all_reduce" in o for o in ops), (policy_cls.name, kind)
    torch._dynamo.reset()


def test_serve_under_torchrun_answers_as_one_process(tmp_path):
    """`torchrun --nproc-per-node 2 dllm serve --tp 2`: rank 0 serves, rank 1 follows every batch in lock
    step; batched and sampled requests get the answers of one process; Ctrl-C stops both ranks."""
    httpx = pytest.importorskip("httpx2")        # the HTTP client the openai package (the test extra) uses
    pytest.importorskip("uvicorn", reason="dllm serve needs the serve extra: pip install -e '.[serve]'")
    dllm = shutil.which("dllm", path=str(Path(sys.executable).parent))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "NO_PROXY": "127.0.0.1,localhost", "PYTHONWARNINGS": "ignore"}
    err = open(tmp_path / "serve.err", "w")
    proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                             dllm, "serve", "--model", str(TRAINED), "--tp", "2", "--port", "0", "--bucket", "32:8:8",
                             "--max-batch", "2", "--backend", "eager"], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=err, text=True, start_new_session=True)
    try:
        ready = proc.stdout.readline()
        assert "ready on http://127.0.0.1:" in ready, (tmp_path / "serve.err").read_text()[-3000:]
        url = "http://127.0.0.1:" + ready.split("http://127.0.0.1:")[1].split()[0] + "/v1/completions"
        eng = Engine.from_pretrained(TRAINED, backend="eager")
        asks = [dict(prompt="reverse 48213\n"), dict(prompt="sort 90417\n"),
                dict(prompt="sort 5531\n", temperature=0.7, seed=5)]
        want = [eng.generate(Request(a["prompt"], gen_length=8, steps=8, temperature=a.get("temperature", 0.0),
                                     seed=a.get("seed", 0))).text[0] for a in asks]
        import concurrent.futures as cf
        with cf.ThreadPoolExecutor(3) as pool:
            replies = list(pool.map(lambda a: httpx.post(url, json={"model": "arith-llada", "max_tokens": 8, **a},
                                                         timeout=120).json(), asks))
        got = [r.get("choices", [{}])[0].get("text", r) for r in replies]
        assert got == want and got[:2] == ["31284", "01479"]
    finally:
        os.killpg(proc.pid, signal.SIGINT)          # Ctrl-C in a terminal: torchrun and both ranks get it
        rc = proc.wait(timeout=90)
    log = (tmp_path / "serve.err").read_text()
    # both ranks end cleanly (rank 0 drains and ends rank 1); torchrun itself reports the signal it got
    # with its own SignalException traceback and exit status, which are not ours to change
    assert rc is not None and "stopped by SIGINT: every request finished" in log, log[-3000:]
    assert "dllm/" not in log.replace(str(TRAINED), "") and "apps/serve" not in log and "rank 0 is gone" not in log


def test_export_refuses_a_tensor_parallel_engine(tiny_dirs, tmp_path):
    from dllm.apps.export import write
    from dllm.runtime import RequestError
    folder = tiny_dirs["llada"]
    cfg = load_config(folder)
    eng = Engine(cfg, load_weights(folder, cfg, shard=Shard(1, 2)), folder=folder, backend="eager")
    with pytest.raises(RequestError, match=r"runs on one device.*rank 1 of a tensor-parallel group of 2"):
        write.export(eng, tmp_path / "pkg", prompt_bucket=8, gen_length=16, steps=16, block_length=8)
    assert not (tmp_path / "pkg").exists()
