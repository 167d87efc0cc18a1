"""ModelConfig: one dataclass for LLaDA and Dream, parsed from an unmodified config.json.

The two families share one architecture (pre-norm Llama-style blocks, bidirectional attention);
they differ in field names, GQA, q/k/v bias, RoPE precision and whether logits are shifted by one.
"""
from __future__ import annotations

import json
import math
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


class _Fields:
    """Reads typed fields of a raw config and collects every problem, so one error names them all."""

    def __init__(self, raw: dict, path: Path):
        self.raw, self.path, self.problems = raw, path, []

    def _bad(self, key: str, want: str) -> None:
        self.problems.append(f"'{key}' must be {want}, got {self.raw.get(key)!r}")

    def int(self, key: str, default=None, *, required: bool = True, low: int = 1) -> int | None:
        """An integer >= low (bools and fractional numbers are refused, never truncated)."""
        v = self.raw.get(key)
        if v is None:
            if default is None and required:
                self.problems.append(f"'{key}' is missing")
            return default
        if isinstance(v, float) and v.is_integer():
            v = int(v)
        if isinstance(v, bool) or not isinstance(v, int) or v < low:
            self._bad(key, f"an integer >= {low}")
            return default
        return v

    def number(self, key: str, default: float, *, positive: bool = True) -> float:
        v = self.raw.get(key)
        if v is None:
            return default
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or (positive and v <= 0):
            self._bad(key, "a finite number > 0" if positive else "a finite number")
            return default
        return float(v)

    def flag(self, key: str) -> bool:
        v = self.raw.get(key)
        if v is not None and not isinstance(v, bool):
            self._bad(key, "true or false")
            return False
        return bool(v)

    def token_id(self, key: str, fallback: int | None, vocab: int | None) -> int | None:
        v = self.raw.get(key)
        if isinstance(v, list):          # some configs list several eos ids; the first is the canonical one
            v = v[0] if v else None
        if v is None:
            return fallback                  # checked against the vocabulary by _ids
        if isinstance(v, bool) or not isinstance(v, int):
            self._bad(key, "an integer token id")
            return fallback
        if v is not None and vocab and not 0 <= v < vocab:
            self.problems.append(f"'{key}' {v} is outside the vocabulary [0, {vocab})")
        return v

    def done(self) -> None:
        if self.problems:
            raise CheckpointError(f"{self.path}: {len(self.problems)} problem(s): " + "; ".join(self.problems))


def raw_missing(raw: dict, key: str) -> bool:
    return raw.get(key) is None or raw.get(key) == []


def _ids(f: _Fields, fallback: dict, vocab: int | None) -> dict:
    out = dict(fallback)
    for ours, theirs in [("mask_id", "mask_token_id"), ("eos_id", "eos_token_id"),
                         ("pad_id", "pad_token_id"), ("bos_id", "bos_token_id")]:
        out[ours] = f.token_id(theirs, fallback[ours], vocab)
    for ours, theirs in [("mask_id", "mask_token_id"), ("eos_id", "eos_token_id"), ("pad_id", "pad_token_id")]:
        if raw_missing(f.raw, theirs) and vocab and not 0 <= out[ours] < vocab:   # a fallback the vocab lacks
            f.problems.append(f"{ours} {out[ours]} (the {fallback is _LLADA_IDS and 'LLaDA' or 'Dream'} "
                              f"default) is outside the vocabulary [0, {vocab}); set it in config.json")
    return out


def family_of(raw: dict) -> str | None:
    mt = str(raw.get("model_type", "")).lower()
    archs = raw.get("architectures") or []
    arch = " ".join(a for a in archs if isinstance(a, str)).lower() if isinstance(archs, list) else ""
    if mt == "llada" or "llada" in arch:
        return "llada"
    if mt == "dream" or "dream" in arch:
        return "dream"
    return None


def _shape_problems(d: int, n_heads: int, n_kv: int) -> list[str]:
    if not (d and n_heads and n_kv):
        return []
    if d % n_heads:
        return [f"d_model {d} is not divisible by {n_heads} heads"]
    if n_heads % n_kv:
        return [f"{n_heads} heads are not divisible by {n_kv} key/value heads"]
    if (d // n_heads) % 2:
        return [f"head dimension {d // n_heads} (d_model / heads) is odd; RoPE needs it even"]
    return []


def parse_config(raw, path: Path = Path("config.json")) -> ModelConfig:
    """Validate the whole config (every problem in one CheckpointError) and parse it."""
    if not isinstance(raw, dict):
        raise CheckpointError(f"{path}: must be a JSON object of model settings, got {type(raw).__name__}; "
                              f"point --model at a LLaDA or Dream checkpoint folder")
    fam = family_of(raw)
    f = _Fields(raw, path)
    if fam == "llada":
        d, n_heads = f.int("d_model"), f.int("n_heads")
        n_kv = f.int("n_kv_heads", n_heads)
        ratio = f.number("mlp_ratio", 4.0)
        mlp = f.int("mlp_hidden_size", int(ratio * d) if d else None)
        vocab = f.int("embedding_size", required=False) or f.int("vocab_size")
        n_layers = f.int("n_layers")
        if f.flag("include_bias") or f.flag("include_qkv_bias"):
            f.problems.append("LLaDA with biases (include_bias/include_qkv_bias) is not supported; the released "
                              "checkpoints have none")
        f.problems += _shape_problems(d, n_heads, n_kv)
        ids = _ids(f, _LLADA_IDS, vocab)
        rope, eps, tied = f.number("rope_theta", 10000.0), f.number("rms_norm_eps", 1e-5), f.flag("weight_tying")
        max_len = f.int("max_sequence_length", required=False)
        f.done()
        return ModelConfig(
            family="llada", d_model=d, n_layers=n_layers, n_heads=n_heads, n_kv_heads=n_kv, head_dim=d // n_heads,
            mlp_hidden=mlp, vocab_size=vocab, rope_theta=rope, norm_eps=eps, qkv_bias=False, tied_head=tied,
            shift_logits=False, rope_fp32=True, max_seq_len=max_len, **ids)
    if fam == "dream":
        d, n_heads = f.int("hidden_size"), f.int("num_attention_heads")
        n_kv = f.int("num_key_value_heads", n_heads)
        n_layers, mlp, vocab = f.int("num_hidden_layers"), f.int("intermediate_size"), f.int("vocab_size")
        f.problems += _shape_problems(d, n_heads, n_kv)
        ids = _ids(f, _DREAM_IDS, vocab)
        rope, eps = f.number("rope_theta", 10000.0), f.number("rms_norm_eps", 1e-6)
        tied, max_len = f.flag("tie_word_embeddings"), f.int("max_position_embeddings", required=False)
        f.done()
        return ModelConfig(
            family="dream", d_model=d, n_layers=n_layers, n_heads=n_heads, n_kv_heads=n_kv, head_dim=d // n_heads,
            mlp_hidden=mlp, vocab_size=vocab, rope_theta=rope, norm_eps=eps, qkv_bias=True, tied_head=tied,
            shift_logits=True, rope_fp32=False, max_seq_len=max_len, **ids)
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
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None
    return parse_config(raw, path)
