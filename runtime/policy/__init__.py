"""Cache policies, one file each, and the one registry that maps a name to a policy.

Adding a policy: write runtime/policy/<name>.py with a Policy subclass (base.py says what it owns) and
add it to POLICIES below; the engine, the backends, export and the CLI pick it up from there.
"""
from __future__ import annotations

from ..errors import RequestError
from .base import Policy
from .d2cache import D2Cache
from .dllm_cache import DllmCache
from .dual_cache import DualCache
from .none import NoCache

POLICIES: dict[str, type[Policy]] = {p.name: p for p in (NoCache, DllmCache, D2Cache, DualCache)}


def make_policy(name: str, **params) -> Policy:
    """The policy called `name` with the given options; RequestError for an unknown name or option."""
    if name not in POLICIES:
        raise RequestError(f"unknown policy {name!r}; choose one of {', '.join(POLICIES)}", "policy")
    try:
        return POLICIES[name](**params)
    except TypeError as e:
        raise RequestError(f"policy {name}: {e}", "policy") from None


__all__ = ["POLICIES", "Policy", "NoCache", "DllmCache", "D2Cache", "DualCache", "make_policy"]
