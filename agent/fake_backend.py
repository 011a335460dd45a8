"""An in-memory nftables with the real backend's interface, for tests without root.

Like knftables' fake: a batch is applied to a copy of the namespace's state and
the copy replaces the state only if every command succeeded, so a failed batch
changes nothing. It models the command subset the compiler emits, with the
checks the kernel makes that a compiler bug would trip (measured against
nftables 1.0.6 on kernel 6.x):

- ``add`` of an existing table, chain, set or element is a no-op; ``create``
  of an existing one fails (EEXIST); an existing map key with a different
  value fails (EEXIST); an element overlapping (but not equal to) another in
  an interval set fails (EEXIST);
- deleting a missing table, chain, set or element fails (ENOENT);
- deleting a chain still referenced by a jump/goto or a map element, or a set
  still referenced by a rule, fails (EBUSY); a chain with rules but without
  references can be deleted (its rules go with it);
- ``flush table`` empties every chain but leaves set elements alone;
- a rule may only reference existing chains and sets.

Rule expressions are stored as given: the kernel prints some expressions in a
normalised form, so comparisons with a real listing should use expressions
that round-trip unchanged. Set elements are normalised (points, prefixes,
ranges) the way the kernel prints them.
"""

from __future__ import annotations

import copy
import ipaddress
import json
from dataclasses import dataclass, field
from typing import Any

from .nft_backend import NftError, check_namespace_name

_ENOENT = "No such file or directory"
_EEXIST = "File exists"
_EBUSY = "Device or resource busy"

_PROTO_NUMBERS = {"icmp": 1, "tcp": 6, "udp": 17, "gre": 47, "ipv6-icmp": 58, "icmpv6": 58}
_INT_TYPES = {"inet_service", "inet_proto", "mark", "integer", "ether_type", "icmp_type"}


class _Reject(Exception):
    """One command failed; carries the kernel-like reason."""


# --------------------------------------------------------------------------
# Element values: normalised to what the kernel prints, with per-field
# intervals for overlap checks.


def _scalar(kind: str, value: Any) -> tuple[Any, Any, Any]:
    """(low, high, printed form) of one field of one element."""
    if kind in ("ipv4_addr", "ipv6_addr"):
        return _address(value)
    if kind in _INT_TYPES:
        if isinstance(value, dict) and "range" in value:
            lo, hi = (_int(kind, v) for v in value["range"])
            return lo, hi, (lo if lo == hi else {"range": [lo, hi]})
        n = _int(kind, value)
        return n, n, n
    text = json.dumps(value, sort_keys=True)
    return text, text, value


def _int(kind: str, value: Any) -> int:
    if isinstance(value, int):
        return value
    if isinstance(value, str):
        if value.isdigit():
            return int(value)
        if kind == "inet_proto" and value in _PROTO_NUMBERS:
            return _PROTO_NUMBERS[value]
    raise _Reject(f"Error: Could not parse {kind} value {value!r}")


def _address(value: Any) -> tuple[int, int, Any]:
    try:
        if isinstance(value, dict) and "prefix" in value:
            net = ipaddress.ip_network(
                f"{value['prefix']['addr']}/{value['prefix']['len']}", strict=False
            )
            lo, hi = int(net.network_address), int(net.broadcast_address)
            version = net.version
        elif isinstance(value, dict) and "range" in value:
            a, b = (ipaddress.ip_address(v) for v in value["range"])
            lo, hi, version = int(a), int(b), a.version
        elif isinstance(value, str):
            # libnftables JSON takes "a/n" only as {"prefix": ...}; the string
            # form is looked up as a host name and fails.
            a = ipaddress.ip_address(value)
            lo, hi, version = int(a), int(a), a.version
        else:
            raise ValueError(value)
    except (ValueError, KeyError, TypeError) as exc:
        raise _Reject(
            f"Error: Could not resolve hostname: Name or service not known ({value!r})"
        ) from exc
    return lo, hi, _print_address(lo, hi, version)


