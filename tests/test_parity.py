"""Numerical parity of models/ against the Hugging Face reference implementations.

LLaDA's block is a Llama block (RMSNorm, rotate-half RoPE, SwiGLU, no biases, separate LM head) and
Dream is Qwen2 (the same, plus q/k/v biases and GQA), so a tiny random checkpoint written by
`models.tiny.write_tiny` is converted tensor by tensor into `transformers.LlamaForCausalLM` /
`transformers.Qwen2ForCausalLM` and both are run on the same token ids. The HF side reads the
safetensors file directly (never through models.checkpoint), so a naming or fusing mistake in our
loader shows up as a mismatch instead of being replicated on both sides.

Making the HF models bidirectional (transformers 5.23)
------------------------------------------------------
Both diffusion LMs attend bidirectionally, while the HF decoder classes are causal. We use three
independent switches, any one of which removes the causal triangle, and then check the result:

1. ``attn_implementation="eager"`` (the primary mechanism). ``eager_attention_forward`` computes
   ``softmax(q k^T * scale + attention_mask)`` and never consults ``is_causal``; causality comes only
   from the mask the model builds.
2. We pass an explicit 4-D additive float mask ``[B, 1, L, L]`` (0.0 = visible, finfo.min = pad key).
   ``masking_utils._preprocess_mask_arguments`` returns a 4-D tensor as-is ("already prepared, or it
   is custom"), so exactly this mask — no causal triangle — is what reaches the attention function.
   With ``"sdpa"`` the same mask is passed as ``attn_mask`` and, because it is not None,
   ``sdpa_attention_forward`` forces ``is_causal=False``; the parity test runs under both backends.
3. ``config.is_causal = False`` plus ``is_causal = False`` on every attention module: the
   "power feature" in ``create_causal_mask`` that falls back to ``create_bidirectional_mask``, and
   the flag SDPA would use if a mask were ever dropped. Belt and braces, not relied upon alone.

``test_hf_reference_is_bidirectional`` proves the effect: changing the LAST token changes the logits
at position 0 in the converted HF model and in ours, while a stock causal HF model (negative control)
leaves position 0 bit-identical, so the probe can tell the two apart.
"""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

transformers = pytest.importorskip("transformers")
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM  # noqa: E402

from dllm.models import load_checkpoint  # noqa: E402
from dllm.models.layers import forward  # noqa: E402
from dllm.models.tiny import write_tiny  # noqa: E402

FAMILIES = ("llada", "dream")
ATOL = 1e-4          # fp32 parity with HF
PAD_ATOL = 1e-5      # padded vs unpadded run of our own model


# ----------------------------------------------------------------------------------------------
# Conversion to HF
# ----------------------------------------------------------------------------------------------

def _llada_to_llama_state(sd: dict[str, torch.Tensor], n_layers: int) -> dict[str, torch.Tensor]:
    """LLaDA (OLMo-style) tensor names -> LlamaForCausalLM names. Every source tensor is used once."""
    p = "model.transformer."
    out = {
        "model.embed_tokens.weight": sd[p + "wte.weight"],
        "model.norm.weight": sd[p + "ln_f.weight"],
        "lm_head.weight": sd[p + "ff_out.weight"],
    }
    per_layer = {
        "attn_norm": "input_layernorm",
        "ff_norm": "post_attention_layernorm",
        "q_proj": "self_attn.q_proj",
        "k_proj": "self_attn.k_proj",
        "v_proj": "self_attn.v_proj",
        "attn_out": "self_attn.o_proj",
        "ff_proj": "mlp.gate_proj",     # LLaDA's ff_proj is the SiLU-gated half
        "up_proj": "mlp.up_proj",
        "ff_out": "mlp.down_proj",      # the block-level ff_out is the down projection
    }
    for i in range(n_layers):
        for src, dst in per_layer.items():
            out[f"model.layers.{i}.{dst}.weight"] = sd[f"{p}blocks.{i}.{src}.weight"]
    assert len(out) == len(sd), "some LLaDA tensors were not mapped"
    return out


def _make_bidirectional(model: torch.nn.Module) -> None:
    model.config.is_causal = False
    n = 0
    for m in model.modules():
        if hasattr(m, "is_causal"):
            m.is_causal = False
            n += 1
    assert n == model.config.num_hidden_layers, "expected one attention module per layer"


