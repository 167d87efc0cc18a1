"""The perf commands run end to end (on the tiny preset, so CI stays fast) and print what they claim."""
import pytest
import torch

from dllm.perf import e2e, steps


def test_e2e_prints_a_row_per_policy(capsys):
    e2e.main(["--preset", "tiny", "--prompt-len", "12", "--gen-length", "16", "--steps", "16", "--block-length", "8",
              "--repeats", "1", "--policies", "none", "dllm-cache:kp=1,kr=1,rho=0.25", "dllm-cache:kp=4,kr=2,rho=0.5",
              "d2cache:k=4,attn_budget=4", "dual-cache:threshold=0.5"])
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].startswith("# llada preset=tiny") and "P=12 G=16" in lines[0]
    rows = {line.split()[0]: line.split() for line in lines[2:]}
    assert set(rows) == {"none", "dllm-cache:kp=1,kr=1,rho=0.25", "dllm-cache:kp=4,kr=2,rho=0.5",
                         "d2cache:k=4,attn_budget=4", "dual-cache:threshold=0.5"}
    assert "block=" in " ".join(rows["dual-cache:threshold=0.5"])
    assert rows["dllm-cache:kp=1,kr=1,rho=0.25"][4] == "100.0%"      # refresh every step: NoCache's tokens
    assert "verify=8" in " ".join(rows["dllm-cache:kp=4,kr=2,rho=0.5"])


def test_steps_prints_every_kind(capsys):
    steps.main(["--preset", "tiny", "--prompt-len", "12", "--gen-length", "16", "--block-length", "8", "--iters", "2"])
    out = capsys.readouterr().out
    for kind in ("full", "response_refresh", "verify", "prompt_refresh"):
        assert f"\n{kind} " in out


def test_cpp_vs_python_prints_ratios(capsys):
    import shutil

    import pytest
    if shutil.which("cmake") is None:
        pytest.skip("no cmake: the C++ runner cannot be built")
    from dllm.perf import cpp
    cpp.main(["--preset", "tiny", "--prompt-len", "8", "--gen-length", "8", "--steps", "8", "--block-length", "4",
              "--formats", "torchscript", "--repeat", "1"])
    rows = [line.split() for line in capsys.readouterr().out.strip().splitlines()[2:]]
    assert [r[0] for r in rows] == ["none", "dllm-cache:kp=100,kr=7,rho=0.25"]
    assert all(r[1] == "torchscript" and r[-1] == "True" and r[5].endswith("x") for r in rows)


def machine_words() -> str:
    """What the report's first line must say about this machine's GPU."""
    return f", GPU {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ", no GPU"


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
def test_report_prints_tables_and_updates_a_readme(capsys, tmp_path, device):
    from dllm.perf import report
    report.main(["--family", "dream", "--preset", "tiny", "--prompt-len", "8", "--gen-length", "8", "--steps", "8",
                 "--block-length", "4", "--policies", "none", "d2cache:k=4,attn_budget=4", "--backends", "eager",
                 "--iters", "2", "--device", device])
    out = capsys.readouterr().out
    first = out.splitlines()[0]
    assert first.startswith("Measured on ") and "torch " in first and machine_words() in first
    assert ("no GPU" in first) == (not torch.cuda.is_available())
    assert ("partial-step floor (weights + cache" in out) == (device == "cuda")
    assert "| none | " in out and "| d2cache:k=4,attn_budget=4 | " in out and "| verify | " in out
    readme = tmp_path / "README.md"
    readme.write_text(f"# x\n{report.BEGIN}\nold\n{report.END}\nrest\n")
    report.update_docs("NEW TABLE", readme)
    assert readme.read_text() == f"# x\n{report.BEGIN}\nNEW TABLE\n{report.END}\nrest\n"


