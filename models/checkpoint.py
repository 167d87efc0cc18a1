"""Safetensors loading: a single file or a sharded index, both naming schemes mapped to one layout.

Q/K/V are fused into one [q+2kv, d] matrix and gate/up into one [2F, d] matrix at load time, so a
layer runs two input matmuls instead of five. Per-layer tensors are stacked on a leading layer axis.
"""
from __future__ import annotations

import dataclasses
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
from .quant import CONFIG_KEY, STORED_FILE, Quantization, device_shapes, matrix_shapes, quantize, to_device
from .quant import nbytes as qnbytes


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
    # Quantized matrices (models/quant.py): the field above holds the int8 / packed int4 weight, this its scales
    wqkv_scale: torch.Tensor | None = None
    wo_scale: torch.Tensor | None = None
    w_gate_up_scale: torch.Tensor | None = None
    w_down_scale: torch.Tensor | None = None
    head_scale: torch.Tensor | None = None
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
                 quant: Quantization | None = None, packed: bool = True, shard: Shard = Shard()) -> Weights:
    """The folder's weights as `dtype` on `device`. quant: quantize the attention and FFN matrices (and
    the head if asked) layer by layer while loading: each layer's fused matrix is assembled in float32 on
    the CPU, quantized on the device and packed; the dense model is never held on the device. A folder
    written by `dllm quantize` (models/quant.CONFIG_KEY in config.json) loads its stored quantized form.
    packed=False keeps quantized matrices in their stored form (what `save_quantized` writes). shard: only
    this tensor-parallel rank's heads, FFN columns and vocabulary rows are read, allocated and quantized."""
    folder = Path(folder)
    stored = stored_quantization(folder)
    if stored is not None:
        if quant is not None and quant.on and quant != stored:
            raise CheckpointError(f"{folder} is already quantized ({stored.mode}); load it without --quantize or "
                                  f"with the same options, or quantize the original checkpoint")
        if shard.parallel:
            raise CheckpointError(f"{folder} was written by dllm quantize, which loads on one rank; under --tp "
                                  f"{shard.world} load the original checkpoint with --quantize {stored.mode}")
        return _load_stored(folder, cfg, stored, dtype, device)
    quant = quant or Quantization()
    local = rank_shapes(cfg, shard)          # this rank's matrices (all of them without parallelism)
    quant.check(local)
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

    shapes = {**dense_shapes(local, quant), "embed": (cfg.vocab_size, cfg.d_model)}   # the embedding: whole
    handles: dict = {}
    _check_headers(expected, where, handles)
    embed_rest = (cfg.vocab_size - local.vocab_size) * cfg.d_model * torch.empty(0, dtype=dtype).element_size()
    check_fits(load_bytes(local, quant, dtype, device) + embed_rest, device,
               f"loading the weights of {folder} as {str(dtype).replace('torch.', '')}"
               + (f" ({quant.mode})" if quant.on else ""))
    out = {k: torch.empty(s, dtype=dtype, device=device) for k, s in shapes.items()}
    out |= {k: torch.empty(s, dtype=dt, device=device)
            for k, (s, dt) in device_shapes(local, quant, device, dtype, packed).items()}
    staged: dict = {}                        # (field, layer) -> [float32 matrix on the CPU, rows still missing]
    full = matrix_shapes(local)

    for name, (field, layer, rows, shape) in expected.items():
        rows = shard.local_rows(rows)        # where this rank's part of the segment lands in its fused matrix
        try:
            t = shard.read(handles[where[name]].get_slice(name), field, shape)
        except Exception as e:
            raise CheckpointError(f"{where[name]}: cannot read tensor '{name}' ({e}); the file is truncated or "
                                  f"corrupt, download it again") from None
        if field in quant.fields(cfg):
            if not bool(torch.isfinite(t).all()):      # dense fields are checked once converted, below
                raise CheckpointError(f"{where[name]}: tensor '{name}' holds NaN or Inf values; the checkpoint is "
                                      f"corrupt")
            slot = staged.setdefault((field, layer), [torch.empty(full[field]), full[field][0]])
            (slot[0] if rows is None else slot[0][rows]).copy_(t)
            slot[1] -= t.shape[0]
            if slot[1] == 0:                 # the layer's fused matrix is complete: quantize it and let it go
                m = staged.pop((field, layer))[0].to(device)
                q, s = quantize(m, quant.mode, quant.group_for(field, m.shape[1]), dtype)
                if packed:
                    q, s = to_device(q, s, device, dtype)
                dst, dst_s = (out[field], out[field + "_scale"]) if layer is None else \
                    (out[field][layer], out[field + "_scale"][layer])
                dst.copy_(q)
                dst_s.copy_(s)
            continue
        dst = out[field] if layer is None else out[field][layer]
        if rows is not None:
            dst = dst[rows]
        dst.copy_(t)
    for field, t in out.items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise CheckpointError(f"{folder}: weight '{field}' holds NaN or Inf values (after conversion to "
                                  f"{str(dtype).replace('torch.', '')}); the checkpoint is corrupt")
    if cfg.tied_head:                        # the head is the embedding (this rank's vocabulary rows of it)
        out["head"] = out["embed"][shard.rows(local.vocab_size)]
    out.setdefault("bqkv", None)
    return Weights(**out, shard=shard)


