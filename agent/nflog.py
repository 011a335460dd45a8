"""Denied-flow logs: an nfnetlink_log reader in the router namespaces.

The compiled program (translators/compiler.py `DeniedLog`) copies packets about to
be dropped by a logged group's profile chain to NFLOG group G, prefixed
`nftsg:<profile>:<in|out>`, rate-limited per rule in the kernel. One socket per
router namespace (a netlink socket belongs to the namespace of the thread that
creates it) is bound to G; one thread waits on all of them (selectors) and turns
each packet into a record: the ENI (by the interface of the side, looked up in
that namespace), the direction (from the prefix), the flow (from the packet's
headers) and the deciding rule or the default. The deciding rule is read from the
compiled program when it has labelled (counted) sets, which is what the kernel
matched; otherwise from the reference evaluator, which the flat program decides
exactly as (tests/test_trace_vs_evaluator.py). An agent-side token bucket limits
the records written; the rest are counted as suppressed.

Records go to the `nftsg.denied` logger (journald fields when run by systemd) and,
if asked, one JSON object per line to `denied-flows.jsonl` in the state directory.
"""

from __future__ import annotations

import errno
import ipaddress
import json
import logging
import selectors
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nftsg.translators.compiler import LOG_PREFIX
from nftsg.translators.counters import DEFAULT, attribute
from nftsg.translators.evaluator import Flow, evaluate_side
from nftsg.translators.network import Network
from nftsg.translators.nft import Program

from . import netns

log = logging.getLogger("nftsg.denied")

NETLINK_NETFILTER = 12
NFNL_SUBSYS_ULOG = 4
NFULNL_MSG_PACKET = NFNL_SUBSYS_ULOG << 8 | 0
NFULNL_MSG_CONFIG = NFNL_SUBSYS_ULOG << 8 | 1
NFULA_CFG_CMD = 1
NFULA_CFG_MODE = 2
NFULNL_CFG_CMD_BIND = 1
NFULNL_COPY_PACKET = 2
NFULA_IFINDEX_INDEV = 4
NFULA_IFINDEX_OUTDEV = 5
NFULA_PAYLOAD = 9
NFULA_PREFIX = 10
NLM_F_REQUEST = 1
NLM_F_ACK = 4
NLMSG_ERROR = 2
COPY_RANGE = 128  # IP header + ports is all a record needs
RECORDS_FILE = "denied-flows.jsonl"

_PORTED = {6, 17, 33, 132}  # TCP, UDP, DCCP, SCTP: ports first in the header


def _nlmsg(msg_type: int, flags: int, seq: int, family: int, res_id: int, attrs: bytes) -> bytes:
    body = struct.pack("=BBH", family, 0, socket.htons(res_id)) + attrs
    return struct.pack("=IHHII", 16 + len(body), msg_type, flags, seq, 0) + body


def _attr(kind: int, value: bytes) -> bytes:
    raw = struct.pack("=HH", 4 + len(value), kind) + value
    return raw + b"\0" * (-len(raw) % 4)


def config_messages(group: int) -> list[bytes]:
    """Bind to `group` and ask for the first COPY_RANGE bytes of each packet."""
    bind = _attr(NFULA_CFG_CMD, bytes([NFULNL_CFG_CMD_BIND]))
    mode = _attr(NFULA_CFG_MODE, struct.pack(">IBx", COPY_RANGE, NFULNL_COPY_PACKET))
    flags = NLM_F_REQUEST | NLM_F_ACK
    return [
        _nlmsg(NFULNL_MSG_CONFIG, flags, 1, socket.AF_UNSPEC, group, bind),
        _nlmsg(NFULNL_MSG_CONFIG, flags, 2, socket.AF_UNSPEC, group, mode),
    ]


@dataclass(frozen=True)
class Logged:
    """One NFLOG packet message: what the kernel said."""

    family: int
    prefix: str
    indev: int | None
    outdev: int | None
    payload: bytes


def parse_messages(data: bytes) -> Iterator[Logged]:
    """The packet messages of one netlink datagram (others are skipped; an error
    message with a non-zero code raises OSError)."""
    off = 0
    while off + 16 <= len(data):
        length, msg_type, _flags, _seq, _pid = struct.unpack_from("=IHHII", data, off)
        if length < 16 or off + length > len(data):
            return
        body = data[off + 16 : off + length]
        off += (length + 3) & ~3
        if msg_type == NLMSG_ERROR:
            (code,) = struct.unpack_from("=i", body, 0)
            if code:
                raise OSError(-code, f"nfnetlink_log: {errno.errorcode.get(-code, code)}")
            continue
        if msg_type != NFULNL_MSG_PACKET or len(body) < 4:
            continue
        family = body[0]
        attrs: dict[int, bytes] = {}
        a = 4
        while a + 4 <= len(body):
            alen, akind = struct.unpack_from("=HH", body, a)
            if alen < 4:
                break
            attrs[akind & 0x3FFF] = body[a + 4 : a + alen]
            a += (alen + 3) & ~3
        prefix = attrs.get(NFULA_PREFIX, b"").split(b"\0", 1)[0].decode("ascii", "replace")
        indev = attrs.get(NFULA_IFINDEX_INDEV)
        outdev = attrs.get(NFULA_IFINDEX_OUTDEV)
        yield Logged(
            family,
            prefix,
            struct.unpack(">I", indev)[0] if indev else None,
            struct.unpack(">I", outdev)[0] if outdev else None,
            attrs.get(NFULA_PAYLOAD, b""),
        )