def test_dllm_bench_is_the_report(capfd):     # capfd: the CLI may run perf.report as its own process
    from dllm.apps.main import main
    assert main(["bench", "--family", "llada", "--preset", "tiny", "--prompt-len", "8", "--gen-length", "8",
                 "--steps", "8", "--block-length", "4", "--policies", "none", "--backends", "eager",
                 "--iters", "1"]) == 0
    assert "| none | " in capfd.readouterr().out


@pytest.mark.parametrize("module", ["e2e", "cpp"])
def test_shape_presets_are_refused_off_cuda_in_one_line(module):
    import importlib
    main = importlib.import_module(f"dllm.perf.{module}").main
    with pytest.raises(SystemExit) as e:
        main(["--preset", "llada-8b-shape", "--device", "cpu"])
    msg = str(e.value.code)
    assert "\n" not in msg and "llada-8b-shape has real dimensions" in msg and "--device cuda" in msg


def test_e2e_runs_in_the_requested_dtype(capsys):
    e2e.main(["--preset", "tiny", "--family", "dream", "--dtype", "bfloat16", "--prompt-len", "8", "--gen-length", "8",
              "--steps", "8", "--repeats", "1", "--policies", "none", "dual-cache"])
    lines = capsys.readouterr().out.strip().splitlines()
    assert "dtype=bfloat16" in lines[0] and len(lines) == 4


def test_gpu_check_says_no_gpu_in_one_line_and_exits_0(capsys, tmp_path):
    from dllm.perf import gpu_check
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: `make gpu-check` is the real run")
    assert gpu_check.main(["--out-dir", str(tmp_path / "out")]) == 0
    out = capsys.readouterr()
    assert out.out.strip() == gpu_check.NO_GPU and "\n" not in out.out.strip() and out.err == ""
    assert out.out.startswith("no GPU") and not (tmp_path / "out").exists()


def test_gpu_check_names():
    from dllm.perf import gpu_check
    assert gpu_check.slug("NVIDIA H100 80GB HBM3") == "nvidia-h100-80gb-hbm3"
    # the baseline gpu_check records is the suite the GPU workflow gates on
    workflow = (gpu_check.ROOT / ".github" / "workflows" / "gpu-latency.yml").read_text()
    assert gpu_check.GATE_SUITE in " ".join(workflow.replace("\\\n", " ").split())


@pytest.mark.parametrize("family,share", [("llada", (0.04, 0.07)), ("dream", (0.02, 0.05))])
def test_partial_step_floor_adds_the_cache(family, share):
    """The partial-step floor counts the K/V/A/M cache a partial step reads besides the weights: at the
    real shapes (bf16, P=512, G=256; cache on meta tensors) a few percent on top of the weights."""
    from dllm.models.checkpoint import checkpoint_names
    from dllm.models.config import parse_config
    from dllm.models.tiny import SHAPE_PRESETS, tiny_config
    from dllm.perf.steps import Floor, nbytes
    from dllm.runtime.state import Cache, RequestShape
    preset = {"llada": "llada-8b-shape", "dream": "dream-7b-shape"}[family]
    cfg = parse_config(tiny_config(family, SHAPE_PRESETS[preset]))
    weight_bytes = sum(2 * torch.Size(shape).numel() for field, _layer, _rows, shape in checkpoint_names(cfg).values()
                       if field != "embed")                                    # bf16: 2 bytes
    cache = Cache.allocate(cfg, RequestShape(1, 512, 256, 32, 256), "meta", torch.bfloat16)
    floor = Floor(weight_bytes, nbytes(cache.tensors().values()), bandwidth=3.0e12)
    assert share[0] < floor.cache_bytes / floor.weight_bytes < share[1]
    assert floor.partial_s == pytest.approx((floor.weight_bytes + floor.cache_bytes) / 3.0e12)
    assert floor.partial_s > floor.weights_s
    text = floor.describe()
    assert "weights only" in text and "weights + cache" in text and "3.00 TB/s measured" in text


