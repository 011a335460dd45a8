"""A conntrack table dump (IPCTNL_MSG_CT_GET, NLM_F_DUMP) as bytes, and its entries parsed.

Why not pyroute2's `Conntrack.dump_entries`: it cost ~16 ms per dump here even for
an empty table (in the namespace's own thread as well as through its netns helper),
and the agent dumps the router's table after every accepted change to judge the
flows. The request is 20 bytes and an entry's original tuple, mark, status, zone,
id and TCP state are a few attributes each, so the walk is done here and the dump
costs what the table holds (docs/dataplane.md §"Per-change cost: kernel side").
Pure: bytes in, field dicts out; `agent/conntrack.py` owns the socket.
"""

from __future__ import annotations

import socket
import struct
from collections.abc import Iterator
from typing import Any

NLMSG_ERROR = 2
NLMSG_DONE = 3
NLM_F_REQUEST = 0x1
NLM_F_DUMP = 0x300
NFNL_SUBSYS_CTNETLINK = 1
IPCTNL_MSG_CT_NEW = 0
IPCTNL_MSG_CT_GET = 1
IPCTNL_MSG_CT_GET_STATS = 5
CTA_STATS_GLOBAL_ENTRIES = 1

CTA_TUPLE_ORIG = 1
CTA_STATUS = 3
CTA_PROTOINFO = 4
CTA_MARK = 8
CTA_ID = 12
CTA_ZONE = 18
CTA_TUPLE_IP = 1
CTA_TUPLE_PROTO = 2
CTA_IP_V4_SRC, CTA_IP_V4_DST, CTA_IP_V6_SRC, CTA_IP_V6_DST = 1, 2, 3, 4
CTA_PROTO_NUM = 1
CTA_PROTO_SRC_PORT = 2
CTA_PROTO_DST_PORT = 3
# (id, type, code) attributes of ICMP, then of ICMPv6.
_ICMP_ATTRS = {socket.IPPROTO_ICMP: (4, 5, 6), socket.IPPROTO_ICMPV6: (7, 8, 9)}
_PORTED = (socket.IPPROTO_TCP, socket.IPPROTO_UDP)
CTA_PROTOINFO_TCP = 1
CTA_PROTOINFO_TCP_STATE = 1

# The names pyroute2 gave the TCP states (FlowEntry.state kept them).
TCP_STATES = {
    0: "NONE",
    1: "SYN_SENT",
    2: "SYN_RECV",
    3: "ESTABLISHED",
    4: "FIN_WAIT",
    5: "CLOSE_WAIT",
    6: "LAST_ACK",
    7: "TIME_WAIT",
    8: "CLOSE",
    9: "SYN_SENT2",
}

_NLMSGHDR = struct.Struct("=IHHII")
_NFGENMSG = struct.Struct(">BBH")
_NLATTR = struct.Struct("=HH")


def dump_request(seq: int) -> bytes:
    """Dump every entry of every family (AF_UNSPEC)."""
    body = _NFGENMSG.pack(socket.AF_UNSPEC, 0, 0)
    kind = (NFNL_SUBSYS_CTNETLINK << 8) | IPCTNL_MSG_CT_GET
    return (
        _NLMSGHDR.pack(_NLMSGHDR.size + len(body), kind, NLM_F_REQUEST | NLM_F_DUMP, seq, 0) + body
    )


def stats_request(seq: int) -> bytes:
    """How many entries the namespace's table holds (its own count: no table walk)."""
    body = _NFGENMSG.pack(socket.AF_UNSPEC, 0, 0)
    kind = (NFNL_SUBSYS_CTNETLINK << 8) | IPCTNL_MSG_CT_GET_STATS
    return _NLMSGHDR.pack(_NLMSGHDR.size + len(body), kind, NLM_F_REQUEST, seq, 0) + body


def parse_stats(data: bytes, seq: int) -> int | None:
    """The entry count of a CT_GET_STATS answer, None if this datagram has none."""
    offset = 0
    while offset + _NLMSGHDR.size <= len(data):
        length, kind, _flags, got_seq, _port = _NLMSGHDR.unpack_from(data, offset)
        if length < _NLMSGHDR.size or offset + length > len(data):
            break
        body = data[offset + _NLMSGHDR.size : offset + length]
        offset += (length + 3) & ~3
        if got_seq != seq:
            continue
        if kind == NLMSG_ERROR:
            (code,) = struct.unpack_from("=i", body)
            if code:
                raise DumpEnd(code)
        elif kind == (NFNL_SUBSYS_CTNETLINK << 8) | IPCTNL_MSG_CT_GET_STATS:
            raw = _attrs(body[_NFGENMSG.size :]).get(CTA_STATS_GLOBAL_ENTRIES)
            if raw is not None:
                return _int(raw)
    return None


