"""Typed nftables objects and the one writer of libnftables JSON.

The compiler builds these frozen objects; `diff.py` compares them; only this
module turns them into JSON commands, and only `envelope` wraps commands in
``{"nftables": [...]}``. No rule text is ever glued from strings, and the only
free text that reaches the kernel is a rule comment, which `safe_comment`
restricts to id characters.

JSON forms are those of nftables 1.0.6 (checked against `nft -j list` of
hand-written rulesets). Version notes that shape this module:
- 1.0.6's JSON parser accepts but silently drops ``comment`` on tables, chains
  and sets; only rule comments reach the kernel, so only rules carry one.
- The text parser rejects comments over 128 bytes; we stay within that so a
  `nft list ruleset` dump can always be loaded back.
"""

from __future__ import annotations

import gc
import ipaddress
import re
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, Literal, NamedTuple, TypeAlias

JsonObj: TypeAlias = dict[str, Any]
Command: TypeAlias = dict[str, Any]

COMMENT_MAX_BYTES = 128
_COMMENT_SAFE = re.compile(r"[^A-Za-z0-9_.:/+=# -]")


class Span(NamedTuple):
    """An inclusive integer interval of one field of a set key.

    Addresses are kept as ints (fast to compare, sort and intersect); a span of
    an address type is rendered as an address, a prefix if it is a CIDR block,
    else a range (the form `nft list` prints, so listings compare equal).
    """

    lo: int
    hi: int


# One field of a set key: an interface name, or a span of a numeric type.
Atom: TypeAlias = str | Span
# A set element (map key): one atom per field of the set's type.
Key: TypeAlias = tuple[Atom, ...]

_ADDR_BITS = {"ipv4_addr": 32, "ipv6_addr": 128}


def safe_comment(text: str) -> str:
    """A comment nft accepts and that cannot carry user text: id characters, <= 128 bytes."""
    clean = _COMMENT_SAFE.sub("_", text)
    if len(clean) > COMMENT_MAX_BYTES:
        clean = clean[: COMMENT_MAX_BYTES - 3] + "..."
    return clean


# --------------------------------------------------------------------------- expressions


@dataclass(frozen=True, slots=True)
class Meta:
    key: str  # nfproto, l4proto, iifname, oifname


@dataclass(frozen=True, slots=True)
class Payload:
    protocol: str  # ip, ip6, th
    field: str  # saddr, daddr, sport, dport


@dataclass(frozen=True, slots=True)
class Ct:
    key: str  # state | mark


@dataclass(frozen=True, slots=True)
class Concat:
    items: tuple[Meta | Payload | Ct, ...]


MARK_BITS = 32  # the conntrack mark is a 32-bit integer


@dataclass(frozen=True, slots=True)
class Masked:
    """``expr & mask``: some bits of the 32-bit conntrack mark, so a rule reads only
    the bits it owns and leaves the others to other users of the mark."""

    expr: Ct
    mask: int

    def __post_init__(self) -> None:
        if self.expr.key != "mark":
            raise ValueError(f"only the ct mark is masked, not ct {self.expr.key}")
        if not 0 < self.mask < 1 << MARK_BITS:
            raise ValueError(f"mask {self.mask:#x} is not a non-zero 32-bit value")

    @property
    def is_prefix(self) -> bool:
        """The mask is leading ones (0x80000000, 0xc0000000...): nft lists such a
        match as a prefix, ``ct mark 0x80000000/1``."""
        low = (1 << MARK_BITS) - 1 - self.mask
        return low & (low + 1) == 0


Expr: TypeAlias = Meta | Payload | Ct | Concat | Masked


@dataclass(frozen=True, slots=True)
class SetRef:
    """A named set or map, ``@name`` in nft."""

    name: str


@dataclass(frozen=True, slots=True)
class Verdict:
    kind: Literal["accept", "drop", "return", "jump"]
    target: str = ""  # the chain of a jump

    def __post_init__(self) -> None:
        if (self.kind == "jump") != bool(self.target):
            raise ValueError(f"verdict {self.kind!r} with target {self.target!r}")