def rank_shapes(cfg: ModelConfig, shard: Shard) -> ModelConfig:
    """The config whose shapes one rank's matrices have: its heads, FFN columns and vocabulary rows (the
    head's; the embedding stays whole). For sizing weights only: the rank computes with shard.local(cfg)."""
    return dataclasses.replace(shard.local(cfg), vocab_size=cfg.vocab_size // shard.world)


def dense_shapes(cfg: ModelConfig, quant: Quantization | None = None) -> dict[str, tuple[int, ...]]:
    """The Weights fields held dense (in the engine dtype) and their shapes."""
    d, q, kv, F, V, nL = cfg.d_model, cfg.q_width, cfg.kv_width, cfg.mlp_hidden, cfg.vocab_size, cfg.n_layers
    shapes = dict(embed=(V, d), attn_norm=(nL, d), wqkv=(nL, q + 2 * kv, d), wo=(nL, d, q), ffn_norm=(nL, d),
                  w_gate_up=(nL, 2 * F, d), w_down=(nL, d, F), final_norm=(d,), head=(V, d))
    if cfg.qkv_bias:
        shapes["bqkv"] = (nL, q + 2 * kv)
    if cfg.tied_head:
        del shapes["head"]
    for f in (quant.fields(cfg) if quant is not None else ()):
        del shapes[f]
    return shapes


def weight_bytes(cfg: ModelConfig, quant: Quantization | None, dtype, device="cpu") -> int:
    """Bytes of the loaded weights (quantized matrices counted as stored on `device`)."""
    quant = quant or Quantization()
    dense = sum(math.prod(s) for s in dense_shapes(cfg, quant).values()) * torch.empty(0, dtype=dtype).element_size()
    return dense + qnbytes(device_shapes(cfg, quant, device, dtype))


def load_bytes(cfg: ModelConfig, quant: Quantization | None, dtype, device="cpu") -> int:
    """The peak a load needs on `device`: the loaded weights, plus (quantizing) one layer's largest fused
    matrix in float32 with its rounding temporaries (about 3x: the matrix, w / scale, the int values)."""
    quant = quant or Quantization()
    peak = 0
    if quant.on:
        peak = 3 * 4 * max(math.prod(s) for f, s in matrix_shapes(cfg).items() if f in quant.fields(cfg))
    return weight_bytes(cfg, quant, dtype, device) + peak


def stored_quantization(folder: Path) -> Quantization | None:
    """The quantization a `dllm quantize` folder was written with (None: an ordinary checkpoint)."""
    try:
        raw = json.loads((Path(folder) / "config.json").read_text())
    except (OSError, ValueError):
        return None
    return Quantization.from_entry(raw[CONFIG_KEY]) if isinstance(raw, dict) and CONFIG_KEY in raw else None


def _load_stored(folder: Path, cfg: ModelConfig, quant: Quantization, dtype, device) -> Weights:
    """A `dllm quantize` folder: Weights fields by name (quantized ones in their stored form), packed for
    the device without re-quantizing."""
    path = folder / STORED_FILE
    if not path.is_file():
        raise CheckpointError(f"{folder}: config.json says '{CONFIG_KEY}' but there is no {STORED_FILE}; "
                              f"write the folder again with dllm quantize")
    h = _open(path)
    check_fits(load_bytes(cfg, quant, dtype, device), device, f"loading the quantized weights of {folder}")
    names = set(h.keys())
    need = set(dense_shapes(cfg, quant)) | {f for f in quant.fields(cfg)} | {f + "_scale" for f in quant.fields(cfg)}
    if need - names:
        raise CheckpointError(f"{path}: tensors missing: {_listing(need - names)}; write the folder again with "
                              f"dllm quantize")
    out = {k: h.get_tensor(k).to(device=device, dtype=dtype) for k in dense_shapes(cfg, quant)}
    for f in quant.fields(cfg):
        q, s = h.get_tensor(f), h.get_tensor(f + "_scale")
        if f == "head":
            out[f], out[f + "_scale"] = to_device(q, s, device, dtype)
        else:
            packed = [to_device(q[i], s[i], device, dtype) for i in range(cfg.n_layers)]
            out[f] = torch.stack([p[0] for p in packed])
            out[f + "_scale"] = torch.stack([p[1] for p in packed])
    if cfg.tied_head:
        out["head"] = out["embed"]
    out.setdefault("bqkv", None)
    return Weights(**out)


def save_quantized(folder: str | Path, out: str | Path, quant: Quantization, dtype=torch.float32) -> Path:
    """Write a quantized copy of a checkpoint folder: its non-weight files, config.json with the
    CONFIG_KEY entry and quantized.safetensors (dense fields in dtype, quantized ones in their stored,
    device-independent form). Layer by layer on the CPU."""
    import shutil

    from safetensors.torch import save_file
    folder, out = Path(folder), Path(out)
    cfg = load_config(folder)
    quant.check(cfg)
    dense = load_weights(folder, cfg, dtype=dtype, quant=quant, packed=False).tensors()
    out.mkdir(parents=True, exist_ok=True)
    for p in folder.iterdir():
        if p.is_file() and not p.name.endswith(".safetensors") and p.name not in ("config.json",
                                                                                  "model.safetensors.index.json"):
            shutil.copy2(p, out / p.name)
    raw = json.loads((folder / "config.json").read_text())
    raw[CONFIG_KEY] = quant.entry(cfg)
    (out / "config.json").write_text(json.dumps(raw, indent=2))
    if cfg.tied_head:
        del dense["head"]
    save_file({k: v.contiguous() for k, v in dense.items()}, str(out / STORED_FILE))
    return out


def load_checkpoint(folder: str | Path, dtype=torch.float32, device="cpu", quant: Quantization | None = None,
                    shard: Shard = Shard()) -> tuple[ModelConfig, Weights]:
    cfg = load_config(folder)
    return cfg, load_weights(folder, cfg, dtype=dtype, device=device, quant=quant, shard=shard)
