"""Real traffic between lab namespaces: ping, TCP connect, UDP request/reply.

Sockets belong to the network namespace of the thread that creates them, and
keep it when used from another thread. So each socket is created inside its
namespace (`netns.entered`, which always returns the thread to where it was)
and the probe then runs in the caller's thread: a probe costs a few syscalls,
or `timeout` when the packet is dropped; no process is spawned.

Every probe returns a `ProbeResult`: `ok`, a `detail` saying what happened,
the client address and port the far end saw (`seen_from`), and the time taken.
"""

from __future__ import annotations

import contextlib
import errno
import ipaddress
import os
import random
import select
import socket
import struct
import time
from collections.abc import Iterator
from dataclasses import dataclass

from . import netns

Address = str | ipaddress.IPv4Address | ipaddress.IPv6Address


@dataclass(frozen=True, slots=True)
class ProbeResult:
    ok: bool
    detail: str
    seconds: float
    seen_from: tuple[str, int] | None = None  # the client's address:port as the listener saw it

    def __bool__(self) -> bool:
        return self.ok


def bind_retrying(sock: socket.socket, address: tuple[str, int], patience: float = 1.0) -> None:
    """Bind, waiting out a port that another probe holds right now (a fixed source port
    may be a listening port of a concurrent probe on the same host)."""
    deadline = time.monotonic() + patience
    while True:
        try:
            sock.bind(address)
            return
        except OSError as exc:
            if exc.errno != errno.EADDRINUSE or time.monotonic() > deadline:
                raise
            time.sleep(0.02)


def _family(addr: Address) -> socket.AddressFamily:
    return socket.AF_INET6 if ipaddress.ip_address(str(addr)).version == 6 else socket.AF_INET


def socket_in(namespace: str, family: int, kind: int, proto: int = 0) -> socket.socket:
    """A socket created inside `namespace` (it stays there whichever thread uses it)."""
    with netns.entered(namespace):
        return socket.socket(family, kind, proto)


def _wait_readable(sock: socket.socket, deadline: float) -> bool:
    remaining = deadline - time.monotonic()
    if remaining <= 0:
        return False
    readable, _, _ = select.select([sock], [], [], remaining)
    return bool(readable)


@contextlib.contextmanager
def _listener(namespace: str, addr: Address, port: int, kind: int) -> Iterator[socket.socket]:
    sock = socket_in(namespace, _family(addr), kind)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        bind_retrying(sock, (str(addr), port))
        if kind == socket.SOCK_STREAM:
            sock.listen(16)
        yield sock
    finally:
        sock.close()


def _client(
    namespace: str, addr: Address, kind: int, src: Address | None, sport: int | None
) -> socket.socket:
    sock = socket_in(namespace, _family(addr), kind)
    if src is not None or sport:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        bind_retrying(sock, (str(src) if src is not None else "", sport or 0))
    return sock


def tcp_probe(
    src_ns: str,
    dst_ns: str,
    dst: Address,
    port: int,
    *,
    src: Address | None = None,
    sport: int | None = None,
    timeout: float = 1.0,
) -> ProbeResult:
    """Connect from src_ns to dst:port, served by a fresh listener in dst_ns; ok when the
    handshake completes and a message makes the round trip."""
    started = time.monotonic()
    deadline = started + timeout

    def result(ok: bool, detail: str, peer: tuple[str, int] | None = None) -> ProbeResult:
        return ProbeResult(ok, detail, time.monotonic() - started, peer)

    with _listener(dst_ns, dst, port, socket.SOCK_STREAM) as lsock:
        client = _client(src_ns, dst, socket.SOCK_STREAM, src, sport)
        try:
            # RST on close: no TIME_WAIT, so the same source port is reusable at once.
            client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            client.settimeout(timeout)
            try:
                client.connect((str(dst), port))
                client.sendall(b"ping")
            except OSError as exc:
                return result(False, f"connect: {exc}")
            if not _wait_readable(lsock, deadline):
                return result(False, "listener saw no connection")
            conn, peer = lsock.accept()
            seen = (peer[0], peer[1])
            with conn:
                if not _wait_readable(conn, deadline):
                    return result(False, "listener got no data", seen)
                conn.sendall(conn.recv(64))
                if not _wait_readable(client, deadline):
                    return result(False, "client got no reply", seen)
                try:
                    reply = client.recv(64)
                except OSError as exc:
                    return result(False, f"recv: {exc}", seen)
                good = reply == b"ping"
                return result(good, "tcp round trip" if good else "bad reply", seen)
        finally:
            client.close()


