"""perf.peers, the side by side with llama.cpp: everything that needs no llama.cpp (CI has none) runs here;
the end-to-end run needs a built checkout named by DLLM_LLAMA_CPP and is skipped without one."""
from __future__ import annotations

import os
import random
import stat
import statistics
from pathlib import Path

import pytest

from dllm.perf import peers


def test_refuses_without_llama_cpp_and_says_how_to_build_it(capsys):
    with pytest.raises(SystemExit) as e:
        peers.main([])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "no --llama-cpp given" in err
    assert "cmake --build build -j2 --target llama-diffusion-cli llama-quantize llama-tokenize" in err
    assert "-DCMAKE_BUILD_TYPE=Release" in err and "python -m dllm.perf.peers --llama-cpp" in err


def test_names_what_an_incomplete_checkout_lacks(tmp_path, capsys):
    (tmp_path / "build" / "bin").mkdir(parents=True)
    (tmp_path / "convert_hf_to_gguf.py").write_text("")
    (tmp_path / "gguf-py").mkdir()
    tool = tmp_path / "build" / "bin" / "llama-quantize"
    tool.write_text("#!/bin/sh\n")
    tool.chmod(tool.stat().st_mode | stat.S_IXUSR)
    with pytest.raises(SystemExit) as e:
        peers.main(["--llama-cpp", str(tmp_path)])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert f"{tmp_path} lacks llama-diffusion-cli, llama-tokenize)" in err     # quantize is there, so not named
    assert peers.LlamaCpp(tmp_path).missing() == ["llama-diffusion-cli", "llama-tokenize"]


def test_defaults_are_the_issue_s_measurement():
    a = peers.parse_args(["--llama-cpp", "x"])
    assert (a.prompt_len, a.gen_length, a.block_length, a.threads, a.rounds) == (512, 128, 32, 2, 3)
    assert a.gguf == ["f32", "bf16", "q8_0"] and a.baseline == "bf16" and a.agree_prompts == 36
    assert [o.label for o in a.ours] == [
        "ours NoCache float32", "ours NoCache bfloat16", "ours dLLM-Cache kp=100,kr=7,rho=0.25 bfloat16",
        "ours dual cache bfloat16", "ours NoCache bfloat16 int8", "ours NoCache bfloat16 int4"]


@pytest.mark.parametrize("argv, says", [
    (["--prompt-len", "500"], "(P + G) % block == 0"),                 # 628 is no multiple of 32
    (["--gen-length", "100", "--prompt-len", "540"], "G % block == 0"),
    (["--baseline", "q4_0"], "is not among --gguf"),
    (["--threads", "0"], "--threads must be >= 1"),
    (["--ours", "none@float16"], "want SPEC@DTYPE"),
    (["--ours", "none"], "want SPEC@DTYPE"),
    (["--ours", "none@bfloat16+int3"], "one of int8, int4"),
    (["--gguf", "q2_k"], "invalid choice"),
])
def test_bad_arguments_fail_in_one_line(argv, says, capsys):
    with pytest.raises(SystemExit) as e:
        peers.parse_args(argv)
    assert e.value.code == 2
    assert says in capsys.readouterr().err


def test_row_specs():
    o = peers.Ours.parse("dllm-cache:kp=100,kr=7,rho=0.25@bfloat16")
    assert (o.spec, o.dtype, o.quantize) == ("dllm-cache:kp=100,kr=7,rho=0.25", "bfloat16", None)
    assert peers.Ours.parse("none@bfloat16+int4").quantize == "int4"


def test_quantized_rows_are_skipped_with_a_note_when_the_engine_has_no_quantize():
    rows = [peers.Ours.parse(s) for s in peers.DEFAULT_OURS]
    kept, note = peers.usable(rows, quantize_ok=False)
    assert [o.quantize for o in kept] == [None] * 4
    assert "takes no `quantize`" in note and "ours NoCache bfloat16 int8, ours NoCache bfloat16 int4" in note
    assert peers.usable(rows, quantize_ok=True) == (rows, None)
    assert isinstance(peers.quantize_supported(), bool)


def test_presets_named_without_torch_are_the_real_ones():
    from dllm.models.tiny import PRESETS
    assert set(peers.PRESET_NAMES) == set(PRESETS)


# ------------------------------------------------------------ llama.cpp's schedule (examples/diffusion)

def test_block_32_at_p512_g128_costs_144_forwards():
    steps = peers.llama_steps(512, 128, 32)
    assert steps == 640                                # 20 blocks over the whole canvas, 32 steps each
    assert peers.llama_forwards(512, 128, 32, steps) == 4 * 32 + 16   # 4 real blocks, 16 past the end


@pytest.mark.parametrize("P, G, B, steps, forwards", [
    (512, 128, 32, 320, 4 * 16 + 16),      # 16 steps a block: each real block runs its 16, commits 2 a step
    (16, 24, 8, 40, 3 * 8 + 2),            # 5 blocks from position 16: 3 real, 2 past the end
    (12, 20, 8, 32, 8 + 8 + (4 + 1) + 1),  # a partial block of 4 masks with 8 steps: 4 commits, 1 finding none
    (8, 8, 8, 2, 1 + 1),                   # one step a block: the real block, then one past the end
    (0, 64, 32, 64, 32 + 32),              # no prompt: the blocks are ours
])
def test_forward_count_model(P, G, B, steps, forwards):
    assert peers.llama_forwards(P, G, B, steps) == forwards


def test_schedules_llama_cpp_refuses():
    with pytest.raises(ValueError, match=r"\(P \+ G\) % block"):
        peers.llama_forwards(500, 128, 32, 640)
    with pytest.raises(ValueError, match="multiple of its 20 blocks"):
        peers.llama_forwards(512, 128, 32, 128)


