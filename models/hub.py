"""Where a checkpoint folder comes from: a local path, or a Hugging Face hub id (`org/name`) resolved
through huggingface_hub (a dependency of transformers): the local cache first, a download only when
the hub is reachable and downloads are not switched off (HF_HUB_OFFLINE=1)."""
from __future__ import annotations

import os
import re
from pathlib import Path

from .config import CheckpointError

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")     # org/name, as the hub spells repository ids
FILES = ["*.json", "*.safetensors", "*.jinja", "*.model", "*.txt", "*.py"]   # what a checkpoint folder needs


def offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def resolve_model(model: str | Path) -> Path:
    """A checkpoint folder for `model`: the path itself when it exists (or does not look like a hub id),
    else the hub id's snapshot. CheckpointError, one line, when a hub id is not cached and cannot be
    fetched."""
    path = Path(model)
    if path.exists() or not HUB_ID.match(str(model)) or str(model).startswith("."):
        return path
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError
    cache = os.environ.get("HF_HUB_CACHE")
    try:
        return Path(snapshot_download(str(model), cache_dir=cache, allow_patterns=FILES, local_files_only=True))
    except LocalEntryNotFoundError:
        pass                                           # not cached (in full): fetch it, when allowed
    where = cache or "the Hugging Face cache (~/.cache/huggingface/hub)"
    if offline():
        raise CheckpointError(f"{model}: not a folder, and not in {where}; downloads are off (HF_HUB_OFFLINE=1): "
                              f"on a machine with internet run `hf download {model}`, or unset "
                              f"HF_HUB_OFFLINE, or pass a local checkpoint folder")
    try:
        return Path(snapshot_download(str(model), cache_dir=cache, allow_patterns=FILES))
    except RepositoryNotFoundError:
        raise CheckpointError(f"{model}: no such model on the Hugging Face hub (or it is private: log in with "
                              f"`hf auth login`), and not a local folder") from None
    except (HfHubHTTPError, OSError, ValueError) as e:    # no network, a proxy, a timeout
        raise CheckpointError(f"{model}: not a folder, not in {where}, and the hub could not be reached "
                              f"({type(e).__name__}); run `hf download {model}` where there is "
                              f"internet, or pass a local checkpoint folder") from None
