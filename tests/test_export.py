"""Export round trip: `dllm export` packages run from Python and from the C++ runner (apps/export/cpp) give
the Python engine's tokens, for every policy and both families; damaged or inconsistent packages are
refused by both loaders with one line (PackageError / exit 2), never a crash."""
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dllm.apps import export as ex
from dllm.apps.export import package as ex_package
from dllm.apps.export import write as ex_write
from dllm.runtime import D2Cache, DllmCache, DualCache, NoCache, RequestError

ROOT = Path(__file__).resolve().parent.parent
POLICIES = [NoCache(), DllmCache(kp=5, kr=3, rho=0.25), D2Cache(k=4, attn_budget=3, attn_p=0.5), DualCache()]
PROMPTS = [[5, 9, 33], [10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21]]
SHAPE = dict(prompt_bucket=12, gen_length=16, steps=16, block_length=8)


@pytest.fixture(scope="session")
def runner():
    """Build apps/export/cpp once (the build folder is reused between test runs: a no-op when unchanged)."""
    missing = [t for t in ("cmake", "c++") if shutil.which(t) is None]
    if missing:
        pytest.skip(f"no {' or '.join(missing)} on this machine: the C++ runner cannot be built")
    try:
        return ex.build_runner(ROOT / "build" / "cpp")
    except RuntimeError as e:       # a CUDA build of torch without the CUDA toolkit cannot configure libtorch;
        if ("CUDA" in str(e) or "nvcc" in str(e)) and not torch.cuda.is_available():  # with a GPU: a failure
            pytest.skip(f"the C++ runner needs the CUDA toolkit with this CUDA build of torch: {str(e)[-300:]}")
        raise


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
    res = subprocess.run([sys.executable, "-m", "dllm.apps.main", "export", "--model", str(tiny_dirs["dream"]),
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


def test_aoti_package_holds_one_weight_copy(engines, aoti_packages):
    """Issue 12.8: the weights are stored once (weights.safetensors) and passed to every program; no
    program carries them as constants, so the package does not grow by a weight copy per step kind."""
    from torch._inductor import aoti_load_package
    wbytes = sum(t.numel() * t.element_size() for t in ex_write.weight_inputs(engines["llada"].weights).values())
    for policy in AOTI_POLICIES:
        pkg = aoti_packages[("llada", policy.name)]
        stored = (pkg / "weights.safetensors").stat().st_size
        assert wbytes <= stored <= wbytes + 16384
        for prog in (pkg / "aoti").iterdir():
            assert not [c for c in aoti_load_package(str(prog)).get_constant_fqns() if "w_" in c], prog.name


# ---------------------------------------------------------------- damaged packages: one line, exit 2

def _edit_line(rel, fn):
    """A tampering: replace the first line of PKG/rel that fn changes."""
    def tamper(pkg):
        lines = (pkg / rel).read_text().splitlines()
        for i, line in enumerate(lines):
            new = fn(line)
            if new != line:
                lines[i] = new
                break
        (pkg / rel).write_text("\n".join(lines) + "\n")
    return tamper


def _plan(**changes):
    def tamper(pkg):
        plan = json.loads((pkg / "plan.json").read_text())
        plan.update(changes)
        (pkg / "plan.json").write_text(json.dumps(plan))
    return tamper


def _write(rel, data: bytes):
    def tamper(pkg):
        (pkg / rel).write_bytes(data)
    return tamper


def _remove(rel):
    def tamper(pkg):
        (pkg / rel).unlink()
    return tamper


def _truncate(rel):
    def tamper(pkg):
        data = (pkg / rel).read_bytes()
        (pkg / rel).write_bytes(data[: len(data) // 2])
    return tamper


def _last_dim_plus_one(line):
    name, dtype, *dims = line.split()
    return " ".join([name, dtype, *dims[:-1], str(int(dims[-1]) + 1)]) if name == "st_conf" else line


def _float_to_half(line):
    return line.replace(" float32 ", " float16 ", 1) if line.startswith("st_conf ") else line


# (id, formats it applies to, tampering, rewrite the manifest so only the deeper checks can catch it)
TAMPERINGS = [
    ("state-shape", ["aoti"], _edit_line("state.txt", _last_dim_plus_one), True),
    ("state-dtype", ["aoti"], _edit_line("state.txt", _float_to_half), True),
    ("state-canvas", ["aoti"],
     _edit_line("state.txt", lambda ln: ln.replace("st_tokens int64 1 ", "st_tokens int64 1 9")), True),
    ("state-garbage", ["aoti"], _edit_line("state.txt", lambda ln: "x y z" if ln.startswith("st_step") else ln), True),
    ("state-unhashed", ["aoti"], _edit_line("state.txt", _last_dim_plus_one), False),
    ("plan-bucket", ["aoti", "torchscript"], _plan(prompt_bucket=16), True),
    ("plan-gen-length", ["aoti", "torchscript"], _plan(gen_length=32, block_length=16), True),
    ("plan-empty-plan", ["aoti", "torchscript"], _plan(plan=[]), True),
    ("plan-unknown-kind", ["aoti", "torchscript"], _plan(kinds=["full", "bogus"], plan=["bogus"] * 16), True),
    ("plan-vocab-string", ["aoti", "torchscript"], _plan(vocab_size="128"), True),
    ("plan-mask-outside", ["aoti", "torchscript"], _plan(mask_id=128), True),
    ("plan-format", ["aoti", "torchscript"], _plan(format="onnx"), True),
    ("plan-device-cuda", ["aoti", "torchscript"], _plan(device="cuda"), True),
    ("plan-state-names", ["aoti"], _plan(state_names=["st_tokens"]), True),
    ("plan-weights", ["aoti"], _plan(weights=[["w_embed", "float32", [7, 7]]]), True),
    ("plan-not-json", ["aoti", "torchscript"], _write("plan.json", b'{"format": "aoti", '), True),
    ("plan-a-list", ["aoti", "torchscript"], _write("plan.json", b"[1, 2]"), True),
    ("weights-truncated", ["aoti"], _truncate("weights.safetensors"), True),
    ("program-garbage", ["aoti"], _write("aoti/full.pt2", b"not a zip file"), True),
    ("program-garbage", ["torchscript"], _write("steps.pt", b"not a zip file"), True),
    ("program-missing", ["aoti"], _remove("aoti/full.pt2"), True),
    ("program-unhashed", ["torchscript"], _truncate("steps.pt"), False),
    ("extra-file", ["aoti", "torchscript"], _write("extra.so", b"\x7fELF"), False),
    ("manifest-missing", ["aoti", "torchscript"], _remove("manifest.txt"), False),
    ("manifest-garbage", ["aoti", "torchscript"], _write("manifest.txt", b"abc  plan.json\n"), False),
]
TAMPER_CASES = [pytest.param(fmt, fn, rehash, id=f"{fmt}-{name}") for name, fmts, fn, rehash in TAMPERINGS
                for fmt in fmts]


@pytest.fixture(scope="module")
def pristine(packages, aoti_packages):
    return {"torchscript": packages[("llada", "none")][0], "aoti": aoti_packages[("llada", "none")]}


def _tampered(pristine, fmt, fn, rehash, tmp_path):
    pkg = tmp_path / "pkg"
    shutil.copytree(pristine[fmt], pkg)
    fn(pkg)
    if rehash:
        ex_package.write_manifest(pkg)
    return pkg


@pytest.mark.parametrize("fmt,fn,rehash", TAMPER_CASES)
def test_python_loader_refuses_a_damaged_package(pristine, fmt, fn, rehash, tmp_path):
    pkg = _tampered(pristine, fmt, fn, rehash, tmp_path)
    with pytest.raises(RequestError) as err:             # PackageError is a RequestError
        mod, plan = ex.load(pkg)
        ex.run(mod, plan, PROMPTS[0])
    assert isinstance(err.value, ex.PackageError) and "\n" not in str(err.value)


@pytest.mark.parametrize("fmt,fn,rehash", TAMPER_CASES)
def test_cpp_runner_refuses_a_damaged_package(runner, pristine, fmt, fn, rehash, tmp_path):
    pkg = _tampered(pristine, fmt, fn, rehash, tmp_path)
    res = subprocess.run([str(runner), str(pkg), "5,9,33"], capture_output=True, text=True)
    assert res.returncode == 2, (res.returncode, res.stderr[-500:])
    assert res.stdout == "" and res.stderr.count("\n") == 1 and res.stderr.startswith("dllm_run: error: ")


@pytest.mark.cuda
def test_aoti_export_on_cuda_runs_on_cuda(tiny_dirs, tmp_path, runner):
    """Issue 12.2: a package exported with --device cuda allocates its state on the GPU in both loaders."""
    from dllm.runtime import Engine
    try:
        ex.check_cuda_toolkit()
    except RequestError as e:
        pytest.skip(str(e))
    eng = Engine.from_pretrained(tiny_dirs["llada"], device="cuda", backend="eager")
    ex.export(eng, tmp_path / "pkg", fmt="aoti", **SHAPE)
    want = eng.generate(PROMPTS[0], **SHAPE).tokens[0]
    mod, plan = ex.load(tmp_path / "pkg")
    assert plan["device"] == "cuda" and all(t.is_cuda for t in mod.state + mod.weights)
    assert ex.run(mod, plan, PROMPTS[0]) == want
    res = subprocess.run([str(runner), str(tmp_path / "pkg"), ",".join(map(str, PROMPTS[0]))],
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert [int(t) for t in res.stdout.split(",")] == want and "on cuda" in res.stderr


def test_aoti_cuda_export_needs_the_toolkit(tmp_path):
    """Issue 12.3: without nvcc (CUDA_HOME pointing nowhere) the check refuses with one line."""
    env = {**__import__("os").environ, "CUDA_HOME": str(tmp_path / "no-cuda"), "CUDA_PATH": str(tmp_path / "no-cuda")}
    res = subprocess.run([sys.executable, "-c", "from dllm.apps.export import check_cuda_toolkit as c\n"
                          "try:\n c()\nexcept Exception as e:\n print(type(e).__name__, e)"],
                         capture_output=True, text=True, env=env, cwd=ROOT)
    assert res.stdout.startswith("RequestError") and "CUDA toolkit" in res.stdout and res.stdout.count("\n") == 1


# ---------------------------------------------------------------- one package rule for both loaders

def _symlink_outside(pkg):
    outside = pkg.parent / "outside-plan.json"
    shutil.copy(pkg / "plan.json", outside)
    (pkg / "plan.json").unlink()
    (pkg / "plan.json").symlink_to(outside)             # same bytes, so the manifest still matches


def _self_loop(pkg):
    (pkg / "loop").symlink_to(pkg / "loop")


def _crlf(pkg):
    (pkg / "manifest.txt").write_bytes((pkg / "manifest.txt").read_bytes().replace(b"\n", b"\r\n"))


def _format_says_aoti(pkg):
    """A TorchScript package whose plan.json is an AOTI plan (state names, weights): only its files differ."""
    plan = json.loads((pkg / "plan.json").read_text())
    plan.update(format="aoti", state_names=["st_tokens"], weights=[["w_embed", "float32", [128, 64]]])
    (pkg / "plan.json").write_text(json.dumps(plan))


SAME_RULE = [  # (id, tampering, rewrite the manifest, what both loaders' one line says)
    ("symlink-outside", _symlink_outside, False, "is a symbolic link"),
    ("symlink-loop", _self_loop, False, "is a symbolic link"),
    ("manifest-crlf", _crlf, False, "carriage return (CRLF)"),
    ("format-mismatch", _format_says_aoti, True, "says format aoti, whose"),
]


@pytest.mark.parametrize("fn,rehash,needle", [pytest.param(*r[1:], id=r[0]) for r in SAME_RULE])
def test_both_loaders_hold_one_package_rule(runner, pristine, fn, rehash, needle, tmp_path):
    pkg = _tampered(pristine, "torchscript", fn, rehash, tmp_path)
    with pytest.raises(ex.PackageError, match="^[^\n]*" + needle.replace("(", r"\(").replace(")", r"\)")):
        mod, plan = ex.load(pkg)
    res = subprocess.run([str(runner), str(pkg), "5,9,33"], capture_output=True, text=True)
    assert res.returncode == 2 and res.stderr.count("\n") == 1 and needle in res.stderr, res.stderr[-300:]


def test_cpp_runner_refuses_arguments_it_does_not_use(runner, pristine):
    for extra in (["extra"], ["--repeat", "x"], ["--repeat", "2", "more"]):
        res = subprocess.run([str(runner), str(pristine["torchscript"]), "5,9,33", *extra], capture_output=True,
                             text=True)
        assert res.returncode == 2 and res.stderr.startswith("dllm_run: error: "), (extra, res.stderr)


# ---------------------------------------------------------------- quantized weights (models/quant.py)
# int8 / int4 weights are int8 / uint8 tensors in the same Weights: TorchScript holds them as buffers and
# AOTI takes them as inputs; PyTorch's weight-only ops are in libtorch, so the C++ runner runs them as is.

QUANT_POLICIES = [NoCache(), DllmCache(kp=5, kr=3, rho=0.25)]


@pytest.fixture(scope="module")
def quant_packages(tiny_dirs, tmp_path_factory):
    from dllm.runtime import Engine
    root = tmp_path_factory.mktemp("qpkg")
    out = {}
    for mode in ("int8", "int4"):
        eng = Engine.from_pretrained(tiny_dirs["llada"], quantize=mode, backend="eager")
        for p in QUANT_POLICIES:
            out[(mode, "torchscript", p.name)] = (eng, ex.export(eng, root / f"{mode}-{p.name}", policy=p, **SHAPE)
                                                  and root / f"{mode}-{p.name}")
        out[(mode, "aoti", "none")] = (eng, ex.export(eng, root / f"{mode}-aoti", policy=NoCache(), fmt="aoti",
                                                      **SHAPE) and root / f"{mode}-aoti")
    return out


@pytest.mark.parametrize("mode", ["int8", "int4"])
@pytest.mark.parametrize("fmt,policy", [("torchscript", p) for p in QUANT_POLICIES] + [("aoti", NoCache())],
                         ids=lambda x: getattr(x, "name", x))
def test_quantized_package_round_trip(runner, quant_packages, mode, fmt, policy):
    """A quantized engine's package gives its tokens from Python and from the C++ runner."""
    eng, pkg = quant_packages[(mode, fmt, policy.name)]
    plan = json.loads((pkg / "plan.json").read_text())
    if fmt == "aoti":
        assert {d for _, d, _ in plan["weights"]} >= {"int8" if mode == "int8" else "uint8"}
    mod, plan = ex.load(pkg)
    for prompt in PROMPTS:
        want = eng.generate(prompt, policy=policy, **SHAPE).tokens[0]
        assert ex.run(mod, plan, prompt) == want
        res = subprocess.run([str(runner), str(pkg), ",".join(map(str, prompt))], capture_output=True, text=True)
        assert res.returncode == 0, res.stderr
        assert [int(t) for t in res.stdout.strip().split(",")] == want
