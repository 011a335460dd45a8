"""A whole program as one nft text batch: the cold-load path.

`nft.py`'s JSON commands stay the one form for changes, checks and listings.
A full load of a big program is measured faster as text (docs/dataplane.md,
"Cold load"): libnftables' text parser does less work per element than its
JSON path, the kernel receives fewer, fuller element batches, and the text is
a third of the JSON. The batch is the same transaction as
`Program.full_sync_commands()` (add table, delete table, build), with the
same objects, so the kernel holds the same table (the drift check compares
the listing with the program either way, and `test_compiled_loads` loads
every golden both ways).

What reaches the text: object names built by the compiler from validated ids
(`[A-Za-z0-9][A-Za-z0-9_.-]*`, every name starts with a letter), interface
names (quoted), numbers and addresses rendered here, and rule comments that
`safe_comment` limits to id characters (quoted). Nothing else.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable

from .nft import (
    _ADDR_BITS,
    Atom,
    Counter,
    Ct,
    Expr,
    Key,
    Limit,
    Log,
    Masked,
    Match,
    Meta,
    NftChain,
    NftMap,
    NftRule,
    NftSet,
    Payload,
    Program,
    SetRef,
    Span,
    Statement,
    Verdict,
    VerdictMap,
    cyclic_gc_paused,
)

_NAME_OK = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_.-")


def _name(name: str) -> str:
    if not name or not name[0].isalpha() or not set(name) <= _NAME_OK:
        raise ValueError(f"object name {name!r} cannot be written as nft text")
    return name


def _quoted(text: str) -> str:
    if '"' in text or "\\" in text or "\n" in text:
        raise ValueError(f"{text!r} cannot be quoted as nft text")
    return f'"{text}"'


def _expr(e: Expr) -> str:
    if isinstance(e, Meta):
        return f"meta {e.key}"
    if isinstance(e, Payload):
        return f"{e.protocol} {e.field}"
    if isinstance(e, Ct):
        return f"ct {e.key}"
    if isinstance(e, Masked):
        return f"{_expr(e.expr)} & {e.mask:#x}"
    return " . ".join(_expr(i) for i in e.items)


def _verdict(v: Verdict) -> str:
    return f"jump {_name(v.target)}" if v.kind == "jump" else v.kind


def _value(v: str | int) -> str:
    if isinstance(v, int):
        return f"{v:#x}" if v > 255 else str(v)
    return _name(v)  # nfproto / protocol / ct state names


def _statement(st: Statement) -> str:
    if isinstance(st, Verdict):
        return _verdict(st)
    if isinstance(st, Counter):
        return "counter"
    if isinstance(st, Limit):
        return f"limit rate {st.rate}/second"  # the default burst, as nft lists it
    if isinstance(st, Log):
        return f'log prefix "{st.prefix}" group {st.group}'
    if isinstance(st, Match):
        right = f"@{_name(st.right.name)}" if isinstance(st.right, SetRef) else _value(st.right)
        op = "!= " if st.op == "!=" else ("== " if isinstance(st.left, Masked) else "")
        return f"{_expr(st.left)} {op}{right}"
    if isinstance(st, VerdictMap):
        if isinstance(st.data, SetRef):
            data = f"@{_name(st.data.name)}"
        else:
            data = "{ " + ", ".join(f"{_name(k)} : {_verdict(v)}" for k, v in st.data) + " }"
        return f"{_expr(st.key)} vmap {data}"
    raise TypeError(f"unknown statement {st!r}")


class _Atoms:
    """Set-key atoms as text, memoised (the same spans recur across many elements)."""

    def __init__(self) -> None:
        self._memo: dict[tuple[str, Atom], str] = {}

    def atom(self, type_: str, a: Atom) -> str:
        key = (type_, a)
        got = self._memo.get(key)
        if got is None:
            got = self._memo[key] = self._render(type_, a)
        return got

    @staticmethod
    def _render(type_: str, a: Atom) -> str:
        if isinstance(a, str):
            return _quoted(a)
        s: Span = a
        bits = _ADDR_BITS.get(type_)
        if bits is None:  # inet_proto, inet_service
            return str(s.lo) if s.lo == s.hi else f"{s.lo}-{s.hi}"
        make = ipaddress.IPv4Address if bits == 32 else ipaddress.IPv6Address
        # IPv6 written in full, so that no address starts or ends with "::" next
        # to the range's "-" (the scanner would not split "::-2001:db8::1").
        show = str if bits == 32 else (lambda x: x.exploded)
        lo = show(make(s.lo))
        if s.lo == s.hi:
            return lo
        host_bits = (s.hi - s.lo).bit_length()
        if s.hi - s.lo + 1 != 1 << host_bits or s.lo & ((1 << host_bits) - 1):
            return f"{lo}-{show(make(s.hi))}"
        return f"{lo}/{bits - host_bits}"

    def key(self, type_: tuple[str, ...], k: Key) -> str:
        return " . ".join(self.atom(t, a) for t, a in zip(type_, k, strict=True))


def _elements(parts: Iterable[str]) -> str:
    body = ", ".join(parts)
    return f" elements = {{ {body} }} ;" if body else ""


class _TextWriter:
    def __init__(self, family: str, table: str) -> None:
        self.prefix = f"{_name(family)} {_name(table)}"
        self.atoms = _Atoms()

    def chain(self, c: NftChain) -> str:
        if c.base is None:
            return f"add chain {self.prefix} {_name(c.name)}"
        b = c.base
        return (
            f"add chain {self.prefix} {_name(c.name)} {{ type {b.type} hook {b.hook} "
            f"priority {b.priority} ; policy {b.policy} ; }}"
        )

    def set(self, s: NftSet) -> str:
        flags = f" flags {','.join(s.flags)} ;" if s.flags else ""
        if s.counter:
            flags += " counter ;"
        key = self.atoms.key
        elems = _elements(key(s.type, k) for k in s.elements)
        return (
            f"add set {self.prefix} {_name(s.name)} {{ type {' . '.join(s.type)} ;{flags}{elems} }}"
        )

    def map(self, m: NftMap) -> str:
        key = self.atoms.key
        elems = _elements(f"{key(m.type, k)} : {_verdict(v)}" for k, v in m.elements)
        return (
            f"add map {self.prefix} {_name(m.name)} {{ type {' . '.join(m.type)} : verdict ;"
            f"{elems} }}"
        )

    def rule(self, chain: str, r: NftRule) -> str:
        body = " ".join(_statement(st) for st in r.statements)
        comment = f" comment {_quoted(r.comment)}" if r.comment else ""
        return f"add rule {self.prefix} {_name(chain)} {body}{comment}"


def full_sync_text(program: Program) -> tuple[str, int]:
    """(the text batch that replaces the table, how many commands it holds): the
    transaction of `program.full_sync_commands()`, in the same order."""
    w = _TextWriter(program.family, program.table)
    table = f"table {w.prefix}"
    with cyclic_gc_paused():
        lines = [f"add {table}", f"delete {table}", f"add {table}"]
        lines.extend(w.chain(c) for c in program.chains)
        lines.extend(w.set(s) for s in program.sets)
        lines.extend(w.map(m) for m in program.maps)
        for c in program.chains:
            lines.extend(w.rule(c.name, r) for r in c.rules)
    return "\n".join(lines) + "\n", len(lines)