# ------------------------------------------------------------ the table

def test_ratios_and_table():
    base = peers.Row("llama.cpp BF16", 144, True, [50.3, 49.0, 51.2])
    nocache = peers.Row("ours NoCache bfloat16", 128, True, [23.3, 24.0, 23.0])
    dual = peers.Row("ours dual cache bfloat16", 128, False, [3.9, 4.2, 3.8])
    assert base.total == 50.3 and nocache.total == 23.3
    assert nocache.per_forward == pytest.approx(23.3 / 128)
    assert peers.ratio(base, nocache, per_forward=True) == pytest.approx((50.3 / 144) / (23.3 / 128))
    assert peers.ratio(base, nocache, per_forward=False) == pytest.approx(50.3 / 23.3)
    assert peers.ratio(base, dual, per_forward=True) is None           # cached steps are not whole forwards
    assert peers.ratio(base, dual, per_forward=False) == pytest.approx(50.3 / 3.9)
    lines = peers.table([base, nocache, dual], "llama.cpp BF16").splitlines()
    assert lines[0].startswith("| | forwards |") and "vs llama.cpp BF16" in lines[0]
    assert lines[2] == "| llama.cpp BF16 | 144 | 349.3 | 50.30 | 1.00× | 1.00× |"
    assert lines[3] == f"| ours NoCache bfloat16 | 128 | 182.0 | 23.30 | {50.3 / 144 / (23.3 / 128):.2f}× | 2.16× |"
    assert lines[4] == "| ours dual cache bfloat16 | 128 | 30.5 | 3.90 | – | 12.90× |"
    assert statistics.median(dual.seconds) == dual.total


# ------------------------------------------------------------ what llama-diffusion-cli prints

def test_parse_llama_output():
    # as llama-diffusion-cli 0c1e57098 prints it with --no-log-prefix --no-log-timestamps --log-colors off
    steps = "".join(f"\rdiffusion step: {i}/640 [{'=' * (i * 50 // 640)}{' ' * (50 - i * 50 // 640)}] "
                    f"{i * 100 // 640}%" for i in range(144))
    out = ("diffusion_params: - steps                     u32              = 640\n" + steps +
           "\ntotal time: 50312.40ms, time per step: 78.61ms, sampling time per step: 1.20ms\n\n31284\n")
    run = peers.parse_llama_output(out)
    assert (run.text, run.forwards) == ("31284", 144)
    assert run.seconds == pytest.approx(50.3124)
    with pytest.raises(ValueError, match="total time"):
        peers.parse_llama_output(steps)                 # the last lines lost at exit (llama.cpp issue 22142)


# ------------------------------------------------------------ staging our character tokenizers

def test_byte_level_table():
    t = peers.byte_level_chars()
    assert len(set(t.values())) == 256
    assert t[ord("a")] == "a" and t[ord("~")] == "~"
    assert t[ord(" ")] == "\u0120" and t[ord("\n")] == "\u010a" and t[ord("\t")] == "\u0109"


def test_staged_tokenizer_gives_our_ids(tmp_path):
    from transformers import AutoTokenizer

    from dllm.models.tiny import CHARS, SPECIALS, write_tiny
    folder = write_tiny(tmp_path / "m", "llada", "tiny")
    staged, pre = peers.stage_for_llama(folder, tmp_path / "staged", vocab_size=128)
    assert pre == "default"
    assert (staged / "model.safetensors").resolve() == (folder / "model.safetensors").resolve()
    ours = AutoTokenizer.from_pretrained(str(folder))
    theirs = AutoTokenizer.from_pretrained(str(staged))
    rng = random.Random(0)
    texts = ["reverse 48213\n", "\t \n\n  a", "".join(CHARS)]
    texts += ["".join(rng.choice(CHARS + SPECIALS["llada"]) for _ in range(200)) for _ in range(20)]
    for text in texts:
        assert theirs(text)["input_ids"] == ours(text)["input_ids"], text
    assert max(theirs.get_vocab().values()) == 127          # the never-applied merge took the last free id
    assert (staged / "chat_template.jinja").read_text() == peers.PASS_THROUGH_TEMPLATE


def test_other_tokenizers_are_converted_as_they_are(tmp_path):
    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "tokenizer.json").write_text('{"model": {"type": "BPE", "vocab": {"ab": 0}}, "added_tokens": []}')
    assert peers.stage_for_llama(folder, tmp_path / "staged", 10) == (folder, None)
    assert not (tmp_path / "staged").exists()


# ------------------------------------------------------------ with a built llama.cpp (not in CI)

LLAMA_CPP = os.environ.get("DLLM_LLAMA_CPP")


@pytest.mark.skipif(not LLAMA_CPP or peers.LlamaCpp(Path(LLAMA_CPP)).missing() != [],
                    reason="set DLLM_LLAMA_CPP to a llama.cpp checkout with its three tools built")
def test_end_to_end_on_the_tiny_preset(tmp_path, capsys):
    peers.main(["--llama-cpp", LLAMA_CPP, "--preset", "tiny", "--work", str(tmp_path), "--prompt-len", "24",
                "--gen-length", "16", "--block-length", "8", "--rounds", "1", "--agree-prompts", "4",
                "--ours", "none@float32", "dual-cache@bfloat16"])
    out = capsys.readouterr().out
    assert "tokenization: llama-tokenize gives our ids (BOS + text) on all 5 prompts" in out
    assert "llama.cpp F32: vs ours fp32 4/4" in out
    assert "--diffusion-steps 40 over 5 blocks of 8 -> 19 forwards for 16 tokens" in out
    assert "| llama.cpp BF16 | 19 |" in out and "| ours dual cache bfloat16 | 16 |" in out
