"""Element-only nft batches as nfnetlink bytes, and the kernel's answers parsed.

Why: a one-rule change is a few element commands, but libnftables first reads the
table's tables, chains and every set into its cache (one dump each, ~1,700 sets at
500 ENIs) before it can send them. The namespace worker can send the same batch
itself: one NFNL_MSG_BATCH_BEGIN .. NEWSETELEM / DELSETELEM .. BATCH_END message,
one kernel transaction, all or nothing, exactly as nft sends it
(docs/kernel-notes.md §"Element batches over nfnetlink").

This module is pure (bytes in, bytes out); `agent/nft_fastpath.py` owns the socket.
Only what the layout uses is encoded: fields `inet_proto`, `ipv4_addr`,
`ipv6_addr`, `inet_service`, `ifname`; plain sets and concatenations, concatenated
intervals (pipapo: key + key_end), verdict maps. Anything else raises
`Unsupported` before a byte is sent, and the caller sends the batch through
libnftables instead (never half of it one way and half the other).
"""

from __future__ import annotations

import ipaddress
import struct
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

# <linux/netlink.h>, <linux/netfilter/nfnetlink.h>, <linux/netfilter/nf_tables.h>
NLMSG_ERROR = 2
NLMSG_DONE = 3
NLM_F_REQUEST = 0x1
NLM_F_ACK = 0x4
NLM_F_CREATE = 0x400
NLM_F_CAPPED = 0x100
NLM_F_ACK_TLVS = 0x200
NLMSGERR_ATTR_MSG = 1
NFNL_MSG_BATCH_BEGIN = 0x10
NFNL_MSG_BATCH_END = 0x11
NFNL_SUBSYS_NFTABLES = 10
NFT_MSG_NEWSET = 9
NFT_MSG_GETSET = 10
NFT_MSG_NEWSETELEM = 12
NFT_MSG_DELSETELEM = 14

NFTA_SET_TABLE = 1
NFTA_SET_NAME = 2
NFTA_SET_FLAGS = 3
NFTA_SET_KEY_TYPE = 4
NFTA_SET_KEY_LEN = 5
NFTA_SET_DATA_TYPE = 6
NFTA_SET_DATA_LEN = 7

NFTA_SET_ELEM_LIST_TABLE = 1
NFTA_SET_ELEM_LIST_SET = 2
NFTA_SET_ELEM_LIST_ELEMENTS = 3
NFTA_LIST_ELEM = 1
NFTA_SET_ELEM_KEY = 1
NFTA_SET_ELEM_DATA = 2
NFTA_SET_ELEM_KEY_END = 10
NFTA_DATA_VALUE = 1
NFTA_DATA_VERDICT = 2
NFTA_VERDICT_CODE = 1
NFTA_VERDICT_CHAIN = 2
NLA_F_NESTED = 0x8000

NFT_SET_INTERVAL = 0x4
NFT_SET_MAP = 0x8
NFT_SET_CONCAT = 0x80
NFT_DATA_VERDICT = 0xFFFFFF00

FAMILIES = {"ip": 2, "ip6": 10, "inet": 1, "arp": 3, "bridge": 7, "netdev": 5}

# nft's datatype ids (src/datatype.h) as the kernel stores them in NFTA_SET_KEY_TYPE;
# a concatenation packs its fields' ids 6 bits each, the first field highest.
TYPE_IPADDR = 7
TYPE_IP6ADDR = 8
TYPE_INET_PROTOCOL = 12
TYPE_INET_SERVICE = 13
TYPE_IFNAME = 41
_TYPE_BITS = 6
# Field type -> bytes of the value (each field is padded to 4 bytes in a key).
FIELD_BYTES = {
    TYPE_INET_PROTOCOL: 1,
    TYPE_IPADDR: 4,
    TYPE_INET_SERVICE: 2,
    TYPE_IP6ADDR: 16,
    TYPE_IFNAME: 16,
}
VERDICTS = {"accept": 1, "drop": 0, "continue": -1, "return": -5, "jump": -3, "goto": -4}
# The protocol names nft accepts in place of a number (the writer sends numbers).
_PROTO_NAMES = {"icmp": 1, "tcp": 6, "udp": 17, "gre": 47, "esp": 50, "ah": 51, "icmpv6": 58}
_IFNAMSIZ = 16

