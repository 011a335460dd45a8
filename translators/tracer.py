"""Walk one packet through a compiled nftables program (libnftables JSON), rule by rule.

This is the packet-trace half of the unit tests (docs/design.md §Testing: kube-proxy traces
packets through its fake ruleset): it interprets exactly the subset of
libnftables JSON that `compiler.py` writes (docs/dataplane.md) and raises
`UnsupportedExpression` on anything else, so a new construct in the compiler
can never pass a test by being silently ignored. Where nft or the kernel would
reject a program (unknown chain, set type mismatch, overlapping interval
elements, a jump loop), it raises `InvalidProgram` instead of guessing.

It reads both the command form the compiler writes (``{"add": {"rule": ...}}``)
and the listing form ``nft -j list ruleset`` prints (``{"rule": ...}``), so a
ruleset read back from the kernel can be traced too. Listings drop implicit
dependencies (``meta nfproto ipv4`` before ``ip saddr``); the tracer applies
them itself: an ``ip`` field on an IPv6 packet (and vice versa) makes the
rule not match, whatever the operator, as in the kernel.

The conntrack mark is read only under a mask (``ct mark & 0x40000000 ==
0x40000000``, the agent's one bit), so a `Packet` carries the whole 32-bit mark
and bits of other users do not change a verdict. nft lists a mask of leading
ones as a prefix (``ct mark 0x80000000/1``); both forms are read.

Ports of protocols without ports: ``th dport``/``th sport`` load bytes 2-3 and
0-1 of whatever transport header follows (the ICMP checksum, the GRE
protocol type...), so for ICMP, ICMPv6, GRE and the like they are "any
value". The tracer models that value as 0: `Packet`s of port-less protocols
carry ``sport = dport = 0`` (`packet_ports` gives them). Because real port
ranges start at 1, a lookup of 0 matches only an element whose port fields
cover 0 as well, i.e. the full 0-65535 range the compiler writes for such
rules; an element that covered only some ports would miss 0 and the trace
would disagree with the evaluator.

Evaluation: the one base chain with hook forward; its rules in order; a
verdict map lookup that finds no element, or a match that fails, moves on to
the next rule; ``jump`` pushes the next rule of the current chain, ``goto``
does not; ``return`` and falling off the end of a regular chain pop, and at
the bottom of the stack the base chain's policy applies.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, TypeAlias, cast

from .network import IPAddress

Verdict = Literal["accept", "drop"]
CtState = Literal["new", "established", "related", "invalid", "untracked"]

# The kernel's jump stack is 16 deep; deeper programs fail to load.
MAX_JUMP_DEPTH = 16

# IP protocols whose first four transport bytes are source and destination port.
PORTED_L4PROTOS = frozenset({6, 17, 33, 132, 136})  # TCP, UDP, DCCP, SCTP, UDP-Lite

_CT_STATES = frozenset({"new", "established", "related", "invalid", "untracked"})
_PROTO_NAMES = {
    # nft lists protocol 0 by its /etc/protocols name (a flattened box can start
    # or end there: the piece below ICMP's 1 of an ALL rule).
    "ip": 0,
    "hopopt": 0,
    "tcp": 6,
    "udp": 17,
    "icmp": 1,
    "ipv6-icmp": 58,
    "icmpv6": 58,
    "gre": 47,
    "sctp": 132,
    "dccp": 33,
    "udplite": 136,
}
_NFPROTO = {"ipv4": "ipv4", "ipv6": "ipv6", 2: "ipv4", 10: "ipv6"}
_TERMINAL = frozenset({"accept", "drop", "jump", "goto", "return", "continue"})
# Keys of objects that change nothing about a packet's verdict; any other key
# (timeouts, devices, rule positions...) is outside the subset.
_COMMON_KEYS = frozenset({"family", "table", "name", "handle", "comment"})
_CHAIN_KEYS = _COMMON_KEYS | {"type", "hook", "prio", "policy"}
_SET_KEYS = _COMMON_KEYS | {"type", "map", "flags", "elem", "size", "policy", "stmt"}
_HOOKS_SEEING_FORWARDED = frozenset({"prerouting", "forward", "postrouting", "ingress"})


class TraceError(Exception):
    """The program cannot be traced."""


class UnsupportedExpression(TraceError):
    """The program uses JSON outside the subset the compiler writes (and the tracer knows)."""


class InvalidProgram(TraceError):
    """The program is something nft or the kernel would refuse to load."""


@dataclass(frozen=True, slots=True)
class Packet:
    """One packet as the VPC router's forward hook sees it.

    `iifname`/`oifname` are router-side port names; addresses are
    `ipaddress` objects or strings. For protocols without ports pass
    ``sport = dport = 0`` (see the module docstring, and `packet_ports`).
    """

    iifname: str
    oifname: str
    src_ip: IPAddress | str
    dst_ip: IPAddress | str
    l4proto: int
    sport: int = 0
    dport: int = 0
    ct_state: CtState = "new"
    ct_mark: int = 0  # the whole 32-bit mark; the agent owns one bit of it (revoked flows)


@dataclass(frozen=True, slots=True)
class Trace:
    """The verdict, and the chains and rules the packet went through (for failure messages)."""

    verdict: Verdict
    steps: list[str]

    def __str__(self) -> str:
        return f"{self.verdict}\n  " + "\n  ".join(self.steps)


def packet_ports(l4proto: int, sport: int, dport: int) -> tuple[int, int]:
    """The (sport, dport) a tracer packet carries: 0, 0 for protocols without ports."""
    return (sport, dport) if l4proto in PORTED_L4PROTOS else (0, 0)


# -- values -------------------------------------------------------------------
# Every value of every datatype becomes a closed interval (lo, hi) of ints or
# strings, so one comparison covers single values, prefixes and ranges.

Scalar: TypeAlias = int | str
Interval: TypeAlias = tuple[Scalar, Scalar]
Element: TypeAlias = tuple[Interval, ...]

_INTERVAL_TYPES = frozenset({"ipv4_addr", "ipv6_addr", "inet_proto", "inet_service"})
_KNOWN_TYPES = frozenset({*_INTERVAL_TYPES, "ifname", "ct_state", "nf_proto", "mark"})


def _is_int(raw: object) -> bool:
    return isinstance(raw, int) and not isinstance(raw, bool)


def _scalar(typ: str, raw: object) -> Scalar:
    try:
        if typ == "ifname" and isinstance(raw, str):
            if raw.endswith("*") or len(raw.encode()) > 15:
                raise UnsupportedExpression(f"interface name pattern {raw!r}")
            return raw
        if typ == "ipv4_addr" and isinstance(raw, str) and "/" not in raw:
            return int(ipaddress.IPv4Address(raw))
        if typ == "ipv6_addr" and isinstance(raw, str) and "/" not in raw:
            return int(ipaddress.IPv6Address(raw))
        if typ == "inet_proto":
            if _is_int(raw) and 0 <= raw <= 255:  # type: ignore[operator]
                return raw  # type: ignore[return-value]
            if isinstance(raw, str) and raw in _PROTO_NAMES:
                return _PROTO_NAMES[raw]
        if typ == "inet_service" and _is_int(raw) and 0 <= raw <= 65535:  # type: ignore[operator]
            return raw  # type: ignore[return-value]
        if typ == "ct_state" and isinstance(raw, str) and raw in _CT_STATES:
            return raw
        if typ == "mark" and _is_int(raw) and 0 <= raw <= 0xFFFFFFFF:  # type: ignore[operator]
            return raw  # type: ignore[return-value]
        if typ == "nf_proto" and isinstance(raw, str | int) and raw in _NFPROTO:
            return _NFPROTO[raw]
    except ValueError:
        raise InvalidProgram(f"{raw!r} is not a valid {typ}") from None
    raise UnsupportedExpression(f"value {raw!r} of type {typ}")


def _interval(typ: str, raw: object, *, ranges_ok: bool) -> Interval:
    """One field of an element: a value, a prefix or a range."""
    if typ == "mark" and isinstance(raw, dict) and set(raw) == {"prefix"}:
        return _mark_prefix(raw)
    if isinstance(raw, dict) and len(raw) == 1 and ("prefix" in raw or "range" in raw):
        if typ not in _INTERVAL_TYPES:
            raise UnsupportedExpression(f"interval {raw!r} of type {typ}")
        if not ranges_ok:
            raise InvalidProgram(f"interval {raw!r} in a set without flags interval")
        if "prefix" in raw:
            body = raw["prefix"]
            if typ not in ("ipv4_addr", "ipv6_addr") or not isinstance(body, dict):
                raise UnsupportedExpression(f"prefix {raw!r} of type {typ}")
            addr, length = body.get("addr"), body.get("len")
            if not isinstance(addr, str) or not _is_int(length) or set(body) != {"addr", "len"}:
                raise UnsupportedExpression(f"prefix {raw!r}")
            try:
                net = ipaddress.ip_network(f"{addr}/{length}", strict=False)
            except ValueError:
                raise InvalidProgram(f"bad prefix {raw!r}") from None
            if (net.version == 4) != (typ == "ipv4_addr"):
                raise InvalidProgram(f"prefix {raw!r} is not of type {typ}")
            return int(net.network_address), int(net.broadcast_address)
        bounds = raw["range"]
        if not isinstance(bounds, list) or len(bounds) != 2:
            raise UnsupportedExpression(f"range {raw!r}")
        lo, hi = _scalar(typ, bounds[0]), _scalar(typ, bounds[1])
        if lo > hi:  # type: ignore[operator]
            raise InvalidProgram(f"range {raw!r} is empty")
        return lo, hi
    value = _scalar(typ, raw)
    return value, value


def _mark_prefix(raw: dict[str, Any]) -> Interval:
    """``ct mark 0x80000000/1``: how nft lists ``ct mark & m == v`` when m is leading ones.

    The marks whose leading `len` bits equal those of `addr` form one interval.
    """
    body = raw["prefix"]
    if not isinstance(body, dict) or set(body) != {"addr", "len"}:
        raise UnsupportedExpression(f"prefix {raw!r}")
    addr, length = body["addr"], body["len"]
    if not (_is_int(addr) and 0 <= addr <= 0xFFFFFFFF and _is_int(length) and 0 <= length <= 32):
        raise InvalidProgram(f"bad mark prefix {raw!r}")
    host = (1 << (32 - length)) - 1
    lo = addr & ~host
    return lo, lo | host


def _unwrap_elem(raw: object) -> object:
    # {"elem": {"val": X, "comment": ...}} carries per-element options; only comments
    # and counters (a listing of a set with `counter`) are inert.
    if isinstance(raw, dict) and set(raw) == {"elem"}:
        body = raw["elem"]
        if (
            not isinstance(body, dict)
            or "val" not in body
            or set(body) - {"val", "comment", "counter"}
        ):
            raise UnsupportedExpression(f"set element options {raw!r}")
        return body["val"]
    return raw


def _element(types: Sequence[str], raw: object, *, ranges_ok: bool) -> Element:
    raw = _unwrap_elem(raw)
    if len(types) == 1:
        return (_interval(types[0], raw, ranges_ok=ranges_ok),)
    if not (isinstance(raw, dict) and set(raw) == {"concat"} and isinstance(raw["concat"], list)):
        raise InvalidProgram(f"element {raw!r} is not a concatenation of {' . '.join(types)}")
    parts = raw["concat"]
    if len(parts) != len(types):
        raise InvalidProgram(f"element {raw!r} does not have {len(types)} fields")
    return tuple(_interval(t, p, ranges_ok=ranges_ok) for t, p in zip(types, parts, strict=True))


def _contains(element: Element, key: tuple[Scalar, ...]) -> bool:
    return all(lo <= v <= hi for (lo, hi), v in zip(element, key, strict=True))  # type: ignore[operator]


def _overlap(a: Element, b: Element) -> bool:
    return all(
        max(alo, blo) <= min(ahi, bhi)  # type: ignore[operator]
        for (alo, ahi), (blo, bhi) in zip(a, b, strict=True)
    )


# -- program objects ----------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Verdict:
    kind: str  # accept drop jump goto return continue
    target: str = ""

    def __str__(self) -> str:
        return f"{self.kind} {self.target}" if self.target else self.kind


@dataclass
class _Set:
    """A named set or verdict map, with its elements."""

    name: str
    types: tuple[str, ...]
    interval: bool
    is_map: bool
    elements: list[Element] = field(default_factory=list)
    data: list[_Verdict] = field(default_factory=list)  # parallel to elements, maps only
    _index: dict[Element, int] = field(default_factory=dict)

    def add(self, key: Element, verdict: _Verdict | None) -> None:
        old = self._index.get(key)
        if old is not None:
            # Adding an existing element again is a no-op ("add", not "create");
            # the same key with other data is refused by the kernel.
            if verdict is not None and self.data[old] != verdict:
                raise InvalidProgram(f"map {self.name}: key {key} has two verdicts")
            return
        if self.interval:
            # nft refuses overlapping intervals; the kernel's concatenated-interval
            # sets refuse some overlaps, depending on insertion order. Refusing every
            # overlap keeps traces order-independent and holds the compiler to its
            # promise (docs/dataplane.md) that no two elements of one set overlap.
            for other in self.elements:
                if _overlap(other, key):
                    raise InvalidProgram(f"set {self.name}: elements {other} and {key} overlap")
        self._index[key] = len(self.elements)
        self.elements.append(key)
        if verdict is not None:
            self.data.append(verdict)

    def clear(self) -> None:
        self.elements.clear()
        self.data.clear()
        self._index.clear()

    def find(self, key: tuple[Scalar, ...]) -> int | None:
        """The index of the element holding `key`, or None."""
        if not self.interval:  # exact elements: one dict lookup
            return self._index.get(tuple((v, v) for v in key))
        for i, element in enumerate(self.elements):
            if _contains(element, key):
                return i
        return None


@dataclass(frozen=True, slots=True)
class _Selector:
    """Something a rule reads from the packet: a meta key, a payload field, ct state."""

    name: str  # as nft prints it: "iifname", "meta l4proto", "ip saddr", "th dport"
    typ: str
    mask: int | None = None  # `ct mark & mask`: only these bits of the value are read
    reads: str = ""  # the packet value a masked selector reads; else `name`


@dataclass(frozen=True, slots=True)
class _Lookup:
    """A key (one selector or a concatenation) looked up in a named or anonymous set."""

    key: tuple[_Selector, ...]
    set_name: str  # "" for an anonymous set
    elements: tuple[Element, ...] = ()
    data: tuple[_Verdict, ...] = ()


@dataclass(frozen=True, slots=True)
class _Match:
    lookup: _Lookup
    negate: bool
    text: str


@dataclass(frozen=True, slots=True)
class _VMap:
    lookup: _Lookup
    text: str


_Stmt: TypeAlias = _Match | _VMap | _Verdict | None  # None: a counter, which decides nothing
# A `limit` while parsing a rule (becomes None once checked to be in a verdict-less rule).
_LIMIT: _Stmt = cast("_Stmt", object())


@dataclass
class _Rule:
    stmts: list[_Stmt]
    text: str


@dataclass
class _Chain:
    name: str
    hook: str | None = None
    policy: Verdict = "accept"
    rules: list[_Rule] = field(default_factory=list)


class _NotApplicable(Exception):
    """The packet lacks the header a selector reads: the rule does not match."""


# -- parsing --------------------------------------------------------------------

_META = {
    "iifname": _Selector("iifname", "ifname"),
    "oifname": _Selector("oifname", "ifname"),
    "nfproto": _Selector("meta nfproto", "nf_proto"),
    "l4proto": _Selector("meta l4proto", "inet_proto"),
}
_PAYLOAD = {
    ("ip", "saddr"): _Selector("ip saddr", "ipv4_addr"),
    ("ip", "daddr"): _Selector("ip daddr", "ipv4_addr"),
    ("ip6", "saddr"): _Selector("ip6 saddr", "ipv6_addr"),
    ("ip6", "daddr"): _Selector("ip6 daddr", "ipv6_addr"),
    ("th", "sport"): _Selector("th sport", "inet_service"),
    ("th", "dport"): _Selector("th dport", "inet_service"),
}
_CT_STATE = _Selector("ct state", "ct_state")
_CT_MARK = _Selector("ct mark", "mark")


def _one_key(raw: object, what: str) -> tuple[str, Any]:
    if not isinstance(raw, dict) or len(raw) != 1:
        raise UnsupportedExpression(f"{what} {raw!r}")
    ((key, body),) = raw.items()
    return str(key), body


def _selector(raw: object) -> _Selector:
    kind, body = _one_key(raw, "expression")
    if kind == "meta" and isinstance(body, dict) and set(body) == {"key"}:
        sel = _META.get(body["key"])
    elif kind == "payload" and isinstance(body, dict) and set(body) == {"protocol", "field"}:
        sel = _PAYLOAD.get((body["protocol"], body["field"]))
    elif kind == "ct" and body == {"key": "state"}:
        sel = _CT_STATE
    elif kind == "ct" and body == {"key": "mark"}:
        sel = _CT_MARK
    else:
        sel = None
    if sel is None:
        raise UnsupportedExpression(f"expression {raw!r}")
    return sel


def _masked(raw: object) -> _Selector:
    """``{"&": [ct mark, mask]}``: the bits of the mark under a 32-bit constant mask."""
    operands = raw.get("&") if isinstance(raw, dict) and set(raw) == {"&"} else None
    if not (isinstance(operands, list) and len(operands) == 2):
        raise UnsupportedExpression(f"expression {raw!r}")
    sel, mask = _selector(operands[0]), operands[1]
    if sel is not _CT_MARK or not (_is_int(mask) and 0 <= mask <= 0xFFFFFFFF):
        raise UnsupportedExpression(f"bitwise and {raw!r} (only ct mark & a 32-bit constant)")
    return _Selector(f"{sel.name} & {mask:#010x}", sel.typ, mask, sel.name)


def _key(raw: object) -> tuple[_Selector, ...]:
    if isinstance(raw, dict) and set(raw) == {"concat"}:
        parts = raw["concat"]
        if not isinstance(parts, list) or len(parts) < 2:
            raise UnsupportedExpression(f"concatenation {raw!r}")
        return tuple(_selector(p) for p in parts)
    if isinstance(raw, dict) and set(raw) == {"&"}:
        return (_masked(raw),)
    return (_selector(raw),)


def _verdict(raw: object) -> _Verdict | None:
    """A verdict statement, or None if `raw` is not one."""
    if not isinstance(raw, dict) or len(raw) != 1:
        return None
    ((kind, body),) = raw.items()
    if kind not in _TERMINAL:
        return None
    if kind in ("jump", "goto"):
        if not (
            isinstance(body, dict) and set(body) == {"target"} and isinstance(body["target"], str)
        ):
            raise UnsupportedExpression(f"verdict {raw!r}")
        return _Verdict(kind, body["target"])
    if body is not None:
        raise UnsupportedExpression(f"verdict {raw!r}")
    return _Verdict(kind)


def _map_verdict(raw: object) -> _Verdict:
    verdict = _verdict(raw)
    if verdict is None:
        raise UnsupportedExpression(f"map data {raw!r} is not a verdict")
    return verdict


def _show_key(key: tuple[_Selector, ...]) -> str:
    return " . ".join(s.name for s in key)


def _show_value(raw: object, types: Sequence[str]) -> str:
    """`raw` as nft prints it, for trace steps (interface names quoted)."""
    raw = _unwrap_elem(raw)
    if isinstance(raw, dict) and isinstance(raw.get("prefix"), dict):
        return f"{raw['prefix'].get('addr')}/{raw['prefix'].get('len')}"
    if isinstance(raw, dict) and isinstance(raw.get("range"), list):
        return "-".join(str(x) for x in raw["range"])
    if isinstance(raw, dict) and isinstance(raw.get("concat"), list):
        return " . ".join(_show_value(x, [t]) for x, t in zip(raw["concat"], types, strict=False))
    if isinstance(raw, dict) and isinstance(raw.get("set"), list):
        return "{ " + ", ".join(_show_value(x, types) for x in raw["set"]) + " }"
    if isinstance(raw, list) and len(raw) == 2 and _verdict(raw[1]) is not None:
        return f"{_show_value(raw[0], types)} : {_verdict(raw[1])}"  # a map element
    if isinstance(raw, list):
        return ",".join(_show_value(x, types) for x in raw)
    if isinstance(raw, str) and list(types) == ["ifname"] and not raw.startswith("@"):
        return f'"{raw}"'
    return str(raw)


class Ruleset:
    """The state built from a command list; `trace` walks packets through it.

    Build once, trace many packets: all parsing and checking happens here.
    """

    def __init__(self, doc: Mapping[str, Any]) -> None:
        self.family = ""
        self.table = ""
        self.chains: dict[str, _Chain] = {}
        self.sets: dict[str, _Set] = {}
        self._raw_rules: list[tuple[str, list[Any]]] = []
        commands = doc.get("nftables") if isinstance(doc, Mapping) else None
        if not isinstance(commands, list):
            raise UnsupportedExpression('the program must be {"nftables": [...]}')
        for command in commands:
            self._command(command)
        # Rules are parsed last: a rule may name a set or chain added after it
        # in the same batch, which nft accepts.
        for chain, exprs in self._raw_rules:
            self.chains[chain].rules.append(self._rule(exprs))
        self._check_targets()
        bases = [c for c in self.chains.values() if c.hook == "forward"]
        if len(bases) != 1:
            raise UnsupportedExpression(
                f"expected one base chain with hook forward, found {len(bases)}"
            )
        self.base = bases[0]

    # -- commands --
    def _command(self, command: object) -> None:
        verb, body = _one_key(command, "command")
        if verb == "metainfo":
            return
        if verb in ("table", "chain", "set", "map", "rule", "element"):  # listing form
            verb, body = "add", {verb: body}
        if verb not in ("add", "create", "delete", "flush"):
            raise UnsupportedExpression(f"command {verb!r}")
        obj, spec = _one_key(body, f"{verb} command")
        if not isinstance(spec, dict):
            raise UnsupportedExpression(f"{verb} {obj} {spec!r}")
        if obj != "table":
            self._check_table(spec)
        if verb == "delete":
            if obj != "table":
                raise UnsupportedExpression(f"delete {obj}")
            if spec.get("name") != self.table:
                raise InvalidProgram(f"delete table {spec.get('name')!r}: no such table")
            self._reset()
            return
        if verb == "flush":
            self._flush(obj, spec)
            return
        if obj == "table":
            self._add_table(spec)
        elif obj == "chain":
            self._add_chain(spec)
        elif obj in ("set", "map"):
            self._add_set(spec, is_map=obj == "map")
        elif obj == "element":
            self._add_element(spec)
        elif obj == "rule":
            self._add_rule(spec)
        else:
            raise UnsupportedExpression(f"{verb} {obj}")

    def _reset(self) -> None:
        self.family = self.table = ""
        self.chains, self.sets, self._raw_rules = {}, {}, []

    def _check_table(self, spec: Mapping[str, Any]) -> None:
        if not self.table:
            raise InvalidProgram(f"{spec!r} before add table")
        if (spec.get("family"), spec.get("table")) != (self.family, self.table):
            raise UnsupportedExpression(
                f"object of table {spec.get('family')} {spec.get('table')}; "
                f"only one table ({self.family} {self.table}) is traced"
            )

    def _add_table(self, spec: Mapping[str, Any]) -> None:
        _only_keys(spec, {"family", "name", "handle", "comment", "flags"}, "table")
        if spec.get("flags") not in (None, [], "") or spec.get("family") != "inet":
            raise UnsupportedExpression(f"table {spec!r} (only an inet table without flags)")
        if self.table and spec.get("name") != self.table:
            raise UnsupportedExpression("more than one table")
        self.family, self.table = "inet", str(spec.get("name"))

    def _add_chain(self, spec: Mapping[str, Any]) -> None:
        _only_keys(spec, _CHAIN_KEYS, "chain")
        name = spec.get("name")
        if not isinstance(name, str):
            raise InvalidProgram(f"chain without a name: {spec!r}")
        hook = spec.get("hook")
        chain = self.chains.setdefault(name, _Chain(name))
        if hook is None:
            if "type" in spec or "policy" in spec:
                raise InvalidProgram(f"chain {name}: type or policy without a hook")
            return
        if hook in _HOOKS_SEEING_FORWARDED and hook != "forward":
            raise UnsupportedExpression(f"chain {name}: hook {hook} (forwarded packets see it)")
        if spec.get("type") != "filter" or not _is_int(spec.get("prio")):
            raise UnsupportedExpression(f"chain {name}: {spec!r}")
        policy = spec.get("policy", "accept")  # nft's default for base chains
        if policy not in ("accept", "drop"):
            raise InvalidProgram(f"chain {name}: policy {policy!r}")
        chain.hook, chain.policy = str(hook), policy

    def _add_set(self, spec: Mapping[str, Any], *, is_map: bool) -> None:
        _only_keys(spec, _SET_KEYS, "set")
        name = spec.get("name")
        raw_type = spec.get("type")
        types = tuple(raw_type) if isinstance(raw_type, list) else (raw_type,)
        if not isinstance(name, str) or not all(isinstance(t, str) for t in types):
            raise InvalidProgram(f"set {spec!r}")
        for t in types:
            if t not in _KNOWN_TYPES:
                raise UnsupportedExpression(f"set {name}: type {t}")
        if is_map and spec.get("map") != "verdict":
            raise UnsupportedExpression(f"map {name}: data type {spec.get('map')!r}")
        if not is_map and "map" in spec:
            raise InvalidProgram(f"set {name} has a data type")
        flags = spec.get("flags", [])
        flags = [flags] if isinstance(flags, str) else flags
        if not isinstance(flags, list) or set(flags) - {"interval"}:
            raise UnsupportedExpression(f"set {name}: flags {flags!r}")
        stmt = spec.get("stmt", [])
        if stmt not in ([], [{"counter": None}]):
            raise UnsupportedExpression(f"set {name}: statements {stmt!r}")
        new = _Set(name, types, "interval" in flags, is_map)
        old = self.sets.get(name)
        if old is None:
            self.sets[name] = new
        elif (old.types, old.interval, old.is_map) != (new.types, new.interval, new.is_map):
            raise InvalidProgram(f"set {name} redefined differently")
        self._elements(name, spec.get("elem", []))

    def _add_element(self, spec: Mapping[str, Any]) -> None:
        _only_keys(spec, {"family", "table", "name", "elem"}, "element")
        self._elements(str(spec.get("name")), spec.get("elem", []))

    def _elements(self, name: str, raw: object) -> None:
        target = self.sets.get(name)
        if target is None:
            raise InvalidProgram(f"elements for unknown set {name}")
        if not isinstance(raw, list):
            raise UnsupportedExpression(f"elements of {name}: {raw!r}")
        for item in raw:
            if target.is_map:
                if not (isinstance(item, list) and len(item) == 2):
                    raise InvalidProgram(f"map {name}: element {item!r} is not [key, verdict]")
                key = _element(target.types, item[0], ranges_ok=target.interval)
                target.add(key, _map_verdict(item[1]))
            else:
                target.add(_element(target.types, item, ranges_ok=target.interval), None)

    def _flush(self, obj: str, spec: Mapping[str, Any]) -> None:
        name = spec.get("name")
        if obj == "chain" and isinstance(name, str) and name in self.chains:
            self._raw_rules = [(c, e) for c, e in self._raw_rules if c != name]
        elif obj in ("set", "map") and isinstance(name, str) and name in self.sets:
            self.sets[name].clear()
        else:
            raise UnsupportedExpression(f"flush {obj} {spec!r}")

    def _add_rule(self, spec: Mapping[str, Any]) -> None:
        _only_keys(spec, {"family", "table", "chain", "handle", "expr", "comment"}, "rule")
        chain, exprs = spec.get("chain"), spec.get("expr")
        if not isinstance(chain, str) or chain not in self.chains:
            raise InvalidProgram(f"rule for unknown chain {chain!r}")
        if not isinstance(exprs, list):
            raise InvalidProgram(f"rule without expressions: {spec!r}")
        self._raw_rules.append((chain, exprs))

    # -- rules --
    def _rule(self, exprs: list[Any]) -> _Rule:
        stmts: list[_Stmt] = []
        for i, raw in enumerate(exprs):
            stmt = self._stmt(raw)
            if isinstance(stmt, _Verdict | _VMap) and i != len(exprs) - 1:
                raise InvalidProgram(f"statement after the verdict in {exprs!r}")
            if stmt is _LIMIT:
                if isinstance(self._stmt(exprs[-1]), _Verdict | _VMap):
                    # Over the rate the verdict would be skipped: fail-open.
                    raise UnsupportedExpression(f"limit in a rule with a verdict: {exprs!r}")
                stmt = None
            stmts.append(stmt)
        return _Rule(stmts, " ".join(_show_stmt(s) for s in stmts if s is not None))

    def _stmt(self, raw: object) -> _Stmt:
        verdict = _verdict(raw)
        if verdict is not None:
            return verdict
        kind, body = _one_key(raw, "statement")
        if kind == "counter" and (body is None or isinstance(body, dict)):
            return None  # counts, decides nothing
        if kind == "log" and isinstance(body, dict) and set(body) == {"prefix", "group"}:
            return None  # hands a copy to NFLOG, decides nothing
        if kind == "limit" and isinstance(body, dict):
            # Whether it matches depends on the rate; modelled as "decides nothing",
            # which holds only in a rule without a verdict (checked in _rule).
            return _LIMIT
        if kind == "match" and isinstance(body, dict) and set(body) == {"op", "left", "right"}:
            return self._match(body)
        if kind == "vmap" and isinstance(body, dict) and set(body) == {"key", "data"}:
            key = _key(body["key"])
            data = body["data"]
            if isinstance(data, str):
                lookup = self._named(key, data, want_map=True)
            elif isinstance(data, dict) and set(data) == {"set"} and isinstance(data["set"], list):
                elements, verdicts = [], []
                for item in data["set"]:
                    if not (isinstance(item, list) and len(item) == 2):
                        raise UnsupportedExpression(f"vmap element {item!r}")
                    elements.append(_element([s.typ for s in key], item[0], ranges_ok=True))
                    verdicts.append(_map_verdict(item[1]))
                lookup = _Lookup(key, "", tuple(elements), tuple(verdicts))
            else:
                raise UnsupportedExpression(f"vmap data {data!r}")
            text = f"{_show_key(key)} vmap {_show_value(data, [s.typ for s in key])}"
            return _VMap(lookup, text)
        raise UnsupportedExpression(f"statement {raw!r}")

    def _match(self, body: Mapping[str, Any]) -> _Match:
        op, right = body["op"], body["right"]
        key = _key(body["left"])
        types = [s.typ for s in key]
        if op not in ("==", "!=", "in"):
            raise UnsupportedExpression(f"match operator {op!r}")
        if isinstance(right, str) and right.startswith("@"):
            lookup = self._named(key, right, want_map=False)
        else:
            if isinstance(right, dict) and set(right) == {"set"}:
                items = right["set"]
            elif isinstance(right, list):
                # A list is a flag set (`ct state established,related`); a
                # packet has one ct state, so it is "one of these".
                if types != ["ct_state"]:
                    raise UnsupportedExpression(f"list {right!r} for {_show_key(key)}")
                items = right
            else:
                items = [right]
            if not isinstance(items, list):
                raise UnsupportedExpression(f"set {right!r}")
            elements = tuple(_element(types, item, ranges_ok=True) for item in items)
            lookup = _Lookup(key, "", elements)
        negate = op == "!="
        text = f"{_show_key(key)} {'!= ' if negate else ''}{_show_value(right, types)}"
        return _Match(lookup, negate, text)

    def _named(self, key: tuple[_Selector, ...], ref: str, *, want_map: bool) -> _Lookup:
        target = self.sets.get(ref[1:]) if ref.startswith("@") else None
        if target is None:
            raise InvalidProgram(f"reference to unknown set {ref!r}")
        if target.is_map != want_map:
            raise InvalidProgram(f"{ref} is a {'map' if target.is_map else 'set'}")
        if tuple(s.typ for s in key) != target.types:
            raise InvalidProgram(
                f"{_show_key(key)} looked up in {ref} of type {' . '.join(target.types)}"
            )
        return _Lookup(key, target.name)

    def _check_targets(self) -> None:
        verdicts: list[_Verdict] = [v for s in self.sets.values() for v in s.data]
        for chain in self.chains.values():
            for rule in chain.rules:
                for stmt in rule.stmts:
                    if isinstance(stmt, _Verdict):
                        verdicts.append(stmt)
                    elif isinstance(stmt, _VMap):
                        verdicts.extend(stmt.lookup.data)
        for v in verdicts:
            if v.target:
                target = self.chains.get(v.target)
                if target is None:
                    raise InvalidProgram(f"{v}: no such chain")
                if target.hook is not None:
                    raise InvalidProgram(f"{v}: cannot jump to a base chain")

    # -- tracing --
    def trace(self, packet: Packet) -> Trace:
        values = _packet_values(packet)
        steps = [f"chain {self.base.name} (hook forward, policy {self.base.policy})"]
        stack: list[tuple[_Chain, int]] = []
        chain, index = self.base, 0
        while True:
            if index >= len(chain.rules):
                if not stack:
                    steps.append(f"{chain.name}: end, policy {self.base.policy}")
                    return Trace(self.base.policy, steps)
                steps.append(f"{chain.name}: end of chain, return")
                chain, index = stack.pop()
                continue
            rule = chain.rules[index]
            index += 1
            verdict, note = self._run(rule, values)
            where = f"{chain.name}[{index}] {rule.text}"
            if verdict is None:
                steps.append(f"{where}: {note}")
                continue
            steps.append(f"{where}: {note or 'match'} -> {verdict}")
            if verdict.kind in ("accept", "drop"):
                return Trace(verdict.kind, steps)  # type: ignore[arg-type]
            if verdict.kind == "continue":
                continue
            if verdict.kind == "return":
                if not stack:
                    steps.append(f"return from the base chain, policy {self.base.policy}")
                    return Trace(self.base.policy, steps)
                chain, index = stack.pop()
                continue
            if verdict.kind == "jump":
                stack.append((chain, index))
                if len(stack) > MAX_JUMP_DEPTH:
                    raise InvalidProgram(f"jump stack deeper than {MAX_JUMP_DEPTH}: a loop?")
            chain, index = self.chains[verdict.target], 0

    def _run(self, rule: _Rule, values: Mapping[str, Scalar]) -> tuple[_Verdict | None, str]:
        """The rule's verdict for the packet (None: go on), and a note for the trace."""
        for stmt in rule.stmts:
            if stmt is None or isinstance(stmt, _Verdict):
                if stmt is not None:
                    return stmt, ""
                continue
            try:
                found = self._find(stmt.lookup, values)
            except _NotApplicable as exc:
                return None, f"no match ({exc})"
            if isinstance(stmt, _Match):
                if (found is None) != stmt.negate:
                    return None, f"no match ({stmt.text})"
                continue
            if found is None:
                return None, f"no element for {_show_key(stmt.lookup.key)}"
            lookup = stmt.lookup
            data = self.sets[lookup.set_name].data if lookup.set_name else lookup.data
            return data[found], f"{_show_key(stmt.lookup.key)} found"
        return None, "match, no verdict"

    def _find(self, lookup: _Lookup, values: Mapping[str, Scalar]) -> int | None:
        """The index of the element that holds the packet's key, or None."""
        key = tuple(_value(values, s) for s in lookup.key)
        if lookup.set_name:
            return self.sets[lookup.set_name].find(key)
        for i, element in enumerate(lookup.elements):
            if _contains(element, key):
                return i
        return None


