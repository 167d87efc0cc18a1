"""ModelConfig: one dataclass for LLaDA and Dream, parsed from an unmodified config.json.

The two families share one architecture (pre-norm Llama-style blocks, bidirectional attention);
they differ in field names, GQA, q/k/v bias, RoPE precision and whether logits are shifted by one.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path


class CheckpointError(ValueError):
    """A checkpoint folder, config or tensor file that cannot be used; the message says how to fix it."""


# Fallback ids when config.json does not carry them: the released checkpoints' (docs/ARCHITECTURE.md, "Checkpoints").
_LLADA_IDS = dict(mask_id=126336, eos_id=126081, pad_id=126081, bos_id=126080, eot_id=126348)
_DREAM_IDS = dict(mask_id=151666, eos_id=151643, pad_id=151643, bos_id=151665, eot_id=151645)


@dataclass(frozen=True)
class ModelConfig:
    family: str            # "llada" | "dream"
    d_model: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    mlp_hidden: int
    vocab_size: int        # rows of the embedding and of the LM head
    rope_theta: float
    norm_eps: float
    qkv_bias: bool         # Dream: q/k/v projections carry a bias
    tied_head: bool        # head shares the embedding matrix
    shift_logits: bool     # Dream: hidden row i predicts token i+1
    rope_fp32: bool        # LLaDA rotates q/k in fp32; Dream casts cos/sin to the activation dtype
    mask_id: int
    eos_id: int
    pad_id: int
    bos_id: int | None = None
    eot_id: int | None = None
    max_seq_len: int | None = None

    @property
    def q_width(self) -> int:
        return self.n_heads * self.head_dim

    @property
    def kv_width(self) -> int:
        return self.n_kv_heads * self.head_dim


def _need(raw: dict, key: str, path: Path):
    if key not in raw or raw[key] is None:
        raise CheckpointError(f"{path}: field '{key}' is missing; this does not look like an unmodified "
                              f"checkpoint config.json")
    return raw[key]


def _ids(raw: dict, fallback: dict) -> dict:
    out = dict(fallback)
    for ours, theirs in [("mask_id", "mask_token_id"), ("eos_id", "eos_token_id"),
                         ("pad_id", "pad_token_id"), ("bos_id", "bos_token_id")]:
        v = raw.get(theirs)
        if isinstance(v, list):          # some configs list several eos ids; the first is the canonical one
            v = v[0] if v else None
        if v is not None:
            out[ours] = int(v)
    return out


def family_of(raw: dict) -> str | None:
    mt = str(raw.get("model_type", "")).lower()
    arch = " ".join(raw.get("architectures") or []).lower()
    if mt == "llada" or "llada" in arch:
        return "llada"
    if mt == "dream" or "dream" in arch:
        return "dream"
    return None


def parse_config(raw: dict, path: Path = Path("config.json")) -> ModelConfig:
    fam = family_of(raw)
    if fam == "llada":
        d = int(_need(raw, "d_model", path))
        n_heads = int(_need(raw, "n_heads", path))
        n_kv = int(raw.get("n_kv_heads") or n_heads)
        mlp = raw.get("mlp_hidden_size") or int(raw.get("mlp_ratio", 4) * d)
        if raw.get("include_bias") or raw.get("include_qkv_bias"):
            raise CheckpointError(f"{path}: LLaDA with biases (include_bias/include_qkv_bias) is not supported; "
                                  f"the released checkpoints have none")
        return ModelConfig(
            family="llada", d_model=d, n_layers=int(_need(raw, "n_layers", path)), n_heads=n_heads,
            n_kv_heads=n_kv, head_dim=d // n_heads, mlp_hidden=int(mlp),
            vocab_size=int(raw.get("embedding_size") or _need(raw, "vocab_size", path)),
            rope_theta=float(raw.get("rope_theta", 10000.0)), norm_eps=float(raw.get("rms_norm_eps", 1e-5)),
            qkv_bias=False, tied_head=bool(raw.get("weight_tying", False)), shift_logits=False, rope_fp32=True,
            max_seq_len=raw.get("max_sequence_length"), **_ids(raw, _LLADA_IDS))
    if fam == "dream":
        d = int(_need(raw, "hidden_size", path))
        n_heads = int(_need(raw, "num_attention_heads", path))
        return ModelConfig(
            family="dream", d_model=d, n_layers=int(_need(raw, "num_hidden_layers", path)), n_heads=n_heads,
            n_kv_heads=int(raw.get("num_key_value_heads") or n_heads), head_dim=d // n_heads,
            mlp_hidden=int(_need(raw, "intermediate_size", path)), vocab_size=int(_need(raw, "vocab_size", path)),
            rope_theta=float(raw.get("rope_theta", 10000.0)), norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
            qkv_bias=True, tied_head=bool(raw.get("tie_word_embeddings", False)), shift_logits=True,
            rope_fp32=False, max_seq_len=raw.get("max_position_embeddings"), **_ids(raw, _DREAM_IDS))
    raise CheckpointError(
        f"{path}: model_type={raw.get('model_type')!r}, architectures={raw.get('architectures')!r} is neither "
        f"LLaDA (model_type 'llada') nor Dream (model_type 'Dream'); point --model at a LLaDA or Dream checkpoint folder")


def load_config(folder: str | Path) -> ModelConfig:
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: not a directory; --model must be a checkpoint folder "
                              f"holding config.json and model.safetensors")
    path = folder / "config.json"
    if not path.is_file():
        raise CheckpointError(f"{folder}: no config.json; --model must be a LLaDA or Dream checkpoint folder")
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None
    cfg = parse_config(raw, path)
    if cfg.d_model % cfg.n_heads or cfg.n_heads % cfg.n_kv_heads or cfg.head_dim % 2:
        raise CheckpointError(f"{path}: inconsistent shape: d_model {cfg.d_model}, heads {cfg.n_heads}, "
                              f"kv heads {cfg.n_kv_heads} (need d % heads == 0, heads % kv_heads == 0, even head_dim)")
    return cfg
