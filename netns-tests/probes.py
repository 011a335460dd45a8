"""Traffic probes between namespaces, for the real-namespace tests.

Every probe runs in the test process itself: a socket belongs to the namespace
of the thread that creates it, so the listener is created inside the
destination namespace and the client inside the source namespace (through
`nftsg.agent.netns.entered`, which always returns the thread to where it was),
and then both are driven from this thread. No process is started per probe:
a probe costs a few syscalls, or `timeout` when the packet is dropped.

    ping(ns, addr)                                   -> bool (ICMP / ICMPv6 echo)
    tcp_connect(src_ns, dst_ns, addr, port)          -> bool (handshake + data both ways)
    udp_request(src_ns, dst_ns, addr, port)          -> bool (request, listener answers)
    tcp_probe(...) / udp_probe(...)                  -> Probe (also: the client address
                                                        the listener saw)

`src` binds the client to one of its addresses, `sport` to a source port.
Addresses may be IPv4 or IPv6 (strings or ipaddress objects).
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import random
import select
import socket
import struct
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass

from nftsg.agent import netns
from nftsg.agent.probe import bind_retrying

Address = str | ipaddress.IPv4Address | ipaddress.IPv6Address

__all__ = [
    "Probe",
    "ns_exec",
    "ping",
    "tcp_connect",
    "tcp_probe",
    "udp_probe",
    "udp_request",
]


@dataclass(frozen=True)
class Probe:
    ok: bool
    seen_from: tuple[str, int] | None = None  # client address:port as the listener saw it
    error: str = ""

    def __bool__(self) -> bool:
        return self.ok


def _family(addr: Address) -> socket.AddressFamily:
    return socket.AF_INET6 if ipaddress.ip_address(str(addr)).version == 6 else socket.AF_INET


def _socket_in(ns: str, family: int, kind: int, proto: int = 0) -> socket.socket:
    with netns.entered(ns):
        return socket.socket(family, kind, proto)


def _wait_readable(sock: socket.socket, deadline: float) -> bool:
    remaining = deadline - time.monotonic()
    if remaining <= 0:
        return False
    readable, _, _ = select.select([sock], [], [], remaining)
    return bool(readable)


@contextlib.contextmanager
def _listener(ns: str, addr: Address, port: int, kind: int) -> Iterator[socket.socket]:
    sock = _socket_in(ns, _family(addr), kind)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        bind_retrying(sock, (str(addr), port))
        if kind == socket.SOCK_STREAM:
            sock.listen(16)
        yield sock
    finally:
        sock.close()


def _client(
    ns: str, addr: Address, kind: int, src: Address | None, sport: int | None
) -> socket.socket:
    sock = _socket_in(ns, _family(addr), kind)
    if src is not None or sport is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        bind_retrying(sock, (str(src) if src is not None else "", sport or 0))
    return sock


def tcp_probe(
    src_ns: str,
    dst_ns: str,
    addr: Address,
    port: int,
    sport: int | None = None,
    timeout: float = 1.0,
    src: Address | None = None,
) -> Probe:
    """Connect from src_ns to addr:port served by a fresh listener in dst_ns; echo one message."""
    deadline = time.monotonic() + timeout
    with _listener(dst_ns, addr, port, socket.SOCK_STREAM) as lsock:
        client = _client(src_ns, addr, socket.SOCK_STREAM, src, sport)
        try:
            # RST on close: no TIME_WAIT, so the same source port is reusable at once.
            client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            client.settimeout(timeout)
            try:
                client.connect((str(addr), port))
                client.sendall(b"ping")
            except OSError as exc:
                return Probe(False, error=f"connect: {exc}")
            if not _wait_readable(lsock, deadline):
                return Probe(False, error="listener saw no connection")
            conn, peer = lsock.accept()
            with conn:
                if not _wait_readable(conn, deadline):
                    return Probe(False, peer[:2], "listener got no data")
                conn.sendall(conn.recv(64))
                if not _wait_readable(client, deadline):
                    return Probe(False, peer[:2], "client got no reply")
                try:
                    reply = client.recv(64)
                except OSError as exc:
                    return Probe(False, peer[:2], f"recv: {exc}")
                return Probe(reply == b"ping", peer[:2], "" if reply == b"ping" else "bad reply")
        finally:
            client.close()


def tcp_connect(
    src_ns: str,
    dst_ns: str,
    addr: Address,
    port: int,
    sport: int | None = None,
    timeout: float = 1.0,
    src: Address | None = None,
) -> bool:
    return tcp_probe(src_ns, dst_ns, addr, port, sport=sport, timeout=timeout, src=src).ok


def udp_probe(
    src_ns: str,
    dst_ns: str,
    addr: Address,
    port: int,
    sport: int | None = None,
    timeout: float = 1.0,
    src: Address | None = None,
) -> Probe:
    """Send one datagram from src_ns to addr:port; a listener in dst_ns answers it."""
    deadline = time.monotonic() + timeout
    token = os.urandom(8)
    with _listener(dst_ns, addr, port, socket.SOCK_DGRAM) as lsock:
        client = _client(src_ns, addr, socket.SOCK_DGRAM, src, sport)
        try:
            try:
                client.sendto(token, (str(addr), port))
            except OSError as exc:
                return Probe(False, error=f"send: {exc}")
            if not _wait_readable(lsock, deadline):
                return Probe(False, error="listener got nothing")
            data, peer = lsock.recvfrom(64)
            lsock.sendto(data, peer)
            while _wait_readable(client, deadline):
                try:
                    reply = client.recv(64)
                except OSError as exc:  # e.g. ICMP port unreachable reported late
                    return Probe(False, peer[:2], f"recv: {exc}")
                if reply == token:
                    return Probe(True, peer[:2])
            return Probe(False, peer[:2], "client got no reply")
        finally:
            client.close()


def udp_request(
    src_ns: str,
    dst_ns: str,
    addr: Address,
    port: int,
    sport: int | None = None,
    timeout: float = 1.0,
    src: Address | None = None,
) -> bool:
    return udp_probe(src_ns, dst_ns, addr, port, sport=sport, timeout=timeout, src=src).ok


def _checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total: int = sum(struct.unpack(f"!{len(data) // 2}H", data))
    total = (total >> 16) + (total & 0xFFFF)
    total += total >> 16
    return ~total & 0xFFFF


def ping(ns: str, addr: Address, timeout: float = 1.0, src: Address | None = None) -> bool:
    """One ICMP (IPv4) or ICMPv6 echo from namespace `ns`; True if the reply came back.

    Raw sockets (we are root): the images have no `ping` binary, and ping
    sockets need a per-namespace ping_group_range.
    """
    target = ipaddress.ip_address(str(addr))
    v6 = target.version == 6
    if v6:
        sock = _socket_in(ns, socket.AF_INET6, socket.SOCK_RAW, socket.IPPROTO_ICMPV6)
    else:
        sock = _socket_in(ns, socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
    ident, seq = random.getrandbits(16), random.getrandbits(16)
    payload = os.urandom(16)
    try:
        if src is not None:
            sock.bind((str(src), 0))
        if v6:
            # The kernel fills in the ICMPv6 checksum of raw ICMPv6 sockets.
            packet = struct.pack("!BBHHH", 128, 0, 0, ident, seq) + payload
        else:
            header = struct.pack("!BBHHH", 8, 0, 0, ident, seq)
            packet = struct.pack("!BBHHH", 8, 0, _checksum(header + payload), ident, seq) + payload
        deadline = time.monotonic() + timeout
        try:
            sock.sendto(packet, (str(target), 0))
        except OSError:
            return False  # e.g. no route: unreachable
        while _wait_readable(sock, deadline):
            data, peer = sock.recvfrom(2048)
            if not v6:
                data = data[(data[0] & 0x0F) * 4 :]  # raw IPv4 sockets include the IP header
            if len(data) < 8 or ipaddress.ip_address(peer[0].split("%")[0]) != target:
                continue
            rtype, _, _, rid, rseq = struct.unpack("!BBHHH", data[:8])
            if rtype == (129 if v6 else 0) and (rid, rseq) == (ident, seq) and data[8:] == payload:
                return True
        return False
    finally:
        sock.close()


def ns_exec(ns: str, argv: list[str], timeout: float = 10.0) -> subprocess.CompletedProcess[str]:
    """Run a command inside namespace `ns` (for inspection in tests)."""
    return subprocess.run(
        ["ip", "netns", "exec", ns, *argv],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
