"""Train a small LLaDA-format masked diffusion model on CPU, on tasks whose answers can be checked.

    python -m dllm.models.train_tiny --out models/trained/arith-llada [--minutes 12] [--seed 0]

Tasks (character level, each needs the prompt): `reverse 48213` -> `31284`, `sort 3141` -> `1134`.
(Three-digit addition was tried too: after 12 minutes on 2 cores it scored 0 % held-out exact match,
so it is left out; `make_example` still generates it for anyone with a bigger budget.) Training follows
LLaDA's SFT objective: the prompt is never masked; every response token (answer then <|endoftext|> up to
the response length) is masked with probability t ~ U(0, 1) drawn per sequence, and the loss is the
cross-entropy on masked tokens weighted by 1/t.
The model is trained through the runtime's own forward (models.layers.forward, left padding and
positions from the first real token), saved in the real LLaDA on-disk format with a character
tokenizer, and loads with the real loader. Seeded; the held-out evaluation set is disjoint from
anything the training sampler can produce (`split`).
"""
from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from .checkpoint import Weights, checkpoint_names
from .config import parse_config
from .layers import forward
from .tiny import Preset, tiny_config, write_tokenizer

PRESET = Preset(n_layers=4, d_model=128, n_heads=4, n_kv_heads=4, mlp_hidden=384, vocab_size=128)
GEN = 8                       # response length: answers are at most 6 characters, then end-of-text
TASKS = ("reverse", "sort")


def make_example(rng: random.Random, task: str) -> tuple[str, str]:
    if task == "add":
        a, b = rng.randint(0, 499), rng.randint(0, 499)
        return f"add {a}+{b}", str(a + b)
    digits = "".join(rng.choice("0123456789") for _ in range(rng.randint(3, 6)))
    return (f"reverse {digits}", digits[::-1]) if task == "reverse" else (f"sort {digits}", "".join(sorted(digits)))


def split(prompt: str) -> str:
    """'train' or 'test' by a stable hash of the prompt: held-out prompts are never trained on."""
    return "test" if sum(map(ord, prompt)) * 2654435761 % 1000 < 150 else "train"


def training_examples(rng: random.Random, n: int) -> list[tuple[str, str]]:
    """n training examples: random tasks, held-out prompts filtered out."""
    out = []
    while len(out) < n:
        p, a = make_example(rng, TASKS[rng.randrange(len(TASKS))])
        if split(p) == "train":
            out.append((p, a))
    return out


def held_out(n: int, seed: int = 1234) -> list[tuple[str, str]]:
    rng, out, seen = random.Random(seed), [], set()
    while len(out) < n:
        task = TASKS[len(out) % len(TASKS)]
        p, a = make_example(rng, task)
        if split(p) == "test" and p not in seen:
            seen.add(p)
            out.append((p, a))
    return out


def init_weights(cfg, g: torch.Generator) -> Weights:
    d, q, kv, Fh, V, nL = cfg.d_model, cfg.q_width, cfg.kv_width, cfg.mlp_hidden, cfg.vocab_size, cfg.n_layers
    p = lambda *s, std: torch.nn.Parameter(torch.randn(*s, generator=g) * std)  # noqa: E731
    return Weights(embed=p(V, d, std=0.5), attn_norm=torch.nn.Parameter(torch.ones(nL, d)),
                   wqkv=p(nL, q + 2 * kv, d, std=d ** -0.5), bqkv=None, wo=p(nL, d, q, std=(2 * nL * q) ** -0.5),
                   ffn_norm=torch.nn.Parameter(torch.ones(nL, d)), w_gate_up=p(nL, 2 * Fh, d, std=d ** -0.5),
                   w_down=p(nL, d, Fh, std=(2 * nL * Fh) ** -0.5), final_norm=torch.nn.Parameter(torch.ones(d)),
                   head=p(V, d, std=d ** -0.5))


