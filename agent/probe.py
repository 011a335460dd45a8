"""Real traffic between lab namespaces: ping, TCP connect, UDP request/reply.

Sockets belong to the network namespace of the thread that creates them, and
keep it when used from another thread. So each socket is created by a short
helper thread that has entered the namespace (`netns.run_in`), and the probe
itself then runs in the caller's thread: hundreds of probes cost no process
spawns.
"""

from __future__ import annotations

import errno
import ipaddress
import os
import select
import socket
import struct
import time
from dataclasses import dataclass

from . import netns

IPAddr = ipaddress.IPv4Address | ipaddress.IPv6Address


def _socket_in(namespace: str, family: int, kind: int, proto: int = 0) -> socket.socket:
    return netns.run_in(namespace, lambda: socket.socket(family, kind, proto))


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


def _family(addr: IPAddr) -> int:
    return socket.AF_INET if addr.version == 4 else socket.AF_INET6


@dataclass(frozen=True, slots=True)
class ProbeResult:
    ok: bool
    detail: str
    seconds: float


def tcp_probe(
    src_ns: str,
    dst_ns: str,
    dst: IPAddr,
    port: int,
    *,
    src: IPAddr | None = None,
    sport: int = 0,
    timeout: float = 0.5,
) -> ProbeResult:
    """Listen on dst:port in dst_ns, connect from src_ns; ok when the handshake completes
    and one byte makes the round trip."""
    fam = _family(dst)
    started = time.monotonic()
    listener = _socket_in(dst_ns, fam, socket.SOCK_STREAM)
    client = _socket_in(src_ns, fam, socket.SOCK_STREAM)
    try:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        bind_retrying(listener, (str(dst), port))
        listener.listen(4)
        client.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if src is not None or sport:
            bind_retrying(client, (str(src) if src is not None else "", sport))
        client.settimeout(timeout)
        try:
            client.connect((str(dst), port))
        except (TimeoutError, OSError) as exc:
            return ProbeResult(False, f"connect: {exc}", time.monotonic() - started)
        listener.settimeout(timeout)
        conn, _ = listener.accept()
        with conn:
            client.sendall(b"x")
            conn.settimeout(timeout)
            conn.sendall(conn.recv(1))
            got = client.recv(1)
        return ProbeResult(got == b"x", "tcp round trip", time.monotonic() - started)
    except (TimeoutError, OSError) as exc:
        return ProbeResult(False, f"tcp: {exc}", time.monotonic() - started)
    finally:
        client.close()
        listener.close()


def udp_probe(
    src_ns: str,
    dst_ns: str,
    dst: IPAddr,
    port: int,
    *,
    src: IPAddr | None = None,
    sport: int = 0,
    timeout: float = 0.5,
) -> ProbeResult:
    """A datagram to dst:port and the echo back: the request and the reply must both pass."""
    fam = _family(dst)
    started = time.monotonic()
    server = _socket_in(dst_ns, fam, socket.SOCK_DGRAM)
    client = _socket_in(src_ns, fam, socket.SOCK_DGRAM)
    try:
        bind_retrying(server, (str(dst), port))
        if src is not None or sport:
            bind_retrying(client, (str(src) if src is not None else "", sport))
        payload = os.urandom(8)
        client.sendto(payload, (str(dst), port))
        ready, _, _ = select.select([server], [], [], timeout)
        if not ready:
            return ProbeResult(False, "request not received", time.monotonic() - started)
        data, peer = server.recvfrom(64)
        server.sendto(data, peer)
        ready, _, _ = select.select([client], [], [], timeout)
        if not ready:
            return ProbeResult(False, "reply not received", time.monotonic() - started)
        return ProbeResult(client.recv(64) == payload, "udp round trip", time.monotonic() - started)
    except OSError as exc:
        return ProbeResult(False, f"udp: {exc}", time.monotonic() - started)
    finally:
        client.close()
        server.close()


def _checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total: int = sum(struct.unpack(f"!{len(data) // 2}H", data))
    total = (total >> 16) + (total & 0xFFFF)
    total += total >> 16
    return ~total & 0xFFFF


def ping_probe(
    src_ns: str, dst: IPAddr, *, src: IPAddr | None = None, timeout: float = 0.5
) -> ProbeResult:
    """One ICMP / ICMPv6 echo request from src_ns; ok when the matching echo reply arrives."""
    started = time.monotonic()
    if dst.version == 4:
        sock = _socket_in(src_ns, socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
        req_type, rep_type = 8, 0
    else:
        sock = _socket_in(src_ns, socket.AF_INET6, socket.SOCK_RAW, socket.IPPROTO_ICMPV6)
        req_type, rep_type = 128, 129  # the kernel fills the ICMPv6 checksum
    ident = int.from_bytes(os.urandom(2), "big")
    try:
        if src is not None:
            sock.bind((str(src), 0))
        body = struct.pack("!HH", ident, 1) + b"nftsg-probe"
        header = struct.pack("!BBH", req_type, 0, 0)
        csum = _checksum(header + body) if dst.version == 4 else 0
        sock.sendto(struct.pack("!BBH", req_type, 0, csum) + body, (str(dst), 0))
        deadline = started + timeout
        while (left := deadline - time.monotonic()) > 0:
            ready, _, _ = select.select([sock], [], [], left)
            if not ready:
                break
            packet = sock.recv(2048)
            icmp = packet[(packet[0] & 0x0F) * 4 :] if dst.version == 4 else packet
            if len(icmp) >= 8 and icmp[0] == rep_type and int.from_bytes(icmp[4:6], "big") == ident:
                return ProbeResult(True, "echo reply", time.monotonic() - started)
        return ProbeResult(False, "no echo reply", time.monotonic() - started)
    except OSError as exc:
        return ProbeResult(False, f"ping: {exc}", time.monotonic() - started)
    finally:
        sock.close()