def _print_address(lo: int, hi: int, version: int) -> Any:
    make = ipaddress.IPv4Address if version == 4 else ipaddress.IPv6Address
    if lo == hi:
        return str(make(lo))
    size = hi - lo + 1
    bits = 32 if version == 4 else 128
    if size & (size - 1) == 0 and lo % size == 0:
        return {"prefix": {"addr": str(make(lo)), "len": bits - size.bit_length() + 1}}
    return {"range": [str(make(lo)), str(make(hi))]}


@dataclass(frozen=True)
class _Key:
    printed: str  # canonical JSON of the printed key
    bounds: tuple[tuple[Any, Any], ...]


def _parse_key(types: list[str] | None, raw: Any) -> tuple[_Key, Any]:
    if isinstance(raw, dict) and "elem" in raw:
        raw = raw["elem"]["val"]
    if types is None:
        text = json.dumps(raw, sort_keys=True)
        return _Key(text, ((text, text),)), raw
    parts = raw["concat"] if isinstance(raw, dict) and "concat" in raw else [raw]
    if len(parts) != len(types):
        raise _Reject(f"Error: element {raw!r} does not match type {'.'.join(types)}")
    fields = [_scalar(kind, part) for kind, part in zip(types, parts, strict=True)]
    printed = [f[2] for f in fields]
    value = {"concat": printed} if len(types) > 1 else printed[0]
    bounds = tuple((f[0], f[1]) for f in fields)
    return _Key(json.dumps(value, sort_keys=True), bounds), value


def _overlaps(a: _Key, b: _Key) -> bool:
    return all(
        type(alo) is type(blo) and alo <= bhi and blo <= ahi
        for (alo, ahi), (blo, bhi) in zip(a.bounds, b.bounds, strict=True)
    )


# --------------------------------------------------------------------------
# State


@dataclass
class _Set:
    kind: str  # "set" or "map"
    spec: dict[str, Any]  # type, map, flags, comment: what a listing shows
    elements: dict[str, tuple[_Key, Any, Any]] = field(default_factory=dict)

    @property
    def types(self) -> list[str] | None:
        t = self.spec.get("type")
        if t is None:
            return None
        return list(t) if isinstance(t, list) else [t]

    @property
    def interval(self) -> bool:
        return "interval" in self.spec.get("flags", [])


@dataclass
class _Chain:
    spec: dict[str, Any]  # type, hook, prio, policy, comment
    rules: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class _Table:
    family: str
    name: str
    chains: dict[str, _Chain] = field(default_factory=dict)
    sets: dict[str, _Set] = field(default_factory=dict)


_State = dict[tuple[str, str], _Table]