def _value(values: Mapping[str, Scalar], sel: _Selector) -> Scalar:
    value = values.get(sel.reads or sel.name)
    if value is None:
        raise _NotApplicable(f"{sel.name} on an {values['meta nfproto']} packet")
    if sel.mask is not None:
        return int(value) & sel.mask
    return value


def _show_stmt(stmt: _Stmt) -> str:
    if isinstance(stmt, _Match | _VMap):
        return stmt.text
    return str(stmt)


def _only_keys(spec: Mapping[str, Any], allowed: Iterable[str], what: str) -> None:
    extra = set(spec) - set(allowed)
    if extra:
        raise UnsupportedExpression(f"{what} with {sorted(extra)}: {dict(spec)!r}")


def _packet_values(packet: Packet) -> dict[str, Scalar]:
    try:
        src = ipaddress.ip_address(packet.src_ip)
        dst = ipaddress.ip_address(packet.dst_ip)
    except ValueError as exc:
        raise ValueError(f"packet address: {exc}") from None
    if src.version != dst.version:
        raise ValueError(f"packet from {src} to {dst}: IPv4 and IPv6 never mix")
    if not 0 <= packet.l4proto <= 255:
        raise ValueError(f"l4proto {packet.l4proto} is not 0..255")
    if not (0 <= packet.sport <= 65535 and 0 <= packet.dport <= 65535):
        raise ValueError(f"ports {packet.sport}, {packet.dport} are not 0..65535")
    if packet.ct_state not in _CT_STATES:
        raise ValueError(f"ct state {packet.ct_state!r}")
    if not 0 <= packet.ct_mark <= 0xFFFFFFFF:
        raise ValueError(f"ct mark {packet.ct_mark} is not a 32-bit value")
    ip = "ip" if src.version == 4 else "ip6"
    return {
        "iifname": packet.iifname,
        "oifname": packet.oifname,
        "meta nfproto": "ipv4" if src.version == 4 else "ipv6",
        "meta l4proto": packet.l4proto,
        f"{ip} saddr": int(src),
        f"{ip} daddr": int(dst),
        "th sport": packet.sport,
        "th dport": packet.dport,
        "ct state": packet.ct_state,
        "ct mark": packet.ct_mark,
    }


def trace(program: Mapping[str, Any], packet: Packet) -> Trace:
    """Build the ruleset from `program` ({"nftables": [...]}) and trace one packet."""
    return Ruleset(program).trace(packet)
