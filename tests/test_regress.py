"""The latency gate's logic on synthetic pytest-benchmark JSON."""
import json
from pathlib import Path

import pytest

from dllm.perf import regress

ROOT = Path(__file__).resolve().parent.parent


def bench_file(path, medians: dict, iqr=0.001, machine=None):
    data = {"machine_info": machine or {"node": "runner-1", "cpu_brand": "x"}, "benchmarks": [
        {"fullname": name, "name": name, "stats": {"median": m, "iqr": iqr, "min": m, "mean": m}}
        for name, m in medians.items()]}
    path.write_text(json.dumps(data))
    return str(path)


def gate(capsys, tmp_path, base, cur, *extra, base_iqr=0.001):
    b = bench_file(tmp_path / "base.json", base, iqr=base_iqr)
    c = bench_file(tmp_path / "cur.json", cur)
    rc = regress.main(["--baseline", b, "--current", c, *extra])
    return rc, capsys.readouterr()


def test_unchanged_passes(capsys, tmp_path):
    rc, out = gate(capsys, tmp_path, {"a": 0.100, "b": 0.050}, {"a": 0.101, "b": 0.050})
    assert rc == 0 and "0 regressed of 2 compared" in out.out


def test_slowdown_beyond_limit_and_noise_fails(capsys, tmp_path):
    rc, out = gate(capsys, tmp_path, {"a": 0.100, "b": 0.050}, {"a": 0.110, "b": 0.050})
    assert rc == 1
    row = next(line for line in out.out.splitlines() if line.startswith("a "))
    assert "REGRESSED" in row and "+10.0%" in row and "100.000" in row and "110.000" in row


def test_slowdown_inside_the_baseline_spread_passes(capsys, tmp_path):
    # +10 % but the baseline itself varied by 20 ms (IQR): not evidence of a regression
    rc, out = gate(capsys, tmp_path, {"a": 0.100}, {"a": 0.110}, base_iqr=0.020)
    assert rc == 0 and "REGRESSED" not in out.out


def test_slowdown_below_the_limit_passes(capsys, tmp_path):
    rc, _ = gate(capsys, tmp_path, {"a": 0.100}, {"a": 0.104}, base_iqr=0.0)
    assert rc == 0
    rc, _ = gate(capsys, tmp_path, {"a": 0.100}, {"a": 0.104}, "--max-slowdown", "3%", base_iqr=0.0)
    assert rc == 1


def test_faster_new_and_missing(capsys, tmp_path):
    rc, out = gate(capsys, tmp_path, {"a": 0.100, "gone": 0.1}, {"a": 0.050, "added": 0.2})
    assert rc == 0
    verdicts = {line.split()[0]: line.split()[-1] for line in out.out.splitlines()[1:-1]}
    assert verdicts == {"a": "faster", "added": "new", "gone": "missing"}
    rc, _ = gate(capsys, tmp_path, {"a": 0.100, "gone": 0.1}, {"a": 0.050}, "--strict")
    assert rc == 1


def test_other_machine_is_noted(capsys, tmp_path):
    b = bench_file(tmp_path / "b.json", {"a": 0.1}, machine={"node": "h100-runner", "gpu": "H100"})
    c = bench_file(tmp_path / "c.json", {"a": 0.1}, machine={"node": "laptop", "gpu": None})
    assert regress.main(["--baseline", b, "--current", c]) == 0
    assert "different machines (node, gpu)" in capsys.readouterr().out


@pytest.mark.parametrize("content,needle", [(None, "no such file"), ("{", "not JSON"),
                                            ('{"x": 1}', "not a pytest-benchmark JSON"),
                                            ('{"benchmarks": [{"name": "a"}]}', "without fullname")])
def test_unusable_input_exits_2(capsys, tmp_path, content, needle):
    good = bench_file(tmp_path / "good.json", {"a": 0.1})
    bad = tmp_path / "bad.json"
    if content is not None:
        bad.write_text(content)
    assert regress.main(["--baseline", str(bad), "--current", good]) == 2
    assert needle in capsys.readouterr().err


def test_bad_slowdown(capsys, tmp_path):
    good = bench_file(tmp_path / "good.json", {"a": 0.1})
    assert regress.main(["--baseline", good, "--current", good, "--max-slowdown", "five"]) == 2
    assert regress.parse_slowdown("5%") == pytest.approx(0.05) and regress.parse_slowdown("0.1") == 0.1


# ---------------------------------------------------------------- recording never clobbers a baseline

def test_record_from_a_run_then_refuses_to_overwrite(capsys, tmp_path):
    run = bench_file(tmp_path / "run.json", {"a": 0.100})
    assert regress.record("gpu-x", "", source=run, folder=tmp_path / "baselines") == 0
    recorded = tmp_path / "baselines" / "gpu-x.json"
    assert json.loads(recorded.read_text())["benchmarks"][0]["stats"]["median"] == 0.100
    slower = bench_file(tmp_path / "slower.json", {"a": 0.200})
    with pytest.raises(regress.GateError, match="exists: it is the baseline .* --force"):
        regress.record("gpu-x", "", source=slower, folder=tmp_path / "baselines")
    assert json.loads(recorded.read_text())["benchmarks"][0]["stats"]["median"] == 0.100   # untouched
    # the gate still judges the slower run against the original baseline
    assert regress.main(["--baseline", str(recorded), "--current", slower]) == 1
    assert regress.record("gpu-x", "", force=True, source=slower, folder=tmp_path / "baselines") == 0
    assert json.loads(recorded.read_text())["benchmarks"][0]["stats"]["median"] == 0.200


def test_record_refuses_an_unusable_run(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text('{"x": 1}')
    with pytest.raises(regress.GateError, match="not a pytest-benchmark JSON"):
        regress.record("gpu-x", "", source=str(bad), folder=tmp_path)
    assert not (tmp_path / "gpu-x.json").exists()


def test_record_over_the_committed_baseline_exits_2_without_running(capsys):
    committed = regress.BASELINES / "cpu-dev-tiny.json"
    before = committed.read_bytes()
    assert regress.main(["--record", "cpu-dev-tiny", "--pytest-args", "--backends eager"]) == 2
    assert "exists" in capsys.readouterr().err and committed.read_bytes() == before


def suite_benchmarks() -> set[str]:
    """Every benchmark perf/test_latency.py can run: presets x policies x backends (x step kinds)."""
    from dllm.graphs import BACKENDS
    from dllm.perf.conftest import POLICIES, SHAPES
    steps = {f"perf/test_latency.py::test_step[{pr}-{po}-{b}-{k}]" for pr in SHAPES for po, pol in POLICIES.items()
             for b in BACKENDS for k in pol.kinds}
    e2e = {f"perf/test_latency.py::test_e2e[{pr}-{po}-{b}]" for pr in SHAPES for po in POLICIES for b in BACKENDS}
    return steps | e2e


def test_committed_baselines_name_only_benchmarks_that_exist():
    """A baseline that names a benchmark the suite no longer has (a renamed step kind) gates nothing for
    it, silently: every committed baseline names only what the suite runs."""
    names = suite_benchmarks()
    assert "perf/test_latency.py::test_step[tiny-d2cache-eager-selected]" in names       # the checker can see
    assert "perf/test_latency.py::test_step[tiny-d2cache-eager-verify]" not in names     # ... and refuse
    for path in sorted((ROOT / "perf" / "baselines").glob("*.json")):
        stale = sorted(set(regress.load(path)["benchmarks"]) - names)
        assert not stale, f"{path.name} names benchmarks the suite does not have: {stale}"