def _attrs(data: bytes) -> dict[int, bytes]:
    out: dict[int, bytes] = {}
    at = 0
    while at + _NLATTR.size <= len(data):
        length, kind = _NLATTR.unpack_from(data, at)
        if length < _NLATTR.size or at + length > len(data):
            break
        out[kind & 0x3FFF] = data[at + _NLATTR.size : at + length]
        at += (length + 3) & ~3
    return out


def _int(raw: bytes | None, default: int = 0) -> int:
    return default if raw is None else int.from_bytes(raw, "big")


class DumpEnd(Exception):
    """The dump ended with an error (negative errno in `code`)."""

    def __init__(self, code: int) -> None:
        super().__init__(f"conntrack dump failed: errno {-code}")
        self.code = code


def parse_dump(data: bytes, seq: int) -> tuple[list[dict[str, Any]], bool]:
    """(entries of IPv4/IPv6 flows in this datagram, whether the dump is complete)."""
    entries: list[dict[str, Any]] = []
    done = False
    offset = 0
    while offset + _NLMSGHDR.size <= len(data):
        length, kind, _flags, got_seq, _port = _NLMSGHDR.unpack_from(data, offset)
        if length < _NLMSGHDR.size or offset + length > len(data):
            break
        body = data[offset + _NLMSGHDR.size : offset + length]
        offset += (length + 3) & ~3
        if got_seq != seq:
            continue
        if kind == NLMSG_DONE:
            done = True
        elif kind == NLMSG_ERROR:
            (code,) = struct.unpack_from("=i", body)
            if code:
                raise DumpEnd(code)
        elif kind == (NFNL_SUBSYS_CTNETLINK << 8) | IPCTNL_MSG_CT_NEW:
            entry = parse_entry(body)
            if entry is not None:
                entries.append(entry)
    return entries, done


def parse_entry(body: bytes) -> dict[str, Any] | None:
    """The FlowEntry fields of one entry, None for a family other than IPv4/IPv6."""
    family = body[0]
    if family not in (socket.AF_INET, socket.AF_INET6):
        return None
    top = _attrs(body[_NFGENMSG.size :])
    orig = _attrs(top.get(CTA_TUPLE_ORIG, b""))
    ip = _attrs(orig.get(CTA_TUPLE_IP, b""))
    proto_attrs = _attrs(orig.get(CTA_TUPLE_PROTO, b""))
    src_key, dst_key = (
        (CTA_IP_V4_SRC, CTA_IP_V4_DST)
        if family == socket.AF_INET
        else (CTA_IP_V6_SRC, CTA_IP_V6_DST)
    )
    src, dst = ip.get(src_key), ip.get(dst_key)
    if src is None or dst is None:
        return None
    proto = _int(proto_attrs.get(CTA_PROTO_NUM))
    icmp = _ICMP_ATTRS.get(proto)
    state = ""
    info = _attrs(top.get(CTA_PROTOINFO, b""))
    if CTA_PROTOINFO_TCP in info:
        raw = _attrs(info[CTA_PROTOINFO_TCP]).get(CTA_PROTOINFO_TCP_STATE)
        state = TCP_STATES.get(_int(raw), "UNKNOWN") if raw is not None else "UNKNOWN"
    zone = top.get(CTA_ZONE)
    ct_id = top.get(CTA_ID)
    out: dict[str, Any] = {
        "family": family,
        "src": socket.inet_ntop(family, src),
        "dst": socket.inet_ntop(family, dst),
        "proto": proto,
        # Ports of TCP and UDP only (as pyroute2 read them; SCTP's are not judged).
        "sport": _int(proto_attrs.get(CTA_PROTO_SRC_PORT)) if proto in _PORTED else 0,
        "dport": _int(proto_attrs.get(CTA_PROTO_DST_PORT)) if proto in _PORTED else 0,
        "mark": _int(top.get(CTA_MARK)),
        "state": state,
        "status": _int(top.get(CTA_STATUS)),
        "zone": _int(zone),
        "icmp_type": None,
        "icmp_code": None,
        "icmp_id": None,
        "ct_id": None if ct_id is None else _int(ct_id),
    }
    if icmp:
        id_attr, type_attr, code_attr = icmp
        out["icmp_id"] = _int(proto_attrs.get(id_attr), 0) if id_attr in proto_attrs else None
        out["icmp_type"] = _int(proto_attrs.get(type_attr)) if type_attr in proto_attrs else None
        out["icmp_code"] = _int(proto_attrs.get(code_attr)) if code_attr in proto_attrs else None
    return out


def walk(chunks: Iterator[bytes], seq: int) -> list[dict[str, Any]]:
    """All entries of a dump read as datagrams from `chunks`, until NLMSG_DONE."""
    entries: list[dict[str, Any]] = []
    for chunk in chunks:
        got, done = parse_dump(chunk, seq)
        entries.extend(got)
        if done:
            return entries
    raise DumpEnd(-5)  # EIO: the socket ended before the dump did
