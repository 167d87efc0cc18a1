"""ModelConfig: one dataclass for LLaDA and Dream, parsed from an unmodified config.json.

The two families share one architecture (pre-norm Llama-style blocks, bidirectional attention);
they differ in field names, GQA, q/k/v bias, RoPE precision and whether logits are shifted by one.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

from .family import FAMILIES, Family


class CheckpointError(ValueError):
    """A checkpoint folder, config or tensor file that cannot be used; the message says how to fix it."""


@dataclass(frozen=True)
class ModelConfig:
    family: str            # a key of models.family.FAMILIES: "llada" | "dream"
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


def _ids(f: _Fields, family: type[Family], vocab: int | None) -> dict:
    fallback = family.ids
    out = dict(fallback)
    for ours, theirs in [("mask_id", "mask_token_id"), ("eos_id", "eos_token_id"),
                         ("pad_id", "pad_token_id"), ("bos_id", "bos_token_id")]:
        out[ours] = f.token_id(theirs, fallback[ours], vocab)
    for ours, theirs in [("mask_id", "mask_token_id"), ("eos_id", "eos_token_id"), ("pad_id", "pad_token_id")]:
        if raw_missing(f.raw, theirs) and vocab and not 0 <= out[ours] < vocab:   # a fallback the vocab lacks
            f.problems.append(f"{ours} {out[ours]} (the {family.label} default) is outside the vocabulary "
                              f"[0, {vocab}); set it in config.json")
    return out


def family_of(raw: dict) -> type[Family] | None:
    mt = str(raw.get("model_type", "")).lower()
    archs = raw.get("architectures") or []
    arch = " ".join(a for a in archs if isinstance(a, str)).lower() if isinstance(archs, list) else ""
    return next((fam for fam in FAMILIES.values() if fam.matches(mt, arch)), None)


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
    if fam is None:
        raise CheckpointError(
            f"{path}: model_type={raw.get('model_type')!r}, architectures={raw.get('architectures')!r} is neither "
            f"{' nor '.join(f'{x.label} (model_type {x.name!r})' for x in FAMILIES.values())}; point --model at a "
            f"LLaDA or Dream checkpoint folder")
    f = _Fields(raw, path)
    v = fam.fields(f)
    d, n_heads, n_kv = v["d_model"], v["n_heads"], v["n_kv_heads"]
    f.problems += _shape_problems(d, n_heads, n_kv)
    ids = _ids(f, fam, v["vocab_size"])
    for other in ("eos_id", "pad_id"):
        if ids["mask_id"] == ids[other]:
            f.problems.append(f"mask_token_id {ids['mask_id']} is also the {other.replace('_id', '')} id: the model "
                              f"could not tell a masked position from the end of the text; fix config.json")
    f.done()
    return ModelConfig(family=fam.name, head_dim=d // n_heads, qkv_bias=fam.qkv_bias, shift_logits=fam.shift_logits,
                       rope_fp32=fam.rope_fp32, **v, **ids)


def load_config(folder: str | Path) -> ModelConfig:
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: not a directory; --model must be a checkpoint folder "
                              f"holding config.json and model.safetensors, or a Hugging Face hub id (org/name)")
    path = folder / "config.json"
    if not path.is_file():
        raise CheckpointError(f"{folder}: no config.json; --model must be a LLaDA or Dream checkpoint folder")
    try:
        raw = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None
    except RecursionError:
        raise CheckpointError(f"{path}: nested too deeply to be a model config; download it again") from None
    return parse_config(raw, path)
