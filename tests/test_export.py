"""Export round trip: `dllm export` packages run from Python and from the C++ runner (graphs/cpp) give
the Python engine's tokens, for every policy and both families."""
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from dllm.runtime import export as ex
from dllm.runtime import D2Cache, DllmCache, DualCache, NoCache, RequestError

ROOT = Path(__file__).resolve().parent.parent
POLICIES = [NoCache(), DllmCache(kp=5, kr=3, rho=0.25), D2Cache(k=4, attn_budget=3, attn_p=0.5), DualCache()]
PROMPTS = [[5, 9, 33], [10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21]]
SHAPE = dict(prompt_bucket=12, gen_length=16, steps=16, block_length=8)


@pytest.fixture(scope="session")
def runner():
    """Build graphs/cpp once (the build folder is reused between test runs: a no-op when unchanged)."""
    missing = [t for t in ("cmake", "c++") if shutil.which(t) is None]
    if missing:
        pytest.skip(f"no {' or '.join(missing)} on this machine: the C++ runner cannot be built")
    return ex.build_runner(ROOT / "build" / "cpp")


@pytest.fixture(scope="module")
def packages(engines, tmp_path_factory):
    root = tmp_path_factory.mktemp("pkg")
    return {(f, p.name): (root / f"{f}-{p.name}", ex.export(engines[f], root / f"{f}-{p.name}", policy=p, **SHAPE))
            for f in ("llada", "dream") for p in POLICIES}


def _expected(engines, family, policy, prompt):
    return engines[family].generate(prompt, policy=policy, **SHAPE).tokens[0]


@pytest.mark.parametrize("family", ["llada", "dream"])
@pytest.mark.parametrize("policy", POLICIES, ids=lambda p: p.name)
def test_python_loads_the_package(engines, packages, family, policy):
    pkg, info = packages[(family, policy.name)]
    assert info["plan"] == policy.plan(16, 8) and (pkg / "steps.pt").is_file()
    mod, plan = ex.load(pkg)
    for prompt in PROMPTS:
        assert ex.run(mod, plan, prompt) == _expected(engines, family, policy, prompt)


@pytest.mark.parametrize("family", ["llada", "dream"])
@pytest.mark.parametrize("policy", POLICIES, ids=lambda p: p.name)
def test_cpp_runner_matches_python(runner, engines, packages, family, policy):
    pkg, _ = packages[(family, policy.name)]
    for prompt in PROMPTS:
        res = subprocess.run([str(runner), str(pkg), ",".join(map(str, prompt))], capture_output=True, text=True)
        assert res.returncode == 0, res.stderr
        assert [int(t) for t in res.stdout.strip().split(",")] == _expected(engines, family, policy, prompt)
        assert "16 steps" in res.stderr and "ms/step" in res.stderr


@pytest.mark.parametrize("args,needle", [(["1,2,3,4,5,6,7,8,9,10,11,12,13"], "prompt bucket holds 12"),
                                         (["5,999"], "outside the vocabulary [0, 128)"),
                                         (["5,2"], "is the mask id"), (["5,x"], "comma-separated integers")])
def test_cpp_runner_rejects_bad_input(runner, packages, args, needle):
    pkg, _ = packages[("llada", "none")]
    res = subprocess.run([str(runner), str(pkg), *args], capture_output=True, text=True)
    assert res.returncode == 2 and needle in res.stderr and res.stdout == ""


def test_cpp_runner_rejects_a_non_package(runner, tmp_path):
    res = subprocess.run([str(runner), str(tmp_path), "5"], capture_output=True, text=True)
    assert res.returncode == 2 and "written by `dllm export`" in res.stderr


def test_export_refuses_what_it_cannot_carry(engines, tmp_path):
    with pytest.raises(RequestError, match="decode greedily"):
        ex.export(engines["llada"], tmp_path / "x", remasking="random", **SHAPE)
    with pytest.raises(RequestError, match="not a multiple of block_length"):
        ex.export(engines["llada"], tmp_path / "x", prompt_bucket=8, gen_length=16, steps=16, block_length=5)
    with pytest.raises(RequestError, match="unknown export format"):
        ex.export(engines["llada"], tmp_path / "x", fmt="onnx", **SHAPE)


def test_cli_export(tiny_dirs, tmp_path, engines):
    out = tmp_path / "pkg"
    res = subprocess.run([sys.executable, "-m", "dllm.runtime.cli", "export", "--model", str(tiny_dirs["dream"]),
                          "--out", str(out), "--prompt-bucket", "12", "--gen-length", "16", "--steps", "16",
                          "--block-length", "8", "--policy", "dllm-cache", "--kp", "5", "--kr", "3"],
                         capture_output=True, text=True, cwd=ROOT)
    assert res.returncode == 0, res.stderr
    assert "wrote" in res.stdout and "policy dllm-cache" in res.stdout
    mod, plan = ex.load(out)
    assert ex.run(mod, plan, PROMPTS[0]) == _expected(engines, "dream", DllmCache(kp=5, kr=3), PROMPTS[0])


# ---------------------------------------------------------------- AOTInductor packages (torch.export)
# kp 100 / kr 3 over 16 steps uses full, verify and response_refresh: 4 programs with fill, ~10 s each

AOTI_POLICIES = [NoCache(), DllmCache(kp=100, kr=3, rho=0.25)]


@pytest.fixture(scope="module")
def aoti_packages(engines, tmp_path_factory):
    root = tmp_path_factory.mktemp("aoti")
    out = {}
    for f in ("llada", "dream"):
        for p in AOTI_POLICIES:
            pkg = root / f"{f}-{p.name}"
            ex.export(engines[f], pkg, policy=p, fmt="aoti", **SHAPE)
            out[(f, p.name)] = pkg
    return out


@pytest.mark.parametrize("family", ["llada", "dream"])
@pytest.mark.parametrize("policy", AOTI_POLICIES, ids=lambda p: p.name)
def test_aoti_package_round_trip(runner, engines, aoti_packages, family, policy):
    pkg = aoti_packages[(family, policy.name)]
    assert sorted(p.name for p in (pkg / "aoti").iterdir()) == sorted(f"{k}.pt2" for k in
                                                                      ["fill", *set(policy.plan(16, 8))])
    progs, plan = ex.load(pkg)
    for prompt in PROMPTS:
        want = _expected(engines, family, policy, prompt)
        assert ex.run(progs, plan, prompt) == want                          # from Python
        res = subprocess.run([str(runner), str(pkg), ",".join(map(str, prompt))], capture_output=True, text=True)
        assert res.returncode == 0, res.stderr                              # from C++
        assert [int(t) for t in res.stdout.strip().split(",")] == want and "aoti, 16 steps" in res.stderr