def encode_batch(tok, cfg, examples, rng: torch.Generator):
    """Left-padded [prompt | answer | eos...] canvases, the response mask and masked inputs."""
    prompts = [tok(p + "\n")["input_ids"] for p, _ in examples]
    answers = [tok(a, add_special_tokens=False)["input_ids"] for _, a in examples]
    P = max(map(len, prompts))
    B = len(examples)
    x = torch.full((B, P + GEN), cfg.eos_id)
    n_pad = torch.tensor([P - len(p) for p in prompts])
    for b, (p, a) in enumerate(zip(prompts, answers)):
        x[b, P - len(p):P] = torch.tensor(p)
        x[b, P:P + len(a)] = torch.tensor(a)
    x[:, :P] = torch.where(torch.arange(P)[None] < n_pad[:, None], cfg.pad_id, x[:, :P])
    t = torch.rand(B, 1, generator=rng).clamp_min(1e-3)
    masked = torch.zeros_like(x, dtype=torch.bool)
    masked[:, P:] = torch.rand(B, GEN, generator=rng) < t
    return x, torch.where(masked, cfg.mask_id, x), masked, t, n_pad


def train(out: Path, minutes: float, seed: int, batch: int = 64, lr: float = 3e-3,
          max_steps: int | None = None) -> dict:
    """Train for `minutes` of wall time (or max_steps, whichever comes first); the schedule follows
    the time budget, so identical runs need max_steps (the test of reproducibility uses it)."""
    was_deterministic = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)     # reproducible: no order-dependent kernels in backward
    try:
        return _train(out, minutes, seed, batch, lr, max_steps)
    finally:
        torch.use_deterministic_algorithms(was_deterministic)


def _train(out: Path, minutes: float, seed: int, batch: int, lr: float, max_steps: int | None) -> dict:
    torch.manual_seed(seed)
    rng, g = random.Random(seed), torch.Generator().manual_seed(seed)
    config = tiny_config("llada", PRESET)
    cfg = parse_config(config)
    out.mkdir(parents=True, exist_ok=True)
    write_tokenizer(out, "llada", PRESET.vocab_size)
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(str(out), trust_remote_code=False, local_files_only=True)
    w = init_weights(cfg, g)
    params = [t for t in w.tensors().values()]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01, betas=(0.9, 0.98))
    t0, step, losses = time.time(), 0, []
    budget = minutes * 60
    while time.time() - t0 < budget and (max_steps is None or step < max_steps):
        frac = (time.time() - t0) / budget if max_steps is None else step / max_steps
        for group in opt.param_groups:               # warm-up then cosine decay over the time budget
            group["lr"] = lr * min(1.0, (step + 1) / 200) * 0.5 * (1 + torch.cos(torch.tensor(frac * 3.14159)).item())
        examples = training_examples(rng, batch)
        x, xm, masked, t, n_pad = encode_batch(tok, cfg, examples, g)
        logits = forward(w, cfg, xm, n_pad)
        ce = F.cross_entropy(logits.flatten(0, 1), x.flatten(), reduction="none").view_as(x)
        loss = (ce * masked / t).sum() / (x.shape[0] * GEN)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        losses.append(loss.item())
        step += 1
        if step % 500 == 0:
            print(f"step {step:6d}  {time.time() - t0:6.0f} s  loss {sum(losses[-500:]) / 500:.4f}", flush=True)
    tensors = {}
    for name, (field, layer, rows, _shape) in checkpoint_names(cfg).items():
        src = getattr(w, field).detach()
        src = src if layer is None else src[layer]
        tensors[name] = (src if rows is None else src[rows]).contiguous().clone()
    (out / "config.json").write_text(json.dumps(config, indent=2))
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    info = {"steps": step, "seconds": round(time.time() - t0, 1), "final_loss": sum(losses[-200:]) / 200,
            "seed": seed, "batch": batch, "lr": lr, "tasks": list(TASKS), "gen_length": GEN}
    (out / "training.json").write_text(json.dumps(info, indent=2))
    return info


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="models/trained/arith-llada")
    ap.add_argument("--minutes", type=float, default=12.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-steps", type=int, default=None, help="stop after this many steps (reproducible runs)")
    a = ap.parse_args(argv)
    print(train(Path(a.out), a.minutes, a.seed, max_steps=a.max_steps))


if __name__ == "__main__":
    main()