_NLMSGHDR = struct.Struct("=IHHII")  # len, type, flags, seq, port id
_NFGENMSG = struct.Struct(">BBH")  # family, version, res_id (big endian)
_NLATTR = struct.Struct("=HH")
# The element list of one message is one attribute, whose length is 16 bits: a
# set's elements are split over several messages (of the same batch) below this.
_ELEMENTS_PER_MESSAGE_BYTES = 48 * 1024


class Unsupported(Exception):
    """This batch is not for the netlink path (nothing was sent); use libnftables."""


@dataclass(frozen=True, slots=True)
class SetInfo:
    """A set as the kernel describes it (NFT_MSG_NEWSET), what encoding needs."""

    name: str
    flags: int
    key_type: int
    key_len: int
    data_type: int | None = None
    data_len: int = 0

    def fields(self) -> tuple[int, ...]:
        """The datatype ids of the key's fields, first field first. nft's own ids are
        below 64, so a larger id is a concatenation (the CONCAT flag comes only with
        intervals, and a plain concatenation has no field description)."""
        if self.key_type >> _TYPE_BITS == 0:
            return (self.key_type,)
        out: list[int] = []
        rest = self.key_type
        while rest:
            out.append(rest & ((1 << _TYPE_BITS) - 1))
            rest >>= _TYPE_BITS
        return tuple(reversed(out))


@dataclass(frozen=True, slots=True)
class ElementOp:
    """One `add element` / `delete element` command of the batch."""

    add: bool
    family: str
    table: str
    set: str
    elements: tuple[Any, ...]


def element_ops(commands: Iterable[dict[str, Any]]) -> list[ElementOp] | None:
    """The batch as element operations, None if any command is something else."""
    ops: list[ElementOp] = []
    for command in commands:
        if not isinstance(command, dict) or len(command) != 1:
            return None
        verb, body = next(iter(command.items()))
        if verb not in ("add", "delete") or not isinstance(body, dict) or len(body) != 1:
            return None
        obj = body.get("element")
        if not isinstance(obj, dict) or set(obj) != {"family", "table", "name", "elem"}:
            return None
        elem = obj["elem"]
        if obj["family"] not in FAMILIES or not isinstance(elem, list):
            return None
        ops.append(ElementOp(verb == "add", obj["family"], obj["table"], obj["name"], tuple(elem)))
    return ops


# -- values ----------------------------------------------------------------------------


def _addr(text: Any, version: int) -> int:
    if not isinstance(text, str):
        raise Unsupported(f"address {text!r}")
    try:
        addr = ipaddress.ip_address(text)
    except ValueError as exc:
        raise Unsupported(f"address {text!r}") from exc
    if addr.version != version:
        raise Unsupported(f"address {text!r} is not IPv{version}")
    return int(addr)


def _number(value: Any, bits: int, names: dict[str, int] | None = None) -> int:
    if isinstance(value, str) and names is not None and value in names:
        return names[value]
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 1 << bits:
        raise Unsupported(f"value {value!r}")
    return value