ACCEPT = Verdict("accept")
DROP = Verdict("drop")
RETURN = Verdict("return")


def jump(chain: str) -> Verdict:
    return Verdict("jump", chain)


@dataclass(frozen=True, slots=True)
class Match:
    """``left op right``; right is a literal value (``ipv4``) or a named set."""

    left: Expr
    right: str | int | SetRef
    op: Literal["==", "!="] = "=="

    def __post_init__(self) -> None:
        if isinstance(self.left, Masked) and not (
            isinstance(self.right, int) and self.right & ~self.left.mask == 0
        ):
            # A bit outside the mask can never be equal: the rule would be dead.
            raise ValueError(f"{self.right!r} is not a value of the mask {self.left.mask:#x}")


@dataclass(frozen=True, slots=True)
class VerdictMap:
    """``key vmap @map`` or ``key vmap { k : verdict, ... }``."""

    key: Expr
    data: SetRef | tuple[tuple[str, Verdict], ...]


@dataclass(frozen=True, slots=True)
class Counter:
    """`counter`: counts the packets reaching it (per-rule hit counters); decides nothing."""


@dataclass(frozen=True, slots=True)
class Limit:
    """`limit rate N/second`: matches while under the rate (burst: nft's default, 5).
    Only ever in a rule WITHOUT a verdict: in a dropping rule, a packet over the rate
    would skip the drop and fall to what follows (fail-open on a default accept)."""

    rate: int

    def __post_init__(self) -> None:
        if self.rate < 1:
            raise ValueError(f"limit rate {self.rate} is not positive")


LIMIT_BURST = 5  # nft's default burst; JSON lists it, text omits it


@dataclass(frozen=True, slots=True)
class Log:
    """`log prefix "..." group N`: hands the packet to NFLOG group N; decides nothing.
    The prefix is made of ids only (checked like a comment)."""

    prefix: str
    group: int

    def __post_init__(self) -> None:
        if self.prefix != safe_comment(self.prefix) or len(self.prefix) > 63:
            raise ValueError(f"unsafe log prefix {self.prefix!r}")
        if not 0 <= self.group <= 65535:
            raise ValueError(f"NFLOG group {self.group} out of range")


Statement: TypeAlias = Match | VerdictMap | Verdict | Counter | Limit | Log


@dataclass(frozen=True, slots=True)
class NftRule:
    statements: tuple[Statement, ...]
    comment: str = ""

    def __post_init__(self) -> None:
        if self.comment != safe_comment(self.comment):
            raise ValueError(f"unsafe rule comment {self.comment!r}")

    def references(self) -> Iterator[str]:
        """Names of the sets/maps and chains this rule depends on."""
        for st in self.statements:
            if isinstance(st, Match) and isinstance(st.right, SetRef):
                yield st.right.name
            elif isinstance(st, VerdictMap):
                if isinstance(st.data, SetRef):
                    yield st.data.name
                else:
                    yield from (v.target for _, v in st.data if v.target)
            elif isinstance(st, Verdict) and st.target:
                yield st.target


# --------------------------------------------------------------------------- objects


@dataclass(frozen=True, slots=True)
class BaseHook:
    type: Literal["filter"]
    hook: Literal["forward", "input", "output", "prerouting", "postrouting"]
    priority: int
    policy: Literal["accept", "drop"]


@dataclass(frozen=True, slots=True)
class NftChain:
    name: str
    rules: tuple[NftRule, ...]
    base: BaseHook | None = None


