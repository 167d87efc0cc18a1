"""The layout holds, written in folders: imports only point down the layers (graphs, models < runtime <
apps < perf), a face under apps/ imports only itself and apps/common.py (apps/main.py, the dispatcher,
knows them all), nothing points outside the repository, and a new cache policy is one class plus one
registry line whose options reach every face (docs/ARCHITECTURE.md)."""
import ast
import json
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from dllm.apps.main import main
from dllm.runtime import POLICIES, Engine, Policy
from dllm.runtime.steps import block_logits, commit, full_step, rows_layer

ROOT = Path(__file__).resolve().parent.parent
LAYERS = ("graphs", "models", "runtime", "apps", "perf")          # the folders that install as dllm.<folder>
# What each layer may import from this project (perf sits on top and nothing imports it).
ALLOWED = {"graphs": {"graphs"}, "models": {"models"}, "runtime": {"graphs", "models", "runtime"},
           "apps": {"graphs", "models", "runtime", "apps"}, "perf": set(LAYERS)}
SHARED_FACES = {None, "common"}       # apps/__init__.py and apps/common.py: made for the faces to share
DISPATCHERS = {"main", "__main__"}    # the `dllm` command: the one module that knows every face


def layer(module: str) -> str:
    return module.split(".")[1]                        # dllm.<folder>...


def face(module: str) -> str | None:
    """The face of a dllm.apps module: its first folder or file under apps/ (None for apps/__init__)."""
    parts = module.split(".")
    return parts[2] if parts[1] == "apps" and len(parts) > 2 else None


def allowed(src: str, dst: str) -> bool:
    if layer(dst) not in ALLOWED[layer(src)]:
        return False
    if layer(src) == "apps" and layer(dst) == "apps" and face(src) not in DISPATCHERS:
        return face(dst) in SHARED_FACES or face(dst) == face(src)
    return True


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
    return [p for pkg in LAYERS for p in sorted((ROOT / pkg).rglob("*.py"))
            if not p.name.startswith("test_") and p.name != "conftest.py"]


def test_every_python_folder_is_a_layer():
    # the tree is the layering: no Python outside the layer folders but tests/ and examples/
    tracked = subprocess.run(["git", "ls-files", "*.py"], cwd=ROOT, capture_output=True, text=True,
                             check=True).stdout.split()
    assert {Path(f).parts[0] for f in tracked if len(Path(f).parts) > 1} <= {*LAYERS, "tests", "examples"}


def test_imports_only_point_down():
    assert len(project_files()) > 30
    bad = []
    for path in project_files():
        src = module_name(path)
        for name in imports(path):
            if name.startswith("dllm."):
                if not allowed(src, name):
                    bad.append(f"{path.relative_to(ROOT)} imports {name}")
            elif name.split(".")[0] in LAYERS:
                bad.append(f"{path.relative_to(ROOT)} imports the bare name {name}: use dllm.{name}")
    assert not bad, "imports that point up or sideways:\n" + "\n".join(bad)


def test_graph_execution_depends_on_torch_only():
    for path in sorted((ROOT / "graphs").rglob("*.py")):
        third = {n.split(".")[0] for n in imports(path) if not n.startswith("dllm.")} - set(sys.stdlib_module_names)
        assert third <= {"torch"}, f"{path.name} imports {third}"


def test_the_walker_sees_an_upward_or_sideways_import():
    # the checker's own sanity check (a checker that cannot fail proves nothing): the core importing a
    # face, models importing the runtime, one face importing another are refused; a face importing the
    # shared module or itself, and the dispatcher importing a face, are not
    assert not allowed("dllm.runtime.engine", "dllm.apps.generate.main")
    assert not allowed("dllm.models.layers", "dllm.runtime.steps")
    assert not allowed("dllm.graphs.backends", "dllm.runtime.state")
    assert not allowed("dllm.apps.serve.main", "dllm.apps.generate.main")
    assert not allowed("dllm.apps.evaluate", "dllm.apps.serve.protocol")
    assert not allowed("dllm.apps.common", "dllm.perf.e2e")
    assert allowed("dllm.apps.serve.app", "dllm.apps.serve.worker")
    assert allowed("dllm.apps.serve.main", "dllm.apps.common")
    assert allowed("dllm.apps.main", "dllm.apps.export.main") and allowed("dllm.perf.cpp", "dllm.apps.export")
    assert face("dllm.apps.export.cpp") == "export" and face("dllm.apps") is None
    names = imports(ROOT / "runtime" / "steps.py")
    assert "dllm.runtime.decoding" in names and "dllm.models.layers" in names
    assert "dllm.apps.serve.worker" in imports(ROOT / "apps" / "serve" / "app.py")    # relative imports resolved


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
    """A trivial extra policy with one option: full steps (the first, and every `full_every`-th), the
    others recompute every row through the cache."""
    full_every: int = field(default=0, metadata={"help": "every-row: a full step every N steps (0: the first only)"})
    name = "every-row"
    kinds = ("full", "rows")

    def kind_at(self, n: int, i: int) -> str:
        return "full" if n == 1 or (self.full_every and (n - 1) % self.full_every == 0) else "rows"

    def bodies(self, w, cfg, st, cache, scratch):
        return {"full": lambda: full_step(w, cfg, st, cache),
                "rows": lambda: commit(cfg, st, block_logits(w, cfg, st, every_row_forward(w, cfg, st, cache)))}