def field_span(field_type: int, atom: Any) -> tuple[bytes, bytes]:
    """(first, last) value of one key field, unpadded, in the kernel's byte order."""
    if field_type == TYPE_IFNAME:
        if not isinstance(atom, str):
            raise Unsupported(f"interface name {atom!r}")
        raw = atom.encode()
        if not raw or len(raw) >= _IFNAMSIZ or b"\0" in raw or raw.endswith(b"*"):
            raise Unsupported(f"interface name {atom!r}")
        value = raw.ljust(_IFNAMSIZ, b"\0")
        return value, value
    size = FIELD_BYTES.get(field_type)
    if size is None:
        raise Unsupported(f"field type {field_type}")
    if field_type in (TYPE_IPADDR, TYPE_IP6ADDR):
        version = 4 if field_type == TYPE_IPADDR else 6
        bits = 32 if version == 4 else 128
        if isinstance(atom, dict) and set(atom) == {"prefix"}:
            prefix = atom["prefix"]
            if not isinstance(prefix, dict) or set(prefix) != {"addr", "len"}:
                raise Unsupported(f"prefix {atom!r}")
            length = _number(prefix["len"], 8)
            if length > bits:
                raise Unsupported(f"prefix {atom!r}")
            host = (1 << (bits - length)) - 1
            lo = _addr(prefix["addr"], version)
            if lo & host:
                raise Unsupported(f"prefix {atom!r} has host bits")  # nft would mask them
            hi = lo | host
        elif isinstance(atom, dict) and set(atom) == {"range"}:
            pair = atom["range"]
            if not isinstance(pair, list) or len(pair) != 2:
                raise Unsupported(f"range {atom!r}")
            lo, hi = _addr(pair[0], version), _addr(pair[1], version)
        else:
            lo = hi = _addr(atom, version)
    else:
        bits = size * 8
        names = _PROTO_NAMES if field_type == TYPE_INET_PROTOCOL else None
        if isinstance(atom, dict) and set(atom) == {"range"}:
            pair = atom["range"]
            if not isinstance(pair, list) or len(pair) != 2:
                raise Unsupported(f"range {atom!r}")
            lo, hi = _number(pair[0], bits, names), _number(pair[1], bits, names)
        else:
            lo = hi = _number(atom, bits, names)
    if lo > hi:
        raise Unsupported(f"empty range {atom!r}")
    return lo.to_bytes(size, "big"), hi.to_bytes(size, "big")


def _pad4(raw: bytes) -> bytes:
    return raw + b"\0" * (-len(raw) % 4)


def encode_key(info: SetInfo, key: Any) -> tuple[bytes, bytes | None]:
    """(key, key_end or None) of one element, as nft 1.0.6 sends it: each field padded
    to 4 bytes, network byte order; concatenated intervals carry both ends always."""
    fields = info.fields()
    if len(fields) > 1:
        if not isinstance(key, dict) or set(key) != {"concat"}:
            raise Unsupported(f"key {key!r} of a concatenation")
        atoms = key["concat"]
        if not isinstance(atoms, list) or len(atoms) != len(fields):
            raise Unsupported(f"key {key!r} has the wrong number of fields")
    else:
        atoms = [key]
    first = bytearray()
    last = bytearray()
    for field_type, atom in zip(fields, atoms, strict=True):
        lo, hi = field_span(field_type, atom)
        first += _pad4(lo)
        last += _pad4(hi)
    if len(first) != info.key_len:
        raise Unsupported(f"key of {len(first)} bytes for a set of {info.key_len}")
    if info.flags & NFT_SET_INTERVAL:
        return bytes(first), bytes(last)
    if first != last:
        raise Unsupported(f"range {key!r} in a set without intervals")
    return bytes(first), None


def _attr(kind: int, payload: bytes) -> bytes:
    return _NLATTR.pack(_NLATTR.size + len(payload), kind) + _pad4(payload)


def _nest(kind: int, payload: bytes) -> bytes:
    return _attr(kind | NLA_F_NESTED, payload)


def _string(kind: int, text: str) -> bytes:
    return _attr(kind, text.encode() + b"\0")


def encode_verdict(verdict: Any) -> bytes:
    """NFTA_DATA_VERDICT of a map element (`{"jump": {"target": c}}`, `{"accept": null}`)."""
    if not isinstance(verdict, dict) or len(verdict) != 1:
        raise Unsupported(f"verdict {verdict!r}")
    kind, arg = next(iter(verdict.items()))
    code = VERDICTS.get(kind)
    if code is None:
        raise Unsupported(f"verdict {verdict!r}")
    body = _attr(NFTA_VERDICT_CODE, struct.pack(">i", code))
    if kind in ("jump", "goto"):
        target = arg.get("target") if isinstance(arg, dict) else None
        if not isinstance(target, str) or not target or set(arg) != {"target"}:
            raise Unsupported(f"verdict {verdict!r}")
        body += _string(NFTA_VERDICT_CHAIN, target)
    elif arg is not None:
        raise Unsupported(f"verdict {verdict!r}")
    return _nest(NFTA_DATA_VERDICT, body)


