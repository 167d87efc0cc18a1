"""`dllm generate --live`: frames redrawn in place under a pseudo-terminal, and plain output through a pipe."""
from __future__ import annotations

import json
import os
import pty
import re
import select
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dllm.apps.generate.live import MASK_CELL, LiveView
from dllm.runtime import Engine

MODEL = Path(__file__).resolve().parents[1] / "models" / "trained" / "arith-llada"
ARGS = ["generate", "--model", str(MODEL), "--prompt", "reverse 48213\n", "--gen-length", "8", "--steps", "8"]
ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def run_in_pty(args: list[str], timeout: float = 120.0) -> tuple[int, str]:
    """Run the CLI with stdout and stderr on a pseudo-terminal; returns (exit status, everything it wrote)."""
    master, slave = pty.openpty()
    proc = subprocess.Popen([sys.executable, "-m", "dllm.apps.main", *args], stdin=subprocess.DEVNULL,
                            stdout=slave, stderr=slave, env=ENV, close_fds=True)
    os.close(slave)
    chunks, end = [], time.monotonic() + timeout
    try:
        while time.monotonic() < end:
            ready, _, _ = select.select([master], [], [], 0.5)
            if not ready:
                if proc.poll() is not None:
                    break
                continue
            try:
                data = os.read(master, 4096)
            except OSError:                   # EIO: the child closed the terminal
                break
            if not data:
                break
            chunks.append(data)
    finally:
        os.close(master)
    rc = proc.wait(timeout=30)
    return rc, b"".join(chunks).decode("utf-8", "replace").replace("\r\n", "\n")


def frames(raw: str) -> list[list[str]]:
    """Split the terminal output into frames (each starts where the view clears below the cursor), as
    lines with the escapes removed."""
    parts = raw.split("\x1b[J")[1:]
    return [ANSI.sub("", p).rstrip("\n").split("\n") for p in parts]


@pytest.fixture(scope="module")
def reference() -> dict:
    out = subprocess.run([sys.executable, "-m", "dllm.apps.main", *ARGS, "--json"], capture_output=True,
                         text=True, env=ENV, timeout=120)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def test_live_frames_end_on_the_json_result(reference):
    rc, raw = run_in_pty([*ARGS, "--live"])
    assert rc == 0, raw
    shots = frames(raw)
    steps = [f for f in shots if f[0].startswith("step ")]
    assert len(steps) == reference["steps"] == 8
    assert [int(f[0].split()[1]) for f in steps] == list(range(1, 9))
    assert all("full" in f[0] and " ms" in f[0] for f in steps)
    masked = [f[1].count(MASK_CELL) for f in steps]
    assert masked == sorted(masked, reverse=True) and masked[0] == 7 and masked[-1] == 0   # one commit per step
    assert "\x1b[1;32m" in raw                               # this step's commits are highlighted
    assert "\x1b[2F" in raw                                  # later frames redraw over the earlier ones

    # the last frame: the final canvas, then the final text and the totals
    last = shots[-1]
    assert last[0].startswith("done  8 steps (full 8)")
    view = LiveView(Engine.from_pretrained(MODEL), width=80)
    assert last[1] == "".join(view.token_text(t) for t in reference["tokens"][0])
    assert last[2] == reference["text"][0] == "31284"
    assert "8 tokens, 8 steps" in last[3] and "tok/s" in last[3]
    assert last[1] == steps[-1][1]                           # the final canvas is the last step's canvas


def test_live_falls_back_to_plain_output_in_a_pipe(reference):
    out = subprocess.run([sys.executable, "-m", "dllm.apps.main", *ARGS, "--live"], capture_output=True, text=True,
                         env=ENV, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "\x1b" not in out.stdout and "\x1b" not in out.stderr
    assert out.stdout == reference["text"][0] + "\n"
    assert "8 tokens, 8 steps (full 8)" in out.stderr