def flow_of(payload: bytes) -> Flow | None:
    """The flow of an IPv4/IPv6 packet's first bytes (no IPv6 extension headers)."""
    if not payload:
        return None
    version = payload[0] >> 4
    if version == 4 and len(payload) >= 20:
        ihl = (payload[0] & 0xF) * 4
        proto = payload[9]
        src: Any = ipaddress.IPv4Address(payload[12:16])
        dst: Any = ipaddress.IPv4Address(payload[16:20])
        l4 = payload[ihl:]
    elif version == 6 and len(payload) >= 40:
        proto = payload[6]
        src = ipaddress.IPv6Address(payload[8:24])
        dst = ipaddress.IPv6Address(payload[24:40])
        l4 = payload[40:]
    else:
        return None
    sport = dport = 0
    if proto in _PORTED and len(l4) >= 4:
        sport, dport = struct.unpack_from(">HH", l4, 0)
    return Flow(src_ip=src, dst_ip=dst, protocol=proto, dport=dport, sport=sport)


_PROTO_NAMES = {1: "icmp", 6: "tcp", 17: "udp", 47: "gre", 58: "icmpv6"}


def record_of(
    logged: Logged,
    namespace: str,
    ifnames: Callable[[int], str | None],
    network: Network | None,
    program: Program | None,
) -> dict[str, Any] | None:
    """The record of one logged packet; None when the prefix is not ours."""
    parts = logged.prefix.split(":")
    if len(parts) != 3 or parts[0] != LOG_PREFIX or parts[2] not in ("in", "out"):
        return None
    profile, side = parts[1], parts[2]
    direction = "ingress" if side == "in" else "egress"
    # The ENI's port: the sender's for egress, the receiver's for ingress.
    ifindex = logged.outdev if direction == "ingress" else logged.indev
    ifname = ifnames(ifindex) if ifindex is not None else None
    flow = flow_of(logged.payload)
    rec: dict[str, Any] = {
        "router": namespace,
        "direction": direction,
        "profile": profile,
        "ifname": ifname,
        "eni_id": None,
    }
    if flow is not None:
        rec.update(
            protocol=_PROTO_NAMES.get(flow.protocol, str(flow.protocol)),
            src=str(flow.src_ip),
            dst=str(flow.dst_ip),
            sport=flow.sport,
            dport=flow.dport,
        )
    eni = None
    if network is not None and ifname is not None:
        eni = next((e for e in network.enis.values() if e.ifname == ifname), None)
    if eni is None or flow is None or network is None:
        rec["decided_by"] = "unknown"
        return rec
    rec["eni_id"] = eni.eni_id
    decided = _by_program(program, profile, side, flow, direction)
    if decided is None:
        side_decision = evaluate_side(network, eni, direction, flow)  # type: ignore[arg-type]
        if side_decision.rule is not None:
            decided = (side_decision.rule.group_id, side_decision.rule.rule_id)
        else:
            decided = DEFAULT
    if isinstance(decided, str):  # DEFAULT
        rec["decided_by"] = "default"
    else:
        group_id, rule_id = decided
        rec.update(decided_by="rule", security_group_id=group_id or None, rule_id=rule_id)
        rec["decided_from"] = "program" if not group_id else "evaluator"
    return rec


def _by_program(
    program: Program | None, profile: str, side: str, flow: Flow, direction: str
) -> tuple[str, str] | str | None:
    """The deciding rule as the kernel matched it: the labelled element of the
    profile chain holding the packet (counted programs only), else None."""
    if program is None:
        return None
    chain = f"{side}_{profile}"
    if chain not in program.chain_by_name:
        return None
    peer, local = (
        (flow.dst_ip, flow.src_ip) if direction == "egress" else (flow.src_ip, flow.dst_ip)
    )
    fam = "ipv4" if flow.src_ip.version == 4 else "ipv6"
    sport, dport = (flow.sport, flow.dport) if flow.protocol in _PORTED else (0, 0)
    got = attribute(program, chain, fam, (flow.protocol, int(peer), dport, sport, int(local)))
    if got is None or got == DEFAULT:
        return got
    # Labels are rule ids; the group is found through the rule id (unique in a model).
    return ("", got)


