"""One rank of a tensor-parallel run for tests/test_parallel.py, launched by torchrun:

    torchrun --nproc-per-node 2 tests/tp_worker.py RUNS.json OUT_DIR

RUNS.json: [{"folder", "policy" (a policy spec), "prompts" (id lists), "options" (generate keywords),
"backend", "device", "quantize" (from_pretrained's quantize keywords)}]
or [{"folder", "forward" (one id list)}]. Each rank writes OUT_DIR/rank<r>.json: per run, in
order, the tokens, or the whole-canvas logits of models.layers.forward."""
import json
import os
import sys
from pathlib import Path

import torch

from dllm.models.layers import forward
from dllm.runtime import Engine
from dllm.runtime.options import parse_policy


def main(runs_path: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    tp = int(os.environ["WORLD_SIZE"])
    runs, engines, out = json.loads(Path(runs_path).read_text()), {}, []
    for run in runs:
        quant = run.get("quantize", {})
        key = (run["folder"], run.get("backend", "eager"), run.get("device", "cpu"), json.dumps(quant))
        if key not in engines:
            engines[key] = Engine.from_pretrained(run["folder"], backend=key[1], device=key[2], tp=tp,
                                                  keep_faster=False, **quant)
        eng = engines[key]
        if "forward" in run:
            with torch.inference_mode():
                out.append(forward(eng.weights, eng.rank_cfg, torch.tensor([run["forward"]])).tolist())
            continue
        out.append(eng.generate(run["prompts"], policy=parse_policy(run["policy"]), **run["options"]).tokens)
    Path(out_dir, f"rank{os.environ['RANK']}.json").write_text(json.dumps(out))


if __name__ == "__main__":
    main(*sys.argv[1:])
