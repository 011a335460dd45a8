"""Host mode: ENIs enforced on interfaces that already exist.

A binding in the topology (`translators/bindings.py`) names an ENI's
interface: a VM's tap or the host end of a container's veth, by name or by
its own MAC, in a named namespace or in the agent's own. The agent moves that
interface into the ENI's VPC router under the ENI's port name and converges
the router's side of the port exactly as the lab does for its veths
(`Lab.converge_router`: proxy ARP, fe80::1, /32 and /128 routes, permanent
neighbours with the ENI's MAC, up). The instance side (addresses, default
route via the router, the ENI's MAC on its NIC) is the VM's or container's own
configuration.

Fail closed, by construction:
- an interface is plugged only into a router whose table enforces a model
  that has its ENI (the router's sync in this round or an earlier one
  succeeded); until then it stays where it is, connected to nothing;
- the move and the rename are one netlink request, so the interface never
  exists in the router under another name; it arrives down, and the rules
  keyed by its port name are already in force when it comes up;
- anything in the router the table does not know is dropped: an unknown
  input port fails anti-spoofing (its name and source address are in no
  set), an unknown output port is in no dispatch map and not a known port,
  and the forward chain's policy is drop.

The agent watches links (RTNLGRP_LINK) in the source namespaces and in the
routers (one netlink socket each, agent/events.py); any link event triggers a
rescan in the agent's next round, and a rescan every `rescan_every` seconds
is the backstop. A rescan is level-triggered: it compares what is with what
should be, so missed or reordered events do no harm.
- appears (or renamed to the bound name, or the MAC shows up): plugged;
- disappears (VM stopped, container removed: the router end goes with its
  pair): forgotten, and plugged again when it comes back;
- renamed inside the router by someone else: renamed back (meanwhile its
  packets are dropped as an unknown port's);
- binding removed or changed: the interface is moved back to its namespace
  under its bound name (down), if that namespace still exists.
"""

from __future__ import annotations

import logging
import os
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from nftsg.translators.bindings import Binding, check_bindings
from nftsg.translators.model import Topology
from nftsg.translators.network import Network
from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from . import netns
from .events import OWN_NAMESPACE, Subscriptions
from .lab import Lab

log = logging.getLogger(__name__)

NETLINK_ROUTE = 0
RTNLGRP_LINK = 1
IFF_LOOPBACK = 0x8
EBUSY = 16


class LinkEvents(Subscriptions):
    """Any link message (new, changed, renamed, deleted) in a watched namespace."""

    protocol = NETLINK_ROUTE
    group = RTNLGRP_LINK
    what = "links"


@dataclass(frozen=True, slots=True)
class Plugged:
    """An interface the agent moved into (or found in) a router as an ENI's port."""

    eni_id: str
    router_ns: str
    ifindex: int
    binding: Binding


@contextmanager
def _iproute(name: str) -> Iterator[IPRoute]:
    ipr = IPRoute(groups=0) if name == OWN_NAMESPACE else netns.iproute(name)
    try:
        yield ipr
    finally:
        ipr.close()