class TokenBucket:
    """At most `rate` records per second, bursts of `rate`."""

    def __init__(self, rate: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.rate = rate
        self.clock = clock
        self.tokens = rate
        self.at = clock()

    def take(self) -> bool:
        now = self.clock()
        self.tokens = min(self.rate, self.tokens + (now - self.at) * self.rate)
        self.at = now
        if self.tokens >= 1:
            self.tokens -= 1
            return True
        return False


class DeniedFlowLog:
    """The reader: sockets per router namespace, one thread, records out."""

    def __init__(
        self,
        group: int,
        rate: float,
        records_path: Path | None,
        context: Callable[[str], tuple[Network | None, Program | None]],
    ) -> None:
        self.group = group
        self.bucket = TokenBucket(rate)
        self.records_path = records_path
        self.context = context  # namespace -> (model, program applied there)
        self.selector = selectors.DefaultSelector()
        self.sockets: dict[str, socket.socket] = {}
        self.records = 0
        self.suppressed = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._ifnames: dict[tuple[str, int], str] = {}

    def watch(self, namespace: str) -> None:
        """Bind a socket to the group in `namespace` (once)."""
        with self._lock:
            if namespace in self.sockets:
                return
            sock = netns.run_in(namespace, _bound_socket, self.group)
            self.sockets[namespace] = sock
            self.selector.register(sock, selectors.EVENT_READ, namespace)
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="nflog", daemon=True)
            self._thread.start()

    def forget(self, namespace: str) -> None:
        with self._lock:
            sock = self.sockets.pop(namespace, None)
            if sock is not None:
                self.selector.unregister(sock)
                sock.close()

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=2)
        for ns in list(self.sockets):
            self.forget(ns)

    def _ifname(self, namespace: str, index: int) -> str | None:
        got = self._ifnames.get((namespace, index))
        if got is None:
            with netns.iproute(namespace) as ipr:
                links = ipr.get_links(index)
                got = links[0].get_attr("IFLA_IFNAME") if links else None
            if got is not None:
                self._ifnames[(namespace, index)] = got
        return got

    def _run(self) -> None:
        while not self._stop.is_set():
            for key, _ in self.selector.select(timeout=0.2):
                namespace = key.data
                sock = key.fileobj
                assert isinstance(sock, socket.socket)
                try:
                    data = sock.recv(65536)
                except BlockingIOError:
                    continue
                except OSError as exc:  # ENOBUFS: the kernel dropped some; go on
                    log.warning("denied-flow log: %s in %s", exc, namespace)
                    continue
                try:
                    self.handle(namespace, data)
                except Exception:
                    log.exception("denied-flow log: cannot read a record in %s", namespace)

    def handle(self, namespace: str, data: bytes) -> None:
        network, program = self.context(namespace)
        for logged in parse_messages(data):
            rec = record_of(
                logged, namespace, lambda i: self._ifname(namespace, i), network, program
            )
            if rec is None:
                continue
            if rec.get("decided_by") == "rule":
                group_id, description = _rule_of(network, rec["rule_id"])
                rec["security_group_id"] = rec.get("security_group_id") or group_id
                rec["rule_description"] = description
            self.emit(rec)

    def emit(self, rec: dict[str, Any]) -> None:
        if not self.bucket.take():
            self.suppressed += 1
            return
        if self.suppressed:
            rec["suppressed_before"] = self.suppressed
            self.suppressed = 0
        rec["time"] = round(time.time(), 3)
        self.records += 1
        who = (
            f"{rec.get('security_group_id')}/{rec.get('rule_id')}"
            if rec.get("decided_by") == "rule"
            else str(rec.get("decided_by"))
        )
        log.info(
            "denied %s %s %s %s:%s -> %s:%s by %s",
            rec.get("eni_id") or rec.get("ifname"),
            rec["direction"],
            rec.get("protocol"),
            rec.get("src"),
            rec.get("sport"),
            rec.get("dst"),
            rec.get("dport"),
            who,
            # Flat extra attributes, for a journal handler that sends them as fields.
            extra={f"denied_{k}": v for k, v in rec.items()},
        )
        if self.records_path is not None:
            with self.records_path.open("a") as f:
                f.write(json.dumps(rec, sort_keys=True) + "\n")


def _rule_of(network: Network | None, rule_id: str) -> tuple[str | None, str | None]:
    """The group and description of a rule id (ids are unique in a model)."""
    if network is not None:
        for g in network.groups.values():
            for r in g.rules:
                if r.rule_id == rule_id:
                    return g.group_id, r.description
    return None, None


def _bound_socket(group: int) -> socket.socket:
    """A NETLINK_NETFILTER socket of the calling thread's namespace, bound to the
    NFLOG group (the kernel acknowledges each config message or says why not)."""
    sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
        sock.bind((0, 0))
        sock.settimeout(2)
        for msg in config_messages(group):
            sock.send(msg)
            for _ in parse_messages(sock.recv(65536)):
                pass  # raises on a non-zero error (EBUSY: another reader has the group)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock
