"""RPC parameters as ECS sends them (flat `Name.N.Field` pairs) -> nested Python values.

`Permissions.1.IpProtocol=TCP` becomes `{"Permissions": [{"IpProtocol": "TCP"}]}`,
`SecurityGroupId.2=sg-2` the second item of `params["SecurityGroupId"]`,
`SystemDisk.Category=x` `{"SystemDisk": {"Category": "x"}}`. Scalars stay
strings. Anything ambiguous (a name given twice, a name both scalar and list,
a list with a hole or an index like `01` or `0`) is an `InvalidParameter`: the
control plane never has to guess.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from nftsg.translators.errors import EcsError

# Common parameters of the RPC style: never an action's own parameter.
COMMON_PARAMETERS = frozenset({"Action", "Version", "Format"})


def _is_index(segment: str) -> bool:
    return segment.isdigit() and segment.isascii() and segment[0] != "0"


def _invalid(name: str, why: str) -> EcsError:
    return EcsError("InvalidParameter", f"The specified parameter {name!r} is not valid: {why}.")


def unflatten(pairs: Iterable[tuple[str, str]]) -> dict[str, Any]:
    """Gather flat RPC pairs into nested dicts and lists (see module docstring)."""
    tree: dict[str | int, Any] = {}
    seen: set[str] = set()
    for name, value in pairs:
        if name in seen:
            raise _invalid(name, "given more than once")
        seen.add(name)
        if name in COMMON_PARAMETERS:
            continue
        segments = name.split(".")
        if any(not s for s in segments) or _is_index(segments[0]):
            raise _invalid(name, "malformed name")
        node = tree
        for depth, segment in enumerate(segments):
            key: str | int = int(segment) if _is_index(segment) else segment
            if isinstance(key, str) and segment.isdigit():
                raise _invalid(name, "list indices start at 1, without leading zeros")
            last = depth == len(segments) - 1
            if last:
                if key in node:
                    raise _invalid(name, "given both as a value and as a list or structure")
                node[key] = value
            else:
                child = node.setdefault(key, {})
                if not isinstance(child, dict):
                    raise _invalid(name, "given both as a value and as a list or structure")
                node = child
    return {str(k): _finish(v, str(k)) for k, v in tree.items()}


def _finish(node: Any, path: str) -> Any:
    if not isinstance(node, dict):
        return node
    keys = list(node)
    if all(isinstance(k, int) for k in keys):
        indices = sorted(keys)
        if indices != list(range(1, len(indices) + 1)):
            missing = next(i for i in range(1, len(indices) + 2) if i not in node)
            raise _invalid(f"{path}.{missing}", "missing: list items are numbered 1..N")
        return [_finish(node[i], f"{path}.{i}") for i in indices]
    if any(isinstance(k, int) for k in keys):
        raise _invalid(path, "mixes numbered items and named fields")
    return {k: _finish(v, f"{path}.{k}") for k, v in node.items()}