def _ns_fd(name: str) -> int:
    if name == OWN_NAMESPACE:
        return os.open("/proc/self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    return netns.open_fd(name)


def _ns_exists(name: str) -> bool:
    return name == OWN_NAMESPACE or netns.exists(name)


class HostPorts:
    """Keeps every bound ENI's interface plugged into its router (see the module doc).

    `set_model()` after each model load, `converge(in_force)` each agent round
    with the VPCs whose router enforces the loaded model; it does work only
    when a link event came, the model or the set in force changed, or the
    periodic rescan is due.
    """

    def __init__(
        self,
        lab: Lab,
        *,
        events: LinkEvents | None = None,
        rescan_every: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.lab = lab
        self.events = events
        self.rescan_every = rescan_every
        self.clock = clock
        self.network: Network | None = None
        self.bindings: dict[str, Binding] = {}
        self.plugged: dict[str, Plugged] = {}
        self.counters: Counter[str] = Counter()
        # When each ENI was plugged (clock), for logs and tests.
        self.plugged_at: dict[str, float] = {}
        self._dirty = True
        self._next_scan = 0.0
        self._in_force: frozenset[str] = frozenset()
        self._complained: set[str] = set()

    # -- the agent's side ---------------------------------------------------------
    def set_model(self, network: Network, topology: Topology) -> None:
        self.network = network
        self.bindings = check_bindings(topology, network) if topology.bindings else {}
        self._dirty = True
        self._complained.clear()
        if self.events is not None:
            self.events.watch(self._namespaces())

    def close(self) -> None:
        if self.events is not None:
            self.events.close()

    def _namespaces(self) -> set[str]:
        names = {b.netns for b in self.bindings.values()}
        names |= {p.router_ns for p in self.plugged.values()}
        if self.network is not None:
            names |= {
                self.lab.router_ns(self.network.enis[e].vpc_id)
                for e in self.bindings
                if e in self.network.enis
            }
        return names

    def converge(self, in_force: set[str]) -> bool:
        """One rescan when something may have changed; True if it ran."""
        now = self.clock()
        events = self.events.changed() if self.events is not None else set()
        grown = bool(frozenset(in_force) - self._in_force)
        self._in_force = frozenset(in_force)
        if not (events or self._dirty or grown or now >= self._next_scan):
            return False
        self._dirty = False
        self._next_scan = now + self.rescan_every
        try:
            self._rescan(self._in_force)
        except Exception:
            self._dirty = True  # try again next round
            self._next_scan = now + 0.5
            raise
        finally:
            if self.events is not None:
                self.events.watch(self._namespaces())
        return True

    # -- one rescan ---------------------------------------------------------------
    def _rescan(self, in_force: frozenset[str]) -> None:
        network = self.network
        if network is None:
            return
        for eni_id, plugged in sorted(self.plugged.items()):
            if self.bindings.get(eni_id) != plugged.binding or eni_id not in network.enis:
                self._release(plugged)
        by_router: dict[str, list[str]] = {}
        for eni_id in self.bindings:
            eni = network.enis[eni_id]
            by_router.setdefault(self.lab.router_ns(eni.vpc_id), []).append(eni_id)
        routers = {self.lab.router_ns(v) for v in network.vpcs}
        bound = frozenset(self.bindings)
        for router_ns, eni_ids in sorted(by_router.items()):
            if not netns.exists(router_ns):
                continue
            touched = False
            for eni_id in eni_ids:
                vpc_id = network.enis[eni_id].vpc_id
                touched |= self._converge_port(router_ns, eni_id, vpc_id in in_force, routers)
            if touched or any(p.router_ns == router_ns for p in self.plugged.values()):
                # Routes, neighbours, sysctls and link state of every present port;
                # changes only what differs.
                self.lab.converge_router(network, router_ns, bound)

    def _converge_port(
        self, router_ns: str, eni_id: str, enforced: bool, routers: set[str]
    ) -> bool:
        """Bring one bound ENI's port to what it should be; True if anything moved."""
        assert self.network is not None
        eni = self.network.enis[eni_id]
        binding = self.bindings[eni_id]
        name = eni.ifname
        with _iproute(router_ns) as ipr:
            links = ipr.get_links()
            by_name = {link.get("ifname"): link for link in links}
            by_index = {link["index"]: link for link in links}
            current = self.plugged.get(eni_id)
            link = by_name.get(name)
            if link is not None:
                if current is None or current.ifindex != link["index"]:
                    # Plugged by an earlier run of the agent (or re-created): adopt.
                    self.plugged[eni_id] = Plugged(eni_id, router_ns, link["index"], binding)
                    log.info("host mode: %s is on %s in %s (adopted)", eni_id, name, router_ns)
                    return True
                return False
            if current is not None and current.ifindex in by_index:
                stray = by_index[current.ifindex].get("ifname")
                self._rename(ipr, current.ifindex, name)
                self.counters["renamed_back"] += 1
                log.warning(
                    "host mode: %s's port was renamed to %s in %s; renamed back to %s",
                    eni_id,
                    stray,
                    router_ns,
                    name,
                )
                return True
            if current is not None:
                del self.plugged[eni_id]
                self.plugged_at.pop(eni_id, None)
                self.counters["gone"] += 1
                log.info("host mode: %s's interface is gone from %s", eni_id, router_ns)
            if not enforced:
                return current is not None  # plugged only once its rules are in force
            if binding.netns in routers:
                self._complain(eni_id, f"{binding.describe()} is a VPC router: not bound")
                return current is not None
            found = self._find(binding)
            if found is None:
                return current is not None
            self._plug(binding, found, router_ns, name)
            for link in ipr.get_links():
                if link.get("ifname") == name:
                    self.plugged[eni_id] = Plugged(eni_id, router_ns, link["index"], binding)
                    self.plugged_at[eni_id] = self.clock()
            self.counters["plugged"] += 1
            return True

    def _find(self, binding: Binding) -> int | None:
        """The ifindex of the bound interface in its namespace, if it is there now."""
        if not _ns_exists(binding.netns):
            return None
        with _iproute(binding.netns) as ipr:
            matches = [
                link
                for link in ipr.get_links()
                if not link["flags"] & IFF_LOOPBACK
                and (
                    link.get("ifname") == binding.ifname
                    if binding.ifname is not None
                    else str(link.get("address", "")).lower() == binding.mac
                )
            ]
        if len(matches) > 1:
            self._complain(binding.eni_id, f"{len(matches)} interfaces match {binding.describe()}")
            return None
        return int(matches[0]["index"]) if matches else None

    def _plug(self, binding: Binding, ifindex: int, router_ns: str, name: str) -> None:
        started = time.perf_counter()
        fd = netns.open_fd(router_ns)
        try:
            with _iproute(binding.netns) as ipr:
                # One request: the interface never exists in the router under
                # another name; it arrives down.
                ipr.link("set", index=ifindex, net_ns_fd=fd, ifname=name)
        finally:
            os.close(fd)
        log.info(
            "host mode: %s (%s) plugged into %s as %s in %.1f ms",
            binding.eni_id,
            binding.describe(),
            router_ns,
            name,
            (time.perf_counter() - started) * 1000,
        )

    def _rename(self, ipr: IPRoute, ifindex: int, name: str) -> None:
        try:
            ipr.link("set", index=ifindex, ifname=name)
        except NetlinkError as exc:
            if exc.code != EBUSY:  # older kernels rename only a link that is down
                raise
            ipr.link("set", index=ifindex, state="down")
            ipr.link("set", index=ifindex, ifname=name)

    def _release(self, plugged: Plugged) -> None:
        """Unbound: give the interface back to its namespace, down, under its bound
        name (a MAC binding keeps the port name)."""
        del self.plugged[plugged.eni_id]
        self.plugged_at.pop(plugged.eni_id, None)
        binding = plugged.binding
        if not netns.exists(plugged.router_ns):
            return
        with _iproute(plugged.router_ns) as ipr:
            if not any(link["index"] == plugged.ifindex for link in ipr.get_links()):
                return
            ipr.link("set", index=plugged.ifindex, state="down")
            if not _ns_exists(binding.netns):
                log.warning(
                    "host mode: %s unbound; %s is gone, its interface stays down in %s",
                    plugged.eni_id,
                    binding.netns,
                    plugged.router_ns,
                )
                return
            fd = _ns_fd(binding.netns)
            try:
                back: dict[str, Any] = {"net_ns_fd": fd}
                if binding.ifname is not None:
                    back["ifname"] = binding.ifname
                ipr.link("set", index=plugged.ifindex, **back)
            finally:
                os.close(fd)
        self.counters["released"] += 1
        log.info(
            "host mode: %s unbound; interface given back (%s)", plugged.eni_id, binding.describe()
        )

    def release_all(self) -> int:
        """Give every bound interface found in its router back (for `lab down`, before
        the routers are removed: removing a namespace deletes the virtual links in
        it, a VM's tap or a container's veth with them). Returns how many."""
        network = self.network
        if network is None:
            return 0
        released = 0
        for eni_id, binding in sorted(self.bindings.items()):
            router_ns = self.lab.router_ns(network.enis[eni_id].vpc_id)
            if not netns.exists(router_ns):
                continue
            with _iproute(router_ns) as ipr:
                indexes = ipr.link_lookup(ifname=network.enis[eni_id].ifname)
            if not indexes:
                continue
            self.plugged[eni_id] = Plugged(eni_id, router_ns, int(indexes[0]), binding)
            self._release(self.plugged[eni_id])
            released += 1
        return released

    def _complain(self, eni_id: str, message: str) -> None:
        if eni_id not in self._complained:
            self._complained.add(eni_id)
            log.error("host mode: %s: %s", eni_id, message)