def test_serve_load_prints_the_throughput_table(capsys):
    pytest.importorskip("uvicorn")
    pytest.importorskip("openai")
    from dllm.perf import serve_load
    assert serve_load.main(["--requests", "4", "--rounds", "1", "--clients", "2", "--batches", "1", "2"]) == 0
    out = capsys.readouterr().out
    assert "every answer equal to the same request run alone: yes" in out
    assert "| 2 | 1 |" in out and "| 2 | 2 |" in out and "H200" in out


def test_quant_prints_memory_agreement_every_kind_and_e2e(capsys):
    """perf.quant on the tiny preset: a memory row per mode (quantized smaller than bf16, fp32 twice it),
    agreement per policy (fp32 against bf16 is a float rounding question; dLLM-Cache refreshing every
    step has NoCache's tokens in every mode, so its agreement equals NoCache's), every kind of every
    policy timed in every mode, and an end-to-end row per policy."""
    from dllm.perf import quant
    quant.main(["--preset", "tiny", "--prompt-len", "12", "--gen-length", "16", "--block-length", "8", "--iters", "1",
                "--repeats", "1", "--policies", "none", "dllm-cache:kp=1,kr=1,rho=0.25", "dual-cache", "--head"])
    out = capsys.readouterr().out
    mem = {line.split("|")[1].strip(): float(line.split("|")[3].strip()[:-1]) for line in out.splitlines()
           if line.startswith("| ") and line.count("|") == 4 and "×" in line}
    assert mem["fp32"] == 2.0 and mem["bf16"] == 1.0 and mem["int4+head"] < mem["int4"] < mem["int8"] < 1.0
    agree = {line.split("|")[1].strip(): line.split("|")[2:-1] for line in out.split("Greedy tokens")[1]
             .split("Every step kind")[0].splitlines() if line.startswith("| ") and "%" in line}
    assert agree["none"] == agree["dllm-cache:kp=1,kr=1,rho=0.25"]
    kinds = out.split("Every step kind")[1].split("End to end")[0]
    for kind in ("| none | full |", "| dual-cache | block |", "| dllm-cache:kp=1,kr=1,rho=0.25 | verify |"):
        assert kind in kinds
    assert out.split("End to end")[1].count("\n| ") == 3 + 1               # header + 3 policies


def test_quant_kernels_table(capsys):
    from dllm.perf import quant
    quant.main(["--preset", "tiny", "--kernels"])
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith(("| 16 ", "| 320 "))]
    assert len(rows) == 4 and all(len(r.split("|")) == 7 for r in rows)


@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="this torch has no oneDNN")
def test_roofline_prints_plain_and_prepacked_rows(capsys):
    from dllm.perf import roofline
    roofline.main(["--preset", "tiny", "--prompt-len", "12", "--gen-length", "16", "--block-length", "8",
                   "--iters", "1", "--policies", "none", "dllm-cache:kp=4,kr=2,rho=0.25", "--prepack", "both"])
    out = capsys.readouterr().out.splitlines()
    rows = [line.split(" | ") for line in out if line.startswith("| ") and "ms" not in line]
    labels = {(r[0].lstrip("| "), r[1]) for r in rows}
    for variant in ("plain", "prepacked"):
        assert (f"none ({variant})", "full") in labels and (f"dllm-cache ({variant})", "verify") in labels


@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="this torch has no oneDNN")
def test_gemm_prints_every_matrix_and_path(capsys):
    from dllm.perf import gemm
    gemm.main(["--preset", "tiny", "--rows", "8", "16", "--iters", "1"])
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ")]
    assert "onednn packed" in lines[0]
    body = lines[1:]
    assert {line.split(" | ")[0][2:] for line in body} == {"wqkv", "wo", "w_gate_up", "w_down", "head"}
    assert len(body) == 10 and all(cell.count("x)") == 1 for line in body for cell in line.split(" | ")[3:])
