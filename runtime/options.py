"""The one parser of request options, for every face: a mapping (a JSON body, lm-eval model arguments,
command-line flags) or a `policy:k=v,...` spec (perf), typed by dataclass fields, Request's and each
registered policy's. A new policy's options reach every face through its dataclass fields alone.

    parse_policy("dllm-cache:kp=50,rho=0.5")          -> DllmCache(kp=50, kr=7, rho=0.5)
    parse_spec("dual-cache:threshold=0.9")             -> {"policy": DualCache(), "threshold": 0.9}
    request_options({"policy": "d2cache", "k": "8", "threshold": "0.9"}, text=True)
        -> {"policy": D2Cache(k=8, ...), "threshold": 0.9}

text=True: values may be strings ("8", "0.5", "true", "none"), as a command line or `k=v` list gives
them; text=False (JSON): values must already have the field's type (a bool is never an integer).
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import fields

from .errors import RequestError
from .policy import POLICIES, Policy, make_policy


def field_kind(annotation) -> tuple[str, bool]:
    """('int' | 'float' | 'bool' | 'str' | 'tuple' | other, optional) of a field's annotation (a string
    under `from __future__ import annotations`, else a type or union)."""
    text = annotation.__name__ if isinstance(annotation, type) else str(annotation)
    parts = [p.strip() for p in text.split("|")]
    optional = "None" in parts
    base = next((p for p in parts if p != "None"), "None")
    return ("tuple" if base.startswith("tuple") else base), optional


def coerce(name: str, value, annotation, *, text: bool):
    """One option value to its field's type, or RequestError naming the option."""
    kind, optional = field_kind(annotation)
    if value is None or (text and optional and isinstance(value, str) and value.lower() in ("none", "null")):
        if optional:
            return None
        raise RequestError(f"{name} must be {_want(kind)}, got {value!r}", name)
    if text and isinstance(value, str):
        try:
            if kind == "bool":
                return {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}[value.lower()]
            if kind == "int":
                return int(value)
            if kind == "float":
                return float(value)
        except (KeyError, ValueError):
            raise RequestError(f"{name} must be {_want(kind)}, got {value!r}", name) from None
        if kind == "tuple":
            return (value,)
        return value
    ok = {"bool": isinstance(value, bool),
          "int": isinstance(value, int) and not isinstance(value, bool),
          "float": isinstance(value, (int, float)) and not isinstance(value, bool),
          "str": isinstance(value, str),
          "tuple": isinstance(value, (str, list, tuple))}.get(kind, True)
    if not ok:
        raise RequestError(f"{name} must be {_want(kind)}, got {value!r}", name)
    if kind == "float":
        return float(value)
    if kind == "tuple":
        return (value,) if isinstance(value, str) else tuple(value)
    return value


def _want(kind: str) -> str:
    return {"bool": "true or false", "int": "an integer", "float": "a number", "str": "a string",
            "tuple": "a string or a list of strings"}.get(kind, f"a {kind}")


def policy_option_names() -> dict[str, list[str]]:
    """Every policy option -> the policies that have it (from the registry's dataclass fields)."""
    out: dict[str, list[str]] = {}
    for name, cls in POLICIES.items():
        for f in fields(cls):
            out.setdefault(f.name, []).append(name)
    return out


def parse_policy(spec, *, text: bool = True, base: Policy | None = None) -> Policy:
    """A policy from a spec: a Policy, a name, 'name:k=v,...', or a mapping {"policy": name, option: value}
    (an option of another policy is refused, naming the policy it belongs to). base: the policy a mapping
    without a name means, and whose options the named options change when the name is its own (a
    server's default policy)."""
    if isinstance(spec, Policy):
        return spec
    if isinstance(spec, str):
        name, _, rest = spec.partition(":")
        options = {}
        for kv in filter(None, rest.split(",")):
            k, eq, v = kv.partition("=")
            if not eq:
                raise RequestError(f"policy spec {spec!r}: {kv!r} is not key=value")
            options[k.strip()] = v.strip()
        return _policy(name.strip(), options, True, base)
    if isinstance(spec, Mapping):
        options = dict(spec)
        name = options.pop("policy", base.name if base is not None else "none")
        if isinstance(name, Policy):
            return name if not options else _policy(name.name, options, text, name)
        return _policy(name, options, text, base)
    raise RequestError(f"a policy is a name, 'name:key=value,...' or a mapping, got {type(spec).__name__}")


def _policy(name, options: dict, text: bool, base: Policy | None = None) -> Policy:
    if not isinstance(name, str) or name not in POLICIES:
        raise RequestError(f"unknown policy {name!r}; choose one of {', '.join(POLICIES)}", "policy")
    own = {f.name: f for f in fields(POLICIES[name])}
    owners = policy_option_names()
    for key in options:
        if key not in own:
            if key in owners:
                raise RequestError(f"option {key} belongs to policy {' / '.join(owners[key])}, not {name}; set "
                                   f"policy {owners[key][0]} or drop {key} (policy {name} takes "
                                   f"{', '.join(own) or 'no options'})", key)
            raise RequestError(f"unknown option {key!r} for policy {name} (its options: {', '.join(own) or 'none'})",
                               key)
    typed = {k: coerce(k, v, own[k].type, text=text) for k, v in options.items()}
    if base is not None and base.name == name:
        typed = {**base.params(), **typed}
    return make_policy(name, **typed)


def parse_spec(spec: str) -> dict:
    """'policy:key=value,...' -> Request options: the keys are the policy's options or any Request option
    (e.g. 'dual-cache:threshold=0.9,block_length=4'); a bare name is the policy alone."""
    name, _, rest = spec.partition(":")
    options = {"policy": name.strip()}
    for kv in filter(None, rest.split(",")):
        k, eq, v = kv.partition("=")
        if not eq:
            raise RequestError(f"spec {spec!r}: {kv!r} is not key=value")
        options[k.strip()] = v.strip()
    return request_options(options, text=True)


def request_options(options: Mapping, *, text: bool = False, allowed=None, base_policy: Policy | None = None) -> dict:
    """Request keyword options from a mapping of Request fields, `policy` and policy options (typed by
    their fields). allowed: the Request fields this face accepts (default: all but the prompt);
    base_policy: see parse_policy."""
    from .request import OPTION_FIELDS
    own = {f.name: f for f in OPTION_FIELDS if f.name != "policy" and (allowed is None or f.name in allowed)}
    owners = policy_option_names()
    out, policy = {}, {}
    for key, value in options.items():
        if key == "policy" or (key in owners and key not in own):
            policy[key] = value
        elif key in own:
            out[key] = coerce(key, value, own[key].type, text=text)
        else:
            raise RequestError(f"unknown option {key!r}; valid: {', '.join([*own, 'policy', *owners])}", key)
    if policy:
        out["policy"] = parse_policy(policy, text=text, base=base_policy)
    return out
