"""One canonical form for a compiled program and for the kernel's listing of a table.

The drift check compares what the agent applied with what the kernel holds,
by content: base chain hooks and policies, every rule's statements, verdicts
and comment, every set's and map's type, flags and elements. Two inputs:
- `canonical_program(program)`: the typed objects of `nft.py` (elements are
  taken as they are, rules as the JSON the one writer renders);
- `canonical_listing(listing)`: ``nft -j list table`` as libnftables prints it.
They are equal exactly when the kernel holds the program. What the listing
prints differently is normalised on both sides: handles are ignored; an
explicit ``meta nfproto`` match that the rule's own ``ip``/``ip6`` fields imply
is dropped (nft lists it away); elements are compared as intervals per field,
so single values, ranges, prefixes and protocol names compare by value.
Anything a listing holds that cannot be read (an unknown element form, an
object of another kind) is kept as an opaque marker, which never equals the
program: it shows as a difference, it never makes two forms equal.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from .nft import Key, Program, Writer
from .tracer import TraceError, _element

# A set's `counter` statement, compared as if it were a flag.
_COUNTER_FLAG = "stmt:counter"
# (kind, name) -> content; kind is "chain", "set", "map" or "other".
Canonical = dict[tuple[str, str], Any]


@dataclass(frozen=True)
class Opaque:
    """Something in a listing the canonical form cannot read; never equal to anything."""

    text: str

    def __eq__(self, other: object) -> bool:
        return False

    def __hash__(self) -> int:
        return hash(self.text)


def _strip(value: Any) -> Any:
    """The JSON value without handles (the kernel's object numbers) and without counter
    values (a counter is content; what it has counted is not drift)."""
    if isinstance(value, dict):
        if set(value) == {"counter"}:
            return {"counter": None}
        return {k: _strip(v) for k, v in value.items() if k != "handle"}
    if isinstance(value, list):
        return [_strip(v) for v in value]
    return value


def _implied_nfproto(stmt: Mapping[str, Any], rule_text: str) -> bool:
    """A ``meta nfproto X`` match that the rule's own ip/ip6 fields imply."""
    match = stmt.get("match")
    if not isinstance(match, dict) or match.get("left") != {"meta": {"key": "nfproto"}}:
        return False
    if match.get("op") not in ("==", None):
        return False
    family = match.get("right")
    needle = {"ipv4": '"protocol": "ip"', "ipv6": '"protocol": "ip6"'}.get(str(family))
    return needle is not None and needle in rule_text


def _rule(body: Mapping[str, Any]) -> tuple[str, tuple[str, ...]]:
    exprs = body.get("expr", [])
    if not isinstance(exprs, list):
        return ("", (json.dumps(exprs),))
    text = json.dumps(exprs, sort_keys=True)
    kept = tuple(
        json.dumps(_strip(e), sort_keys=True)
        for e in exprs
        if not (isinstance(e, dict) and _implied_nfproto(e, text))
    )
    return (str(body.get("comment", "")), kept)


def _types(raw: Any) -> tuple[str, ...]:
    return tuple(raw) if isinstance(raw, list) else (str(raw),)


def _flags(raw: Any) -> frozenset[str]:
    if raw is None:
        return frozenset()
    return frozenset(raw) if isinstance(raw, list) else frozenset({str(raw)})


def _program_key(key: Key) -> tuple[Any, ...]:
    return tuple((a, a) if isinstance(a, str) else (a.lo, a.hi) for a in key)


def _listed_key(types: tuple[str, ...], raw: Any) -> Any:
    try:
        return _element(types, raw, ranges_ok=True)
    except (TraceError, ValueError, TypeError, KeyError) as exc:
        return Opaque(f"{raw!r}: {exc}")


def _verdict(raw: Any) -> str:
    return json.dumps(_strip(raw), sort_keys=True)


def canonical_program(program: Program) -> Canonical:
    out: Canonical = {}
    w = Writer(program.family, program.table)
    for chain in program.chains:
        base = None
        if chain.base is not None:
            b = chain.base
            base = (b.type, b.hook, b.priority, b.policy)
        rules = tuple(_rule(w.add_rule(chain.name, r)["add"]["rule"]) for r in chain.rules)
        out[("chain", chain.name)] = (base, rules)
    for s in program.sets:
        elements = frozenset(_program_key(k) for k in s.elements)
        flags = frozenset(s.flags) | ({_COUNTER_FLAG} if s.counter else set())
        out[("set", s.name)] = (s.type, flags, elements)
    for m in program.maps:
        rendered = w.map_elements(m.type, m.elements)
        pairs = zip(m.elements, rendered, strict=True)
        items = frozenset((_program_key(k), _verdict(v[1])) for (k, _), v in pairs)
        out[("map", m.name)] = (m.type, items)
    return out


def canonical_listing(listing: Mapping[str, Any]) -> Canonical:
    out: Canonical = {}
    chains: dict[str, tuple[Any, list[tuple[str, tuple[str, ...]]]]] = {}
    items = listing.get("nftables", [])
    for n, item in enumerate(items if isinstance(items, list) else []):
        if not isinstance(item, dict) or len(item) != 1:
            out[("other", str(n))] = Opaque(repr(item))
            continue
        kind, body = next(iter(item.items()))
        if kind in ("metainfo", "table"):
            continue
        if not isinstance(body, dict):
            out[("other", str(n))] = Opaque(repr(item))
            continue
        if kind == "chain":
            base = None
            if "hook" in body:
                base = (body.get("type"), body.get("hook"), body.get("prio"), body.get("policy"))
            chains.setdefault(str(body.get("name")), (base, []))
            chains[str(body.get("name"))] = (base, chains[str(body.get("name"))][1])
        elif kind == "rule":
            name = str(body.get("chain"))
            orphan: tuple[Any, list[tuple[str, tuple[str, ...]]]] = (
                Opaque(f"rule before chain {name}"),
                [],
            )
            chains.setdefault(name, orphan)[1].append(_rule(body))
        elif kind == "set" and "map" not in body:
            types = _types(body.get("type"))
            elements = frozenset(_listed_key(types, e) for e in body.get("elem", []))
            flags = _flags(body.get("flags"))
            stmt = body.get("stmt")
            if stmt == [{"counter": None}]:
                flags |= {_COUNTER_FLAG}
            elif stmt is not None:
                flags |= {Opaque(f"set statements {stmt!r}").text}
            out[("set", str(body.get("name")))] = (types, flags, elements)
        elif kind == "map" or (kind == "set" and "map" in body):
            types = _types(body.get("type"))
            pairs = []
            for e in body.get("elem", []):
                if isinstance(e, list) and len(e) == 2:
                    pairs.append((_listed_key(types, e[0]), _verdict(e[1])))
                else:
                    pairs.append((Opaque(repr(e)), ""))
            if body.get("map") != "verdict" or _flags(body.get("flags")):
                types = (*types, Opaque(f"map {body.get('map')} {body.get('flags')}").text)
            out[("map", str(body.get("name")))] = (types, frozenset(pairs))
        else:
            out[(kind, str(body.get("name", n)))] = Opaque(repr(item))
    for name, (base, rules) in chains.items():
        out[("chain", name)] = (base, tuple(rules))
    return out


def _element_count(elements: Iterable[Any]) -> int:
    return sum(1 for _ in elements)


def describe_differences(expected: Canonical, actual: Canonical, limit: int = 50) -> list[str]:
    """Short lines naming what differs (empty when the forms are equal)."""
    lines: list[str] = []
    for key in sorted(set(expected) | set(actual), key=str):
        kind, name = key
        if key not in actual:
            lines.append(f"{kind} {name} is missing")
        elif key not in expected:
            lines.append(f"unexpected {kind} {name}")
        elif expected[key] != actual[key]:
            lines.append(_differs(kind, name, expected[key], actual[key]))
        if len(lines) >= limit:
            lines.append("...")
            break
    return lines


def _differs(kind: str, name: str, want: Any, got: Any) -> str:
    if kind == "chain":
        (wbase, wrules), (gbase, grules) = want, got
        if wbase != gbase:
            return f"chain {name}: hook/policy {gbase}, expected {wbase}"
        if len(wrules) != len(grules):
            return f"chain {name}: {len(grules)} rules, expected {len(wrules)}"
        for i, (w, g) in enumerate(zip(wrules, grules, strict=True)):
            if w != g:
                shown, wanted = " ".join(g[1])[:160], " ".join(w[1])[:160]
                return f"chain {name} rule {i + 1}: {shown} (expected {wanted})"
    if kind in ("set", "map") and isinstance(got, tuple):
        if want[:-1] != got[:-1]:
            return f"{kind} {name}: definition {got[:-1]}, expected {want[:-1]}"
        unexpected = _element_count(e for e in got[-1] if e not in want[-1])
        missing = _element_count(e for e in want[-1] if e not in got[-1])
        return f"{kind} {name}: {unexpected} unexpected element(s), {missing} missing"
    return f"{kind} {name} differs"