def _refs(node: Any, chains: set[str], sets: set[str]) -> None:
    """Collect chain (jump/goto) and named-set (@name) references."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key in ("jump", "goto") and isinstance(value, dict) and "target" in value:
                chains.add(value["target"])
            else:
                _refs(value, chains, sets)
    elif isinstance(node, list):
        for item in node:
            _refs(item, chains, sets)
    elif isinstance(node, str) and node.startswith("@"):
        sets.add(node[1:])


# --------------------------------------------------------------------------
# Commands


class _Machine:
    """Applies commands to one namespace's state (a copy, owned by the caller)."""

    def __init__(self, state: _State) -> None:
        self.state = state

    def run(self, command: dict[str, Any]) -> None:
        if not isinstance(command, dict) or len(command) != 1:
            raise _Reject(f"Error: malformed command {command!r}")
        ((verb, body),) = command.items()
        if not isinstance(body, dict) or len(body) != 1:
            raise _Reject(f"Error: malformed {verb} command")
        ((obj, spec),) = body.items()
        handler = getattr(self, f"_{verb}_{obj}", None)
        if verb == "create":
            handler = getattr(self, f"_add_{obj}", None)
        if handler is None:
            raise _Reject(f"Error: {verb} {obj} is not supported by the fake backend")
        if verb == "create":
            handler(spec, exclusive=True)
        elif verb == "add":
            handler(spec, exclusive=False)
        else:
            handler(spec)

    # tables

    def _table(self, spec: dict[str, Any], key: str = "table") -> _Table:
        ref = (spec.get("family", "ip"), spec[key])
        table = self.state.get(ref)
        if table is None:
            raise _Reject(f"Error: Could not process rule: {_ENOENT} (table {ref[0]} {ref[1]})")
        return table

    def _add_table(self, spec: dict[str, Any], exclusive: bool) -> None:
        ref = (spec.get("family", "ip"), spec["name"])
        if ref in self.state:
            if exclusive:
                raise _Reject(f"Error: Could not process rule: {_EEXIST}")
            return
        self.state[ref] = _Table(*ref)

    def _delete_table(self, spec: dict[str, Any]) -> None:
        table = self._table(spec, "name")
        del self.state[(table.family, table.name)]

    def _flush_table(self, spec: dict[str, Any]) -> None:
        for chain in self._table(spec, "name").chains.values():
            chain.rules.clear()

    # chains

    def _chain(self, spec: dict[str, Any], key: str = "name") -> tuple[_Table, _Chain]:
        table = self._table(spec)
        chain = table.chains.get(spec[key])
        if chain is None:
            raise _Reject(f"Error: Could not process rule: {_ENOENT} (chain {spec[key]})")
        return table, chain

    def _add_chain(self, spec: dict[str, Any], exclusive: bool) -> None:
        table = self._table(spec)
        wanted: dict[str, Any] = {
            k: spec[k] for k in ("type", "hook", "prio", "policy", "comment") if k in spec
        }
        old = table.chains.get(spec["name"])
        if old is None:
            table.chains[spec["name"]] = _Chain(wanted)
            return
        if exclusive:
            raise _Reject(f"Error: Could not process rule: {_EEXIST}")
        for k in ("type", "hook", "prio"):
            if k in wanted and old.spec.get(k) != wanted[k]:
                raise _Reject("Error: Could not process rule: Operation not supported")
        if "policy" in wanted:
            old.spec["policy"] = wanted["policy"]

    def _chain_users(self, table: _Table, name: str) -> bool:
        for chain in table.chains.values():
            for rule in chain.rules:
                targets: set[str] = set()
                _refs(rule["expr"], targets, set())
                if name in targets:
                    return True
        for s in table.sets.values():
            for _key, _printed, data in s.elements.values():
                targets = set()
                _refs(data, targets, set())
                if name in targets:
                    return True
        return False

    def _delete_chain(self, spec: dict[str, Any]) -> None:
        table, _unused = self._chain(spec)
        if self._chain_users(table, spec["name"]):
            raise _Reject(f"Error: Could not process rule: {_EBUSY}")
        del table.chains[spec["name"]]

    def _flush_chain(self, spec: dict[str, Any]) -> None:
        self._chain(spec)[1].rules.clear()

    # rules

    def _add_rule(self, spec: dict[str, Any], exclusive: bool) -> None:
        self._put_rule(spec, at_end=True)

    def _insert_rule(self, spec: dict[str, Any]) -> None:
        self._put_rule(spec, at_end=False)

    def _put_rule(self, spec: dict[str, Any], at_end: bool) -> None:
        if "handle" in spec or "index" in spec or "position" in spec:
            raise _Reject("Error: positioned rules are not supported by the fake backend")
        table, chain = self._chain(spec, "chain")
        chains: set[str] = set()
        sets: set[str] = set()
        _refs(spec["expr"], chains, sets)
        if spec["chain"] in chains:
            raise _Reject("Error: Could not process rule: Too many levels of symbolic links")
        for name in sorted(chains):
            if name not in table.chains:
                raise _Reject(f"Error: Could not process rule: {_ENOENT} (chain {name})")
        for name in sorted(sets):
            if name not in table.sets:
                raise _Reject(f"Error: Could not process rule: {_ENOENT} (set {name})")
        rule = {"expr": copy.deepcopy(spec["expr"])}
        if "comment" in spec:
            rule["comment"] = spec["comment"]
        if at_end:
            chain.rules.append(rule)
        else:
            chain.rules.insert(0, rule)

    # sets and maps

    def _set(self, spec: dict[str, Any]) -> tuple[_Table, _Set]:
        table = self._table(spec)
        s = table.sets.get(spec["name"])
        if s is None:
            raise _Reject(f"Error: Could not process rule: {_ENOENT} (set {spec['name']})")
        return table, s

    def _add_set(self, spec: dict[str, Any], exclusive: bool, kind: str = "set") -> None:
        table = self._table(spec)
        wanted: dict[str, Any] = {k: spec[k] for k in ("type", "map", "comment") if k in spec}
        if spec.get("flags"):
            flags = spec["flags"]
            wanted["flags"] = sorted([flags] if isinstance(flags, str) else flags)
        old = table.sets.get(spec["name"])
        if old is None:
            table.sets[spec["name"]] = _Set(kind, wanted)
        elif (
            exclusive
            or old.kind != kind
            or any(old.spec.get(k) != wanted.get(k) for k in ("type", "map", "flags"))
        ):
            raise _Reject(f"Error: Could not process rule: {_EEXIST}")
        if spec.get("elem"):
            self._add_element({**spec, "elem": spec["elem"]}, exclusive=False)

    def _add_map(self, spec: dict[str, Any], exclusive: bool) -> None:
        self._add_set(spec, exclusive, kind="map")

    def _delete_set(self, spec: dict[str, Any], kind: str = "set") -> None:
        table, s = self._set(spec)
        if s.kind != kind:
            raise _Reject(f"Error: Could not process rule: {_ENOENT}")
        for chain in table.chains.values():
            for rule in chain.rules:
                sets: set[str] = set()
                _refs(rule["expr"], set(), sets)
                if spec["name"] in sets:
                    raise _Reject(f"Error: Could not process rule: {_EBUSY}")
        del table.sets[spec["name"]]

    def _delete_map(self, spec: dict[str, Any]) -> None:
        self._delete_set(spec, kind="map")

    def _flush_set(self, spec: dict[str, Any]) -> None:
        self._set(spec)[1].elements.clear()

    _flush_map = _flush_set

    # elements

    def _items(
        self, s: _Set, spec: dict[str, Any], *, keys_only: bool = False
    ) -> list[tuple[_Key, Any, Any]]:
        elems = spec["elem"] if isinstance(spec["elem"], list) else [spec["elem"]]
        out = []
        for item in elems:
            if s.kind == "map" and keys_only and not (isinstance(item, list) and len(item) == 2):
                # `delete element` names a map's elements by key alone, as nft does.
                key, printed = _parse_key(s.types, item)
                out.append((key, printed, None))
            elif s.kind == "map":
                if not (isinstance(item, list) and len(item) == 2):
                    raise _Reject(f"Error: map element {item!r} needs a key and a value")
                key, printed = _parse_key(s.types, item[0])
                out.append((key, printed, item[1]))
            else:
                key, printed = _parse_key(s.types, item)
                out.append((key, printed, None))
        return out

    def _add_element(self, spec: dict[str, Any], exclusive: bool) -> None:
        table, s = self._set(spec)
        for key, printed, data in self._items(s, spec):
            if s.kind == "map":
                targets: set[str] = set()
                _refs(data, targets, set())
                for name in sorted(targets):
                    if name not in table.chains:
                        raise _Reject(f"Error: Could not process rule: {_ENOENT} (chain {name})")
            old = s.elements.get(key.printed)
            if old is not None:
                if exclusive or old[2] != data:
                    raise _Reject(f"Error: Could not process rule: {_EEXIST}")
                continue
            if s.interval and any(_overlaps(key, k) for k, _p, _d in s.elements.values()):
                raise _Reject(f"Error: Could not process rule: {_EEXIST} (interval overlap)")
            s.elements[key.printed] = (key, printed, copy.deepcopy(data))

    def _delete_element(self, spec: dict[str, Any]) -> None:
        _table, s = self._set(spec)
        for key, _printed, _data in self._items(s, spec, keys_only=True):
            if s.elements.pop(key.printed, None) is None:
                raise _Reject(f"Error: Could not process rule: {_ENOENT} (element)")


