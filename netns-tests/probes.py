"""Traffic probes between namespaces, for the real-namespace tests.

The test-facing shape of `nftsg.agent.probe` (which does the work): every probe
runs in the test process itself: a socket belongs to the namespace
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

import subprocess
from dataclasses import dataclass

from nftsg.agent.probe import Address, ProbeResult, ping_probe
from nftsg.agent.probe import tcp_probe as _tcp
from nftsg.agent.probe import udp_probe as _udp

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


def _as_probe(result: ProbeResult) -> Probe:
    return Probe(result.ok, result.seen_from, "" if result.ok else result.detail)


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
    return _as_probe(_tcp(src_ns, dst_ns, addr, port, src=src, sport=sport, timeout=timeout))


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
    return _as_probe(_udp(src_ns, dst_ns, addr, port, src=src, sport=sport, timeout=timeout))


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


def ping(ns: str, addr: Address, timeout: float = 1.0, src: Address | None = None) -> bool:
    """One ICMP (IPv4) or ICMPv6 echo from namespace `ns`; True if the reply came back."""
    return ping_probe(ns, addr, src=src, timeout=timeout).ok


def reaches(ns: str, addr: Address, attempts: int = 3, timeout: float = 1.0) -> bool:
    """An echo that must get through: a few attempts, because the first packet to a
    fresh neighbour can wait on its resolution for about a second on a loaded
    machine (seen in CI). Never use it for a flow that must be dropped."""
    return any(ping(ns, addr, timeout=timeout) for _ in range(attempts))


def ns_exec(ns: str, argv: list[str], timeout: float = 10.0) -> subprocess.CompletedProcess[str]:
    """Run a command inside namespace `ns` (for inspection in tests)."""
    return subprocess.run(
        ["ip", "netns", "exec", ns, *argv],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
