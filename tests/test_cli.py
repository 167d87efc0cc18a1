"""The `dllm generate` contract: flags, the one-object JSON output, and clear errors (exit 2)."""
import json
import shutil
import subprocess
import sys

import pytest

from dllm.apps.main import main


def run_cli(capsys, *args):
    args = list(map(str, args))
    if "--backend" not in args:       # compile costs seconds per step kind; the contract is backend-agnostic
        args += ["--backend", "eager"]
    if "--dtype" not in args:         # compared with float32 engines; the default (auto) has its own test
        args += ["--dtype", "float32"]
    rc = main(["generate", *args])
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_json_contract(capsys, tiny_dirs, engines):
    rc, out, _ = run_cli(capsys, "--model", tiny_dirs["llada"], "--prompt-ids", "5,6,7", "--gen-length", 16,
                         "--steps", 8, "--block-length", 8, "--json")
    assert rc == 0
    obj = json.loads(out)                                   # exactly one JSON object on stdout
    assert set(obj) == {"tokens", "text", "steps", "step_kinds", "seconds", "backend", "prepare_seconds"}
    assert obj["backend"] == "eager" and obj["prepare_seconds"] == 0.0
    assert len(obj["tokens"]) == 1 and len(obj["tokens"][0]) == 16
    assert obj["steps"] == 8 and obj["step_kinds"] == {"full": 8} and obj["seconds"] > 0
    assert obj["tokens"] == engines["llada"].generate([5, 6, 7], gen_length=16, steps=8, block_length=8).tokens
    assert isinstance(obj["text"], list)                    # the folder has a tokenizer


def test_text_prompt_and_chat(capsys, tiny_dirs, engines):
    eng = engines["dream"]
    rc, out, _ = run_cli(capsys, "--model", tiny_dirs["dream"], "--prompt", "2+2=", "--chat", "--gen-length", 8,
                         "--steps", 8, "--alg", "maskgit_plus", "--json")
    assert rc == 0
    ids = eng.encode("2+2=", chat=True)
    assert eng.tokenizer.decode(ids).startswith("<|im_start|>user\n2+2=")
    assert json.loads(out)["tokens"] == eng.generate(ids, gen_length=8, steps=8, alg="maskgit_plus").tokens


def test_plain_output_and_summary(capsys, tiny_dirs):
    rc, out, err = run_cli(capsys, "--model", tiny_dirs["llada"], "--prompt", "hi", "--gen-length", 8,
                           "--steps", 4, "--block-length", 4)
    assert rc == 0 and out.endswith("\n")
    assert "8 tokens, 4 steps (full 4)" in err and "tok/s" in err


def test_prompt_ids_without_tokenizer(capsys, tmp_path, tiny_dirs):
    d = tmp_path / "bare"
    shutil.copytree(tiny_dirs["dream"], d)
    for f in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        (d / f).unlink(missing_ok=True)
    rc, out, _ = run_cli(capsys, "--model", d, "--prompt-ids", "5,6", "--gen-length", 8, "--steps", 8, "--json")
    assert rc == 0 and json.loads(out)["text"] is None
    rc, _, err = run_cli(capsys, "--model", d, "--prompt", "hi", "--gen-length", 8, "--steps", 8)
    assert rc == 2 and "no tokenizer files" in err and "--prompt-ids" in err


def test_custom_tokenizer_code_needs_the_flag(capsys, tmp_path, tiny_dirs):
    d = tmp_path / "dreamlike"
    shutil.copytree(tiny_dirs["dream"], d)
    tc = json.loads((d / "tokenizer_config.json").read_text())
    tc["auto_map"] = {"AutoTokenizer": ["tokenization_dream.DreamTokenizer", None]}
    (d / "tokenizer_config.json").write_text(json.dumps(tc))
    rc, _, err = run_cli(capsys, "--model", d, "--prompt", "hi", "--gen-length", 8, "--steps", 8)
    assert rc == 2 and "--trust-remote-code" in err
    rc, _, _ = run_cli(capsys, "--model", d, "--prompt-ids", "5", "--gen-length", 8, "--steps", 8)
    assert rc == 0                                          # ids need no tokenizer, so no flag


