"""Loading real-format checkpoints, and every way a checkpoint folder can be wrong."""
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from dllm.models import CheckpointError, load_checkpoint, load_config
from dllm.models.layers import forward
from dllm.models.tiny import write_tiny


@pytest.mark.parametrize("family", ["llada", "dream"])
def test_sharded_and_single_file_load_the_same_weights(tmp_path, family):
    cfg1, w1 = load_checkpoint(write_tiny(tmp_path / "one", family, tokenizer=False))
    cfg2, w2 = load_checkpoint(write_tiny(tmp_path / "two", family, sharded=True, tokenizer=False))
    assert cfg1 == cfg2
    assert (tmp_path / "two" / "model.safetensors.index.json").is_file()
    for name, t in w1.tensors().items():
        assert torch.equal(t, w2.tensors()[name]), name


@pytest.mark.parametrize("family", ["llada", "dream"])
def test_fusion_keeps_the_checkpoint_tensors(tmp_path, family):
    d = write_tiny(tmp_path / family, family, tokenizer=False)
    cfg, w = load_checkpoint(d)
    raw = load_file(str(d / "model.safetensors"))
    q, kv, F = cfg.q_width, cfg.kv_width, cfg.mlp_hidden
    if family == "llada":
        b = "model.transformer.blocks.1."
        qn, kn, vn, gn, un = (b + "q_proj.weight", b + "k_proj.weight", b + "v_proj.weight",
                              b + "ff_proj.weight", b + "up_proj.weight")
        assert torch.equal(w.head, raw["model.transformer.ff_out.weight"])
    else:
        b = "model.layers.1."
        qn, kn, vn = (b + f"self_attn.{x}_proj.weight" for x in "qkv")
        gn, un = b + "mlp.gate_proj.weight", b + "mlp.up_proj.weight"
        assert torch.equal(w.bqkv[1, q:q + kv], raw[b + "self_attn.k_proj.bias"])
        assert torch.equal(w.head, raw["lm_head.weight"])
    assert torch.equal(w.wqkv[1, :q], raw[qn])
    assert torch.equal(w.wqkv[1, q:q + kv], raw[kn])
    assert torch.equal(w.wqkv[1, q + kv:], raw[vn])
    assert torch.equal(w.w_gate_up[1, :F], raw[gn])       # the gate (SiLU side) first
    assert torch.equal(w.w_gate_up[1, F:], raw[un])


def test_dtype_is_the_callers(tmp_path):
    d = write_tiny(tmp_path / "m", "dream", tokenizer=False)
    cfg, w = load_checkpoint(d, dtype=torch.bfloat16)
    assert all(t.dtype == torch.bfloat16 for t in w.tensors().values())
    logits = forward(w, cfg, torch.tensor([[5, 6, 7]]))
    assert logits.dtype == torch.bfloat16 and torch.isfinite(logits.float()).all()


def test_ids_come_from_the_config(tmp_path):
    d = write_tiny(tmp_path / "m", "llada", tokenizer=False)
    cfg, _ = load_checkpoint(d)
    assert (cfg.mask_id, cfg.eos_id, cfg.pad_id) == (2, 0, 0)       # tiny vocab: the config's ids, not 126336
    raw = json.loads((d / "config.json").read_text())
    del raw["mask_token_id"]
    raw["vocab_size"] = raw["embedding_size"] = 126464
    (d / "config.json").write_text(json.dumps(raw))
    assert load_config(d).mask_id == 126336                          # the released LLaDA id, the fallback
    raw["vocab_size"] = raw["embedding_size"] = 128
    (d / "config.json").write_text(json.dumps(raw))
    with pytest.raises(CheckpointError, match=r"mask_id 126336 .* outside the vocabulary \[0, 128\)"):
        load_config(d)                                               # a fallback the vocabulary cannot hold


# ---------------------------------------------------------------- bad input: one clear message each

def _folder(tmp_path, family="llada", **kw):
    return write_tiny(tmp_path / "m", family, tokenizer=False, **kw)


def _edit_tensors(folder, fn):
    path = folder / "model.safetensors"
    t = load_file(str(path))
    fn(t)
    save_file(t, str(path))


def _fails(folder, *needles):
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(folder)
    msg = str(e.value)
    for n in needles:
        assert n in msg, msg
    return msg


def test_missing_tensor(tmp_path):
    d = _folder(tmp_path)
    _edit_tensors(d, lambda t: t.pop("model.transformer.blocks.1.up_proj.weight"))
    _fails(d, "1 tensors missing", "blocks.1.up_proj.weight", "different model")


def test_extra_tensor(tmp_path):
    d = _folder(tmp_path, "dream")
    _edit_tensors(d, lambda t: t.__setitem__("model.layers.7.mlp.up_proj.weight", torch.zeros(2, 2)))
    _fails(d, "unexpected tensors", "model.layers.7.mlp.up_proj.weight")


def test_misshaped_tensor(tmp_path):
    d = _folder(tmp_path)
    _edit_tensors(d, lambda t: t.__setitem__("model.transformer.blocks.0.q_proj.weight", torch.zeros(64, 32)))
    _fails(d, "blocks.0.q_proj.weight", "shape (64, 32)", "expected (64, 64)")


def test_truncated_file(tmp_path):
    d = _folder(tmp_path)
    p = d / "model.safetensors"
    p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])
    _fails(d, "truncated or corrupt", "download it again")


def test_missing_shard(tmp_path):
    d = _folder(tmp_path, sharded=True)
    (d / "model-00002-of-00002.safetensors").unlink()
    _fails(d, "model-00002-of-00002.safetensors", "missing shard")


def test_config_of_neither_family(tmp_path):
    d = _folder(tmp_path)
    (d / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 64}))
    _fails(d, "neither LLaDA", "'llama'")


def test_not_a_checkpoint_folder(tmp_path):
    _fails(tmp_path, "no config.json")
    _fails(tmp_path / "nope", "not a directory")
    d = _folder(tmp_path)
    (d / "model.safetensors").unlink()
    _fails(d, "no model.safetensors")


def test_config_missing_a_field(tmp_path):
    d = _folder(tmp_path, "dream")
    raw = json.loads((d / "config.json").read_text())
    del raw["num_hidden_layers"]
    (d / "config.json").write_text(json.dumps(raw))
    _fails(d, "num_hidden_layers")


def test_weights_of_another_size(tmp_path):
    d = _folder(tmp_path)
    other = write_tiny(tmp_path / "small", "llada", "small", tokenizer=False)
    shutil.copy(other / "model.safetensors", d / "model.safetensors")
    _fails(d, "unexpected tensors", "2 layers")
