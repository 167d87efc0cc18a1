"""Latency-regression gate over pytest-benchmark JSON.

    python -m dllm.perf.regress --baseline perf/baselines/cpu-tiny.json --current run.json --max-slowdown 5%
    python -m dllm.perf.regress --record cpu-tiny [--pytest-args "--presets tiny --backends eager"] [--force]
    python -m dllm.perf.regress --record h100 --from run.json [--force]

Compares the median of every benchmark present in both files. Noise rule: a benchmark regresses only
if its median is slower than the baseline median by more than --max-slowdown AND the slowdown in
seconds exceeds the baseline's interquartile range (a change inside the baseline's own spread is not
evidence). Prints one table row per benchmark; exit status 1 if any regressed, 2 on unusable input,
0 otherwise. Benchmarks only in one file are listed (new / missing) and do not fail the gate unless
--strict. --record runs the benchmark suite and writes perf/baselines/<name>.json (--from FILE adopts
an existing run instead, e.g. a CI job's first run); it refuses to overwrite a baseline without --force,
so the committed baseline is never silently replaced by the run it is meant to judge.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BASELINES = ROOT / "perf" / "baselines"


class GateError(ValueError):
    pass


@dataclass
class Row:
    name: str
    base: float | None      # median seconds
    cur: float | None
    iqr: float | None       # the baseline's interquartile range, seconds
    verdict: str            # ok | REGRESSED | faster | new | missing

    @property
    def change(self) -> float | None:
        return None if self.base is None or self.cur is None else self.cur / self.base - 1


def parse_slowdown(text: str) -> float:
    try:
        v = float(text[:-1]) / 100 if text.endswith("%") else float(text)
    except ValueError:
        raise GateError(f"--max-slowdown takes a percentage like 5% or a fraction like 0.05, got {text!r}") from None
    if v < 0:
        raise GateError(f"--max-slowdown must be >= 0, got {text!r}")
    return v


def load(path: str | Path) -> dict:
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise GateError(f"{path}: no such file; record a baseline with `python -m dllm.perf.regress --record NAME`") \
            from None
    except json.JSONDecodeError as e:
        raise GateError(f"{path}: not JSON ({e})") from None
    if not isinstance(data, dict) or not isinstance(data.get("benchmarks"), list):
        raise GateError(f"{path}: not a pytest-benchmark JSON file (no 'benchmarks' list); write one with "
                        f"`pytest perf/ --benchmark-json=FILE`")
    out = {}
    for b in data["benchmarks"]:
        try:
            out[b["fullname"]] = (float(b["stats"]["median"]), float(b["stats"]["iqr"]))
        except (KeyError, TypeError, ValueError):
            raise GateError(f"{path}: benchmark entry without fullname / stats.median / stats.iqr") from None
    return {"benchmarks": out, "machine": data.get("machine_info", {})}


def compare(base: dict, cur: dict, max_slowdown: float) -> list[Row]:
    rows = []
    b, c = base["benchmarks"], cur["benchmarks"]
    for name in sorted(set(b) | set(c)):
        if name not in c:
            rows.append(Row(name, b[name][0], None, b[name][1], "missing"))
        elif name not in b:
            rows.append(Row(name, None, c[name][0], None, "new"))
        else:
            (bm, iqr), cm = b[name], c[name][0]
            if cm > bm * (1 + max_slowdown) and cm - bm > iqr:
                verdict = "REGRESSED"
            elif cm < bm * (1 - max_slowdown) and bm - cm > iqr:
                verdict = "faster"
            else:
                verdict = "ok"
            rows.append(Row(name, bm, cm, iqr, verdict))
    return rows


def table(rows: list[Row]) -> str:
    ms = lambda v: "-" if v is None else f"{v * 1e3:.3f}"  # noqa: E731
    width = max([9] + [len(r.name) for r in rows])
    lines = [f"{'benchmark':<{width}} {'base ms':>10} {'now ms':>10} {'change':>8} {'base IQR':>9}  verdict"]
    for r in rows:
        ch = "-" if r.change is None else f"{r.change:+.1%}"
        lines.append(f"{r.name:<{width}} {ms(r.base):>10} {ms(r.cur):>10} {ch:>8} {ms(r.iqr):>9}  {r.verdict}")
    return "\n".join(lines)


def machine_note(base: dict, cur: dict) -> str | None:
    keys = ("node", "machine", "processor", "cpu_brand", "gpu")
    differ = [k for k in keys if base["machine"].get(k) != cur["machine"].get(k)]
    if differ:
        return ("note: the runs come from different machines (" + ", ".join(differ) + "); latency gates only "
                "mean something on the same runner class")
    return None


def check_writable(out: Path, force: bool) -> None:
    if out.exists() and not force:
        raise GateError(f"{out} exists: it is the baseline runs are gated against. Gate a new run with "
                        f"--baseline {out} --current RUN.json, or pass --force to replace it")


def record(name: str, pytest_args: str, force: bool = False, source: str | None = None,
           folder: Path = BASELINES) -> int:
    """Write folder/NAME.json: from the run in `source` (validated), or by running the suite."""
    out = Path(folder) / f"{name}.json"
    check_writable(out, force)
    out.parent.mkdir(parents=True, exist_ok=True)
    if source is not None:
        load(source)                                       # a usable pytest-benchmark file, or GateError
        out.write_text(Path(source).read_text())
        print(f"baseline recorded: {out} (from {source})")
        return 0
    tmp = out.with_suffix(".json.part")                    # a failed run leaves the old baseline alone
    cmd = [sys.executable, "-m", "pytest", str(ROOT / "perf"), "-q", f"--benchmark-json={tmp}", *pytest_args.split()]
    print("$ " + " ".join(cmd))
    rc = subprocess.run(cmd, cwd=ROOT).returncode
    if rc == 0:
        tmp.replace(out)
        print(f"baseline recorded: {out}")
    else:
        tmp.unlink(missing_ok=True)
    return rc


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--baseline")
    ap.add_argument("--current")
    ap.add_argument("--max-slowdown", default="5%")
    ap.add_argument("--strict", action="store_true", help="benchmarks missing from the current run fail the gate")
    ap.add_argument("--record", metavar="NAME", help="run the suite and write perf/baselines/NAME.json")
    ap.add_argument("--pytest-args", default="", help="extra pytest arguments for --record")
    ap.add_argument("--from", dest="source", metavar="FILE", help="--record: adopt this benchmark JSON instead of "
                                                                  "running the suite")
    ap.add_argument("--force", action="store_true", help="--record: replace an existing baseline")
    a = ap.parse_args(argv)
    try:
        if a.record:
            return record(a.record, a.pytest_args, a.force, a.source)
        if not a.baseline or not a.current:
            raise GateError("give --baseline FILE and --current FILE (or --record NAME)")
        limit = parse_slowdown(a.max_slowdown)
        base, cur = load(a.baseline), load(a.current)
    except GateError as e:
        print(f"perf.regress: error: {e}", file=sys.stderr)
        return 2
    rows = compare(base, cur, limit)
    print(table(rows))
    note = machine_note(base, cur)
    if note:
        print(note)
    bad = [r for r in rows if r.verdict == "REGRESSED" or (a.strict and r.verdict == "missing")]
    shared = sum(r.base is not None and r.cur is not None for r in rows)
    print(f"{len(bad)} regressed of {shared} compared (max slowdown {limit:.1%}, beyond the baseline IQR)")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
