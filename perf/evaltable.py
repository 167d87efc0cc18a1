"""Accuracy and efficiency of every policy configuration through lm-eval's own evaluator.

    python -m dllm.perf.evaltable [--model models/trained/arith-llada] [--tasks arith]
                                  [--include-path perf/eval_tasks] [--limit N] [--backend eager] [--batch-size 240]
    python -m dllm.perf.evaltable --write-data     # regenerate perf/eval_tasks/arith/held_out.jsonl

Runs each configuration of perf.quality.CONFIGS as the `dllm` lm-eval model (dllm.apps.evaluate) on
the in-repo task (the trained model's held-out prompts) with lm_eval.simple_evaluate, and prints one
markdown table: configuration, accuracy (the task's first metric), tokens/s (generated tokens up to the
first end-of-text over the wall time of the generation calls), forwards per token (steps x batch rows
over those tokens), step kinds, and the speedup against NoCache timed on the same batches.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
from pathlib import Path

from dllm.models.train_tiny import GEN, held_out
from dllm.perf.quality import CONFIGS, DEFAULT_MODEL
from dllm.runtime import Engine

TASKS_DIR = Path(__file__).resolve().parent / "eval_tasks"
DATA = TASKS_DIR / "arith" / "held_out.jsonl"
N_DATA = 240


def task_rows(n: int = N_DATA) -> list[dict]:
    """The arith task's rows: held-out prompt, answer, and one wrong answer of the same length."""
    return [{"prompt": p, "answer": a, "wrong": wrong_answer(p, a)} for p, a in held_out(n)]


def wrong_answer(prompt: str, ans: str) -> str:
    """The other task's answer when it differs, else the answer rotated, else its first digit changed."""
    digits = prompt.split()[1]
    for cand in ("".join(sorted(digits)) if prompt.startswith("reverse") else digits[::-1], ans[1:] + ans[:1]):
        if cand != ans:
            return cand
    return str((int(ans[0]) + 1) % 10) + ans[1:]


def write_data(path: Path = DATA) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in task_rows()))


def task_manager(include_path: str, tasks: list[str]):
    """A TaskManager over include_path alone when it holds every task (indexing lm-eval's own few
    thousand task files takes seconds), else over both."""
    from lm_eval.tasks import TaskManager
    tm = TaskManager(include_path=include_path, include_defaults=False)
    return tm if all(t in tm.all_tasks for t in tasks) else TaskManager(include_path=include_path)


def evaluate_config(engine: Engine, options: dict, tasks: list[str], tm, limit: int | None, batch_size: int) -> dict:
    """{task: (metric name, accuracy, Efficiency)} of one configuration through lm_eval.simple_evaluate."""
    import lm_eval

    from dllm.apps.evaluate import DllmLM
    lm = DllmLM(engine=engine, gen_length=GEN, steps=GEN, batch_size=batch_size, report=False, **options)
    res = lm_eval.simple_evaluate(model=lm, tasks=tasks, task_manager=tm, limit=limit, bootstrap_iters=0,
                                  log_samples=False)
    out = {}
    for task in tasks:
        metric, value = next((k, v) for k, v in res["results"][task].items() if "," in k and "stderr" not in k)
        out[task] = (metric.split(",")[0], value, lm.efficiency.get(task))
    return out


def markdown(rows: list[tuple[str, str, str, float, object]]) -> str:
    lines = ["| configuration | task | accuracy | tokens/s | forwards/token | step kinds | speedup vs NoCache |",
             "|---|---|---|---|---|---|---|"]
    for label, task, metric, acc, eff in rows:
        if eff is None:
            lines.append(f"| {label} | {task} | {acc:.1%} ({metric}) | – | – | – | – |")
            continue
        kinds = ", ".join(f"{k} {n}" for k, n in eff.step_kinds.items())
        speed = f"{eff.speedup:.2f}×" if eff.speedup is not None else "–"
        lines.append(f"| {label} | {task} | {acc:.1%} | {eff.tokens_per_second:.0f} | {eff.forwards_per_token:.2f} "
                     f"| {kinds} | {speed} |")
    return "\n".join(lines).replace("%", " %")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=str(DEFAULT_MODEL))
    ap.add_argument("--tasks", nargs="+", default=["arith"])
    ap.add_argument("--include-path", default=str(TASKS_DIR))
    ap.add_argument("--limit", type=int, default=None, help="first N documents of each task")
    ap.add_argument("--backend", default="eager")
    ap.add_argument("--batch-size", type=int, default=N_DATA)
    ap.add_argument("--write-data", action="store_true", help=f"rewrite {DATA.relative_to(TASKS_DIR.parent.parent)}")
    a = ap.parse_args(argv)
    if a.write_data:
        write_data()
        print(f"wrote {DATA}")
        return
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    logging.getLogger("lm_eval").setLevel(logging.WARNING)
    engine = Engine.from_pretrained(a.model, backend=a.backend)
    tm = task_manager(a.include_path, a.tasks)
    rows = []
    for label, options in CONFIGS:
        for task, (metric, acc, eff) in evaluate_config(engine, options, a.tasks, tm, a.limit,
                                                        a.batch_size).items():
            rows.append((label, task, metric, acc, eff))
            print(f"{label}: {task} {metric} {acc:.4f}", flush=True)
    print(f"\n{a.model}, backend {a.backend}, tasks {', '.join(a.tasks)} through lm_eval.simple_evaluate, batch "
          f"{a.batch_size}; tokens/s = generated tokens up to the first end-of-text over the wall time of the "
          f"generation calls; forwards/token = steps x batch rows per token; speedup = NoCache on the same "
          f"batches / these seconds\n")
    print(markdown(rows))


if __name__ == "__main__":
    main()