@pytest.mark.parametrize("args,needle", [
    (["--prompt-ids", "5,999"], "outside the vocabulary [0, 128)"),
    (["--prompt-ids", "5,2"], "is the mask id"),
    (["--prompt-ids", "5", "--block-length", "5"], "not a multiple of block_length 5"),
    (["--prompt-ids", "5", "--block-length", "8", "--steps", "3"], "not a multiple of the number of blocks 2"),
    (["--prompt-ids", "5,6,7", "--prompt-bucket", "2"], "prompt bucket holds 2"),
    (["--prompt-ids", "5", "--alg", "entropy"], "Dream option"),
    (["--prompt-ids", "5", "--top-k", "3"], "Dream options"),
    (["--prompt-ids", "5", "--temperature", "-1"], "temperature must be >= 0"),
    (["--prompt-ids", "5", "--chat"], "--chat applies a chat template to --prompt"),
])
def test_bad_requests(capsys, tiny_dirs, args, needle):
    base = ["--model", tiny_dirs["llada"], "--gen-length", "16", "--steps", "16"]
    rc, out, err = run_cli(capsys, *base, *args)
    assert rc == 2 and out == ""
    assert needle in err and err.splitlines()[-1].startswith("dllm: error:") and "Traceback" not in err


def test_bad_model_folder(capsys, tmp_path):
    rc, _, err = run_cli(capsys, "--model", tmp_path, "--prompt-ids", "5", "--gen-length", 8, "--steps", 8)
    assert rc == 2 and "no config.json" in err


def test_console_script_installed():
    exe = shutil.which("dllm") or str(__import__("pathlib").Path(sys.executable).parent / "dllm")
    res = subprocess.run([exe, "generate", "--help"], capture_output=True, text=True)
    assert res.returncode == 0
    for flag in ("--model", "--prompt-ids", "--gen-length", "--steps", "--block-length", "--remasking", "--alg",
                 "--temperature", "--top-p", "--top-k", "--seed", "--dtype", "--device", "--chat", "--json"):
        assert flag in res.stdout


def test_policy_flags(capsys, tiny_dirs, engines):
    from dllm.runtime import DllmCache
    rc, out, _ = run_cli(capsys, "--model", tiny_dirs["dream"], "--prompt-ids", "5,6,7", "--gen-length", 16,
                         "--steps", 16, "--policy", "dllm-cache", "--kp", 5, "--kr", 3, "--rho", 0.25, "--json")
    assert rc == 0
    obj = json.loads(out)
    assert obj["step_kinds"] == {"full": 2, "verify": 8, "response_refresh": 4, "prompt_refresh": 2}
    ref = engines["dream"].generate([5, 6, 7], gen_length=16, steps=16, policy=DllmCache(5, 3, 0.25))
    assert obj["tokens"] == ref.tokens


@pytest.mark.parametrize("args,needle", [(["--kp", "0"], "kp must be an integer >= 1"),
                                         (["--rho", "2"], "rho must be in [0, 1]")])
def test_bad_policy_flags(capsys, tiny_dirs, args, needle):
    rc, _, err = run_cli(capsys, "--model", tiny_dirs["llada"], "--prompt-ids", "5", "--gen-length", 8,
                         "--steps", 8, "--policy", "dllm-cache", *args)
    assert rc == 2 and needle in err


def test_cuda_requested_without_a_device(capsys, tiny_dirs):
    import torch
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA; the refusal only applies without one")
    rc, _, err = run_cli(capsys, "--model", tiny_dirs["llada"], "--prompt-ids", "5", "--gen-length", 8,
                         "--steps", 8, "--device", "cuda")
    assert rc == 2 and "sees no CUDA device" in err and "--device cpu" in err


def test_half_precision_flag(capsys, tiny_dirs):
    rc, out, _ = run_cli(capsys, "--model", tiny_dirs["dream"], "--prompt-ids", "5,6", "--gen-length", 8,
                         "--steps", 8, "--dtype", "bfloat16", "--json")
    assert rc == 0 and len(json.loads(out)["tokens"][0]) == 8


def test_default_dtype_is_bf16_where_the_cpu_has_it(capsys, tiny_dirs, engines, monkeypatch):
    """--dtype auto (the default): bfloat16 on a CPU with AVX512-BF16 / AMX, float32 elsewhere; the
    tokens are those of an engine loaded in that dtype."""
    import torch

    from dllm.runtime import Engine, engine
    from dllm.runtime.device import native_bf16, resolve_dtype
    want = torch.bfloat16 if native_bf16("cpu") else torch.float32
    assert resolve_dtype("auto", "cpu") == want and resolve_dtype("float32", "cpu") == torch.float32
    loaded, load = [], engine.load_weights
    monkeypatch.setattr(engine, "load_weights", lambda *a, **kw: loaded.append(kw["dtype"]) or load(*a, **kw))
    rc = main(["generate", "--model", str(tiny_dirs["llada"]), "--prompt-ids", "5,6,7", "--gen-length", "8",
               "--backend", "eager", "--json"])                        # no --dtype: the default
    out = capsys.readouterr().out
    assert rc == 0 and loaded == [want]
    ref = Engine.from_pretrained(tiny_dirs["llada"], dtype=want).generate([5, 6, 7], gen_length=8, steps=8)
    assert json.loads(out)["tokens"] == ref.tokens
