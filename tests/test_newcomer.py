"""A newcomer's first hour (issue 25): a fast `dllm --help` that lists every command, hub ids resolved
from a Hugging Face cache laid out as huggingface_hub lays it out, the model folder's generation
defaults and prompt format, every request error before a weight is read, nothing silently ignored, and
progress where work takes seconds."""
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from dllm.apps.main import SUBCOMMANDS, main
from dllm.models.tiny import write_tiny
from dllm.runtime import Engine, ProgressBar, engine

ROOT = Path(__file__).resolve().parent.parent
TRAINED = ROOT / "models" / "trained" / "arith-llada"
DLLM = Path(sys.executable).parent / "dllm"


def run(capsys, *args):
    rc = main(list(map(str, args)))
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_help_lists_every_command_without_importing_torch():
    code = ("import sys\nfrom dllm.apps.main import main\ntry:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
            "print('torch' in sys.modules)")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert res.stdout.strip().endswith("False"), res.stdout              # no torch for --help
    for command in SUBCOMMANDS:
        assert command in res.stdout
    res = subprocess.run([str(DLLM)], capture_output=True, text=True)
    assert res.returncode == 2 and "usage: dllm" in res.stderr and "--help" in res.stderr


# ---------------------------------------------------------------- hub ids

@pytest.fixture(scope="module")
def hub_cache(tmp_path_factory):
    """A Hugging Face cache with one model, laid out as huggingface_hub writes it: refs/main names a commit,
    snapshots/<commit>/ holds the files."""
    root = tmp_path_factory.mktemp("hf")
    repo = root / "models--testorg--tiny-llada"
    commit = "0123456789abcdef0123456789abcdef01234567"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    write_tiny(repo / "snapshots" / commit, "llada")
    return root


def test_a_hub_id_resolves_from_the_cache_offline(hub_cache, tiny_dirs):
    env = {**os.environ, "HF_HUB_CACHE": str(hub_cache), "HF_HUB_OFFLINE": "1"}
    args = ["generate", "--prompt-ids", "5,6,7", "--gen-length", "8", "--dtype", "float32", "--json"]
    res = subprocess.run([str(DLLM), *args, "--model", "testorg/tiny-llada"], capture_output=True, text=True, env=env)
    assert res.returncode == 0, res.stderr
    ref = Engine.from_pretrained(tiny_dirs["llada"]).generate([5, 6, 7], gen_length=8)
    assert json.loads(res.stdout)["tokens"] == ref.tokens                # the same checkpoint, from the cache
    res = subprocess.run([str(DLLM), *args, "--model", "testorg/not-there"], capture_output=True, text=True, env=env)
    assert res.returncode == 2 and res.stderr.count("\n") == 1
    assert "not in " + str(hub_cache) in res.stderr and "hf download testorg/not-there" in res.stderr
    res = subprocess.run([sys.executable, "-c", "from dllm.runtime import Engine\n"
                          "e = Engine.from_pretrained('testorg/tiny-llada')\nprint(e.folder.parent.name)"],
                         capture_output=True, text=True, env=env, check=True)
    assert res.stdout.strip() == "snapshots"                             # the Python API resolves it too


# ---------------------------------------------------------------- defaults and the prompt format

def test_the_model_folder_gives_the_lengths_and_warns_off_its_prompt_format(capsys):
    rc, out, err = run(capsys, "generate", "--model", TRAINED, "--prompt", "reverse 48213\n", "--json")
    assert rc == 0 and json.loads(out)["text"] == ["31284"] and json.loads(out)["steps"] == 8   # 8, not 128
    rc, out, err = run(capsys, "generate", "--model", TRAINED, "--prompt", "reverse 48213", "--quiet")
    assert rc == 0 and "not in the format" in err and "the trailing newline is missing" in err
    rc, out, err = run(capsys, "generate", "--model", TRAINED, "--prompt", "reverse 48213", "--chat", "--quiet")
    assert rc == 0 and out == "31284\n" and err == ""                      # the chat template adds it: no warning


# ---------------------------------------------------------------- checks before loading

