"""Loader of the arith tasks: the rows of held_out.jsonl beside this file, as the task's test split.

held_out.jsonl is dllm.models.train_tiny.held_out(240) with one wrong answer per prompt; regenerate it
with `python -m dllm.perf.evaltable --write-data` (tests/test_evaluate.py checks it is current).
"""
import json
from pathlib import Path

import datasets

DATA = Path(__file__).resolve().parent / "held_out.jsonl"


def load_held_out(**_metadata) -> datasets.DatasetDict:
    """lm-eval passes the task metadata (and model args) as keywords; the data does not depend on them."""
    rows = [json.loads(line) for line in DATA.read_text().splitlines() if line.strip()]
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)})