def udp_probe(
    src_ns: str,
    dst_ns: str,
    dst: Address,
    port: int,
    *,
    src: Address | None = None,
    sport: int | None = None,
    timeout: float = 1.0,
) -> ProbeResult:
    """A datagram to dst:port and the echo back: the request and the reply must both pass."""
    started = time.monotonic()
    deadline = started + timeout
    token = os.urandom(8)

    def result(ok: bool, detail: str, peer: tuple[str, int] | None = None) -> ProbeResult:
        return ProbeResult(ok, detail, time.monotonic() - started, peer)

    with _listener(dst_ns, dst, port, socket.SOCK_DGRAM) as lsock:
        client = _client(src_ns, dst, socket.SOCK_DGRAM, src, sport)
        try:
            try:
                client.sendto(token, (str(dst), port))
            except OSError as exc:
                return result(False, f"send: {exc}")
            if not _wait_readable(lsock, deadline):
                return result(False, "request not received")
            data, peer = lsock.recvfrom(64)
            seen = (peer[0], peer[1])
            lsock.sendto(data, peer)
            while _wait_readable(client, deadline):
                try:
                    reply = client.recv(64)
                except OSError as exc:  # e.g. an ICMP port unreachable reported late
                    return result(False, f"recv: {exc}", seen)
                if reply == token:
                    return result(True, "udp round trip", seen)
            return result(False, "reply not received", seen)
        finally:
            client.close()


def icmp_checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total: int = sum(struct.unpack(f"!{len(data) // 2}H", data))
    total = (total >> 16) + (total & 0xFFFF)
    total += total >> 16
    return ~total & 0xFFFF


def ping_probe(
    src_ns: str, dst: Address, *, src: Address | None = None, timeout: float = 1.0
) -> ProbeResult:
    """One ICMP (IPv4) or ICMPv6 echo from src_ns; ok when the matching reply comes back.

    Raw sockets (we are root): the machines have no `ping` binary, and ping
    sockets would need a per-namespace ping_group_range.
    """
    started = time.monotonic()
    target = ipaddress.ip_address(str(dst))
    v6 = target.version == 6
    if v6:
        sock = socket_in(src_ns, socket.AF_INET6, socket.SOCK_RAW, socket.IPPROTO_ICMPV6)
    else:
        sock = socket_in(src_ns, socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
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
            csum = icmp_checksum(header + payload)
            packet = struct.pack("!BBHHH", 8, 0, csum, ident, seq) + payload
        deadline = started + timeout
        try:
            sock.sendto(packet, (str(target), 0))
        except OSError as exc:
            return ProbeResult(False, f"send: {exc}", time.monotonic() - started)
        while _wait_readable(sock, deadline):
            data, peer = sock.recvfrom(2048)
            if not v6:
                data = data[(data[0] & 0x0F) * 4 :]  # raw IPv4 sockets include the IP header
            if len(data) < 8 or ipaddress.ip_address(peer[0].split("%")[0]) != target:
                continue
            rtype, _, _, rid, rseq = struct.unpack("!BBHHH", data[:8])
            if rtype == (129 if v6 else 0) and (rid, rseq) == (ident, seq) and data[8:] == payload:
                return ProbeResult(True, "echo reply", time.monotonic() - started)
        return ProbeResult(False, "no echo reply", time.monotonic() - started)
    finally:
        sock.close()
