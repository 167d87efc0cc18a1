"""Write tiny random checkpoints in the real on-disk format of each family.

config.json carries the real field names, model.safetensors (or a sharded index) the real tensor
names, and an optional character-level tokenizer (tokenizer.json + tokenizer_config.json with a chat
template) that `transformers.AutoTokenizer` loads from the folder. Tests, the demo and the benchmarks
use these; nothing is fetched from a hub.

    python -m dllm.models.tiny --family llada --out /tmp/tiny-llada [--preset small] [--sharded]
"""
from __future__ import annotations

import argparse
import json
import string
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

from .checkpoint import checkpoint_names
from .config import parse_config


@dataclass(frozen=True)
class Preset:
    n_layers: int
    d_model: int
    n_heads: int
    n_kv_heads: int      # Dream only; LLaDA is plain MHA
    mlp_hidden: int
    vocab_size: int


# tiny: overhead-bound (tests, launch-cost measurements); small: the CPU benchmark model, with a
# realistic 32k vocabulary so the head and the embedding weigh what they do in real models.
PRESETS = {
    "tiny": Preset(n_layers=2, d_model=64, n_heads=4, n_kv_heads=2, mlp_hidden=160, vocab_size=128),
    "small": Preset(n_layers=8, d_model=512, n_heads=8, n_kv_heads=2, mlp_hidden=1408, vocab_size=32000),
}
# Real dimensions (docs/ARCHITECTURE.md, "Checkpoints") for GPU latency: weights are generated on the device,
# never written.
SHAPE_PRESETS = {
    "llada-8b-shape": Preset(n_layers=32, d_model=4096, n_heads=32, n_kv_heads=32, mlp_hidden=12288,
                             vocab_size=126464),
    "dream-7b-shape": Preset(n_layers=28, d_model=3584, n_heads=28, n_kv_heads=4, mlp_hidden=18944,
                             vocab_size=152064),
}

# Special tokens of each family, in the order they take the first ids of the tiny vocabulary.
SPECIALS = {
    "llada": ["<|endoftext|>", "<|startoftext|>", "<|mdm_mask|>", "<|eot_id|>",
              "<|start_header_id|>", "<|end_header_id|>"],
    "dream": ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|beginoftext|>", "<|mask|>"],
}
CHAT_TEMPLATES = {
    "llada": ("{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
              "{{ m['content'] }}<|eot_id|>{% endfor %}{% if add_generation_prompt %}"
              "<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"),
    "dream": ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
              "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"),
}
CHARS = [c for c in string.printable if c not in "\x0b\x0c\r"]   # 97 characters incl. space, \t, \n


def tiny_config(family: str, p: Preset) -> dict:
    """An unmodified-looking config.json for the family, with ids inside the tiny vocabulary."""
    ids = {t: i for i, t in enumerate(SPECIALS[family])}
    if family == "llada":
        return {
            "architectures": ["LLaDAModelLM"], "model_type": "llada",
            "auto_map": {"AutoConfig": "configuration_llada.LLaDAConfig",
                         "AutoModel": "modeling_llada.LLaDAModelLM"},
            "d_model": p.d_model, "n_layers": p.n_layers, "n_heads": p.n_heads, "n_kv_heads": p.n_heads,
            "mlp_hidden_size": p.mlp_hidden, "mlp_ratio": 4, "vocab_size": p.vocab_size,
            "embedding_size": p.vocab_size, "rope": True, "rope_theta": 500000.0, "rope_full_precision": True,
            "alibi": False, "layer_norm_type": "rms", "rms_norm_eps": 1e-5, "activation_type": "silu",
            "block_type": "llama", "include_bias": False, "include_qkv_bias": False, "weight_tying": False,
            "max_sequence_length": 4096, "mask_token_id": ids["<|mdm_mask|>"],
            "eos_token_id": ids["<|endoftext|>"], "pad_token_id": ids["<|endoftext|>"],
            "bos_token_id": ids["<|startoftext|>"], "torch_dtype": "float32",
        }
    return {
        "architectures": ["DreamModel"], "model_type": "Dream",
        "auto_map": {"AutoConfig": "configuration_dream.DreamConfig", "AutoModel": "modeling_dream.DreamModel"},
        "hidden_size": p.d_model, "num_hidden_layers": p.n_layers, "num_attention_heads": p.n_heads,
        "num_key_value_heads": p.n_kv_heads, "intermediate_size": p.mlp_hidden, "vocab_size": p.vocab_size,
        "hidden_act": "silu", "rope_theta": 1000000.0, "rope_scaling": None, "rms_norm_eps": 1e-6,
        "tie_word_embeddings": False, "use_sliding_window": False, "max_position_embeddings": 4096,
        "mask_token_id": ids["<|mask|>"], "pad_token_id": ids["<|endoftext|>"],
        "eos_token_id": ids["<|endoftext|>"], "bos_token_id": ids["<|beginoftext|>"], "torch_dtype": "float32",
    }


