"""Every code block of the README and docs/*.md runs as written (issue 25), from a folder that mirrors the
repository, in file order:

- a ```bash line runs (continuation lines joined); a trailing `# prints X` is checked on stdout;
- a line marked `# needs ...` (a GPU, an 8B folder, internet) or `# slow` is not run, but its flags are
  checked against the command's own `--help` (every `--flag` it names must be one);
- a line marked `# runs until Ctrl-C` starts in the background (a server) and is stopped with Ctrl-C at
  the end of its file, once it printed its ready line; later lines of that file may talk to it;
- a ```python block runs as a script; one whose first line is a `# needs ...` comment is compiled only.
"""
from __future__ import annotations

import re
import signal
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
NOT_RUN = re.compile(r"#\s*(needs\b|slow\b)")
PRINTS = re.compile(r"#\s*prints\s+(\S+)")
BACKGROUND = re.compile(r"#\s*runs until Ctrl-C")
FENCE = re.compile(r"```(bash|python)\n(.*?)```", re.S)


def blocks(text: str) -> list[tuple[str, str]]:
    """(language, code) of every bash / python block, in order."""
    return [(lang, code) for lang, code in FENCE.findall(text)]


def bash_lines(code: str) -> list[str]:
    """The commands of a bash block: continuation lines joined, comments and blank lines dropped."""
    out = []
    for line in re.sub(r"\\\n\s*", "", code).splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            out.append(line)
    return out


def comment(line: str) -> str:
    return "#" + line.split(" #", 1)[1] if " #" in line else ""


def command(line: str) -> str:
    return line.split(" #", 1)[0].strip()


def mirror(workdir: Path) -> None:
    """A folder whose entries link to the repository's, so what the examples write (demo-models/, a
    package) lands in the test's folder; build/ is the repository's (the C++ runner is built once)."""
    for entry in ROOT.iterdir():
        if entry.name not in ("demo-models", ".git"):
            (workdir / entry.name).symlink_to(entry)


_HELP: dict[str, str] = {}


def help_text(prefix: str, workdir: Path) -> str:
    if prefix not in _HELP:
        res = subprocess.run(["bash", "-c", prefix + " --help"], cwd=workdir, capture_output=True, text=True,
                             timeout=120)
        _HELP[prefix] = res.stdout + res.stderr
    return _HELP[prefix]


def check_flags(line: str, workdir: Path) -> None:
    """A line that is not run: its program exists and knows every --flag the line passes it."""
    cmd = command(line)
    words = cmd.split()
    if not words[0].startswith(".venv/bin/"):
        return                                             # cmake, curl, make: their own tools
    first_flag = next((i for i, w in enumerate(words) if w.startswith("-") and w != "-m"), len(words))
    prefix = " ".join(words[:first_flag])                  # dllm SUBCOMMAND, python -m MODULE, pytest PATH
    text = help_text(prefix, workdir)
    assert "usage:" in text, f"{prefix} --help failed: {text[-500:]}"
    unknown = [f for f in re.findall(r"(?<!\S)(--[a-z][a-z0-9-]*)", cmd) if f not in text]
    assert not unknown, f"{line}: {prefix} has no {unknown}"


def run_page(page: Path, workdir: Path) -> list[str]:
    """Run a page's blocks in order; returns the commands run (for the selection test)."""
    ran, background = [], []
    try:
        for i, (lang, code) in enumerate(blocks(page.read_text())):
            if lang == "python":
                first = code.lstrip().splitlines()[0] if code.strip() else ""
                if NOT_RUN.search(first):
                    compile(code, f"{page.name}:python-{i}", "exec")
                    continue
                script = workdir / f"{page.stem}-{i}.py"
                script.write_text(code)
                res = subprocess.run([str(ROOT / ".venv" / "bin" / "python"), script.name], cwd=workdir,
                                     capture_output=True, text=True, timeout=300)
                assert res.returncode == 0, f"{page.name} python block {i} failed:\n{code}\n{res.stderr[-2000:]}"
                for want in PRINTS.findall(code):
                    assert want in res.stdout, f"{page.name} python block {i}: expected {want!r} in {res.stdout!r}"
                ran.append(f"python block {i}")
                continue
            for line in bash_lines(code):
                if NOT_RUN.search(comment(line)):
                    check_flags(line, workdir)
                    continue
                if BACKGROUND.search(comment(line)):
                    proc = subprocess.Popen(["bash", "-c", "exec " + command(line)], cwd=workdir,
                                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
                    background.append(proc)
                    ready = proc.stdout.readline()
                    assert "ready on" in ready, f"{line}: no ready line ({ready!r})"
                    ran.append(line)
                    continue
                res = subprocess.run(["bash", "-c", command(line)], cwd=workdir, capture_output=True, text=True,
                                     timeout=600)
                assert res.returncode == 0, f"{page.name}: {line}\nexit {res.returncode}: {res.stderr[-2000:]}"
                want = PRINTS.search(comment(line))
                if want:
                    assert want.group(1) in res.stdout, f"{line}: expected {want.group(1)!r}, got {res.stdout!r}"
                ran.append(line)
    finally:
        for proc in background:
            proc.send_signal(signal.SIGINT)
            proc.wait(60)
    return ran


@pytest.mark.parametrize("page", PAGES, ids=[p.name for p in PAGES])
def test_every_code_block_runs(page, tmp_path):
    if not (ROOT / ".venv" / "bin" / "dllm").exists():
        pytest.skip("no .venv/bin/dllm: the examples assume `make demo` / `make test` made .venv/")
    mirror(tmp_path)
    run_page(page, tmp_path)


def test_the_readme_is_short_and_links_every_page():
    text = (ROOT / "README.md").read_text()
    assert len(text.splitlines()) <= 170
    for page in PAGES[1:]:
        assert f"docs/{page.name}" in text, f"the README does not link docs/{page.name}"


def test_block_selection(tmp_path):
    text = ("```bash\n.venv/bin/dllm --version   # prints dllm\n.venv/bin/dllm generate --model ./LLaDA-8B \\\n"
            "    --steps 8  # needs an 8B folder\n# a comment\n```\n```python\n# needs a GPU\nimport torch\n```\n"
            "```python\nprint('ok')   # prints ok\n```\n```text\nnot code\n```\n")
    page = tmp_path / "page.md"
    page.write_text(text)
    (tmp_path / "w").mkdir()
    mirror(tmp_path / "w")
    ran = run_page(page, tmp_path / "w")
    assert ran == [".venv/bin/dllm --version   # prints dllm", "python block 2"]
    bad = tmp_path / "bad.md"
    bad.write_text("```bash\n.venv/bin/dllm generate --model x --no-such-flag 1   # needs an 8B folder\n```\n")
    with pytest.raises(AssertionError, match="has no"):
        run_page(bad, tmp_path / "w")