@dataclass(frozen=True, slots=True)
class NftSet:
    """A named set. `elements` is sorted and free of duplicates (see `make_set`)."""

    name: str
    type: tuple[str, ...]
    elements: tuple[Key, ...] = ()
    flags: tuple[str, ...] = ()
    # `counter` in the set: the kernel keeps packets/bytes per element.
    counter: bool = False
    # Parallel to `elements` when counted: the ECS rule id deciding each element.
    # Not content (the kernel never sees it), so not compared: a relabelled box is
    # no element change.
    labels: tuple[str, ...] = field(default=(), compare=False, hash=False, repr=False)

    def definition(self) -> tuple[object, ...]:
        """What cannot change in place: a change here means delete and re-create."""
        return (self.name, self.type, self.flags, self.counter)


@dataclass(frozen=True, slots=True)
class NftMap:
    """A named verdict map keyed by `type`; elements sorted by key (see `make_map`)."""

    name: str
    type: tuple[str, ...]
    elements: tuple[tuple[Key, Verdict], ...] = ()

    def definition(self) -> tuple[object, ...]:
        return (self.name, self.type, "verdict")


def make_set(
    name: str, type_: tuple[str, ...], elements: Iterable[Key], flags: tuple[str, ...] = ()
) -> NftSet:
    return NftSet(name, type_, tuple(sorted(set(elements))), flags)


def make_map(name: str, type_: tuple[str, ...], elements: Mapping[Key, Verdict]) -> NftMap:
    return NftMap(name, type_, tuple(sorted(elements.items(), key=lambda kv: kv[0])))


@dataclass(frozen=True)
class Program:
    """The complete desired state of one table.

    Sets, maps and chains are sorted by name (base chains first), so two
    programs built from the same model in any order compare and serialise
    identically. Not slotted: `cached_property` keeps lookup indexes.
    """

    family: str
    table: str
    sets: tuple[NftSet, ...] = ()
    maps: tuple[NftMap, ...] = ()
    chains: tuple[NftChain, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "sets", tuple(sorted(self.sets, key=lambda s: s.name)))
        object.__setattr__(self, "maps", tuple(sorted(self.maps, key=lambda m: m.name)))
        object.__setattr__(
            self,
            "chains",
            tuple(sorted(self.chains, key=lambda c: (c.base is None, c.name))),
        )
        names = [s.name for s in self.sets] + [m.name for m in self.maps]
        if len(set(names)) != len(names):
            raise ValueError("sets and maps share one namespace in nftables: duplicate name")
        if len({c.name for c in self.chains}) != len(self.chains):
            raise ValueError("duplicate chain name")

    @cached_property
    def set_by_name(self) -> dict[str, NftSet]:
        return {s.name: s for s in self.sets}

    @cached_property
    def map_by_name(self) -> dict[str, NftMap]:
        return {m.name: m for m in self.maps}

    @cached_property
    def chain_by_name(self) -> dict[str, NftChain]:
        return {c.name: c for c in self.chains}

    def full_sync_commands(self) -> list[Command]:
        """One atomic batch that replaces the table: add (so delete cannot fail), delete, build.

        Chains come first (map elements and rules jump to them), then sets and
        maps with their elements (rules look them up), then the rules.
        """
        w = Writer(self.family, self.table)
        with cyclic_gc_paused():
            cmds: list[Command] = [w.add_table(), w.delete_table(), w.add_table()]
            cmds.extend(w.add_chain(c) for c in self.chains)
            cmds.extend(w.add_set(s) for s in self.sets)
            cmds.extend(w.add_map(m) for m in self.maps)
            for chain in self.chains:
                cmds.extend(w.add_rule(chain.name, r) for r in chain.rules)
        return cmds

    def to_json(self) -> JsonObj:
        return envelope(self.full_sync_commands())

    def element_count(self) -> int:
        return sum(len(s.elements) for s in self.sets) + sum(len(m.elements) for m in self.maps)


@contextmanager
def cyclic_gc_paused() -> Iterator[None]:
    """Pause the cyclic collector while building ~10^5 small acyclic objects.

    Otherwise every allocation burst triggers a collection that re-walks the
    whole model graph: at 200 ENIs x 200 rules it doubles the time to compile
    and to render. Reference counting still frees everything; the previous
    state is restored, so a caller that disabled the collector keeps it so.
    """
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def envelope(commands: list[Command]) -> JsonObj:
    """The only place that writes the libnftables JSON envelope."""
    return {"nftables": list(commands)}


