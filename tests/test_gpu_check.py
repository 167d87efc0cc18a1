"""`make gpu-check` (perf/gpu_check.py, docs/gpu.md) proven on the CPU: the dry run runs every part with CPU
stand-ins and writes what a GPU run writes; a part that raises, one that hangs past its cap and one that
crashes its process are each recorded while the others still report; the budget cuts parts short; `make
gpu-check` asks no registry and makes no venv; the C++ runner's CMake gets the CUDA toolkit's real root."""
import json
import os
import shutil
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

from dllm.perf import gpu_check
from dllm.perf.quality import CONFIGS

ROOT = Path(__file__).resolve().parent.parent
KINDS = {"none": 1, "dllm-cache": 4, "d2cache": 2, "dual-cache": 2}      # step kinds per policy


def dry_run(out: Path, *args: str):
    """(process, results.json, seconds) of one dry run into `out`."""
    t0 = time.perf_counter()
    res = subprocess.run([sys.executable, "-m", "dllm.perf.gpu_check", "--dry-run", "--out-dir", str(out), *args],
                         capture_output=True, text=True, timeout=300, cwd=ROOT)
    return res, json.loads((out / "results.json").read_text()), time.perf_counter() - t0


def summary_lines(stdout: str) -> list[str]:
    lines = stdout.strip().splitlines()
    return lines[max(i for i, line in enumerate(lines) if line.startswith("== gpu_check ")):]


