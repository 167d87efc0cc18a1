"""The perf commands run end to end (on the tiny preset, so CI stays fast) and print what they claim."""
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


def test_report_prints_tables_and_updates_a_readme(capsys, tmp_path):
    from dllm.perf import report
    report.main(["--family", "dream", "--preset", "tiny", "--prompt-len", "8", "--gen-length", "8", "--steps", "8",
                 "--block-length", "4", "--policies", "none", "d2cache:k=4,attn_budget=4", "--backends", "eager",
                 "--iters", "2"])
    out = capsys.readouterr().out
    assert out.startswith("Measured on ") and "torch " in out and "no GPU" in out
    assert "| none | " in out and "| d2cache:k=4,attn_budget=4 | " in out and "| verify | " in out
    readme = tmp_path / "README.md"
    readme.write_text(f"# x\n{report.BEGIN}\nold\n{report.END}\nrest\n")
    report.update_readme("NEW TABLE", readme)
    assert readme.read_text() == f"# x\n{report.BEGIN}\nNEW TABLE\n{report.END}\nrest\n"


def test_dllm_bench_is_the_report(capsys):
    from dllm.runtime.cli import main
    assert main(["bench", "--family", "llada", "--preset", "tiny", "--prompt-len", "8", "--gen-length", "8",
                 "--steps", "8", "--block-length", "4", "--policies", "none", "--backends", "eager",
                 "--iters", "1"]) == 0
    assert "| none | " in capsys.readouterr().out
