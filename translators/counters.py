"""Per-rule hit counters: which kernel counter belongs to which ECS rule (pure).

With counting on (`compile_vpc(..., counters=True)`, docs/dataplane.md "Hit
counters"), every element of a profile's `f_...` and `c_...` sets is one box
decided by one ECS rule (`NftSet.labels`), and the kernel keeps a counter per
element; each profile chain's default rule carries a counter too. This module
reads those counters out of ``nft -j list table`` and names them:
- `listed_counters(listing)`: (set name, element) -> (packets, bytes), and
  (chain name, "default") -> (packets, bytes) for the default rules;
- `element_labels(program)`: (set name, element) -> rule id, in the same element
  form (intervals per field, as the drift check compares them);
- `attribute(program, chain, point)`: what the kernel would count a new flow's
  packet against (a rule id or DEFAULT), walking the chain as the kernel does:
  the tests check it against the evaluator's deciding rule.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from .compiler import KEY_ORDER
from .nft import Counter, Key, Match, Program, SetRef, Span, Verdict
from .tracer import TraceError, _element

DEFAULT = "default"
# (set or chain name, element in interval form, or DEFAULT for a chain's default rule)
CounterKey = tuple[str, Any]


def program_key(key: Key) -> tuple[Any, ...]:
    """A program's element in the interval form of a listing's (as the drift check has it)."""
    return tuple((a, a) if isinstance(a, str) else (a.lo, a.hi) for a in key)


def element_labels(program: Program) -> dict[CounterKey, str]:
    """(set name, element) -> the ECS rule id deciding it, for every counted set."""
    out: dict[CounterKey, str] = {}
    for s in program.sets:
        if not s.counter:
            continue
        for key, label in zip(s.elements, s.labels, strict=True):
            out[(s.name, program_key(key))] = label
    return out


def counted_chains(program: Program) -> list[str]:
    """Chains whose default rule counts (their last rule starts with a counter)."""
    return [
        c.name
        for c in program.chains
        if c.rules and c.rules[-1].statements and isinstance(c.rules[-1].statements[0], Counter)
    ]


def _counter(raw: Any) -> tuple[int, int] | None:
    if isinstance(raw, dict) and isinstance(raw.get("packets"), int):
        return int(raw["packets"]), int(raw.get("bytes", 0))
    return None


def _items(listing: Mapping[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    items = listing.get("nftables", [])
    for item in items if isinstance(items, list) else []:
        if isinstance(item, dict) and len(item) == 1:
            kind, body = next(iter(item.items()))
            if isinstance(body, dict):
                yield kind, body


def listed_counters(listing: Mapping[str, Any]) -> dict[CounterKey, tuple[int, int]]:
    """Counter values of a table listing: per element of sets with `counter`, and per
    chain whose last rule has a counter (the default rule). Unreadable elements are
    skipped (they cannot be named; the drift check reports them)."""
    out: dict[CounterKey, tuple[int, int]] = {}
    for kind, body in _items(listing):
        if kind == "set" and body.get("stmt") == [{"counter": None}]:
            raw_type = body.get("type")
            types = tuple(raw_type) if isinstance(raw_type, list) else (str(raw_type),)
            for e in body.get("elem", []):
                inner = e.get("elem") if isinstance(e, dict) else None
                got = _counter(inner.get("counter")) if isinstance(inner, dict) else None
                if got is None:
                    continue
                try:
                    key = _element(types, e, ranges_ok=True)
                except (TraceError, ValueError, TypeError, KeyError):
                    continue
                out[(str(body.get("name")), key)] = got
        elif kind == "rule":
            exprs = body.get("expr")
            if isinstance(exprs, list) and exprs and isinstance(exprs[0], dict):
                got = _counter(exprs[0].get("counter"))
                if got is not None and len(exprs) == 2:
                    # Only the default rule is `counter <verdict>`; a later one wins,
                    # so the chain's last such rule is what is kept.
                    out[(str(body.get("chain")), DEFAULT)] = got
    return out


def _holds(key: Key, point: Sequence[int]) -> bool:
    return all(isinstance(s, Span) and s.lo <= v <= s.hi for s, v in zip(key, point, strict=True))


def attribute(program: Program, chain: str, family: str, point: Sequence[int]) -> str | None:
    """The rule id (or DEFAULT) the kernel counts a new flow's packet against in a
    counted profile chain; `point` is (l4proto, peer address, dport, sport, local
    address) as ints, `family` "ipv4" or "ipv6". None when nothing in the chain
    counts it (a chain without counters)."""
    addr_type = "ipv4_addr" if family == "ipv4" else "ipv6_addr"
    # The sets' elements are in the kernel key's field order, not the point's.
    at = tuple(point[i] for i in KEY_ORDER)
    for rule in program.chain_by_name[chain].rules:
        st = rule.statements
        if len(st) == 3 and isinstance(st[1], Match) and isinstance(st[1].right, SetRef):
            s = program.set_by_name[st[1].right.name]
            if not s.counter or addr_type not in s.type:
                continue
            for key, label in zip(s.elements, s.labels, strict=True):
                if _holds(key, at):
                    return label
        elif st and isinstance(st[0], Counter) and isinstance(st[-1], Verdict):
            return DEFAULT
    return None