def encode_element(info: SetInfo, elem: Any, add: bool) -> bytes:
    """One NFTA_LIST_ELEM of NFTA_SET_ELEM_LIST_ELEMENTS."""
    is_map = bool(info.flags & NFT_SET_MAP)
    verdict = None
    if is_map and add:
        if not isinstance(elem, list) or len(elem) != 2:
            raise Unsupported(f"map element {elem!r}")
        elem, verdict = elem
    key, key_end = encode_key(info, elem)
    body = _nest(NFTA_SET_ELEM_KEY, _attr(NFTA_DATA_VALUE, key))
    if key_end is not None:
        body += _nest(NFTA_SET_ELEM_KEY_END, _attr(NFTA_DATA_VALUE, key_end))
    if verdict is not None:
        body += _nest(NFTA_SET_ELEM_DATA, encode_verdict(verdict))
    return _nest(NFTA_LIST_ELEM, body)


def check_set(info: SetInfo) -> None:
    """Refuse the set kinds this encoder does not write exactly as nft does."""
    known = NFT_SET_INTERVAL | NFT_SET_MAP | NFT_SET_CONCAT
    if info.flags & ~known:
        raise Unsupported(f"set {info.name} has flags {info.flags:#x}")
    if info.flags & NFT_SET_INTERVAL and not info.flags & NFT_SET_CONCAT:
        # A one-field interval set (rbtree) takes start and end elements with
        # flags, and nft merges and splits intervals in userspace: not done here.
        raise Unsupported(f"set {info.name} is a one-field interval set")
    if info.flags & NFT_SET_MAP and info.data_type != NFT_DATA_VERDICT:
        raise Unsupported(f"map {info.name} is not a verdict map")
    if any(t not in FIELD_BYTES for t in info.fields()):
        raise Unsupported(f"set {info.name} has key type {info.key_type:#x}")


# -- messages ----------------------------------------------------------------------------


def message(kind: int, flags: int, seq: int, family: int, payload: bytes, res_id: int = 0) -> bytes:
    body = _NFGENMSG.pack(family, 0, res_id) + payload
    return _NLMSGHDR.pack(_NLMSGHDR.size + len(body), kind, flags, seq, 0) + body


