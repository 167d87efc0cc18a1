"""Issue 13.3: an export is all or nothing. It refuses a non-empty --out unless asked to replace it,
builds in a temporary folder beside it, and a failed or interrupted export leaves nothing behind (and
an old package untouched). Every package carries a sha256 manifest of its files."""
from dataclasses import dataclass

import pytest

from dllm.apps import export as ex
from dllm.runtime import NoCache

SHAPE = dict(prompt_bucket=8, gen_length=8, steps=8)


@dataclass(frozen=True)
class FailsMidway(NoCache):
    """NoCache whose step raises when the export traces it: after the package folder was started."""
    error: type = RuntimeError

    def bodies(self, w, cfg, st, cache, scratch):
        def explode():
            raise self.error("the step failed while exporting")
        return {"full": explode}


def _listing(folder):
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*"))


@pytest.mark.parametrize("error", [RuntimeError, KeyboardInterrupt], ids=["exception", "ctrl-c"])
def test_failed_export_leaves_nothing_behind(engines, tmp_path, error):
    with pytest.raises(error):
        ex.export(engines["llada"], tmp_path / "pkg", policy=FailsMidway(error=error), **SHAPE)
    assert _listing(tmp_path) == []                          # no package, no temporary folder


@pytest.mark.parametrize("error", [RuntimeError, KeyboardInterrupt], ids=["exception", "ctrl-c"])
def test_failed_replace_keeps_the_old_package(engines, tmp_path, error):
    pkg = tmp_path / "pkg"
    ex.export(engines["llada"], pkg, **SHAPE)
    before = {p: (pkg / p).read_bytes() for p in _listing(pkg) if (pkg / p).is_file()}
    with pytest.raises(error):
        ex.export(engines["llada"], pkg, policy=FailsMidway(error=error), replace=True, **SHAPE)
    assert _listing(tmp_path) == ["pkg", *(f"pkg/{p}" for p in _listing(pkg))]
    assert {p: (pkg / p).read_bytes() for p in before} == before
    ex.check_manifest(pkg)                                    # still whole


def test_non_empty_out_needs_replace(engines, tmp_path):
    pkg = tmp_path / "pkg"
    ex.export(engines["llada"], pkg, **SHAPE)
    old_plan = (pkg / "plan.json").read_text()
    with pytest.raises(ex.PackageError, match="is not empty; pass --force"):
        ex.export(engines["llada"], pkg, **{**SHAPE, "gen_length": 4, "steps": 4})
    assert (pkg / "plan.json").read_text() == old_plan
    info = ex.export(engines["llada"], pkg, replace=True, **{**SHAPE, "gen_length": 4, "steps": 4})
    assert info["gen_length"] == 4 and _listing(tmp_path) == ["pkg", *(f"pkg/{p}" for p in _listing(pkg))]
    mod, plan = ex.load(pkg)
    assert plan["gen_length"] == 4 and len(ex.run(mod, plan, [5, 9])) == 4


def test_manifest_lists_every_file_with_its_sha256(engines, tmp_path):
    import hashlib
    pkg = tmp_path / "pkg"
    ex.export(engines["dream"], pkg, **SHAPE)
    lines = (pkg / "manifest.txt").read_text().splitlines()
    assert sorted(line.split("  ")[1] for line in lines) == ["plan.json", "steps.pt"]
    for line in lines:
        digest, name = line.split("  ")
        assert hashlib.sha256((pkg / name).read_bytes()).hexdigest() == digest


def test_package_that_is_not_a_folder(tmp_path):
    with pytest.raises(ex.PackageError, match="no plan.json"):
        ex.load(tmp_path / "missing")
