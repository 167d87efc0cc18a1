"""The Python API on the model shipped in this repository. From the repository root:

    .venv/bin/python examples/api.py

models/trained/arith-llada answers one line: a task word (reverse or sort), a space, 3-6 digits and a
newline ("reverse 48213\\n" -> "31284"). Its chat template builds that line from a single user message,
so chat=True takes the plain "reverse 48213". It was trained with gen_length 8.
"""
import logging
import sys
from pathlib import Path

from dllm.runtime import DllmCache, Engine

MODEL = Path(__file__).resolve().parent.parent / "models" / "trained" / "arith-llada"


def main() -> None:
    # the engine reports long work (loading weights, compiling steps) on the "dllm" logger at INFO
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s", stream=sys.stderr)

    eng = Engine.from_pretrained(MODEL)                       # CPU, float32, eager backend
    out = eng.generate("reverse 48213", chat=True, gen_length=8, steps=8)
    print(out.text[0], out.step_kinds, f"{out.seconds:.3f} s", f"{out.tokens_per_second:.1f} tok/s")

    # a batch (left-padded to the longest prompt) under the dLLM-Cache policy
    out = eng.generate(["sort 93142", "reverse 7705"], chat=True, gen_length=8, steps=8,
                       policy=DllmCache(kp=4, kr=2, rho=0.25))
    print(out.text, out.step_kinds)
    if out.text != ["12349", "5077"]:
        sys.exit(f"unexpected answers {out.text}")


if __name__ == "__main__":
    main()