# --------------------------------------------------------------------------- rendering


def _render_expr(e: Expr) -> JsonObj:
    if isinstance(e, Meta):
        return {"meta": {"key": e.key}}
    if isinstance(e, Payload):
        return {"payload": {"protocol": e.protocol, "field": e.field}}
    if isinstance(e, Ct):
        return {"ct": {"key": e.key}}
    if isinstance(e, Masked):
        return {"&": [_render_expr(e.expr), e.mask]}
    return {"concat": [_render_expr(i) for i in e.items]}


def render_verdict(v: Verdict) -> JsonObj:
    if v.kind == "jump":
        return {"jump": {"target": v.target}}
    return {v.kind: None}


class _KeyRenderer:
    """Renders set keys by field type, memoised.

    The same span (a port range, a member address) and the same whole key recur
    across thousands of elements (every ENI of a group holds its rules'
    elements); JSON encoding does not mind shared, never-mutated dicts.
    """

    def __init__(self) -> None:
        self._atoms: dict[tuple[str, Span], Any] = {}
        self._keys: dict[tuple[tuple[str, ...], Key], Any] = {}

    def atom(self, type_: str, a: Atom) -> Any:
        if isinstance(a, str):
            return a
        key = (type_, a)
        out = self._atoms.get(key)
        if out is None:
            out = self._atoms[key] = self._span(type_, a)
        return out

    @staticmethod
    def _span(type_: str, s: Span) -> Any:
        bits = _ADDR_BITS.get(type_)
        if bits is None:  # inet_proto, inet_service
            return s.lo if s.lo == s.hi else {"range": [s.lo, s.hi]}
        make = ipaddress.IPv4Address if bits == 32 else ipaddress.IPv6Address
        addr = make(s.lo)
        if s.lo == s.hi:
            return str(addr)
        host_bits = (s.hi - s.lo).bit_length()
        if s.hi - s.lo + 1 != 1 << host_bits or s.lo & ((1 << host_bits) - 1):
            # Not a CIDR block (a piece of a flattened rule space): nft lists it as
            # a range, and a block as a prefix, so this form lists back identically.
            return {"range": [str(addr), str(make(s.hi))]}
        return {"prefix": {"addr": str(addr), "len": bits - host_bits}}

    def key(self, type_: tuple[str, ...], k: Key) -> Any:
        if len(type_) == 1:
            return self.atom(type_[0], k[0])
        memo = (type_, k)
        out = self._keys.get(memo)
        if out is None:
            atom = self.atom
            out = {"concat": [atom(t, a) for t, a in zip(type_, k, strict=True)]}
            self._keys[memo] = out
        return out


