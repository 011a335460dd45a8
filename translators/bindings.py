"""Host mode: the checked `bindings` section of a topology. Pure.

A binding says that an ENI is not a veth the lab builds but an interface that
already exists (a VM's tap, the host end of a container's veth), named by
`ifname` or by its own MAC, in a named namespace (`netns`) or in the agent's
own (`netns` omitted). The agent moves the interface into the VPC router under
the ENI's port name once the router enforces that ENI (`agent/host_mode.py`);
everything else about the ENI (addresses, MAC, groups) comes from the
instance it belongs to, as for lab-built ENIs.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from . import model as m
from .errors import EcsError
from .network import Network

# Linux's dev_valid_name(): 1-15 bytes, not "." or "..", no '/', ':' or whitespace.
IFNAMSIZ = 16
_BAD_IFNAME_CHARS = re.compile(r"[/:\s\x00]")
_MAC = re.compile(r"^[0-9a-f]{2}(:[0-9a-f]{2}){5}$")


@dataclass(frozen=True, slots=True)
class Binding:
    """One checked binding. `netns` is "" for the agent's own namespace; exactly one of
    `ifname` and `mac` is set (`mac` lower case, colon separated)."""

    eni_id: str
    netns: str
    ifname: str | None
    mac: str | None

    def describe(self) -> str:
        where = f"netns {self.netns}" if self.netns else "the agent's namespace"
        what = f"ifname {self.ifname}" if self.ifname is not None else f"MAC {self.mac}"
        return f"{what} in {where}"


def valid_ifname(name: str) -> bool:
    return (
        0 < len(name.encode()) < IFNAMSIZ
        and name not in (".", "..")
        and not _BAD_IFNAME_CHARS.search(name)
    )


def valid_netns_name(name: str) -> bool:
    # A file name in iproute2's run directory.
    return (
        0 < len(name.encode()) <= 255
        and name not in (".", "..")
        and "/" not in name
        and ("\x00" not in name)
    )


def _check_one(b: m.Binding, network: Network, path: str) -> Binding:
    if b.network_interface_id not in network.enis:
        raise EcsError(
            "InvalidNetworkInterfaceId.NotFound",
            f"ENI {b.network_interface_id} does not exist (only ENIs can be bound)",
            f"{path}.network_interface_id",
        )
    if (b.ifname is None) == (b.mac_address is None):
        raise EcsError(
            "MissingParameter" if b.ifname is None else "InvalidParameter",
            "a binding names its interface by exactly one of ifname and mac_address",
            path,
        )
    netns = b.netns or ""
    if b.netns is not None and not valid_netns_name(b.netns):
        raise EcsError(
            "InvalidParameter", f"{b.netns!r} is not a valid namespace name", f"{path}.netns"
        )
    mac = None
    if b.ifname is not None and not valid_ifname(b.ifname):
        raise EcsError(
            "InvalidParameter",
            f"{b.ifname!r} is not a valid interface name (1-15 bytes, no '/', ':' or spaces)",
            f"{path}.ifname",
        )
    if b.mac_address is not None:
        mac = b.mac_address.strip().lower().replace("-", ":")
        if not _MAC.match(mac):
            raise EcsError(
                "InvalidMacAddress.Malformed",
                f"{b.mac_address!r} is not a MAC address",
                f"{path}.mac_address",
            )
        if int(mac[:2], 16) & 1 or mac == "00:00:00:00:00:00":
            raise EcsError(
                "InvalidMacAddress.Malformed",
                f"{b.mac_address!r} is not a unicast MAC address",
                f"{path}.mac_address",
            )
    return Binding(b.network_interface_id, netns, b.ifname, mac)


def check_bindings(topology: m.Topology, network: Network) -> dict[str, Binding]:
    """The topology's bindings, checked against its network, by ENI id (sorted);
    raises EcsError naming the binding. One binding per ENI, one ENI per interface."""
    out: dict[str, Binding] = {}
    interfaces: dict[tuple[str, str, str], str] = {}
    for i, raw in enumerate(topology.bindings):
        path = f"bindings[{i}]"
        binding = _check_one(raw, network, path)
        if binding.eni_id in out:
            raise EcsError(
                "InvalidParameter",
                f"ENI {binding.eni_id} is bound twice",
                f"{path}.network_interface_id",
            )
        key = (
            binding.netns,
            "ifname" if binding.ifname is not None else "mac",
            binding.ifname or binding.mac or "",
        )
        if key in interfaces:
            raise EcsError(
                "InvalidParameter",
                f"{binding.describe()} is bound to both {interfaces[key]} and {binding.eni_id}",
                path,
            )
        interfaces[key] = binding.eni_id
        out[binding.eni_id] = binding
    return dict(sorted(out.items()))


def bound_eni_ids(topology: m.Topology) -> frozenset[str]:
    """The ENIs the topology binds (unchecked: for the lab builder, after validation)."""
    return frozenset(b.network_interface_id for b in topology.bindings)