@pytest.fixture
def with_every_row(monkeypatch):
    monkeypatch.setitem(POLICIES, EveryRow.name, EveryRow)   # the one registry line, for this test only
    return EveryRow(full_every=4)


KINDS_8 = {"full": 2, "rows": 6}      # 8 steps with full_every=4: steps 1 and 5 are full


def test_an_extra_policy_is_one_class_and_one_registry_line(with_every_row, engines, tiny_dirs, capsys, tmp_path):
    # The engine prepares and runs it, export packages it: none of them names it. Recomputing every
    # row gives the full step's tokens (the same rows, the same keys).
    from dllm.apps import export as ex
    from dllm.runtime import make_policy
    eng = engines["llada"]
    kw = dict(gen_length=16, steps=16, block_length=8)
    for prompt in ([5, 9, 33, 40, 41, 7, 8], [77, 12]):
        out = eng.generate(prompt, policy=make_policy("every-row"), **kw)
        assert out.step_kinds == {"full": 1, "rows": 15}
        assert out.tokens == eng.generate(prompt, **kw).tokens
    assert eng.generate([77, 12], policy=with_every_row, **kw).step_kinds == {"full": 4, "rows": 12}
    info = ex.export(eng, tmp_path / "pkg", prompt_bucket=4, gen_length=8, steps=8, policy=with_every_row)
    assert info["kinds"] == ["full", "rows"] and info["policy"] == {"name": "every-row", "full_every": 4}
    mod, plan = ex.load(tmp_path / "pkg")
    ref = Engine.from_pretrained(tiny_dirs["llada"], backend="eager").generate([5, 9, 33], gen_length=8, steps=8)
    assert ex.run(mod, plan, [5, 9, 33]) == ref.tokens[0]


def test_an_extra_policys_option_reaches_every_face(with_every_row, engines, tiny_dirs, capsys):
    """Its option, read from its dataclass field by the one option parser, reaches `dllm generate` (a
    flag), `dllm serve` (a JSON field), `dllm eval` (a model argument) and perf (a `name:k=v` spec)."""
    eng = engines["llada"]
    assert main(["generate", "--model", str(tiny_dirs["llada"]), "--prompt-ids", "5,9,33", "--gen-length", "8",
                 "--policy", "every-row", "--full-every", "4", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["step_kinds"] == KINDS_8
    assert main(["generate", "--model", str(tiny_dirs["llada"]), "--prompt-ids", "5,9,33", "--gen-length", "8",
                 "--policy", "every-row:full_every=4", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["step_kinds"] == KINDS_8
    assert main(["generate", "--model", str(tiny_dirs["llada"]), "--prompt-ids", "5", "--full-every", "4"]) == 2
    assert "belongs to policy every-row" in capsys.readouterr().err     # never silently ignored

    from dllm.perf.e2e import policy_rows
    rows = policy_rows(eng, [5, 9, 33], ["none", "every-row:full_every=4"], 1, gen_length=8, steps=8)
    assert rows[1]["step_kinds"] == KINDS_8 and rows[1]["agree"] == 1.0

    pytest.importorskip("starlette")
    from starlette.testclient import TestClient

    from dllm.apps.serve.app import create_app
    from dllm.apps.serve.protocol import ServeOptions
    from dllm.runtime import Request
    opts = ServeOptions("tiny", Request(gen_length=8, steps=8, block_length=8))
    with TestClient(create_app(eng, opts)) as client:
        body = {"model": "tiny", "prompt": "hi", "max_tokens": 8, "policy": "every-row", "full_every": 4}
        r = client.post("/v1/completions", json=body)
        assert r.status_code == 200 and r.json()["dllm"]["step_kinds"] == KINDS_8, r.text
        r = client.post("/v1/completions", json={**body, "full_every": "4"})
        assert r.status_code == 400 and r.json()["error"]["param"] == "full_every"

    pytest.importorskip("lm_eval")
    from lm_eval.api.instance import Instance

    from dllm.apps.evaluate import DllmLM
    lm = DllmLM(engine=eng, policy="every-row", full_every="4", gen_length=8, steps=8, report=False, baseline=False)
    lm.generate_until([Instance("generate_until", {}, ("hi", {"until": ["\n"], "max_gen_toks": 8}), 0)])
    assert dict(lm.efficiency["default"].step_kinds) == KINDS_8
