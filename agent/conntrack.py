"""Listing and cutting conntrack entries in a VPC router namespace.

Removing an allow rule does not stop a flow that conntrack already accepted
(the `ct state established accept` shortcut lets it through). After a change
the agent lists the namespace's flows, asks the reference evaluator about each
original tuple and sets the revoked bit of the conntrack mark on the entries
whose verdict became drop (the forward chain drops flows with that bit, both
ways); entries the model allows again get the bit cleared. Entries are never
deleted: a deleted entry would let the responder start the flow over the other
way round, and could not be revived.

The agent owns one bit of the 32-bit mark (`DEFAULT_CT_MARK_BIT`, configurable);
every other bit belongs to other users of ct marks on the host. The bit is set
and cleared with CTA_MARK_MASK, which the kernel applies to the entry's
current mark (``new = (old & ~mask) ^ mark``) in the one update: no
read-modify-write in user space, so a foreign bit written between our dump
and our update is not undone.

Listing is a plain netlink dump (`agent/ct_wire.py`), preceded by the
namespace's own entry count: a dump walks the conntrack hash all namespaces
share, ~10 ms even for an empty table (docs/kernel-notes.md §Conntrack).
Updates go through pyroute2, whose ``Conntrack(netns=...)`` forks a helper into
the namespace (~7 ms), so one socket per (namespace, address family) is kept
while the `Conntracker` lives. Updates pass the entry's conntrack id, so a flow
that was replaced by a new one with the same tuple in the meantime is left alone.
"""

from __future__ import annotations

import errno
import ipaddress
import logging
import os
import socket
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from nftsg.translators.compiler import DEFAULT_CT_MARK_BIT, check_ct_mark_bit
from nftsg.translators.evaluator import Flow

from . import ct_wire
from .nft_backend import NETNS_DIR, check_namespace_name

log = logging.getLogger(__name__)

_ICMP_PROTOS = (socket.IPPROTO_ICMP, socket.IPPROTO_ICMPV6)
_NETLINK_NETFILTER = 12
# A dump is answered while we read; this only bounds a kernel that stops answering.
_DUMP_TIMEOUT_S = 10.0


class ConntrackError(Exception):
    """Listing or marking conntrack entries failed."""

    def __init__(self, message: str, *, namespace: str) -> None:
        super().__init__(f"{message} (namespace {namespace!r})")
        self.namespace = namespace


@dataclass(frozen=True)
class FlowEntry:
    """The original-direction tuple of one conntrack entry.

    For ICMP and ICMPv6 `sport` and `dport` are 0 (security-group rules match
    ICMP without ports); type, code and id are kept separately.
    """

    family: int  # socket.AF_INET or socket.AF_INET6
    src: str
    dst: str
    proto: int
    sport: int
    dport: int
    mark: int = 0  # the whole 32-bit mark, our bit and other users' bits
    state: str = ""  # TCP state name (ESTABLISHED...), "" for other protocols
    status: int = 0  # IPS_* bits
    zone: int = 0
    icmp_type: int | None = None
    icmp_code: int | None = None
    icmp_id: int | None = None
    ct_id: int | None = None

    @property
    def ipv6(self) -> bool:
        return self.family == socket.AF_INET6


Predicate = Callable[[FlowEntry], bool]


def _entry_to_flow(entry: Any) -> FlowEntry:
    t = entry.tuple_orig
    icmp = t.proto in _ICMP_PROTOS
    state = ""
    if entry.protoinfo is not None:
        state = entry.protoinfo.state_name()
    return FlowEntry(
        family=t.family,
        src=str(t.saddr),
        dst=str(t.daddr),
        proto=int(t.proto),
        sport=0 if icmp or t.sport is None else int(t.sport),
        dport=0 if icmp or t.dport is None else int(t.dport),
        mark=int(entry.mark or 0),
        state=state,
        status=int(entry.status or 0),
        zone=int(entry.zone or 0),
        icmp_type=t.icmp_type if icmp else None,
        icmp_code=t.icmp_code if icmp else None,
        icmp_id=t.icmp_id if icmp else None,
        ct_id=None if entry.id is None else int(entry.id),
    )


