"""Using dllm the way people use an inference runtime (issue 15): `--version`, defaults for the response
length and step count, progress of long work on stderr (none under --json or --quiet). The README's and
docs' examples run in tests/test_docs.py."""
import io
import json
import logging
import re
import sys
import time
from importlib.metadata import version
from pathlib import Path

import pytest

from dllm.apps.generate.main import build_parser
from dllm.apps.main import main
from dllm.runtime import ProgressBar, Request

ROOT = Path(__file__).resolve().parent.parent
TRAINED = ROOT / "models" / "trained" / "arith-llada"
SKIP_MARK = re.compile(r"#\s*(needs\b|slow\b)")
PRINTS = re.compile(r"#\s*prints\s+(\S+)")


def run(capsys, *args):
    rc = main(list(map(str, args)))
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_version(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0
    assert capsys.readouterr().out == f"dllm {version('dllm-runtime')}\n"


def test_defaults_and_help(capsys):
    a = build_parser().parse_args(["--model", "m", "--prompt", "p"])
    assert (a.gen_length, a.steps, a.block_length, a.quiet, a.json) == (None, None, None, False, False)
    r = Request("p").resolved()                       # flags left out: the model's defaults, else these
    assert (r.gen_length, r.steps, r.block_length) == (128, 128, 128)
    with pytest.raises(SystemExit):
        main(["generate", "--help"])
    help_text = capsys.readouterr().out
    assert "else 128" in help_text and "default G" in help_text
    assert "models/trained/arith-llada" in help_text and "reverse 48213" in help_text   # the prompt format


def test_shipped_model_steps_default_to_gen_length(capsys):
    rc, out, err = run(capsys, "generate", "--model", TRAINED, "--prompt", "reverse 48213\n", "--gen-length", 8,
                       "--json")
    assert rc == 0
    assert out.count("\n") == 1 and json.loads(out)["text"] == ["31284"]     # exactly one JSON object
    obj = json.loads(out)
    assert obj["steps"] == 8 and obj["step_kinds"] == {"full": 8}
    assert err == ""                                                         # no progress under --json


def test_gen_length_default(capsys, tiny_dirs):
    rc, out, err = run(capsys, "generate", "--model", tiny_dirs["llada"], "--prompt-ids", "5,6,7", "--steps", 8,
                       "--json")
    obj = json.loads(out)
    assert rc == 0 and len(obj["tokens"][0]) == 128 and obj["steps"] == 8 and err == ""


def test_progress_on_stderr_and_quiet(capsys):
    args = ["generate", "--model", TRAINED, "--prompt", "sort 93142", "--chat", "--gen-length", 8]
    rc, out, err = run(capsys, *args)
    assert rc == 0 and out == "12349\n"
    assert f"dllm: loading weights from {TRAINED}" in err and "dllm: loaded " in err
    assert "8 tokens, 8 steps (full 8)" in err                            # the summary line
    assert "denoising" not in err                                        # no bar: stderr is not a terminal
    rc, out, err = run(capsys, *args, "--quiet")
    assert rc == 0 and out == "12349\n" and err == ""
    assert not logging.getLogger("dllm").handlers             # main() leaves the logger as it found it


@pytest.fixture
def dllm_logger():
    """dllm export configures the 'dllm' logger for the rest of its process; put it back after the test."""
    log = logging.getLogger("dllm")
    saved = (log.handlers[:], log.level, log.propagate)
    yield
    log.handlers[:], log.level, log.propagate = saved


def test_export_progress_and_quiet(capsys, tmp_path, tiny_dirs, dllm_logger):
    args = ["export", "--model", tiny_dirs["llada"], "--format", "torchscript", "--prompt-bucket", 8,
            "--gen-length", 8, "--steps", 8]
    rc, out, err = run(capsys, *args, "--out", tmp_path / "a")
    assert rc == 0 and "wrote" in out and "dllm: loading weights from" in err
    rc, out, err = run(capsys, *args, "--out", tmp_path / "b", "--quiet")
    assert rc == 0 and "wrote" in out and err == ""


class FakeTerminal(io.StringIO):
    def isatty(self):
        return True


def test_step_bar(monkeypatch):
    monkeypatch.setattr("sys.stderr", FakeTerminal())
    assert not ProgressBar(enabled=False).enabled
    quick = ProgressBar(enabled=True)                # a generation shorter than 2 s draws nothing
    for i in range(1, 5):
        quick(i, 4)
    quick.close()
    assert "denoising" not in sys.stderr.getvalue()
    slow = ProgressBar(enabled=True)
    slow(1, 4)
    time.sleep(2.1)
    slow(2, 4)
    assert "dllm: denoising" in sys.stderr.getvalue() and "2/4" in sys.stderr.getvalue()
    slow.close()
    monkeypatch.setattr("sys.stderr", io.StringIO())
    assert not ProgressBar(enabled=True).enabled     # never a bar into a pipe or a file