# --------------------------------------------------------------------------
# Listings and the canonical form


def _listing(table: _Table) -> list[dict[str, Any]]:
    """The table as libnftables' JSON listing shows it (without handles)."""
    items: list[dict[str, Any]] = [{"table": {"family": table.family, "name": table.name}}]
    base = {"family": table.family, "table": table.name}
    for name, s in table.sets.items():
        obj: dict[str, Any] = {**base, "name": name, **copy.deepcopy(s.spec)}
        if s.elements:
            obj["elem"] = [
                [printed, copy.deepcopy(data)] if s.kind == "map" else printed
                for _key, printed, data in s.elements.values()
            ]
        items.append({s.kind: obj})
    for name, chain in table.chains.items():
        items.append({"chain": {**base, "name": name, **chain.spec}})
    for name, chain in table.chains.items():
        for rule in chain.rules:
            items.append({"rule": {**base, "chain": name, **copy.deepcopy(rule)}})
    return items


def _key_text(value: Any) -> str:
    return json.dumps(value, sort_keys=True)


def canonical(listing: dict[str, Any] | None) -> dict[str, Any]:
    """A listing (real or fake) reduced to what the ruleset means, sorted.

    Handles, counters and metainfo are dropped; tables, chains and sets are
    sorted by name; set elements are normalised and sorted; rules keep their
    order (it matters).
    """
    tables: dict[tuple[str, str], dict[str, Any]] = {}
    for item in (listing or {}).get("nftables", []):
        ((kind, obj),) = item.items()
        if kind == "table":
            tables[(obj["family"], obj["name"])] = {
                "family": obj["family"],
                "name": obj["name"],
                "chains": {},
                "sets": {},
            }
    for item in (listing or {}).get("nftables", []):
        ((kind, obj),) = item.items()
        if kind in ("metainfo", "table"):
            continue
        t = tables[(obj["family"], obj["table"])]
        if kind == "chain":
            spec = {k: obj[k] for k in ("type", "hook", "prio", "policy", "comment") if k in obj}
            t["chains"].setdefault(obj["name"], {"rules": []}).update(spec)
        elif kind == "rule":
            chain = t["chains"].setdefault(obj["chain"], {"rules": []})
            rule = {"expr": obj["expr"]}
            if "comment" in obj:
                rule["comment"] = obj["comment"]
            chain["rules"].append(rule)
        elif kind in ("set", "map"):
            t["sets"][obj["name"]] = _canonical_set(kind, obj)
    out = []
    for ref in sorted(tables):
        t = tables[ref]
        out.append(
            {
                "family": t["family"],
                "name": t["name"],
                "chains": [{"name": n, **t["chains"][n]} for n in sorted(t["chains"])],
                "sets": [{"name": n, **t["sets"][n]} for n in sorted(t["sets"])],
            }
        )
    return {"tables": out}