class Writer:
    """Builds the command dicts of one table. Every JSON command is made here."""

    def __init__(self, family: str, table: str) -> None:
        self.family = family
        self.table = table
        self._keys = _KeyRenderer()
        # Rendered statements by identity: the compiler shares expression objects.
        self._statements: dict[int, tuple[Statement, JsonObj]] = {}
        self._exprs: dict[int, tuple[Expr, JsonObj]] = {}

    def _obj(self, **extra: Any) -> JsonObj:
        return {"family": self.family, "table": self.table, **extra}

    def add_table(self) -> Command:
        return {"add": {"table": {"family": self.family, "name": self.table}}}

    def delete_table(self) -> Command:
        return {"delete": {"table": {"family": self.family, "name": self.table}}}

    def add_chain(self, chain: NftChain) -> Command:
        body = self._obj(name=chain.name)
        if chain.base is not None:
            b = chain.base
            body.update(type=b.type, hook=b.hook, prio=b.priority, policy=b.policy)
        return {"add": {"chain": body}}

    def flush_chain(self, name: str) -> Command:
        return {"flush": {"chain": self._obj(name=name)}}

    def delete_chain(self, name: str) -> Command:
        return {"delete": {"chain": self._obj(name=name)}}

    def add_rule(self, chain: str, rule: NftRule) -> Command:
        body = self._obj(chain=chain)
        if rule.comment:
            body["comment"] = rule.comment
        body["expr"] = [self._statement(st) for st in rule.statements]
        return {"add": {"rule": body}}

    def _statement(self, st: Statement) -> JsonObj:
        got = self._statements.get(id(st))
        if got is not None:
            return got[1]
        out: JsonObj
        if isinstance(st, Verdict):
            out = render_verdict(st)
        elif isinstance(st, Counter):
            out = {"counter": None}
        elif isinstance(st, Limit):
            out = {"limit": {"rate": st.rate, "burst": LIMIT_BURST, "per": "second"}}
        elif isinstance(st, Log):
            out = {"log": {"prefix": st.prefix, "group": st.group}}
        elif isinstance(st, Match):
            out = self._match(st)
        else:
            data: Any
            if isinstance(st.data, SetRef):
                data = f"@{st.data.name}"
            else:
                data = {"set": [[k, render_verdict(v)] for k, v in st.data]}
            out = {"vmap": {"key": self._expr(st.key), "data": data}}
        self._statements[id(st)] = (st, out)
        return out

    def _match(self, st: Match) -> JsonObj:
        left, right = st.left, st.right
        if isinstance(left, Masked) and left.is_prefix:
            # nft 1.0.6 lists `ct mark & 0x80000000 == 0x80000000` back as the prefix
            # `ct mark 0x80000000/1`; writing that form keeps program and listing equal.
            prefix = {"prefix": {"addr": right, "len": left.mask.bit_count()}}
            return {"match": {"op": st.op, "left": self._expr(left.expr), "right": prefix}}
        value: Any = f"@{right.name}" if isinstance(right, SetRef) else right
        return {"match": {"op": st.op, "left": self._expr(left), "right": value}}

    def _expr(self, e: Expr) -> JsonObj:
        got = self._exprs.get(id(e))
        if got is None:
            got = self._exprs[id(e)] = (e, _render_expr(e))
        return got[1]

    @staticmethod
    def _type(type_: tuple[str, ...]) -> str | list[str]:
        return type_[0] if len(type_) == 1 else list(type_)

    def add_set(self, s: NftSet) -> Command:
        body = self._obj(name=s.name, type=self._type(s.type))
        if s.flags:
            body["flags"] = list(s.flags)
        if s.counter:
            body["stmt"] = [{"counter": None}]
        if s.elements:
            body["elem"] = self.set_elements(s.type, s.elements)
        return {"add": {"set": body}}

    def add_map(self, m: NftMap) -> Command:
        body = self._obj(name=m.name, type=self._type(m.type), map="verdict")
        if m.elements:
            body["elem"] = self.map_elements(m.type, m.elements)
        return {"add": {"map": body}}

    def delete_set(self, name: str) -> Command:
        return {"delete": {"set": self._obj(name=name)}}

    def delete_map(self, name: str) -> Command:
        return {"delete": {"map": self._obj(name=name)}}

    def set_elements(self, type_: tuple[str, ...], keys: Iterable[Key]) -> list[Any]:
        key = self._keys.key
        return [key(type_, k) for k in keys]

    def map_elements(
        self, type_: tuple[str, ...], items: Iterable[tuple[Key, Verdict]]
    ) -> list[Any]:
        return [[self._keys.key(type_, k), render_verdict(v)] for k, v in items]

    def add_elements(self, name: str, elem: list[Any]) -> Command:
        return {"add": {"element": self._obj(name=name, elem=elem)}}

    def delete_elements(self, name: str, elem: list[Any]) -> Command:
        return {"delete": {"element": self._obj(name=name, elem=elem)}}
