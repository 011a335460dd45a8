"""What the lab should look like for a model: namespace names and ports. Pure.

`build_plan` turns a checked `Network` into the namespaces and veth ports the
lab builder converges to. No kernel access here, so the naming and addressing
rules are testable without root.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass

from nftsg.translators.network import Eni, ExternalHost, Network

PREFIX_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.]{0,31}$")

# Policy-routing tables of multi-ENI instances: one per ENI, by device index.
TABLE_BASE = 100
# Priority of the source rules, ahead of `main` (32766).
RULE_PRIORITY = 1000


class LabError(Exception):
    """The lab cannot be built, converged, torn down or resolved as asked."""


@dataclass(frozen=True, slots=True)
class Port:
    """One veth pair: an ENI or an external host's interface."""

    key: str  # ENI id or external host name
    router_ns: str
    host_ns: str
    router_ifname: str
    host_ifname: str
    mac: str  # of the host end
    index: int  # device index inside the host (eth<index>)
    table: int | None  # host routing table for replies from this port (multi-ENI only)
    ipv4: tuple[ipaddress.IPv4Interface, ...]
    ipv6: tuple[ipaddress.IPv6Interface, ...]
    # Host mode: an existing interface the agent moves into the router under
    # `router_ifname`; the lab neither creates nor removes it (no host side).
    bound: bool = False


@dataclass(frozen=True, slots=True)
class Plan:
    routers: dict[str, tuple[Port, ...]]  # router ns -> its ports
    hosts: dict[str, tuple[Port, ...]]  # instance / external ns -> its ports, by index
    vpc_routers: dict[str, str]  # vpc id -> router ns
    host_names: dict[str, str]  # instance id, ENI id, external name -> host ns

    @property
    def namespaces(self) -> list[str]:
        """Routers first: ports are created from the router side."""
        return [*sorted(self.routers), *sorted(self.hosts)]


def check_prefix(prefix: str) -> None:
    # No '-' in the prefix: `{prefix}-r-...` must not be mistaken for another lab's names.
    if not PREFIX_PATTERN.match(prefix):
        raise LabError(f"lab prefix {prefix!r} must be 1-32 letters, digits, '_' or '.' (no '-')")


def router_ns_name(prefix: str, vpc_id: str) -> str:
    return f"{prefix}-r-{vpc_id}"


def instance_ns_name(prefix: str, instance_id: str) -> str:
    return f"{prefix}-i-{instance_id}"


def external_ns_name(prefix: str, name: str) -> str:
    return f"{prefix}-x-{name}"


def lab_name_pattern(prefix: str) -> re.Pattern[str]:
    return re.compile(rf"^{re.escape(prefix)}-[rix]-.+$")


def _eni_port(network: Network, eni: Eni, prefix: str, multi: bool, bound: bool = False) -> Port:
    vsw = next(s for s in network.vpcs[eni.vpc_id].vswitches if s.vswitch_id == eni.vswitch_id)
    v6len = vsw.ipv6_cidr.prefixlen if vsw.ipv6_cidr is not None else 64
    return Port(
        key=eni.eni_id,
        router_ns=router_ns_name(prefix, eni.vpc_id),
        host_ns="" if bound else instance_ns_name(prefix, eni.instance_id),
        router_ifname=eni.ifname,
        host_ifname="" if bound else eni.peer_ifname,
        mac=eni.mac,
        index=eni.device_index,
        table=TABLE_BASE + eni.device_index if multi else None,
        ipv4=tuple(ipaddress.IPv4Interface(f"{a}/{vsw.cidr.prefixlen}") for a in eni.ipv4),
        ipv6=tuple(ipaddress.IPv6Interface(f"{a}/{v6len}") for a in eni.ipv6),
        bound=bound,
    )


def _external_port(ext: ExternalHost, prefix: str) -> Port:
    # Outside every vSwitch: host routes only, everything else via the router.
    return Port(
        key=ext.name,
        router_ns=router_ns_name(prefix, ext.vpc_id),
        host_ns=external_ns_name(prefix, ext.name),
        router_ifname=ext.ifname,
        host_ifname="eth0",
        mac=ext.mac,
        index=0,
        table=None,
        ipv4=tuple(ipaddress.IPv4Interface(f"{a}/32") for a in ext.ipv4),
        ipv6=tuple(ipaddress.IPv6Interface(f"{a}/128") for a in ext.ipv6),
    )


def build_plan(network: Network, prefix: str, bound: frozenset[str] = frozenset()) -> Plan:
    """The lab for `network`. ENIs in `bound` (host mode) get a router port that the
    lab leaves to the agent, and no instance side; an instance all of whose ENIs
    are bound gets no namespace."""
    check_prefix(prefix)
    routers: dict[str, list[Port]] = {router_ns_name(prefix, v): [] for v in network.vpcs}
    hosts: dict[str, list[Port]] = {}
    names: dict[str, str] = {}
    for inst in network.instances.values():
        ns = instance_ns_name(prefix, inst.instance_id)
        multi = len(inst.eni_ids) > 1
        ports = [
            _eni_port(network, network.enis[e], prefix, multi, e in bound) for e in inst.eni_ids
        ]
        for p in ports:
            routers[p.router_ns].append(p)
        built = [p for p in ports if not p.bound]
        if not built:
            continue
        names[inst.instance_id] = ns
        hosts[ns] = sorted(built, key=lambda p: p.index)
        for p in built:
            names[p.key] = ns
    for ext in network.externals.values():
        port = _external_port(ext, prefix)
        names[ext.name] = port.host_ns
        hosts[port.host_ns] = [port]
        routers[port.router_ns].append(port)
    return Plan(
        routers={
            ns: tuple(sorted(ps, key=lambda p: p.router_ifname)) for ns, ps in routers.items()
        },
        hosts={ns: tuple(ps) for ns, ps in hosts.items()},
        vpc_routers={v: router_ns_name(prefix, v) for v in network.vpcs},
        host_names=names,
    )