def build_hf(folder, family: str, attn_implementation: str = "eager", bidirectional: bool = True):
    """The HF reference model for a tiny checkpoint folder, weights read straight from safetensors."""
    import json
    raw = json.loads((folder / "config.json").read_text())
    sd = load_file(str(folder / "model.safetensors"))
    if family == "llada":
        d, nh = raw["d_model"], raw["n_heads"]
        hf_cfg = LlamaConfig(
            hidden_size=d, intermediate_size=raw["mlp_hidden_size"], num_hidden_layers=raw["n_layers"],
            num_attention_heads=nh, num_key_value_heads=raw.get("n_kv_heads") or nh,
            vocab_size=raw["embedding_size"], head_dim=d // nh,
            rope_parameters={"rope_type": "default", "rope_theta": float(raw["rope_theta"])},
            rms_norm_eps=raw["rms_norm_eps"], tie_word_embeddings=False, attention_bias=False, mlp_bias=False,
            max_position_embeddings=raw["max_sequence_length"], attn_implementation=attn_implementation,
        )
        model = LlamaForCausalLM(hf_cfg)
        state = _llada_to_llama_state(sd, raw["n_layers"])
    else:
        d, nh = raw["hidden_size"], raw["num_attention_heads"]
        hf_cfg = Qwen2Config(
            hidden_size=d, intermediate_size=raw["intermediate_size"], num_hidden_layers=raw["num_hidden_layers"],
            num_attention_heads=nh, num_key_value_heads=raw["num_key_value_heads"], vocab_size=raw["vocab_size"],
            head_dim=d // nh, rope_parameters={"rope_type": "default", "rope_theta": float(raw["rope_theta"])},
            rms_norm_eps=raw["rms_norm_eps"], tie_word_embeddings=False, use_sliding_window=False,
            max_position_embeddings=raw["max_position_embeddings"], attn_implementation=attn_implementation,
        )
        model = Qwen2ForCausalLM(hf_cfg)
        state = sd                      # Dream already uses Qwen2 names (q/k/v carry biases)
    missing, unexpected = model.load_state_dict(state, strict=True)
    assert not missing and not unexpected
    model = model.float().eval()
    if bidirectional:
        _make_bidirectional(model)
    assert model.config._attn_implementation == attn_implementation
    return model


def additive_mask(n_pad: torch.Tensor, L: int) -> torch.Tensor:
    """[B, 1, L, L] fp32 additive mask: every query sees every real key, pad keys get finfo.min."""
    real_key = torch.arange(L)[None] >= n_pad[:, None]                     # [B, L]
    m = torch.zeros(n_pad.shape[0], 1, L, L)
    return m.masked_fill(~real_key[:, None, None, :], torch.finfo(torch.float32).min)


def hf_logits(model, tokens: torch.Tensor, n_pad: torch.Tensor | None = None) -> torch.Tensor:
    B, L = tokens.shape
    if n_pad is None:
        n_pad = torch.zeros(B, dtype=torch.int64)
    pos = (torch.arange(L)[None] - n_pad[:, None]).clamp(min=0)           # same convention as ours
    with torch.no_grad():
        out = model(input_ids=tokens, attention_mask=additive_mask(n_pad, L), position_ids=pos, use_cache=False)
    return out.logits.float()


def ours_logits(w, cfg, tokens: torch.Tensor, n_pad: torch.Tensor | None = None) -> torch.Tensor:
    with torch.no_grad():
        return forward(w, cfg, tokens, n_pad).float()


# ----------------------------------------------------------------------------------------------
# Fixtures
# ----------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """family -> (folder, cfg, weights), written once per module."""
    out = {}
    for fam in FAMILIES:
        folder = write_tiny(tmp_path_factory.mktemp(f"parity-{fam}"), fam, "tiny", tokenizer=False)
        cfg, w = load_checkpoint(folder)
        out[fam] = (folder, cfg, w)
    return out


@pytest.fixture(scope="module")
def hf_models(tiny):
    """(family, attn_implementation) -> bidirectional HF reference model."""
    return {(fam, impl): build_hf(tiny[fam][0], fam, impl) for fam in FAMILIES for impl in ("eager", "sdpa")}


