import pytest
import torch

from dllm.models.tiny import write_tiny

FAMILIES = ("llada", "dream")


@pytest.fixture(scope="session")
def tiny_dirs(tmp_path_factory):
    """One tiny checkpoint folder per family (real on-disk format, with a char tokenizer)."""
    root = tmp_path_factory.mktemp("tiny")
    return {f: write_tiny(root / f, f) for f in FAMILIES}


@pytest.fixture(scope="session")
def engines(tiny_dirs):
    from dllm.runtime import Engine
    return {f: Engine.from_pretrained(d, backend="eager") for f, d in tiny_dirs.items()}


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device; this machine has none")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)
