"""The demo, in one process. Part 1: the small LLaDA-format model trained in this repo
(models/trained/arith-llada) answers real prompts with no cache and under each cache policy. Part 2: tiny
random LLaDA and Dream checkpoints in the real on-disk format go through the same loader, tokenizer,
chat template and decoding (their text is noise). Each part prints the `dllm generate` command that does
the same from a shell.
"""
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from dllm.models.tiny import write_tiny  # noqa: E402
from dllm.runtime import D2Cache, DllmCache, DualCache, Engine, NoCache, Request  # noqa: E402

TRAINED = ROOT / "models" / "trained" / "arith-llada"
PROMPTS = [("reverse 48213", "31284"), ("sort 90417", "01479"), ("reverse 7705", "5077"), ("sort 3141", "1134")]
POLICIES = [("none", NoCache(), {}), ("dllm-cache --kp 4 --kr 2", DllmCache(kp=4, kr=2), {}),
            ("d2cache --k 4 --attn-budget 4", D2Cache(k=4, attn_budget=4), {}),
            ("dual-cache --block-length 4", DualCache(), {"block_length": 4})]


def main() -> None:
    t0 = time.perf_counter()
    rel = TRAINED.relative_to(ROOT)
    eng = Engine.from_pretrained(TRAINED, dtype="auto")      # the command line's default dtype
    print(f"== trained model {rel}: like `.venv/bin/dllm generate --model {rel} --prompt $'reverse 48213\\n' "
          f"--policy ...` (8 tokens: its generation_config.json)", flush=True)
    wrong = 0
    for label, policy, extra in POLICIES:
        out = eng.generate([p + "\n" for p, _ in PROMPTS], policy=policy, **extra)
        cells = []
        for (prompt, want), got in zip(PROMPTS, out.text):
            wrong += got != want
            cells.append(f"{prompt!r} -> {got!r}" + ("" if got == want else f" (want {want!r})"))
        print(f"   {label:<32} " + "; ".join(cells) + f"  [{out.seconds * 1e3:.0f} ms, {out.step_kinds}]",
              flush=True)

    out_dir = ROOT / "demo-models"
    for family in ("llada", "dream"):
        folder = write_tiny(out_dir / f"tiny-{family}", family)
        tiny = Engine.from_pretrained(folder)
        res = tiny.generate("What is 7*6?", chat=True, gen_length=32, block_length=8 if family == "llada" else 32)
        print(f"== tiny random {family} ({folder.relative_to(ROOT)}): like `.venv/bin/dllm generate --model "
              f"{folder.relative_to(ROOT)} --prompt 'What is 7*6?' --chat --gen-length 32`: tokens "
              f"{res.tokens[0][:10]}... kinds {res.step_kinds} {res.seconds:.3f} s", flush=True)

    eng = Engine.from_pretrained(out_dir / "tiny-llada")
    a = eng.generate([5, 6, 7, 8], gen_length=16, block_length=8)
    b = eng.generate(Request([5, 6, 7, 8], gen_length=16, block_length=8, prompt_bucket=12))
    c = eng.generate([5, 6, 7, 8], gen_length=16, block_length=8, policy=DllmCache(kp=1, kr=1))
    print(f"== Python API: same tokens in prompt buckets 4 and 12: {a.tokens == b.tokens}; dllm-cache refreshing "
          f"every step = no cache: {c.tokens == a.tokens}")
    if a.tokens != b.tokens or c.tokens != a.tokens:
        sys.exit("demo: an exactness check failed")
    print(f"demo OK ({len(PROMPTS) * len(POLICIES) - wrong}/{len(PROMPTS) * len(POLICIES)} trained-model answers "
          f"correct, {time.perf_counter() - t0:.1f} s)")


if __name__ == "__main__":
    main()