@pytest.fixture(scope="module")
def full(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu-check")
    return (out, *dry_run(out))


def test_dry_run_runs_every_part_and_writes_what_a_gpu_run_writes(full):
    out, res, results, seconds = full
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert sorted(p.name for p in out.iterdir()) == ["log.txt", "report.md", "results.json"]
    status = {p["part"]: p["status"] for p in results["parts"]}
    assert status == {**dict.fromkeys(gpu_check.DEFAULT, "PASS"), "cpp-runner": "NOT RUN", "aoti": "NOT RUN"}
    assert list(status) == list(gpu_check.DEFAULT)                       # in the order of information per second
    assert all(p["why"].startswith("dry run: ") for p in results["parts"] if p["status"] == "NOT RUN")
    assert results["mode"] == "dry-run" and results["used_s"] < results["budget_s"] == 180
    assert results["env"]["torch"] and results["env"]["gpu"].startswith("none (dry run")

    rows = results["rows"]
    tables = Counter((r["part"], r["table"]) for r in rows)
    correctness = [r for r in rows if r["table"] == "correctness"]
    assert len(correctness) == len(CONFIGS) + len(gpu_check.PROMPT_REFRESH)
    assert all(r["graph≠eager"] == 0 and r["prompts"] == 4 for r in correctness)
    for part in ("llada-8b", "dream-7b"):
        latency = [r for r in rows if r["part"] == part and r["table"] == "latency"]
        assert Counter(r["policy"].split(":")[0] for r in latency) == KINDS, latency
        assert all(r["ms"] > 0 and r["x_weight_floor"] > 0 and r["x_compute_floor"] > 0 for r in latency)
        assert all(r["sdpa"].startswith("scaled_dot_product_") and r["sdpa"] != "scaled_dot_product_attention"
                   for r in latency)                                     # the kernel SDPA chose, not SDPA itself
        assert tables[(part, "e2e")] == 4 and tables[(part, "memory")] == 1 and tables[(part, "peaks")] == 1
    tp = [r for r in rows if r["table"] == "tp-prediction"]                # from the peaks llada-8b measured
    assert [(r["part"], r["policy"]) for r in tp] == [("llada-8b", n) for n in ("none", "dllm-cache", "d2cache",
                                                                                 "dual-cache")]
    assert all(r["tp1_ms"] > r["tp2_ms"] > r["tp4_ms"] > r["tp8_ms"] > 0 for r in tp)
    assert Counter(r["outcome"] for r in rows if r["part"] == "cuda-tests") == {"passed": 1, "skipped": 1}
    assert tables[("compile-tiny", "latency")] == 2 * sum(KINDS.values())

    report = (out / "report.md").read_text()
    for o in results["parts"]:
        assert f"## {o['part']}: {o['status']}" in report
    assert "### latency" in report and "### e2e" in report and "### correctness" in report
    log = (out / "log.txt").read_text()
    assert all(f"===== part {p}: timeout" in log for p in gpu_check.DEFAULT) and "--tb=long" in log

    summary = summary_lines(res.stdout)                                  # the last lines tell what happened
    assert summary[0].startswith("== gpu_check DRY RUN on the CPU") and "torch " in summary[1]
    assert summary[-1] == "== 6 PASS · 0 FAIL · 0 TIMED OUT · 2 NOT RUN =="
    assert [line.split()[0] for line in summary[3:-1]] == list(gpu_check.DEFAULT)
    assert len(summary) <= 20 and all(len(line) <= 200 for line in summary)
    assert report.rstrip().endswith("```") and summary[-1] in report


def test_a_part_that_raises_hangs_or_crashes_is_recorded_and_the_others_still_report(tmp_path):
    res, results, seconds = dry_run(tmp_path, "--part", "fault-raise", "fault-hang", "fault-poison", "env")
    assert res.returncode == 1                                           # a part failed: the run says so
    parts = {p["part"]: p for p in results["parts"]}
    assert parts["fault-raise"]["status"] == "FAIL"
    assert parts["fault-raise"]["why"] == "RuntimeError: a part that raises (dry-run fault)"
    assert "Traceback" in parts["fault-raise"]["tail"] and "in fault_raise" in parts["fault-raise"]["tail"]

    hang = parts["fault-hang"]                                           # killed at its cap, its child too
    assert hang["status"] == "TIMED OUT" and hang["timeout_s"] == gpu_check.PARTS["fault-hang"].cap_s
    assert hang["seconds"] < hang["timeout_s"] + 2 * gpu_check.GRACE_S
    assert "s) in fault_hang (perf/gpu_check.py:" in hang["why"]        # where it was when killed
    assert "in fault_hang" in hang["tail"]                               # where it hung (faulthandler on SIGTERM)
    worker = next(r["worker_pid"] for r in results["rows"] if r["part"] == "fault-hang")
    assert not running(worker)

    poison = parts["fault-poison"]
    assert poison["status"] == "FAIL" and poison["why"].startswith("killed by SIGSEGV in fault_poison (perf/")
    assert "Segmentation fault" in poison["tail"]
    assert {r["part"] for r in results["rows"] if r["table"] == "fault"} == set(gpu_check.FAULTS)  # rows kept

    assert parts["env"]["status"] == "PASS" and any(r["part"] == "env" for r in results["rows"])
    summary = summary_lines(res.stdout)
    assert summary[-1] == "== 1 PASS · 2 FAIL · 1 TIMED OUT · 0 NOT RUN =="
    assert any(line.startswith("fault-hang    TIMED OUT") for line in summary)
    report = (tmp_path / "report.md").read_text()
    assert "## fault-poison: FAIL" in report and "Segmentation fault" in report


def running(pid: int) -> bool:
    """Whether pid is a live process (a zombie waiting for its reaper is not)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_the_budget_cuts_a_part_short_and_leaves_the_rest_not_run(tmp_path):
    res, results, seconds = dry_run(tmp_path, "--part", "fault-hang", "env", "--budget-minutes", "0.095")
    hang, env = results["parts"]
    assert hang["status"] == "TIMED OUT" and hang["timeout_s"] < gpu_check.PARTS["fault-hang"].cap_s
    assert hang["timeout_s"] == pytest.approx(5.7, abs=0.3)             # min(its 6 s cap, the 5.7 s budget left)
    assert env["status"] == "NOT RUN" and env["why"].startswith("budget spent")
    assert seconds < 5.7 + 2 * gpu_check.GRACE_S + 10                   # the whole run, interpreter starts included


def test_fault_parts_are_refused_outside_a_dry_run(capsys):
    with pytest.raises(SystemExit) as e:
        gpu_check.main(["--part", "fault-raise"])
    assert e.value.code == 2 and "only with --dry-run" in capsys.readouterr().err


def test_make_gpu_check_asks_no_registry_and_makes_no_venv(tmp_path):
    if shutil.which("make") is None:
        pytest.skip("no make on this machine")
    # CI runs the suite inside `make test`: a clean environment keeps the outer make's MAKEFLAGS/MAKELEVEL out
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MAKE", "MFLAGS"))}
    res = subprocess.run(["make", "-n", "--no-print-directory", "gpu-check", "GPU_PYTHON=/opt/torch/.venv/bin/python3",
                          f"VENV={tmp_path / 'never'}"], cwd=ROOT, capture_output=True, text=True, env=env)
    assert res.returncode == 0, res.stderr
    assert res.stdout.splitlines() == [             # the whole recipe: no venv, no index, nothing but the project
        "/opt/torch/.venv/bin/python3 -m pip install -q --disable-pip-version-check --no-deps --no-build-isolation "
        "--no-index -e .",
        "/opt/torch/.venv/bin/python3 -m dllm.perf.gpu_check"]
    default = subprocess.run(["make", "-n", "--no-print-directory", "gpu-check"], cwd=ROOT, capture_output=True,
                             text=True, env=env).stdout
    assert default.startswith("python3 -m pip install") and "venv" not in default


def test_the_runner_cmake_gets_the_toolkit_root_behind_an_nvcc_wrapper_and_the_wheels_nvrtc(tmp_path, monkeypatch):
    """An nvcc wrapper script in a bin/ of its own (as /usr/local/bin/nvcc -> a toolkit assembled from
    wheels) makes CMake's FindCUDA take that bin's parent for the toolkit root; the root is where nvcc
    says it lives. A toolkit without libnvrtc gets the torch wheel's."""
    from dllm.apps.export import build
    root = tmp_path.resolve() / "cuda-13.0"
    for d in ("include", "bin", "lib"):
        (root / d).mkdir(parents=True)
    (root / "include" / "cuda_runtime.h").write_text("")
    nvcc = root / "bin" / "nvcc"
    nvcc.write_text(f'#!/bin/sh\necho "#$ TOP={root}/bin/.." >&2\n')
    wrapper = tmp_path / "local" / "bin" / "nvcc"
    wrapper.parent.mkdir(parents=True)
    wrapper.write_text(f'#!/bin/sh\nexec {nvcc} "$@"\n')
    for f in (nvcc, wrapper):
        f.chmod(0o755)
    lib = tmp_path / "site" / "nvidia" / "cu13" / "lib"
    lib.mkdir(parents=True)
    for name in ("libnvrtc-builtins.so.13", "libnvrtc.so.13"):
        (lib / name).write_text("")
    monkeypatch.delenv("CUDA_HOME", raising=False)
    monkeypatch.delenv("CUDA_PATH", raising=False)
    monkeypatch.setenv("PATH", f"{wrapper.parent}{os.pathsep}{os.environ['PATH']}")
    assert build.cuda_root() == root
    nvrtc = lib / "libnvrtc.so.13"
    assert build.cuda_cmake_flags(tmp_path / "site") == [
        f"-DCUDA_TOOLKIT_ROOT_DIR={root}", f"-DCUDAToolkit_ROOT={root}", f"-DCMAKE_CUDA_COMPILER={nvcc}",
        f"-DCUDA_nvrtc_LIBRARY={nvrtc}", f"-DCUDA_NVRTC_LIB={nvrtc}"]
    (root / "lib" / "libnvrtc.so").write_text("")                        # the toolkit's own: CMake finds it
    assert not any("nvrtc" in f for f in build.cuda_cmake_flags(tmp_path / "site"))
    monkeypatch.setenv("CUDA_HOME", str(root))                           # an explicit root wins
    assert build.cuda_root() == root


def test_dry_run_of_the_quantized_part(tmp_path):
    """`--part quantized` (not in the default run): every step kind with bf16, int8 and int4 weights, each
    row tagged with its mode and timed against the floor of its own weight bytes (smaller when quantized)."""
    res, results, _ = dry_run(tmp_path, "--part", "quantized")
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    assert [p["status"] for p in results["parts"]] == ["PASS"]
    rows = [r for r in results["rows"] if r["table"] == "latency"]
    modes = Counter(r.get("quantize", "none") for r in rows)
    assert set(modes) == {"none", "int8", "int4"} and len(set(modes.values())) == 1 and "error" not in str(rows)
    weight = {r.get("quantize", "none"): r["weight_gb"] for r in results["rows"] if r["table"] == "peaks"}
    assert weight["int4"] < weight["int8"] < weight["none"]
