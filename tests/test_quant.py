"""Weight-only quantization (models/quant.py): error bounds, the kernels against the dequantized matmul,
every policy on quantized weights, the `dllm quantize` round trip, memory, bad flags."""
from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from safetensors import safe_open

from dllm.apps.main import main
from dllm.models.checkpoint import load_weights, weight_bytes
from dllm.models.config import CheckpointError, load_config, parse_config
from dllm.models.layers import forward
from dllm.models.quant import (
    CONFIG_KEY,
    STORED_FILE,
    Quantization,
    dequantize,
    linear,
    quantize,
    quantize_int4,
    quantize_int8,
    to_device,
)
from dllm.models.tiny import SHAPE_PRESETS, tiny_config, write_tiny
from dllm.runtime import POLICIES, Engine

SHAPE = dict(gen_length=16, steps=16, block_length=8)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int8_and_int4_dequant_error_bounds(dtype):
    """Round to nearest of w / s: |w - q s| <= s / 2 exactly, for every element. The scale is rounded to
    the engine dtype *before* q is chosen, so a bf16 scale does not widen the bound; at the row maximum a
    scale rounded down gives max|w| / s <= 127 (1 + 2^-8) < 127.5, still rounding to 127 (no clamp error).
    The only slack is fp32's own division and product: a relative 2^-22 of |w|. int8: s = max|w_row| / 127
    (so the error is <= max|w_row| / 254, 0.4 % of the row's largest weight); int4: s = max|w_group| / 7."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(96, 256, generator=g) * torch.rand(96, 1, generator=g) * 3     # rows of different scales
    w[3] = 0                                                                       # an all-zero row
    q, s = quantize_int8(w, dtype)
    err = (w - dequantize(q, s)).abs()
    assert q.dtype == torch.int8 and s.dtype == dtype and q.abs().max() <= 127
    assert bool((err <= s.float()[:, None] / 2 + w.abs() * 2 ** -22).all())
    assert err[3].max() == 0
    q4, s4 = quantize_int4(w, 64, dtype)
    err4 = (w - dequantize(q4, s4)).abs()
    assert q4.dtype == torch.uint8 and q4.shape == (96, 128) and s4.shape == (96, 4)
    bound = s4.float().repeat_interleave(64, dim=1) / 2 + w.abs() * 2 ** -22
    assert bool((err4 <= bound).all())
    assert (err4 > 0).any() and (err > 0).any()          # the bound is not met by doing nothing


@pytest.mark.parametrize("mode", ["int8", "int4"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_linear_is_the_dequantized_matmul(mode, dtype):
    """linear() on the packed weight = x @ dequantized.T, rows lo:hi included. fp32: the same products
    summed in another order (atol 1e-4 on outputs of size ~10: 256 terms, fp32). bf16: the kernels round
    the output (and int4's CPU kernel its partial sums) to bf16: 2^-8 relative of the output's scale."""
    g = torch.Generator().manual_seed(1)
    w, x = torch.randn(128, 256, generator=g), torch.randn(2, 5, 256, generator=g).to(dtype)
    q, s = quantize(w, mode, 64, dtype)
    ref = x.float() @ dequantize(q, s).t()
    pw, ps = to_device(q, s, "cpu", dtype)
    tol = 1e-4 if dtype == torch.float32 else 2 ** -8 * ref.abs().max().item() * 2
    for lo, hi in [(0, None), (0, 64), (64, None), (32, 96)]:
        y = linear(x, pw, ps, lo, hi)
        assert y.dtype == dtype and y.shape == (2, 5, (hi or 128) - lo)
        assert (y.float() - ref[..., lo:hi]).abs().max() <= tol


@pytest.fixture(scope="module")
def small_pair(tmp_path_factory):
    return {f: write_tiny(tmp_path_factory.mktemp("q") / f, f) for f in ("llada", "dream")}


@pytest.mark.parametrize("family", ["llada", "dream"])
@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_quantized_forward_is_the_dequantized_model(small_pair, family, mode):
    """The whole-canvas forward on quantized weights (fp32) = the dense forward on the dequantized
    weights: the quantized path changes which weights are used, not the rest of the maths. atol 1e-4
    on logits of size ~1 (fp32 sums in another order over widths <= 160)."""
    folder = small_pair[family]
    cfg = load_config(folder)
    quant = Quantization(mode, head=True)
    stored = load_weights(folder, cfg, quant=quant, packed=False)         # the stored form, on the CPU
    packed = load_weights(folder, cfg, quant=quant)
    dense = dataclasses.replace(stored, **{f"{f}_scale": None for f in quant.fields(cfg)})
    for f in quant.fields(cfg):
        q, s = getattr(stored, f), getattr(stored, f + "_scale")
        deq = dequantize(q, s) if f == "head" else torch.stack([dequantize(q[i], s[i]) for i in range(cfg.n_layers)])
        setattr(dense, f, deq)
    tokens = torch.randint(0, cfg.vocab_size, (2, 24), generator=torch.Generator().manual_seed(2))
    ref, got = forward(dense, cfg, tokens), forward(packed, cfg, tokens)
    assert (ref - got).abs().max() < 1e-4
    assert (forward(load_weights(folder, cfg), cfg, tokens) - got).abs().max() > 1e-3     # it is quantized


@pytest.mark.parametrize("mode", ["int8", "int4"])
@pytest.mark.parametrize("family", ["llada", "dream"])
def test_every_policy_runs_quantized(small_pair, family, mode):
    """Every policy's step kinds on quantized weights: the tokens are the model's own (no mask left), and
    the cache's exactness holds on quantized weights: dLLM-Cache verifying every response row (rho = 1,
    int4's V-only projection cut from the fused one) gives response_refresh's tokens."""
    eng = Engine.from_pretrained(small_pair[family], quantize=mode, backend="eager")
    cfg = eng.cfg
    seen = {}
    for name, cls in POLICIES.items():
        g = eng.generate("hello world", **SHAPE, policy=cls())
        assert len(g.tokens[0]) == SHAPE["gen_length"] and cfg.mask_id not in g.tokens[0]
        seen[name] = g
        assert set(g.step_kinds) <= set(cls.kinds)
    big, cls = 10 ** 6, POLICIES["dllm-cache"]
    part = eng.generate("hello world", **SHAPE, policy=cls(kp=big, kr=big, rho=1.0))
    resp = eng.generate("hello world", **SHAPE, policy=cls(kp=big, kr=1, rho=0.0))
    assert part.step_kinds == {"full": 1, "verify": SHAPE["steps"] - 1}
    assert part.tokens == resp.tokens


def test_quantize_round_trip(small_pair, tmp_path, capsys):
    """`dllm quantize` writes a folder that loads to exactly the weights (and tokens) of quantizing while
    loading, with the same dtype; it holds no floating-point copy of a quantized matrix (so loading it
    cannot re-quantize) and loads packed for the device."""
    src = small_pair["llada"]
    out = tmp_path / "q4"
    assert main(["quantize", "--model", str(src), "--out", str(out), "--quantize", "int4", "--dtype", "float32"]) == 0
    raw = json.loads((out / "config.json").read_text())
    assert raw[CONFIG_KEY]["mode"] == "int4" and raw[CONFIG_KEY]["groups"]["w_down"] == 32   # F = 160
    with safe_open(str(out / STORED_FILE), "pt") as h:
        dtypes = {k: h.get_slice(k).get_dtype() for k in h.keys()}
    assert dtypes["wqkv"] == dtypes["w_down"] == "U8" and dtypes["head"] == "F32"       # head kept dense
    assert not (out / "model.safetensors").exists()
    direct = Engine.from_pretrained(src, quantize="int4", backend="eager")
    again = Engine.from_pretrained(out, backend="eager")
    a, b = direct.weights.tensors(), again.weights.tensors()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    for name, cls in POLICIES.items():
        assert again.generate("hi", **SHAPE, policy=cls()).tokens == direct.generate("hi", **SHAPE, policy=cls()).tokens
    with pytest.raises(CheckpointError, match="already quantized"):
        Engine.from_pretrained(out, quantize="int8")


def test_memory_per_mode_at_the_8b_shape():
    """The bytes load_weights allocates (and checks against the device before allocating), LLaDA-8B in
    bf16: int8 stores 1 byte + a bf16 scale per row, int4 half a byte + a (scale, zero) pair per group of
    128, on the attention and FFN matrices; the embedding and head (2 x 126464 x 4096) stay bf16."""
    cfg = parse_config(tiny_config("llada", SHAPE_PRESETS["llada-8b-shape"]))
    dense = weight_bytes(cfg, None, torch.bfloat16)
    layers = cfg.n_layers * (3 * 4096 * 4096 + 4096 * 4096 + 3 * 4096 * 12288)            # 6.98e9 weights
    kept = dense - 2 * layers
    assert weight_bytes(cfg, Quantization("int8"), torch.bfloat16) == kept + layers + 2 * cfg.n_layers * (
        3 * 4096 + 4096 + 2 * 12288 + 4096)
    int4 = weight_bytes(cfg, Quantization("int4"), torch.bfloat16)
    assert int4 == kept + layers // 2 + 2 * 2 * layers // 128
    assert weight_bytes(cfg, Quantization("int4", head=True), torch.bfloat16) < int4 - 126464 * 4096


@pytest.mark.parametrize("args,says", [
    (["--quantize", "int8", "--quantize-group", "64"], "does not apply to --quantize int8"),
    (["--quantize", "int4", "--quantize-group", "48"], "--quantize-group must be one of 32, 64, 128, 256"),
    (["--quantize", "int4", "--quantize-group", "64"], "does not divide the input width 160 of 'w_down'"),
    (["--quantize-head"], "--quantize-head needs --quantize int8 or int4"),
])
def test_bad_quantize_flags_fail_fast_in_one_line(capsys, small_pair, args, says):
    rc = main(["generate", "--model", str(small_pair["llada"]), "--prompt", "hi", *map(str, args)])
    err = capsys.readouterr().err
    assert rc == 2 and says in err and len(err.strip().splitlines()) == 1 and "loading weights" not in err


def test_bad_quantize_mode_from_python_and_eval(small_pair):
    with pytest.raises(CheckpointError, match="--quantize must be one of none, int8, int4"):
        Engine.from_pretrained(small_pair["llada"], quantize="int3")
    from dllm.apps.evaluate import check_model_args
    with pytest.raises(CheckpointError, match="does not divide"):
        check_model_args({"model": str(small_pair["llada"]), "quantize": "int4", "quantize_group": "64"})


@pytest.mark.parametrize("quant", [None, Quantization("int8"), Quantization("int4"), Quantization("int4", head=True)],
                         ids=["bf16", "int8", "int4", "int4-head"])
def test_roofline_counts_the_quantized_bytes(quant):
    """perf.roofline's full step at the 8B shape reads every matrix once: its weight bytes are exactly what
    load_weights holds, less the embedding and the norms (gathered rows / elementwise, not streamed)."""
    from dllm.perf.roofline import kind_cost
    from dllm.runtime.state import RequestShape
    cfg = parse_config(tiny_config("llada", SHAPE_PRESETS["llada-8b-shape"]))
    shape = RequestShape(1, 512, 256, 32, 256)
    cost = kind_cost(cfg, shape, 8, POLICIES["none"](), "full", torch.bfloat16, quant)
    d, nL, V = cfg.d_model, cfg.n_layers, cfg.vocab_size
    not_streamed = 2 * (V * d + 2 * nL * d + d)
    assert cost.bytes - cost.cache == weight_bytes(cfg, quant, torch.bfloat16) - not_streamed


@pytest.mark.cuda
@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_cuda_kernels_are_the_dequantized_matmul(mode):
    """The CUDA packing and kernels (aten._convert_weight_to_int4pack / _weight_int4pack_mm; int8 shares
    the op) = x @ dequantized.T in bf16, to bf16's output rounding (2^-8 relative, twice for the kernel's
    partial sums), row ranges included; and they match the CPU kernels' outputs to the same tolerance."""
    g = torch.Generator().manual_seed(3)
    w, x = torch.randn(256, 512, generator=g), torch.randn(7, 512, generator=g).to(torch.bfloat16)
    q, s = quantize(w, mode, 128, torch.bfloat16)
    ref = x.float() @ dequantize(q, s).t()
    pw, ps = to_device(q, s, "cuda", torch.bfloat16)
    cw, cs = to_device(q, s, "cpu", torch.bfloat16)
    tol = 2 * 2 ** -8 * ref.abs().max().item()
    for lo, hi in [(0, None), (128, None), (0, 64)]:
        y = linear(x.cuda(), pw, ps, lo, hi).float().cpu()
        assert (y - ref[:, lo:hi]).abs().max() <= tol
        assert (y - linear(x, cw, cs, lo, hi).float()).abs().max() <= tol


@pytest.mark.cuda
@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_every_policy_runs_quantized_on_cuda_graphs(small_pair, mode):
    """Quantized weights under CUDA-graph replay give the quantized eager tokens on the same device."""
    eager = Engine.from_pretrained(small_pair["llada"], device="cuda", dtype="bfloat16", quantize=mode,
                                   backend="eager")
    graph = Engine.from_pretrained(small_pair["llada"], device="cuda", dtype="bfloat16", quantize=mode,
                                   backend="cudagraph")
    for cls in POLICIES.values():
        assert graph.generate("hello", **SHAPE, policy=cls()).tokens == eager.generate("hello", **SHAPE,
                                                                                        policy=cls()).tokens
