"""The layout holds: imports only point down, nothing points outside the repository, and a new cache
policy is one class plus one registry line (docs/ARCHITECTURE.md)."""
import ast
import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from dllm.runtime import POLICIES, Engine, Policy
from dllm.runtime.cli import main
from dllm.runtime.steps import block_logits, commit, full_step, rows_layer

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("models", "graphs", "runtime", "perf")
# Top-layer modules of the runtime folder: they use the runtime; nothing in the runtime uses them.
APP = {"cli", "export", "serve", "live", "evaluate"}
# What each layer may import from this project (perf sits on top and nothing imports it).
ALLOWED = {"graphs": {"graphs"}, "models": {"models"}, "runtime": {"graphs", "models", "runtime"},
           "app": {"graphs", "models", "runtime", "app"}, "perf": {"graphs", "models", "runtime", "app", "perf"}}


def layer(module: str) -> str:
    parts = module.split(".")                          # dllm.<package>.<module>...
    if parts[1] == "runtime" and len(parts) > 2 and parts[2] in APP:
        return "app"
    return parts[1]


def module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(["dllm", *parts])


def imports(path: Path) -> list[str]:
    """Absolute names of everything the file imports (relative imports resolved)."""
    mod = module_name(path)
    package = mod if path.name == "__init__.py" else mod.rsplit(".", 1)[0]
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                out.append(f"{base}.{node.module}" if node.module else base)
            else:
                out.append(node.module)
    return out


def project_files():
    return [p for pkg in PACKAGES for p in sorted((ROOT / pkg).rglob("*.py"))
            if not p.name.startswith("test_") and p.name != "conftest.py"]


def test_imports_only_point_down():
    assert len(project_files()) > 20
    bad = []
    for path in project_files():
        src = layer(module_name(path))
        for name in imports(path):
            if name.startswith("dllm."):
                if layer(name) not in ALLOWED[src]:
                    bad.append(f"{path.relative_to(ROOT)} ({src}) imports {name} ({layer(name)})")
            elif name.split(".")[0] in PACKAGES:
                bad.append(f"{path.relative_to(ROOT)} imports the bare name {name}: use dllm.{name}")
    assert not bad, "imports that point up:\n" + "\n".join(bad)


def test_graph_execution_depends_on_torch_only():
    for path in sorted((ROOT / "graphs").glob("*.py")):
        third = {n.split(".")[0] for n in imports(path) if not n.startswith("dllm.")} - set(sys.stdlib_module_names)
        assert third <= {"torch"}, f"{path.name} imports {third}"


def test_the_walker_sees_an_upward_import(tmp_path):
    # the checker's own sanity check: a runtime module importing the CLI, or models importing the runtime,
    # is reported (a checker that cannot fail proves nothing)
    assert layer("dllm.runtime.cli") == "app" and "app" not in ALLOWED["runtime"]
    assert layer("dllm.runtime.engine") == "runtime" and "runtime" not in ALLOWED["models"]
    assert "perf" not in ALLOWED["app"] and "runtime" not in ALLOWED["graphs"]
    src = ROOT / "runtime" / "steps.py"
    names = imports(src)
    assert "dllm.runtime.decoding" in names and "dllm.models.layers" in names


def test_nothing_points_outside_the_repository():
    outside = ["../" + "shared", "DESIGN" + ".md", "/work" + "/", "exact_" + "semantics.md"]
    files = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    hits = []
    for f in files:
        p = ROOT / f
        if p.suffix in {".safetensors", ".json"} and p.stat().st_size > 100_000 or not p.is_file():
            continue
        try:
            text = p.read_text()
        except UnicodeDecodeError:
            continue
        hits += [f"{f}: {o}" for o in outside if o in text]
    assert not hits, hits
    assert (ROOT / "docs" / "ARCHITECTURE.md").is_file()


def test_every_policy_kind_runs_on_every_registered_policy():
    # the protocol's promises, checked for every registered policy: kinds are unique, the plan only
    # names declared kinds, the first step is a full refresh (it writes every cache)
    for name, cls in POLICIES.items():
        p = cls()
        assert p.name == name and len(set(p.kinds)) == len(p.kinds) and p.kinds[0] == "full"
        assert set(p.plan(24, 8)) <= set(p.kinds) and p.plan(24, 8)[0] == "full"


# ---------------------------------------------------------------- a fifth policy, in one class

def every_row_forward(w, cfg, st, cache):
    """Every row through every layer via the row-subset path: the cache is rewritten in full."""
    rows = torch.arange(st.shape.length, device=st.tokens.device).expand(st.shape.batch, -1)
    x = F.embedding(st.tokens, w.embed)
    for i in range(cfg.n_layers):
        a, m = rows_layer(w, cfg, i, x, st, cache, rows)
        x = x + a + m
    return x


@dataclass(frozen=True)
class EveryRow(Policy):
    """A trivial extra policy: a full step, then steps that recompute every row through the cache."""
    name = "every-row"
    kinds = ("full", "rows")

    def kind_at(self, n: int, i: int) -> str:
        return "full" if n == 1 else "rows"

    def bodies(self, w, cfg, st, cache, scratch):
        return {"full": lambda: full_step(w, cfg, st, cache),
                "rows": lambda: commit(cfg, st, block_logits(w, cfg, st, every_row_forward(w, cfg, st, cache)))}


@pytest.fixture
def with_every_row(monkeypatch):
    monkeypatch.setitem(POLICIES, EveryRow.name, EveryRow)   # the one registry line, for this test only
    return EveryRow()


def test_an_extra_policy_is_one_class_and_one_registry_line(with_every_row, engines, tiny_dirs, capsys, tmp_path):
    # The engine prepares and runs it, the CLI offers it, export packages it: none of them names it.
    # Recomputing every row gives the full step's tokens (the same rows, the same keys).
    from dllm.runtime import export as ex
    from dllm.runtime import make_policy
    eng = engines["llada"]
    kw = dict(gen_length=16, steps=16, block_length=8)
    for prompt in ([5, 9, 33, 40, 41, 7, 8], [77, 12]):
        out = eng.generate(prompt, policy=make_policy("every-row"), **kw)
        assert out.step_kinds == {"full": 1, "rows": 15}
        assert out.tokens == eng.generate(prompt, **kw).tokens
    assert main(["generate", "--model", str(tiny_dirs["llada"]), "--prompt-ids", "5,9,33", "--gen-length", "8",
                 "--steps", "8", "--policy", "every-row", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["step_kinds"] == {"full": 1, "rows": 7}
    info = ex.export(eng, tmp_path / "pkg", prompt_bucket=4, gen_length=8, steps=8, policy=with_every_row)
    assert info["kinds"] == ["full", "rows"] and info["policy"] == {"name": "every-row"}
    mod, plan = ex.load(tmp_path / "pkg")
    ref = Engine.from_pretrained(tiny_dirs["llada"], backend="eager").generate([5, 9, 33], gen_length=8, steps=8)
    assert ex.run(mod, plan, [5, 9, 33]) == ref.tokens[0]