def _tokens(cfg, B: int, L: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, cfg.vocab_size, (B, L), generator=g)


# ----------------------------------------------------------------------------------------------
# Tests
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("family", FAMILIES)
def test_hf_conversion_is_configured_as_intended(tiny, hf_models, family):
    _, cfg, _ = tiny[family]
    model = hf_models[(family, "eager")]
    assert isinstance(model, LlamaForCausalLM if family == "llada" else Qwen2ForCausalLM)
    assert model.config._attn_implementation == "eager"
    assert model.config.is_causal is False
    assert all(m.is_causal is False for m in model.modules() if hasattr(m, "is_causal"))
    assert model.config.rope_parameters["rope_theta"] == cfg.rope_theta
    assert model.config.num_key_value_heads == cfg.n_kv_heads
    attn0 = model.model.layers[0].self_attn
    assert (attn0.q_proj.bias is not None) == cfg.qkv_bias
    assert attn0.o_proj.bias is None
    if family == "dream":
        assert cfg.n_kv_heads < cfg.n_heads, "the tiny Dream preset should exercise GQA"


@pytest.mark.parametrize("family", FAMILIES)
def test_hf_reference_is_bidirectional(tiny, hf_models, family):
    """Changing the last token must move the logits at position 0 (HF and ours); a stock causal HF
    model must not move them (negative control proving the probe detects causality)."""
    folder, cfg, w = tiny[family]
    torch.manual_seed(0)
    a = _tokens(cfg, 2, 9, seed=1)
    b = a.clone()
    b[:, -1] = (a[:, -1] + 1 + cfg.vocab_size // 2) % cfg.vocab_size
    assert (a[:, -1] != b[:, -1]).all()

    for impl in ("eager", "sdpa"):
        hf = hf_models[(family, impl)]
        d_hf = (hf_logits(hf, a)[:, 0] - hf_logits(hf, b)[:, 0]).abs().max().item()
        assert d_hf > 1e-3, f"HF ({impl}) position 0 ignored the last token: still causal?"
    d_ours = (ours_logits(w, cfg, a)[:, 0] - ours_logits(w, cfg, b)[:, 0]).abs().max().item()
    assert d_ours > 1e-3, "our forward is not bidirectional"

    causal = build_hf(folder, family, "eager", bidirectional=False)
    with torch.no_grad():
        la, lb = causal(input_ids=a, use_cache=False).logits, causal(input_ids=b, use_cache=False).logits
    d_causal = (la[:, :-1] - lb[:, :-1]).abs().max().item()
    assert d_causal <= 1e-6, f"negative control: a causal model must ignore a later token ({d_causal:.3e})"


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
@pytest.mark.parametrize("L", [7, 16])
@pytest.mark.parametrize("family", FAMILIES)
def test_logits_match_hf(tiny, hf_models, family, L, impl):
    _, cfg, w = tiny[family]
    torch.manual_seed(1234)
    tokens = _tokens(cfg, 2, L, seed=100 + L)
    ref = hf_logits(hf_models[(family, impl)], tokens)
    got = ours_logits(w, cfg, tokens)
    assert got.shape == ref.shape == (2, L, cfg.vocab_size)
    assert got.dtype == torch.float32
    diff = (got - ref).abs().max().item()
    assert diff <= ATOL, f"{family} L={L} {impl}: max |ours - HF| = {diff:.3e}"
    # the logits are O(1), so the tolerance is meaningful, not vacuous
    assert ref.abs().max().item() > 0.5


def _decodable(raw: torch.Tensor, cfg) -> torch.Tensor:
    """Logits that decide canvas position j, per the reference generators: LLaDA uses row j as is;
    Dream uses row j-1 (`cat([logits[:, :1], logits[:, :-1]], 1)` in Dream's generation utils)."""
    if cfg.shift_logits:
        return torch.cat([raw[:, :1], raw[:, :-1]], dim=1)
    return raw


def test_shift_flags():
    """Dream's hidden row i predicts token i+1 (autoregressive heritage); LLaDA's row i predicts token i."""
    from dllm.models import parse_config
    from dllm.models.tiny import PRESETS, tiny_config
    assert parse_config(tiny_config("dream", PRESETS["tiny"])).shift_logits is True
    assert parse_config(tiny_config("llada", PRESETS["tiny"])).shift_logits is False


@pytest.mark.parametrize("family", FAMILIES)
def test_shift_convention_matches_hf(tiny, hf_models, family):
    _, cfg, w = tiny[family]
    assert cfg.shift_logits is (family == "dream")
    torch.manual_seed(7)
    B, L = 2, 12
    tokens = _tokens(cfg, B, L, seed=7)
    hf = hf_models[(family, "eager")]
    ref = hf_logits(hf, tokens)
    raw = ours_logits(w, cfg, tokens)
    dec = _decodable(raw, cfg)
    if family == "dream":
        # canvas position j (j >= 1) is decided by hidden row j-1, which equals HF's row j-1
        for j in range(1, L):
            diff = (dec[:, j] - ref[:, j - 1]).abs().max().item()
            assert diff <= ATOL, f"position {j}: {diff:.3e}"
        # HF's own next-token convention: the loss shifts internally (logits[:-1] vs labels[1:]).
        # Scoring our decodable rows 1..L-1 against tokens 1..L-1 must give the same loss.
        with torch.no_grad():
            hf_loss = hf(input_ids=tokens, labels=tokens, attention_mask=additive_mask(
                torch.zeros(B, dtype=torch.int64), L), use_cache=False).loss.item()
        our_loss = torch.nn.functional.cross_entropy(
            dec[:, 1:].reshape(-1, cfg.vocab_size), tokens[:, 1:].reshape(-1)).item()
        assert abs(hf_loss - our_loss) <= 1e-4, (hf_loss, our_loss)
        # and the shift is real: the unshifted rows differ from the decodable ones
        assert (dec[:, 1:] - raw[:, 1:]).abs().max().item() > 1e-2
    else:
        assert dec is raw
        assert (dec - ref).abs().max().item() <= ATOL


@pytest.mark.parametrize("family", FAMILIES)
def test_left_padding_matches_unpadded(tiny, family):
    """Left-padding with n_pad pad tokens: real rows equal the unpadded run (positions count from the
    first real token, pad keys are masked). Our model only."""
    _, cfg, w = tiny[family]
    torch.manual_seed(11)
    B, L = 2, 10
    n_pad = torch.tensor([3, 0], dtype=torch.int64)
    tokens = _tokens(cfg, B, L, seed=11)
    # Equal-width canvas: row b holds n_pad[b] pad tokens followed by its first L - n_pad[b] real tokens.
    canvas = torch.full((B, L), cfg.pad_id, dtype=torch.int64)
    for b in range(B):
        k = int(n_pad[b])
        canvas[b, k:] = tokens[b, : L - k]
    padded_logits = ours_logits(w, cfg, canvas, n_pad)
    assert padded_logits.isfinite().all(), "pad rows must not produce NaN (no query row is fully masked)"
    for b in range(B):
        k = int(n_pad[b])
        alone = ours_logits(w, cfg, tokens[b : b + 1, : L - k])[0]
        d = (padded_logits[b, k:] - alone).abs().max().item()
        assert d <= PAD_ATOL, f"row {b} (n_pad={k}): max diff {d:.3e}"
    # the mask matters: without n_pad the padded row's real logits differ
    unmasked = ours_logits(w, cfg, canvas)
    assert (unmasked[0, 3:] - padded_logits[0, 3:]).abs().max().item() > 1e-3


@pytest.mark.parametrize("family", FAMILIES)
def test_left_padding_matches_hf(tiny, hf_models, family):
    """Padded canvas, every row (pads included): ours vs HF fed the same positions and pad-key mask."""
    _, cfg, w = tiny[family]
    torch.manual_seed(13)
    n_pad = torch.tensor([0, 5], dtype=torch.int64)
    tokens = _tokens(cfg, 2, 16, seed=13)
    for b in range(2):
        tokens[b, : int(n_pad[b])] = cfg.pad_id
    for impl in ("eager", "sdpa"):
        diff = (ours_logits(w, cfg, tokens, n_pad) - hf_logits(hf_models[(family, impl)], tokens, n_pad))
        assert diff.abs().max().item() <= ATOL, f"{impl}: {diff.abs().max().item():.3e}"


# ----------------------------------------------------------------------------------------------
# Grouped-query attention reaches SDPA with equal head counts (issue 12, item 5)
# ----------------------------------------------------------------------------------------------

GQA_ATOL = {torch.float32: 1e-6, torch.bfloat16: 1e-2}   # expanded K/V vs enable_gqa, same inputs


class SdpaCalls(torch.overrides.TorchFunctionMode):
    """Records (query heads, key heads, value heads, enable_gqa) of every SDPA call."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.nn.functional.scaled_dot_product_attention:
            q, k, v = args[:3]
            self.calls.append((q.shape[1], k.shape[1], v.shape[1], bool(kwargs.get("enable_gqa", False))))
        return func(*args, **kwargs)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_expanded_kv_heads_equal_enable_gqa(dtype):
    """layers.attention with Dream's head ratio (28 / 4, real head dim) equals SDPA's own enable_gqa
    on the same inputs, with a key mask, within GQA_ATOL."""
    from dllm.models.layers import attention
    g = torch.Generator().manual_seed(5)
    B, H, Hkv, S, L, hd = 2, 28, 4, 6, 20, 128
    q = torch.randn(B, H, S, hd, generator=g).to(dtype)
    k = torch.randn(B, Hkv, L, hd, generator=g).to(dtype)
    v = torch.randn(B, Hkv, L, hd, generator=g).to(dtype)
    key_mask = torch.ones(B, 1, 1, L, dtype=torch.bool)
    key_mask[1, ..., :7] = False                                        # left padding of row 1
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=key_mask, enable_gqa=True)
    ref = ref.transpose(1, 2).reshape(B, S, H * hd)
    out = attention(q, k, v, key_mask, gqa=True)
    diff = (out.float() - ref.float()).abs().max().item()
    assert diff <= GQA_ATOL[dtype], f"{dtype}: max diff {diff:.3e}"
    # the check can fail: a wrong head order (tile instead of repeat) is far off
    wrong = torch.nn.functional.scaled_dot_product_attention(q, k.repeat(1, H // Hkv, 1, 1),
                                                             v.repeat(1, H // Hkv, 1, 1), attn_mask=key_mask)
    assert (wrong.transpose(1, 2).reshape(B, S, H * hd).float() - ref.float()).abs().max().item() > 0.1


def test_dream_attention_calls_sdpa_with_equal_head_counts(tiny):
    """Every SDPA call of a Dream forward gets as many K/V heads as query heads and no enable_gqa, so on
    CUDA the memory-efficient kernel can take it (with a key mask flash cannot, and the efficient
    kernel refuses grouped heads: the math kernel would run instead)."""
    _, cfg, w = tiny["dream"]
    assert cfg.n_kv_heads < cfg.n_heads, "the tiny Dream preset must be grouped for this test to mean anything"
    with SdpaCalls() as seen:
        ours_logits(w, cfg, _tokens(cfg, 1, 8, seed=3))
    assert len(seen.calls) == cfg.n_layers
    assert all(c == (cfg.n_heads, cfg.n_heads, cfg.n_heads, False) for c in seen.calls), seen.calls


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dream_step_runs_on_efficient_sdpa_kernels(tiny_dirs, dtype):
    """On CUDA, a Dream generation (every dual-cache step kind: full and partial rows) runs with SDPA
    restricted to the memory-efficient and flash kernels: a fallback to the math kernel raises
    instead of silently costing an fp32 upcast in every layer. Tokens equal the unrestricted run."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from dllm.runtime import DualCache, Engine
    eng = Engine.from_pretrained(tiny_dirs["dream"], device="cuda", dtype=dtype, backend="eager")
    kw = dict(gen_length=16, steps=16, block_length=8, prompt_bucket=16, policy=DualCache())
    free = eng.generate([5, 6, 7, 8, 9], **kw)
    with sdpa_kernel([SDPBackend.EFFICIENT_ATTENTION, SDPBackend.FLASH_ATTENTION]):
        fast = eng.generate([5, 6, 7, 8, 9], **kw)
    assert fast.tokens == free.tokens