@pytest.mark.parametrize("args, needle", [
    (["--prompt", "reverse 1\n", "--gen-length", "10", "--block-length", "4"], "not a multiple of block_length"),
    (["--prompt", "reverse 1\n", "--threshold", "1.5"], "threshold must be in (0, 1]"),
    (["--prompt-ids", "5,999"], "outside the vocabulary"),
    (["--prompt", "reverse 1\n", "--kp", "4"], "belongs to policy dllm-cache"),
    (["--prompt", "reverse 1\n", "--alg", "entropy"], "Dream option"),
    (["--prompt", "reverse 1\n", "--policy", "d2cache", "--attn-p", "2"], "attn_p must be in (0, 1]"),
    (["--prompt", "x" * 5000], "maximum sequence length"),
])
def test_request_errors_come_before_the_weights_are_read(capsys, monkeypatch, args, needle):
    read = []
    monkeypatch.setattr(engine, "load_weights", lambda *a, **kw: read.append(1))
    rc, out, err = run(capsys, "generate", "--model", TRAINED, *args)
    assert rc == 2 and needle in err and not read, err


# ---------------------------------------------------------------- nothing silently ignored

def test_repeated_prompts_stdin_and_files(capsys, tmp_path, monkeypatch):
    rc, out, _ = run(capsys, "generate", "--model", TRAINED, "--prompt", "reverse 48213\n", "--prompt", "sort 93142\n",
                     "--quiet")
    assert rc == 0 and out == "31284\n12349\n"                             # a batch: one line per prompt
    monkeypatch.setattr("sys.stdin", io.StringIO("sort 93142\n"))
    rc, out, _ = run(capsys, "generate", "--model", TRAINED, "--prompt", "-", "--quiet")
    assert rc == 0 and out == "12349\n"
    (tmp_path / "p.txt").write_text("reverse 48213\n")
    rc, out, _ = run(capsys, "generate", "--model", TRAINED, "--prompt-file", tmp_path / "p.txt", "--quiet",
                     "--threads", "1")
    assert rc == 0 and out == "31284\n"
    rc, _, err = run(capsys, "generate", "--model", TRAINED, "--prompt-file", tmp_path / "nope.txt")
    assert rc == 2 and "--prompt-file" in err


# ---------------------------------------------------------------- progress

class FakeTerminal(io.StringIO):
    def isatty(self):
        return True


def test_progress_true_draws_a_bar_and_long_preparation_ticks(monkeypatch):
    monkeypatch.setattr("sys.stderr", FakeTerminal())
    monkeypatch.setattr(ProgressBar, "DELAY", 0.0)
    eng = Engine.from_pretrained(TRAINED)
    assert eng.generate("reverse 48213\n", progress=True).text == ["31284"]
    assert "dllm: denoising" in sys.stderr.getvalue()
    from dllm.runtime.observe import ticking
    lines = []

    class Log:
        def info(self, fmt, *args):
            lines.append(fmt % args)
    import time
    with ticking(Log(), "preparing full (compile)", every=0.05):
        time.sleep(0.3)
    assert lines and lines[0].startswith("preparing full (compile) ... ")


def test_make_demo_installs_only_what_it_needs(tmp_path):
    # a venv that does not exist yet (so make prints the set-up recipe even where .venv is built), and a clean
    # environment (CI runs the suite inside `make test`: the outer make's MAKEFLAGS/MAKELEVEL stay out)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MAKE", "MFLAGS"))}
    res = subprocess.run(["make", "-n", "--no-print-directory", "demo", f"VENV={tmp_path / 'fresh'}"], cwd=ROOT,
                         capture_output=True, text=True, check=True, env=env)
    installs = [line for line in res.stdout.splitlines() if "pip install" in line]
    assert installs and not any("[test" in line or "serve" in line or "eval" in line for line in installs)
    assert "examples/demo.py" in res.stdout and "== make demo" in res.stdout
    assert "subprocess" not in (ROOT / "examples" / "demo.py").read_text()     # one process, one torch import


def test_eval_shows_generation_progress(capsys):
    pytest.importorskip("lm_eval")
    from lm_eval.api.instance import Instance

    from dllm.apps.evaluate import DllmLM
    lm = DllmLM(engine=Engine.from_pretrained(TRAINED), report=False, baseline=False)
    out = lm.generate_until([Instance("generate_until", {}, ("reverse 48213\n", {"until": ["\n"]}), 0)])
    assert out == ["31284"] and "dllm: generating" in capsys.readouterr().err