def random_tensors(config: dict, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random weights under the real tensor names. Scaled so activations and logits are O(1): a tiny
    random model then has well-separated confidences, so token choices are not decided by rounding."""
    cfg = parse_config(config)
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, (field, _layer, _rows, shape) in sorted(checkpoint_names(cfg).items()):
        if field.endswith("norm"):
            t = 1.0 + 0.1 * torch.randn(shape, generator=g)
        elif field == "bqkv":
            t = 0.1 * torch.randn(shape, generator=g)
        elif field == "embed":
            t = torch.randn(shape, generator=g)
        elif field == "head":
            t = 2.0 * torch.randn(shape, generator=g) / shape[1] ** 0.5
        else:  # projections [out, in]
            t = torch.randn(shape, generator=g) / shape[1] ** 0.5
        out[name] = t.contiguous()
    return out


def random_weights(family: str, preset: Preset, device, dtype, seed: int = 0):
    """(ModelConfig, Weights) of the preset's dimensions, random, allocated directly on the device:
    for latency work on real shapes (latency does not depend on weight values)."""
    from .checkpoint import Weights
    cfg = parse_config(tiny_config(family, preset))
    g = torch.Generator(device=device).manual_seed(seed)
    d, q, kv, F, V, nL = cfg.d_model, cfg.q_width, cfg.kv_width, cfg.mlp_hidden, cfg.vocab_size, cfg.n_layers

    def rnd(*shape, std):
        return torch.empty(shape, device=device, dtype=dtype).normal_(0.0, std, generator=g)
    embed = rnd(V, d, std=1.0)
    return cfg, Weights(embed=embed, attn_norm=rnd(nL, d, std=0.1) + 1, wqkv=rnd(nL, q + 2 * kv, d, std=d ** -0.5),
                        bqkv=rnd(nL, q + 2 * kv, std=0.1) if cfg.qkv_bias else None, wo=rnd(nL, d, q, std=q ** -0.5),
                        ffn_norm=rnd(nL, d, std=0.1) + 1, w_gate_up=rnd(nL, 2 * F, d, std=d ** -0.5),
                        w_down=rnd(nL, d, F, std=F ** -0.5), final_norm=rnd(d, std=0.1) + 1,
                        head=rnd(V, d, std=2 * d ** -0.5))


def write_tokenizer(folder: Path, family: str, vocab_size: int) -> None:
    """A character-level fast tokenizer in the HF format (tokenizer.json + tokenizer_config.json)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = SPECIALS[family]
    vocab = {t: i for i, t in enumerate(specials + CHARS)}
    if len(vocab) > vocab_size:
        raise ValueError(f"vocab_size {vocab_size} is too small for the {len(vocab)}-entry character tokenizer")
    unk = "<|endoftext|>"
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=unk))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("(?m)."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens(specials)
    kw = dict(eos_token=unk, pad_token=unk, unk_token=unk)
    if family == "llada":
        kw.update(bos_token="<|startoftext|>", mask_token="<|mdm_mask|>")
    else:
        kw.update(bos_token="<|beginoftext|>", mask_token="<|mask|>")
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, **kw)
    hf.chat_template = CHAT_TEMPLATES[family]
    hf.save_pretrained(str(folder))


def write_tiny(folder: str | Path, family: str = "llada", preset: str | Preset = "tiny", *, seed: int = 0,
               sharded: bool = False, tokenizer: bool = True, dtype: torch.dtype = torch.float32) -> Path:
    """Write config.json + model.safetensors (or two shards + index) [+ tokenizer] into folder."""
    if family not in SPECIALS:
        raise ValueError(f"family must be 'llada' or 'dream', got {family!r}")
    p = PRESETS[preset] if isinstance(preset, str) else preset
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config = tiny_config(family, p)
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    tensors = {k: v.to(dtype) for k, v in random_tensors(config, seed).items()}
    if sharded:
        names = sorted(tensors)
        half = len(names) // 2
        shards = {"model-00001-of-00002.safetensors": names[:half], "model-00002-of-00002.safetensors": names[half:]}
        weight_map = {}
        for fname, part in shards.items():
            save_file({n: tensors[n] for n in part}, str(folder / fname), metadata={"format": "pt"})
            weight_map.update({n: fname for n in part})
        index = {"metadata": {"total_size": sum(t.numel() * t.element_size() for t in tensors.values())},
                 "weight_map": weight_map}
        (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    else:
        save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    if tokenizer:
        write_tokenizer(folder, family, p.vocab_size)
    return folder


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="python -m dllm.models.tiny", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="then: .venv/bin/dllm generate --model OUT --prompt 'What is 7*6?' --chat "
                                        "--gen-length 32   (random weights: the text is noise)")
    ap.add_argument("--family", choices=sorted(SPECIALS), default="llada", help="checkpoint format (default llada)")
    ap.add_argument("--preset", choices=sorted(PRESETS), default="tiny",
                    help="dimensions: " + "; ".join(f"{n}: {p.n_layers} layers, d {p.d_model}, vocab {p.vocab_size}"
                                                    for n, p in sorted(PRESETS.items())) + " (default tiny)")
    ap.add_argument("--out", required=True, help="folder to write (created; existing files are overwritten)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the random weights (default 0)")
    ap.add_argument("--sharded", action="store_true", help="two safetensors shards and an index, like a hub folder")
    ap.add_argument("--no-tokenizer", action="store_true", help="no tokenizer files (use --prompt-ids then)")
    a = ap.parse_args(argv)
    path = write_tiny(a.out, a.family, a.preset, seed=a.seed, sharded=a.sharded, tokenizer=not a.no_tokenizer)
    p = PRESETS[a.preset]
    print(f"wrote a random {a.family} checkpoint to {path} ({a.preset}: {p.n_layers} layers, d {p.d_model}, "
          f"vocab {p.vocab_size}; {'two safetensors shards' if a.sharded else 'model.safetensors'}"
          f"{'' if a.no_tokenizer else ', character tokenizer with a chat template'})")


if __name__ == "__main__":
    main()
