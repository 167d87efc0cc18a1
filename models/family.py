"""The two model families as plug-ins: what tells a LLaDA checkpoint from a Dream one, how each names
its config fields and tensors, and its fallback token ids. Everything else is shared (one architecture,
one ModelConfig); the runtime's family-specific decoding lives in runtime/decoding.py's FAMILY_DECODING.

Adding a family is one class here and one line in FAMILIES.
"""
from __future__ import annotations

from typing import ClassVar


class Family:
    name: ClassVar[str]
    label: ClassVar[str]              # how messages name it
    shift_logits: ClassVar[bool]      # hidden row i predicts token i+1
    rope_fp32: ClassVar[bool]         # q/k rotated in fp32 (else in the activation dtype)
    qkv_bias: ClassVar[bool]
    ids: ClassVar[dict[str, int]]     # fallback ids when config.json lacks them (the released checkpoints')

    @classmethod
    def matches(cls, model_type: str, architectures: str) -> bool:
        raise NotImplementedError

    @classmethod
    def fields(cls, f) -> dict:
        """The ModelConfig fields read from a raw config (f: config._Fields, which collects problems)."""
        raise NotImplementedError

    @classmethod
    def tensor_names(cls, cfg) -> dict[str, tuple[str, int | None, slice | None, tuple[int, ...]]]:
        """Checkpoint tensor name -> (Weights field, layer or None, row slice in the fused tensor, shape)."""
        raise NotImplementedError


def _fused(cfg):
    """Row slices of the fused q|k|v and gate|up matrices."""
    q, kv, F = cfg.q_width, cfg.kv_width, cfg.mlp_hidden
    return (slice(0, q), slice(q, q + kv), slice(q + kv, q + 2 * kv)), (slice(0, F), slice(F, 2 * F))


class LLaDA(Family):
    name, label = "llada", "LLaDA"
    shift_logits, rope_fp32, qkv_bias = False, True, False
    ids = dict(mask_id=126336, eos_id=126081, pad_id=126081, bos_id=126080, eot_id=126348)

    @classmethod
    def matches(cls, model_type, architectures):
        return model_type == "llada" or "llada" in architectures

    @classmethod
    def fields(cls, f) -> dict:
        d, n_heads = f.int("d_model"), f.int("n_heads")
        ratio = f.number("mlp_ratio", 4.0)
        out = dict(d_model=d, n_heads=n_heads, n_kv_heads=f.int("n_kv_heads", n_heads),
                   mlp_hidden=f.int("mlp_hidden_size", int(ratio * d) if d else None),
                   vocab_size=f.int("embedding_size", required=False) or f.int("vocab_size"),
                   n_layers=f.int("n_layers"), rope_theta=f.number("rope_theta", 10000.0),
                   norm_eps=f.number("rms_norm_eps", 1e-5), tied_head=f.flag("weight_tying"),
                   max_seq_len=f.int("max_sequence_length", required=False))
        if f.flag("include_bias") or f.flag("include_qkv_bias"):
            f.problems.append("LLaDA with biases (include_bias/include_qkv_bias) is not supported; the released "
                              "checkpoints have none")
        return out

    @classmethod
    def tensor_names(cls, cfg):
        d, q, kv, F, V = cfg.d_model, cfg.q_width, cfg.kv_width, cfg.mlp_hidden, cfg.vocab_size
        (qs, ks, vs), (gs, us) = _fused(cfg)
        p = "model.transformer."
        out = {p + "wte.weight": ("embed", None, None, (V, d)), p + "ln_f.weight": ("final_norm", None, None, (d,))}
        if not cfg.tied_head:
            out[p + "ff_out.weight"] = ("head", None, None, (V, d))
        for i in range(cfg.n_layers):
            b = f"{p}blocks.{i}."
            out[b + "attn_norm.weight"] = ("attn_norm", i, None, (d,))
            out[b + "ff_norm.weight"] = ("ffn_norm", i, None, (d,))
            out[b + "q_proj.weight"] = ("wqkv", i, qs, (q, d))
            out[b + "k_proj.weight"] = ("wqkv", i, ks, (kv, d))
            out[b + "v_proj.weight"] = ("wqkv", i, vs, (kv, d))
            out[b + "attn_out.weight"] = ("wo", i, None, (d, q))
            out[b + "ff_proj.weight"] = ("w_gate_up", i, gs, (F, d))   # gate: SiLU is applied to it
            out[b + "up_proj.weight"] = ("w_gate_up", i, us, (F, d))
            out[b + "ff_out.weight"] = ("w_down", i, None, (d, F))
        return out


class Dream(Family):
    name, label = "dream", "Dream"
    shift_logits, rope_fp32, qkv_bias = True, False, True
    ids = dict(mask_id=151666, eos_id=151643, pad_id=151643, bos_id=151665, eot_id=151645)

    @classmethod
    def matches(cls, model_type, architectures):
        return model_type == "dream" or "dream" in architectures

    @classmethod
    def fields(cls, f) -> dict:
        n_heads = f.int("num_attention_heads")
        return dict(d_model=f.int("hidden_size"), n_heads=n_heads, n_kv_heads=f.int("num_key_value_heads", n_heads),
                    n_layers=f.int("num_hidden_layers"), mlp_hidden=f.int("intermediate_size"),
                    vocab_size=f.int("vocab_size"), rope_theta=f.number("rope_theta", 10000.0),
                    norm_eps=f.number("rms_norm_eps", 1e-6), tied_head=f.flag("tie_word_embeddings"),
                    max_seq_len=f.int("max_position_embeddings", required=False))

    @classmethod
    def tensor_names(cls, cfg):
        d, q, kv, F, V = cfg.d_model, cfg.q_width, cfg.kv_width, cfg.mlp_hidden, cfg.vocab_size
        (qs, ks, vs), (gs, us) = _fused(cfg)
        out = {"model.embed_tokens.weight": ("embed", None, None, (V, d)),
               "model.norm.weight": ("final_norm", None, None, (d,))}
        if not cfg.tied_head:
            out["lm_head.weight"] = ("head", None, None, (V, d))
        for i in range(cfg.n_layers):
            b = f"model.layers.{i}."
            out[b + "input_layernorm.weight"] = ("attn_norm", i, None, (d,))
            out[b + "post_attention_layernorm.weight"] = ("ffn_norm", i, None, (d,))
            for name, sl, width in [("q", qs, q), ("k", ks, kv), ("v", vs, kv)]:
                out[b + f"self_attn.{name}_proj.weight"] = ("wqkv", i, sl, (width, d))
                out[b + f"self_attn.{name}_proj.bias"] = ("bqkv", i, sl, (width,))
            out[b + "self_attn.o_proj.weight"] = ("wo", i, None, (d, q))
            out[b + "mlp.gate_proj.weight"] = ("w_gate_up", i, gs, (F, d))
            out[b + "mlp.up_proj.weight"] = ("w_gate_up", i, us, (F, d))
            out[b + "mlp.down_proj.weight"] = ("w_down", i, None, (d, F))
        return out


FAMILIES: dict[str, type[Family]] = {f.name: f for f in (LLaDA, Dream)}
