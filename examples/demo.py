"""The demo. Part 1: the small LLaDA-format model trained in this repo (models/train_tiny.py, shipped in
models/trained/arith-llada) answers real prompts through the CLI, with no cache and under each cache
policy. Part 2: tiny random LLaDA and Dream checkpoints in the real on-disk format go through the same
path (their text is noise; the point is the loader, tokenizer, chat template and decoding).
"""
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from dllm.models.tiny import write_tiny  # noqa: E402
from dllm.runtime import DllmCache, Engine  # noqa: E402

DLLM = [str(Path(sys.executable).parent / "dllm")]
TRAINED = ROOT / "models" / "trained" / "arith-llada"
PROMPTS = [("reverse 48213", "31284"), ("sort 90417", "01479"), ("reverse 7705", "5077"), ("sort 3141", "1134")]


def dllm(*args) -> dict:
    cmd = DLLM + ["generate", *map(str, args), "--json"]
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode:
        sys.exit(f"demo: {' '.join(cmd)} failed (exit {res.returncode}):\n{res.stderr}")
    return json.loads(res.stdout)


def main() -> None:
    print(f"== trained model {TRAINED.relative_to(ROOT)}: `.venv/bin/dllm generate --model {TRAINED.relative_to(ROOT)} "
          f"--prompt $'reverse 48213\\n' --gen-length 8 [--policy ...]` (one process per answer; each starts "
          f"torch)", flush=True)
    wrong = 0
    for policy in (["--policy", "none"], ["--policy", "dllm-cache", "--kp", "4", "--kr", "2"],
                   ["--policy", "d2cache", "--k", "4", "--attn-budget", "4"],
                   ["--policy", "dual-cache", "--block-length", "4"]):
        print(f"   {' '.join(policy[1:]):<38}", end="", flush=True)
        for i, (prompt, want) in enumerate(PROMPTS):
            res = dllm("--model", TRAINED, "--prompt", prompt + "\n", "--gen-length", 8, "--steps", 8, *policy)
            got = res["text"][0]
            wrong += got != want
            print(("; " if i else " ") + f"{prompt!r} -> {got!r}" + ("" if got == want else f" (want {want!r})"),
                  end="", flush=True)
        print()

    out = ROOT / "demo-models"
    for family in ("llada", "dream"):
        folder = write_tiny(out / f"tiny-{family}", family)
        res = dllm("--model", folder, "--prompt", "What is 7*6?", "--chat", "--gen-length", 32, "--steps", 32,
                   "--block-length", 8 if family == "llada" else 32)
        print(f"== tiny random {family} ({folder.relative_to(ROOT)}): tokens {res['tokens'][0][:10]}... "
              f"kinds {res['step_kinds']} {res['seconds']:.3f} s backend {res['backend']}", flush=True)

    eng = Engine.from_pretrained(out / "tiny-llada", backend="eager")
    a = eng.generate([5, 6, 7, 8], gen_length=16, steps=16, block_length=8)
    b = eng.generate([5, 6, 7, 8], gen_length=16, steps=16, block_length=8, prompt_bucket=12)
    c = eng.generate([5, 6, 7, 8], gen_length=16, steps=16, block_length=8, policy=DllmCache(kp=1, kr=1))
    print(f"== Python API: same tokens in prompt buckets 4 and 12: {a.tokens == b.tokens}; dllm-cache refreshing "
          f"every step = no cache: {c.tokens == a.tokens}")
    if a.tokens != b.tokens or c.tokens != a.tokens:
        sys.exit("demo: an exactness check failed")
    print(f"demo OK ({len(PROMPTS) * 4 - wrong}/{len(PROMPTS) * 4} trained-model answers correct)")


if __name__ == "__main__":
    main()
