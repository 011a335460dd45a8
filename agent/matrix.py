"""Probe every pair of lab hosts with real traffic and compare with the evaluator.

This is what `nftsg lab check` prints: for each probe, what the reference
evaluator (the same answer `nftsg explain` gives) predicts and what the kernel
did. Agreement must be total.
"""

from __future__ import annotations

import errno
import random
from collections import defaultdict
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace

from nftsg.translators.evaluator import Flow, evaluate
from nftsg.translators.network import IPAddress, Network

from .probe import ping_probe, tcp_probe, udp_probe

PROTO_NUMBERS = {"tcp": 6, "udp": 17}


@dataclass(frozen=True, slots=True)
class Host:
    name: str  # instance id or external host name
    namespace: str
    ipv4: IPAddress | None
    ipv6: IPAddress | None


@dataclass(frozen=True, slots=True)
class Probe:
    kind: str  # ping | tcp | udp
    src: Host
    dst: Host
    src_ip: IPAddress
    dst_ip: IPAddress
    port: int = 0
    sport: int = 0

    def flow(self) -> Flow:
        if self.kind == "ping":
            return Flow(self.src_ip, self.dst_ip, 1 if self.dst_ip.version == 4 else 58)
        return Flow(self.src_ip, self.dst_ip, PROTO_NUMBERS[self.kind], self.port, self.sport)

    def label(self) -> str:
        what = "ping" if self.kind == "ping" else f"{self.kind}/{self.port}"
        return f"{self.src.name} -> {self.dst.name} {what} ({self.dst_ip})"


@dataclass(frozen=True, slots=True)
class Outcome:
    probe: Probe
    expected: bool
    observed: bool
    detail: str

    @property
    def agrees(self) -> bool:
        return self.expected == self.observed


def lab_hosts(network: Network, namespace_of: Callable[[str], str]) -> list[Host]:
    """One host per instance (its primary ENI's first addresses) and per external host."""
    hosts = []
    for inst in network.instances.values():
        eni = network.enis[inst.eni_ids[0]]
        hosts.append(
            Host(
                inst.instance_id,
                namespace_of(inst.instance_id),
                eni.ipv4[0] if eni.ipv4 else None,
                eni.ipv6[0] if eni.ipv6 else None,
            )
        )
    for ext in network.externals.values():
        hosts.append(
            Host(
                ext.name,
                namespace_of(ext.name),
                ext.ipv4[0] if ext.ipv4 else None,
                ext.ipv6[0] if ext.ipv6 else None,
            )
        )
    return hosts


def plan(
    network: Network,
    hosts: list[Host],
    tcp_ports: Iterable[int],
    udp_ports: Iterable[int],
    *,
    seed: int = 0,
) -> list[Probe]:
    """Every ordered pair in the same VPC, every family both ends have, every probe kind."""
    rng = random.Random(seed)
    vpc_of = {
        **{i.instance_id: i.vpc_id for i in network.instances.values()},
        **{x.name: x.vpc_id for x in network.externals.values()},
    }
    probes = []
    for src in hosts:
        for dst in hosts:
            if src is dst or vpc_of[src.name] != vpc_of[dst.name]:
                continue
            for s_ip, d_ip in ((src.ipv4, dst.ipv4), (src.ipv6, dst.ipv6)):
                if s_ip is None or d_ip is None:
                    continue
                probes.append(Probe("ping", src, dst, s_ip, d_ip))
                for port in tcp_ports:
                    probes.append(
                        Probe("tcp", src, dst, s_ip, d_ip, port, rng.randint(20000, 60000))
                    )
                for port in udp_ports:
                    probes.append(
                        Probe("udp", src, dst, s_ip, d_ip, port, rng.randint(20000, 60000))
                    )
    return probes


def run_probe(probe: Probe, timeout: float) -> tuple[bool, str]:
    if probe.kind == "ping":
        res = ping_probe(probe.src.namespace, probe.dst_ip, src=probe.src_ip, timeout=timeout)
    elif probe.kind == "tcp":
        res = tcp_probe(
            probe.src.namespace,
            probe.dst.namespace,
            probe.dst_ip,
            probe.port,
            src=probe.src_ip,
            sport=probe.sport,
            timeout=timeout,
        )
    else:
        res = udp_probe(
            probe.src.namespace,
            probe.dst.namespace,
            probe.dst_ip,
            probe.port,
            src=probe.src_ip,
            sport=probe.sport,
            timeout=timeout,
        )
    return res.ok, res.detail


def run(
    network: Network, probes: list[Probe], *, timeout: float = 0.4, workers: int = 16
) -> list[Outcome]:
    """Run the probes concurrently; probes that would listen on the same address and port
    run one after another in the same worker."""
    lanes: dict[tuple[str, str, int], list[tuple[int, Probe]]] = defaultdict(list)
    for index, probe in enumerate(probes):
        key = (
            (probe.kind, str(probe.dst_ip), probe.port)
            if probe.kind != "ping"
            else ("ping", f"{probe.src.name}>{probe.dst_ip}", 0)
        )
        lanes[key].append((index, probe))

    def run_lane(lane: list[tuple[int, Probe]]) -> list[tuple[int, Outcome]]:
        out = []
        rng = random.Random(lane[0][0])
        for index, probe in lane:
            for _ in range(5):
                try:
                    observed, detail = run_probe(probe, timeout)
                    break
                except OSError as exc:
                    # The planned source port is held by some other socket of the
                    # host (not ours to close): plan the flow from another one.
                    if exc.errno != errno.EADDRINUSE or probe.kind == "ping":
                        raise
                    probe = replace(probe, sport=rng.randint(20000, 60000))
            else:
                raise OSError(errno.EADDRINUSE, f"no free source port for {probe.label()}")
            expected = evaluate(network, probe.flow()).verdict == "accept"
            if observed != expected:
                # Confirm before reporting: on two busy cores a probe can lose the CPU
                # for longer than its timeout. A real disagreement persists.
                observed, detail = run_probe(probe, timeout * 4)
                detail += " (confirmed)"
            out.append((index, Outcome(probe, expected, observed, detail)))
        return out

    with ThreadPoolExecutor(max_workers=workers) as pool:
        results = [o for lane in pool.map(run_lane, lanes.values()) for o in lane]
    return [outcome for _, outcome in sorted(results, key=lambda pair: pair[0])]


def render(outcomes: list[Outcome]) -> str:
    lines = []
    for o in outcomes:
        mark = "ok " if o.agrees else "MISMATCH"
        verdict = "allowed" if o.observed else "dropped"
        lines.append(f"  {mark} {verdict:8} {o.probe.label()}")
    agree = sum(o.agrees for o in outcomes)
    lines.append(
        f"{agree}/{len(outcomes)} probes agree with the evaluator "
        f"({sum(o.observed for o in outcomes)} allowed, "
        f"{sum(not o.observed for o in outcomes)} dropped)"
    )
    return "\n".join(lines)
