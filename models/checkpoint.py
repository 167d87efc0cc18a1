"""Safetensors loading: a single file or a sharded index, both naming schemes mapped to one layout.

Q/K/V are fused into one [q+2kv, d] matrix and gate/up into one [2F, d] matrix at load time, so a
layer runs two input matmuls instead of five. Per-layer tensors are stacked on a leading layer axis.
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, fields
from pathlib import Path

import torch
from safetensors import safe_open

from .config import CheckpointError, ModelConfig, load_config
from .family import FAMILIES
from .memory import check_fits
from .parallel import Shard


@dataclass
class Weights:
    embed: torch.Tensor        # [V, d]
    attn_norm: torch.Tensor    # [nL, d]
    wqkv: torch.Tensor         # [nL, q + 2kv, d]   rows: q | k | v
    bqkv: torch.Tensor | None  # [nL, q + 2kv]      Dream only
    wo: torch.Tensor           # [nL, d, q]
    ffn_norm: torch.Tensor     # [nL, d]
    w_gate_up: torch.Tensor    # [nL, 2F, d]        rows: gate | up
    w_down: torch.Tensor       # [nL, d, F]
    final_norm: torch.Tensor   # [d]
    head: torch.Tensor         # [V, d]             the embedding itself when tied
    shard: Shard = Shard()     # the tensor-parallel rank these weights are (q, kv, F and V above are 1/N each)

    def tensors(self) -> dict[str, torch.Tensor]:
        return {n: t for n in TENSOR_FIELDS if (t := getattr(self, n)) is not None}


TENSOR_FIELDS = tuple(f.name for f in fields(Weights) if f.name != "shard")


def checkpoint_names(cfg: ModelConfig) -> dict[str, tuple[str, int | None, slice | None, tuple[int, ...]]]:
    """Checkpoint tensor name -> (Weights field, layer or None, row slice in the fused tensor, expected shape)."""
    return FAMILIES[cfg.family].tensor_names(cfg)


def _shard_map(folder: Path) -> dict[str, Path]:
    """Tensor name -> file holding it (a shard index may only name files inside the folder)."""
    single, index = folder / "model.safetensors", folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index}: not a safetensors index (needs a 'weight_map'): {e!r}") from None
        if not isinstance(weight_map, dict) or not all(isinstance(n, str) and isinstance(f, str)
                                                       for n, f in weight_map.items()):
            raise CheckpointError(f"{index}: 'weight_map' must map tensor names to shard file names")
        root = folder.resolve()
        files = {f: (folder / f).resolve() for f in set(weight_map.values())}
        for f, p in files.items():
            if root not in p.parents:
                raise CheckpointError(f"{index} names shard '{f}', which is outside {folder}; a shard index "
                                      f"may only name files in the model folder")
            if not p.is_file():
                raise CheckpointError(f"{index} names shard '{f}', which is not in {folder}; "
                                      f"download the missing shard")
        return {name: files[f] for name, f in weight_map.items()}
    if single.is_file():
        return {name: single for name in _open(single).keys()}
    raise CheckpointError(f"{folder}: no model.safetensors or model.safetensors.index.json; "
                          f"--model must be a checkpoint folder with safetensors weights")


FLOAT_DTYPES = ("F32", "F16", "BF16", "F64")    # safetensors dtype names a weight may be stored as


def _check_headers(expected: dict, where: dict[str, Path], handles: dict) -> None:
    """Shapes and dtypes from the safetensors headers, before anything is allocated."""
    for name, (_field, _layer, _rows, shape) in expected.items():
        path = where[name]
        h = handles.get(path) or handles.setdefault(path, _open(path))
        try:
            sl = h.get_slice(name)
            got, dtype = tuple(sl.get_shape()), sl.get_dtype()
        except Exception as e:  # safetensors' own error type
            raise CheckpointError(f"{path}: cannot read tensor '{name}' ({e}); the file is truncated or "
                                  f"corrupt, download it again") from None
        if got != shape:
            raise CheckpointError(f"{path}: tensor '{name}' has shape {got}, expected {shape} from "
                                  f"config.json; the config and the weights do not belong together")
        if dtype not in FLOAT_DTYPES:
            raise CheckpointError(f"{path}: tensor '{name}' is stored as {dtype}; weights must be floating point "
                                  f"({', '.join(FLOAT_DTYPES)})")


def _open(path: Path):
    try:
        return safe_open(str(path), framework="pt", device="cpu")
    except Exception as e:  # safetensors raises its own error type for bad headers and short files
        raise CheckpointError(f"{path}: cannot read safetensors file ({e}); it is truncated or corrupt, "
                              f"download it again") from None


def _listing(names) -> str:
    names = sorted(names)
    more = f" and {len(names) - 5} more" if len(names) > 5 else ""
    return ", ".join(names[:5]) + more


def stored_layers(names) -> int:
    """How many layers the tensor names hold: 1 + the largest layer index in names like '...layers.N.'
    or '...blocks.N.' (0 when none)."""
    indices = [int(m.group(1)) for n in names if (m := _LAYER.search(n))]
    return max(indices, default=-1) + 1


_LAYER = re.compile(r"\.(?:layers|blocks)\.(\d+)\.")


def load_weights(folder: str | Path, cfg: ModelConfig, dtype=torch.float32, device="cpu",
                 shard: Shard = Shard()) -> Weights:
    """The weights of a checkpoint folder (shard: only this tensor-parallel rank's heads, FFN columns and
    vocabulary rows are read and allocated)."""
    folder = Path(folder)
    where = _shard_map(folder)
    held = stored_layers(where)
    if cfg.n_layers > held:                  # before the name table of every layer is built (a million of them)
        raise CheckpointError(f"{folder}: config.json says {cfg.n_layers} layers but the weights hold {held}; the "
                              f"config and the weights do not belong together")
    expected = checkpoint_names(cfg)
    missing, extra = set(expected) - set(where), set(where) - set(expected)
    hint = (f"config.json says {cfg.family} with {cfg.n_layers} layers, d={cfg.d_model}: the weights belong to a "
            f"different model, or a shard is missing")
    if missing:
        raise CheckpointError(f"{folder}: {len(missing)} tensors missing: {_listing(missing)}; {hint}")
    if extra:
        raise CheckpointError(f"{folder}: {len(extra)} unexpected tensors: {_listing(extra)}; {hint}")

    lc = shard.local(cfg)                    # this rank's heads and FFN columns (all of them without parallelism)
    d, q, kv, F, V, nL = cfg.d_model, lc.q_width, lc.kv_width, lc.mlp_hidden, cfg.vocab_size, cfg.n_layers
    shapes = dict(embed=(V, d), attn_norm=(nL, d), wqkv=(nL, q + 2 * kv, d), wo=(nL, d, q), ffn_norm=(nL, d),
                  w_gate_up=(nL, 2 * F, d), w_down=(nL, d, F), final_norm=(d,), head=(V // shard.world, d))
    if cfg.qkv_bias:
        shapes["bqkv"] = (nL, q + 2 * kv)
    if cfg.tied_head:
        del shapes["head"]
    handles: dict = {}
    _check_headers(expected, where, handles)
    nbytes = sum(math.prod(s) for s in shapes.values()) * torch.empty(0, dtype=dtype).element_size()
    check_fits(nbytes, device, f"loading the weights of {folder} as {str(dtype).replace('torch.', '')}")
    out = {k: torch.empty(s, dtype=dtype, device=device) for k, s in shapes.items()}

    for name, (field, layer, rows, shape) in expected.items():
        try:
            t = shard.read(handles[where[name]].get_slice(name), field, shape)
        except Exception as e:
            raise CheckpointError(f"{where[name]}: cannot read tensor '{name}' ({e}); the file is truncated or "
                                  f"corrupt, download it again") from None
        dst = out[field] if layer is None else out[field][layer]
        if rows is not None:
            dst = dst[shard.local_rows(rows)]
        dst.copy_(t)
    for field, t in out.items():
        if not bool(torch.isfinite(t).all()):
            raise CheckpointError(f"{folder}: weight '{field}' holds NaN or Inf values (after conversion to "
                                  f"{str(dtype).replace('torch.', '')}); the checkpoint is corrupt")
    if cfg.tied_head:                        # the head is the embedding (this rank's vocabulary rows of it)
        out["head"] = out["embed"][shard.rows(V // shard.world)]
    out.setdefault("bqkv", None)
    return Weights(**out, shard=shard)


def load_checkpoint(folder: str | Path, dtype=torch.float32, device="cpu",
                    shard: Shard = Shard()) -> tuple[ModelConfig, Weights]:
    cfg = load_config(folder)
    return cfg, load_weights(folder, cfg, dtype=dtype, device=device, shard=shard)