def _canonical_set(kind: str, obj: dict[str, Any]) -> dict[str, Any]:
    spec: dict[str, Any] = {"kind": kind}
    for k in ("type", "map", "comment"):
        if k in obj:
            spec[k] = obj[k]
    flags = obj.get("flags", [])
    spec["flags"] = sorted([flags] if isinstance(flags, str) else flags)
    types = obj.get("type")
    type_list = None if types is None else (types if isinstance(types, list) else [types])
    elems = []
    for item in obj.get("elem", []):
        if kind == "map":
            _key, printed = _parse_key(type_list, item[0])
            elems.append([printed, item[1]])
        else:
            elems.append(_parse_key(type_list, item)[1])
    spec["elements"] = sorted(elems, key=_key_text)
    return spec


def canonical_text(listing: dict[str, Any] | None) -> str:
    return json.dumps(canonical(listing), indent=1, sort_keys=True)


# --------------------------------------------------------------------------
# The backend


@dataclass(frozen=True)
class Transaction:
    namespace: str
    commands: list[dict[str, Any]]
    ok: bool


class FakeBackend:
    """Same interface as NftBackend; state lives in memory, per namespace.

    Namespaces must be declared with `add_namespace` (or passed to the
    constructor): like the real backend, the fake never invents one.
    """

    def __init__(self, namespaces: list[str] | None = None) -> None:
        self._states: dict[str, _State] = {}
        self.transactions: list[Transaction] = []
        self._generations: dict[str, int] = {}
        for ns in namespaces or []:
            self.add_namespace(ns)

    def add_namespace(self, namespace: str) -> None:
        check_namespace_name(namespace)
        self._states.setdefault(namespace, {})

    def remove_namespace(self, namespace: str) -> None:
        self._states.pop(namespace, None)

    def _state(self, namespace: str, batch: list[dict[str, Any]]) -> _State:
        from .nft_backend import NamespaceNotFound

        state = self._states.get(namespace)
        if state is None:
            raise NamespaceNotFound(
                f"namespace {namespace!r} does not exist",
                rc=-1,
                stderr="",
                batch=batch,
                namespace=namespace,
            )
        return state

    def _run(self, namespace: str, commands: list[dict[str, Any]], what: str) -> _State:
        work = copy.deepcopy(self._state(namespace, commands))
        machine = _Machine(work)
        for index, command in enumerate(commands):
            try:
                machine.run(command)
            except (_Reject, KeyError, TypeError) as exc:
                reason = str(exc) if isinstance(exc, _Reject) else f"Error: malformed ({exc!r})"
                raise NftError(
                    f"nft {what} failed",
                    rc=-1,
                    stderr=f"{reason}\ncommand {index}: {json.dumps(command, sort_keys=True)}\n",
                    batch=commands,
                    namespace=namespace,
                ) from None
        return work

    # -- Backend ---------------------------------------------------------

    def apply(self, namespace: str, commands: list[dict[str, Any]]) -> None:
        batch = copy.deepcopy(commands)
        try:
            work = self._run(namespace, batch, "transaction")
        except NftError:
            self.transactions.append(Transaction(namespace, batch, ok=False))
            raise
        self._states[namespace] = work
        self._generations[namespace] = self._generations.get(namespace, 0) + 1
        self.transactions.append(Transaction(namespace, batch, ok=True))

    def generation(self, namespace: str) -> int:
        """Like nftables' generation id: moves with every successful batch."""
        self._state(namespace, [])
        return self._generations.get(namespace, 0)

    def check(self, namespace: str, commands: list[dict[str, Any]]) -> None:
        self._run(namespace, copy.deepcopy(commands), "check")

    def list_table(self, namespace: str, family: str, table: str) -> dict[str, Any] | None:
        found = self._state(namespace, []).get((family, table))
        if found is None:
            return None
        return {"nftables": _listing(found)}

    def delete_table(self, namespace: str, family: str, table: str) -> None:
        self._state(namespace, []).pop((family, table), None)

    def release(self, namespace: str) -> None:
        return None

    def close(self) -> None:
        return None

    # -- for tests -------------------------------------------------------

    def dump(self, namespace: str) -> str:
        """Sorted canonical JSON text of every table in the namespace."""
        items: list[dict[str, Any]] = []
        for ref in sorted(self._state(namespace, [])):
            items.extend(_listing(self._states[namespace][ref]))
        return canonical_text({"nftables": items})

    def applied(self, namespace: str) -> list[list[dict[str, Any]]]:
        """The batches that succeeded in `namespace`, oldest first."""
        return [t.commands for t in self.transactions if t.namespace == namespace and t.ok]
