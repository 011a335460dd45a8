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

import hashlib
import json
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from .nft import Key, NftChain, NftMap, Program, Writer
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


def program_object(program: Program, key: tuple[str, str]) -> Any:
    """The canonical content of one object of the program (None if it has none)."""
    kind, name = key
    w = Writer(program.family, program.table)
    if kind == "chain" and name in program.chain_by_name:
        return _program_chain(w, program.chain_by_name[name])
    if kind == "set" and name in program.set_by_name:
        s = program.set_by_name[name]
        flags = frozenset(s.flags) | ({_COUNTER_FLAG} if s.counter else set())
        return (s.type, flags, frozenset(_program_key(k) for k in s.elements))
    if kind == "map" and name in program.map_by_name:
        return _program_map(w, program.map_by_name[name])
    return None


def _program_chain(w: Writer, chain: NftChain) -> Any:
    base = None
    if chain.base is not None:
        b = chain.base
        base = (b.type, b.hook, b.priority, b.policy)
    rules = tuple(_rule(w.add_rule(chain.name, r)["add"]["rule"]) for r in chain.rules)
    return (base, rules)


def _program_map(w: Writer, m: NftMap) -> Any:
    rendered = w.map_elements(m.type, m.elements)
    pairs = zip(m.elements, rendered, strict=True)
    items = frozenset((_program_key(k), _verdict(v[1])) for (k, _), v in pairs)
    return (m.type, items)


def program_keys(program: Program) -> Iterator[tuple[str, str]]:
    yield from (("chain", c.name) for c in program.chains)
    yield from (("set", s.name) for s in program.sets)
    yield from (("map", m.name) for m in program.maps)


def canonical_program(program: Program) -> Canonical:
    return {key: program_object(program, key) for key in program_keys(program)}


def listing_objects(items: Iterable[Any]) -> Iterator[tuple[tuple[str, str], Any]]:
    """The canonical objects of a listing's items (``listing["nftables"]``), one at a
    time: a set or map as soon as its item is read, the chains (small: rules only) at
    the end. So a caller can compare a big table object by object without holding it."""
    chains: dict[str, tuple[Any, list[tuple[str, tuple[str, ...]]]]] = {}
    for n, item in enumerate(items):
        if not isinstance(item, dict) or len(item) != 1:
            yield ("other", str(n)), Opaque(repr(item))
            continue
        kind, body = next(iter(item.items()))
        if kind in ("metainfo", "table"):
            continue
        if not isinstance(body, dict):
            yield ("other", str(n)), Opaque(repr(item))
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
            yield ("set", str(body.get("name"))), (types, flags, elements)
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
            yield ("map", str(body.get("name"))), (types, frozenset(pairs))
        else:
            yield (kind, str(body.get("name", n))), Opaque(repr(item))
    for name, (base, rules) in chains.items():
        yield ("chain", name), (base, tuple(rules))


def canonical_listing(listing: Mapping[str, Any]) -> Canonical:
    items = listing.get("nftables", [])
    return dict(listing_objects(items if isinstance(items, list) else []))


# -- comparing by digest ---------------------------------------------------------------
# The drift check keeps, per applied program, one digest per object instead of its
# canonical form (at 165k elements that form is hundreds of MB of tuples), and
# compares the kernel's listing object by object as it is read (docs/design.md,
# "Memory").

Digests = dict[tuple[str, str], bytes]


def _serial(value: Any, out: list[str]) -> None:
    """Text that is equal for equal canonical contents: set members in sorted order.
    Members are tuples of strings and numbers (their repr is canonical) or sets."""
    if isinstance(value, frozenset):
        parts = []
        for item in value:
            if isinstance(item, frozenset):
                sub: list[str] = []
                _serial(item, sub)
                parts.append("".join(sub))
            else:
                parts.append(repr(item))
        parts.sort()
        out.append("{" + ",".join(parts) + "}")
    elif isinstance(value, tuple):
        out.append("(")
        for item in value:
            _serial(item, out)
            out.append(",")
        out.append(")")
    else:
        out.append(repr(value))


def _opaque_member(item: Any) -> bool:
    # Where a listing puts an Opaque inside a set: the element itself, or the key
    # of a map pair (`listing_objects`).
    return isinstance(item, Opaque) or (
        type(item) is tuple and bool(item) and isinstance(item[0], Opaque)
    )


def _has_opaque(value: Any) -> bool:
    if isinstance(value, Opaque):
        return True
    if isinstance(value, frozenset):
        return any(
            _opaque_member(v) or (isinstance(v, frozenset) and _has_opaque(v)) for v in value
        )
    if isinstance(value, tuple):
        return any(_has_opaque(v) for v in value)
    return False


def digest(content: Any) -> bytes | None:
    """A digest of one object's canonical content; None when it holds something
    unreadable (an `Opaque`: never equal to anything)."""
    if content is None or _has_opaque(content):
        return None
    out: list[str] = []
    _serial(content, out)
    return hashlib.blake2b("".join(out).encode(), digest_size=16).digest()


def program_digests(program: Program) -> Digests:
    """One digest per object of the program (what the drift check keeps)."""
    out: Digests = {}
    for key in program_keys(program):
        d = digest(program_object(program, key))
        if d is not None:
            out[key] = d
    return out


def differences_streaming(
    program: Program,
    digests: Digests,
    listed: Iterable[tuple[tuple[str, str], Any]],
    limit: int = 50,
) -> list[str]:
    """`describe_differences(canonical_program(program), canonical_listing(...))`
    computed from the program's digests and the listing's objects one at a time: an
    object whose digest differs is compared in full (only then is its program form
    built), so neither whole canonical form is ever held."""
    keys = frozenset(program_keys(program))
    found: dict[tuple[str, str], str] = {}
    seen: set[tuple[str, str]] = set()
    for key, content in listed:
        seen.add(key)
        kind, name = key
        if key not in keys:
            found[key] = f"unexpected {kind} {name}"
            continue
        want_digest = digests.get(key)
        if want_digest is not None and digest(content) == want_digest:
            continue
        want = program_object(program, key)
        if want != content:
            found[key] = _differs(kind, name, want, content)
        else:
            found.pop(key, None)
    for key in keys - seen:
        found[key] = f"{key[0]} {key[1]} is missing"
    lines: list[str] = []
    for key in sorted(found, key=str):
        lines.append(found[key])
        if len(lines) >= limit:
            lines.append("...")
            break
    return lines


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