def getset_request(family: str, table: str, name: str, seq: int) -> bytes:
    payload = _string(NFTA_SET_TABLE, table) + _string(NFTA_SET_NAME, name)
    kind = (NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_GETSET
    return message(kind, NLM_F_REQUEST | NLM_F_ACK, seq, FAMILIES[family], payload)


def batch(ops: list[ElementOp], sets: dict[tuple[str, str, str], SetInfo], seq: int) -> list[bytes]:
    """The batch's messages, BATCH_BEGIN first and BATCH_END last, sequence numbers from
    `seq` up. Each element message asks for an ACK. Raises Unsupported."""
    # BEGIN/END name the subsystem in res_id; no ACK asked of them (older kernels
    # never send one).
    begin = message(NFNL_MSG_BATCH_BEGIN, NLM_F_REQUEST, seq, 0, b"", res_id=NFNL_SUBSYS_NFTABLES)
    out = [begin]
    for op in ops:
        info = sets[(op.family, op.table, op.set)]
        kind = (NFNL_SUBSYS_NFTABLES << 8) | (NFT_MSG_NEWSETELEM if op.add else NFT_MSG_DELSETELEM)
        flags = NLM_F_REQUEST | NLM_F_ACK | (NLM_F_CREATE if op.add else 0)
        head = _string(NFTA_SET_ELEM_LIST_TABLE, op.table) + _string(NFTA_SET_ELEM_LIST_SET, op.set)
        for chunk in _chunks(encode_element(info, e, op.add) for e in op.elements):
            seq += 1
            payload = head + _nest(NFTA_SET_ELEM_LIST_ELEMENTS, chunk)
            out.append(message(kind, flags, seq, FAMILIES[op.family], payload))
    seq += 1
    out.append(message(NFNL_MSG_BATCH_END, NLM_F_REQUEST, seq, 0, b"", res_id=NFNL_SUBSYS_NFTABLES))
    return out


def _chunks(encoded: Iterable[bytes]) -> Iterator[bytes]:
    chunk = bytearray()
    for piece in encoded:
        if chunk and len(chunk) + len(piece) > _ELEMENTS_PER_MESSAGE_BYTES:
            yield bytes(chunk)
            chunk = bytearray()
        chunk += piece
    if chunk:
        yield bytes(chunk)


# -- answers -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Reply:
    """One message from the kernel: an ACK/error (`error` set) or a NEWSET."""

    kind: int
    seq: int
    error: int | None = None  # 0: ACK; negative errno otherwise
    text: str = ""  # the kernel's extended ACK message, if any
    set_info: SetInfo | None = None


def attributes(data: bytes) -> dict[int, bytes]:
    out: dict[int, bytes] = {}
    at = 0
    while at + _NLATTR.size <= len(data):
        length, kind = _NLATTR.unpack_from(data, at)
        if length < _NLATTR.size or at + length > len(data):
            break
        out[kind & 0x3FFF] = data[at + _NLATTR.size : at + length]
        at += (length + 3) & ~3
    return out


def parse_replies(data: bytes) -> Iterator[Reply]:
    """The messages of one datagram read from the socket."""
    offset = 0
    while offset + _NLMSGHDR.size <= len(data):
        length, kind, flags, seq, _port = _NLMSGHDR.unpack_from(data, offset)
        if length < _NLMSGHDR.size or offset + length > len(data):
            return
        body = data[offset + _NLMSGHDR.size : offset + length]
        if kind == NLMSG_ERROR and len(body) >= 4 + _NLMSGHDR.size:
            (error,) = struct.unpack_from("=i", body)
            orig_len, _k, _f, orig_seq, _p = _NLMSGHDR.unpack_from(body, 4)
            text = ""
            if flags & NLM_F_ACK_TLVS:
                # The original message follows the error code: its header alone
                # when capped (NETLINK_CAP_ACK, or any ACK), whole otherwise; then
                # the TLVs.
                capped = 4 + (_NLMSGHDR.size if flags & NLM_F_CAPPED else orig_len)
                tlvs = attributes(body[(capped + 3) & ~3 :])
                text = tlvs.get(NLMSGERR_ATTR_MSG, b"").split(b"\0", 1)[0].decode(errors="replace")
            yield Reply(kind, orig_seq, error=error, text=text)
        elif kind == (NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_NEWSET:
            yield Reply(kind, seq, set_info=parse_set(body[_NFGENMSG.size :]))
        else:
            yield Reply(kind, seq)
        offset += (length + 3) & ~3


def _u32(raw: bytes | None, default: int = 0) -> int:
    return int.from_bytes(raw, "big") if raw is not None and len(raw) == 4 else default


def parse_set(payload: bytes) -> SetInfo:
    attrs = attributes(payload)
    data_type = attrs.get(NFTA_SET_DATA_TYPE)
    return SetInfo(
        name=attrs.get(NFTA_SET_NAME, b"").split(b"\0", 1)[0].decode(errors="replace"),
        flags=_u32(attrs.get(NFTA_SET_FLAGS)),
        key_type=_u32(attrs.get(NFTA_SET_KEY_TYPE)),
        key_len=_u32(attrs.get(NFTA_SET_KEY_LEN)),
        data_type=None if data_type is None else _u32(data_type),
        data_len=_u32(attrs.get(NFTA_SET_DATA_LEN)),
    )