class Conntracker:
    """Conntrack sockets for the namespaces in use; close() when done."""

    def __init__(self) -> None:
        self._sockets: dict[tuple[str, int], Any] = {}
        # Plain netlink sockets for dumps, per namespace (agent/ct_wire.py).
        self._dumpers: dict[str, socket.socket] = {}
        self._seq = 0

    def _socket(self, namespace: str, family: int) -> Any:
        key = (namespace, family)
        sock = self._sockets.get(key)
        if sock is None:
            check_namespace_name(namespace)
            if not os.path.exists(os.path.join(NETNS_DIR, namespace)):
                # pyroute2 would create a missing namespace: refuse first.
                raise ConntrackError("namespace does not exist", namespace=namespace)
            from pyroute2 import Conntrack

            # AF_UNSPEC dumps every family; updating needs the entry's own
            # family, because the kernel parses the tuple by it.
            sock = Conntrack(netns=namespace, nfgen_family=family)
            self._sockets[key] = sock
        return sock

    def _dumper(self, namespace: str) -> socket.socket:
        sock = self._dumpers.get(namespace)
        if sock is None:
            check_namespace_name(namespace)
            if not os.path.exists(os.path.join(NETNS_DIR, namespace)):
                raise ConntrackError("namespace does not exist", namespace=namespace)
            from . import netns

            with netns.entered(namespace):
                # A netlink socket belongs to the namespace of the thread creating it.
                sock = socket.socket(
                    socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, _NETLINK_NETFILTER
                )
            try:
                sock.bind((0, 0))
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
                sock.settimeout(_DUMP_TIMEOUT_S)
            except OSError:
                sock.close()
                raise
            self._dumpers[namespace] = sock
        return sock

    def count(self, namespace: str) -> int:
        """How many entries the namespace's conntrack table holds (CT_GET_STATS)."""
        try:
            sock = self._dumper(namespace)
            self._seq = (self._seq + 1) & 0x7FFFFFFF
            seq = self._seq
            sock.sendall(ct_wire.stats_request(seq))
            while True:
                found = ct_wire.parse_stats(sock.recv(1 << 16), seq)
                if found is not None:
                    return found
        except (OSError, ct_wire.DumpEnd) as exc:
            self._drop(namespace)
            raise ConntrackError(
                f"cannot count conntrack entries: {exc}", namespace=namespace
            ) from exc

    def list_flows(self, namespace: str) -> list[FlowEntry]:
        """Every IPv4/IPv6 entry of the namespace's conntrack table (one netlink dump).

        A dump walks the kernel's conntrack hash, which all namespaces share (262,144
        buckets here: ~10 ms of system time per dump even for an empty table), so the
        namespace's own entry count is asked first and an empty table is not walked."""
        if self.count(namespace) == 0:
            log.debug("conntrack of %s: no entries (not walked)", namespace)
            return []
        try:
            sock = self._dumper(namespace)
            self._seq = (self._seq + 1) & 0x7FFFFFFF
            seq = self._seq
            sock.sendall(ct_wire.dump_request(seq))
            entries = ct_wire.walk(iter(lambda: sock.recv(1 << 20), b""), seq)
        except (OSError, ct_wire.DumpEnd) as exc:
            self._drop(namespace)
            raise ConntrackError(
                f"cannot list conntrack entries: {exc}", namespace=namespace
            ) from exc
        log.debug("conntrack of %s: %d entries", namespace, len(entries))
        return [FlowEntry(**e) for e in entries]

    def set_mark_bit(
        self, namespace: str, changes: Iterable[tuple[FlowEntry, bool]], bit: int
    ) -> int:
        """Set (True) or clear (False) `bit` in the mark of each entry, leaving its other
        bits as they are; returns how many entries still existed."""
        from pyroute2.netlink.exceptions import NetlinkError

        check_ct_mark_bit(bit)
        updated = 0
        for flow, on in changes:
            sock = self._socket(namespace, flow.family)
            orig, extra = _tuple_of(flow)
            try:
                # The kernel computes (mark & ~mark_mask) ^ mark: only `bit` changes.
                sock.entry("set", tuple_orig=orig, mark=bit if on else 0, mark_mask=bit, **extra)
            except NetlinkError as exc:
                if exc.code == errno.ENOENT:
                    continue  # timed out or closed meanwhile
                raise ConntrackError(
                    f"cannot mark conntrack entry {flow}: {exc}", namespace=namespace
                ) from exc
            except OSError as exc:
                self._drop(namespace)
                raise ConntrackError(
                    f"cannot mark conntrack entry {flow}: {exc}", namespace=namespace
                ) from exc
            updated += 1
        return updated

    def judge(self, namespace: str, predicate: Predicate, bit: int = DEFAULT_CT_MARK_BIT) -> int:
        """Set `bit` in the mark of every tracked flow that `predicate` rejects, and clear
        it in flows it accepts again. Returns how many flows were newly cut.

        Whether a flow is cut is read from `bit` alone; other bits of the mark belong
        to other users and are neither read nor changed. The ruleset drops flows with
        `bit` set in both directions, so a revoked flow stops at once; its entry stays
        (until it times out), so the responder cannot restart it the other way round,
        and a restored rule revives it.
        """
        changes: list[tuple[FlowEntry, bool]] = []
        for flow in self.list_flows(namespace):
            revoked = bool(flow.mark & bit)
            if predicate(flow) == revoked:  # allowed but cut, or denied but not cut
                changes.append((flow, not revoked))
        cut = sum(on for _, on in changes)
        if changes:
            log.info("%d flow(s) cut, %d revived in %s", cut, len(changes) - cut, namespace)
        self.set_mark_bit(namespace, changes, bit)
        return cut

    def release(self, namespace: str) -> None:
        self._drop(namespace)

    def _drop(self, namespace: str) -> None:
        dumper = self._dumpers.pop(namespace, None)
        if dumper is not None:
            dumper.close()
        for key in [k for k in self._sockets if k[0] == namespace]:
            sock = self._sockets.pop(key)
            try:
                sock.close()
            except OSError:
                log.debug("closing conntrack socket for %s failed", namespace)

    def close(self) -> None:
        for namespace in sorted({k[0] for k in self._sockets} | set(self._dumpers)):
            self._drop(namespace)

    def __enter__(self) -> Conntracker:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _tuple_of(flow: FlowEntry) -> tuple[Any, dict[str, Any]]:
    """The entry's original tuple (and id, zone) as the kernel wants it to find the entry."""
    from pyroute2.netlink.nfnetlink.nfctsocket import NFCTAttrTuple

    icmp = flow.proto in _ICMP_PROTOS
    orig = NFCTAttrTuple(
        family=flow.family,
        saddr=flow.src,
        daddr=flow.dst,
        proto=flow.proto,
        sport=None if icmp else flow.sport,
        dport=None if icmp else flow.dport,
        icmp_id=flow.icmp_id if icmp else None,
        icmp_type=flow.icmp_type if icmp else None,
        icmp_code=flow.icmp_code if icmp else None,
    )
    extra: dict[str, Any] = {}
    if flow.ct_id is not None:
        extra["id"] = flow.ct_id
    if flow.zone:
        extra["zone"] = flow.zone
    return orig, extra


def as_evaluator_flow(entry: FlowEntry) -> Flow:
    """The entry's original tuple as the reference evaluator's new-flow question."""
    return Flow(
        src_ip=ipaddress.ip_address(entry.src),
        dst_ip=ipaddress.ip_address(entry.dst),
        protocol=entry.proto,
        dport=entry.dport,
        sport=entry.sport,
    )


def prune_flows(
    namespace: str, allowed: Callable[[Flow], bool], bit: int = DEFAULT_CT_MARK_BIT
) -> int:
    """Cut the flows of `namespace` that `allowed` (the evaluator) now denies, and
    revive the cut ones it allows again, by conntrack mark `bit`; returns how many
    were newly cut.

    The reconciler's flow judge, run after every change. Sockets are opened per
    call: a cached one could outlive a namespace that `lab down`/`lab up` replaced.
    """
    with Conntracker() as ct:
        return ct.judge(namespace, lambda entry: allowed(as_evaluator_flow(entry)), bit)
