"""The lab builder: namespaces, veths, addresses, routes for a `Network`.

One namespace per VPC router (`{prefix}-r-{vpc}`), one per instance
(`{prefix}-i-{id}`) and one per external host (`{prefix}-x-{name}`). Each ENI
or external port is a veth pair created straight between the router and the
host namespace, so its names never meet the host's own links.

The recipe (docs/kernel-notes.md §"The VPC router recipe" says why each piece is there):

Router
  - forwarding on (IPv4, IPv6); rp_filter 0: anti-spoofing is the firewall's
    job, and a second silent filter would hide what the firewall does;
  - per port: proxy_arp=1 and proxy_delay=0 (without it first packets wait
    0.2-1.4 s), a /32 and /128 route per ENI address out of the port, and a
    permanent neighbour per address with the ENI's MAC (the router has no IPv4
    address to ARP from);
  - IPv6: every port carries the link-local gateway address fe80::1 (no DAD,
    no other link-local). Instances route all IPv6 via fe80::1, so the router
    answers neighbour solicitations for its own address and needs no proxy
    NDP. Proxy NDP would need one entry per (address, port) pair: the kernel
    refuses device-less IPv6 proxy entries (ENOBUFS), which makes it N^2.
Instances and external hosts
  - loopback up, forwarding off, rp_filter 2 (loose: multi-ENI instances
    receive on one ENI what they may have routed out of another), no DAD, no RA;
  - IPv4 addresses with the vSwitch prefix, IPv6 addresses with the vSwitch
    prefix but `noprefixroute`: nothing is on-link for IPv6, every packet goes
    to fe80::1;
  - default routes: IPv4 `dev eth0` on-link (the router answers ARP by proxy),
    IPv6 `via fe80::1 dev eth0`;
  - instances with several ENIs: a table per ENI (`100 + device index`) with
    the same default routes out of that ENI, and a rule per address
    (`from ADDR lookup TABLE`, priority 1000), so replies leave through the
    ENI that owns their source address.

`apply()` converges: it reads what is there and changes only the difference.
Links that stay are never recreated and addresses that stay are never
re-added, so a second apply of the same model touches nothing.
"""

from __future__ import annotations

import errno
import ipaddress
import logging
import os
import socket
import time
from collections.abc import Iterable
from typing import Any

from nftsg.translators import naming
from nftsg.translators.network import Network
from pyroute2 import IPRoute
from pyroute2 import netns as _pr_netns
from pyroute2.netlink.exceptions import NetlinkError

from . import netns
from .labplan import (
    RULE_PRIORITY,
    LabError,
    Plan,
    Port,
    build_plan,
    check_prefix,
    external_ns_name,
    instance_ns_name,
    lab_name_pattern,
    router_ns_name,
)

__all__ = ["GATEWAY_V6", "Lab", "LabError", "adopt_namespace", "lab_namespaces"]

log = logging.getLogger(__name__)

GATEWAY_V6 = "fe80::1"
AF_INET: int = socket.AF_INET.value
AF_INET6: int = socket.AF_INET6.value
IFA_F_NODAD = 0x02
IFA_F_NOPREFIXROUTE = 0x200
IFF_UP = 0x1
NUD_PERMANENT = 0x80
RTPROT_STATIC = 4
RT_SCOPE_UNIVERSE = 0
RT_SCOPE_LINK = 253
MAIN_TABLE = 254

_ROUTER_SYSCTLS: dict[str, int] = {
    "net/ipv4/ip_forward": 1,
    "net/ipv4/conf/all/rp_filter": 0,
    "net/ipv4/conf/default/rp_filter": 0,
    "net/ipv6/conf/all/forwarding": 1,
    "net/ipv6/conf/default/forwarding": 1,
    "net/ipv6/conf/all/accept_dad": 0,
    "net/ipv6/conf/default/accept_dad": 0,
    "net/ipv6/conf/all/accept_ra": 0,
    "net/ipv6/conf/default/accept_ra": 0,
    # No EUI-64 link-locals on ports: fe80::1 is the only one, added by us.
    "net/ipv6/conf/default/addr_gen_mode": 1,
    # ECS tracks sessions for at most 910 s idle (docs/semantics.md §State); the
    # kernel's default for established TCP is five days.
    "net/netfilter/nf_conntrack_tcp_timeout_established": 910,
    # With loose pickup, a TCP packet whose entry is gone (timed out, flushed)
    # starts a new entry and is judged against the current rules as a new flow.
    "net/netfilter/nf_conntrack_tcp_loose": 1,
}

_HOST_SYSCTLS: dict[str, int] = {
    # New namespaces inherit the host's IPv4 settings (ip_forward=1 here).
    "net/ipv4/ip_forward": 0,
    "net/ipv4/conf/all/rp_filter": 2,
    "net/ipv4/conf/default/rp_filter": 2,
    "net/ipv6/conf/all/forwarding": 0,
    "net/ipv6/conf/all/accept_dad": 0,
    "net/ipv6/conf/default/accept_dad": 0,
    "net/ipv6/conf/all/accept_ra": 0,
    "net/ipv6/conf/default/accept_ra": 0,
    # Removing the first IPv4 address of a subnet would otherwise remove every
    # other address of that subnet with it (a changed primary address must not
    # take the ENI's secondary addresses along).
    "net/ipv4/conf/all/promote_secondaries": 1,
    "net/ipv4/conf/default/promote_secondaries": 1,
}


def _router_port_sysctls(ifname: str) -> dict[str, int]:
    # Per interface: the `default` neighbour sysctls do not exist outside the
    # root namespace, so proxy_delay cannot be set once for all ports.
    return {
        f"net/ipv4/conf/{ifname}/proxy_arp": 1,
        f"net/ipv4/neigh/{ifname}/proxy_delay": 0,
        f"net/ipv4/conf/{ifname}/rp_filter": 0,
        f"net/ipv6/conf/{ifname}/accept_dad": 0,
        f"net/ipv6/conf/{ifname}/forwarding": 1,
    }


def _host_port_sysctls(ifname: str) -> dict[str, int]:
    return {
        f"net/ipv4/conf/{ifname}/rp_filter": 2,
        f"net/ipv6/conf/{ifname}/accept_dad": 0,
        f"net/ipv6/conf/{ifname}/accept_ra": 0,
    }


def lab_namespaces(prefix: str) -> list[str]:
    """Namespaces of the lab with this prefix present now, sorted."""
    check_prefix(prefix)
    pattern = lab_name_pattern(prefix)
    return [n for n in netns.list_namespaces() if pattern.match(n)]


def adopt_namespace(name: str, pid: int) -> None:
    """Name the network namespace of process `pid` `name` (as `ip netns attach` does).

    For instances whose namespace something else made, such as a container
    started with `--network none`: once a lab's instance or external-host name
    points at it, `Lab.apply()` plugs the ENIs into it as into a namespace of
    its own (it holds only `lo`; any other link there would be removed as
    stale). Removing the name (`Lab.destroy()`) unplugs the ENIs' veths with
    the router namespace but leaves the namespace itself to its owner.
    """
    path = netns.path_of(name)
    if os.path.exists(path):
        raise LabError(f"network namespace {name!r} already exists")
    if not os.path.exists(f"/proc/{pid}/ns/net"):
        raise LabError(f"cannot adopt the namespace of pid {pid} as {name!r}: no such process")
    try:
        _pr_netns.attach(name, pid)
    except OSError as exc:
        raise LabError(f"cannot adopt the namespace of pid {pid} as {name!r}: {exc}") from exc


class Lab:
    """Builds, converges and removes the namespaces of one lab."""

    def __init__(self, prefix: str = "nftsg") -> None:
        check_prefix(prefix)
        self.prefix = prefix
        self._plan: Plan | None = None

    # -- names ----------------------------------------------------------------
    def set_model(self, network: Network) -> None:
        """Resolve names against `network` without touching the kernel.

        For a process that did not run apply() itself (e.g. `lab exec` with the
        model from the state store): ENI ids resolve only with a model.
        """
        self._plan = build_plan(network, self.prefix)

    def router_ns(self, vpc_id: str) -> str:
        if self._plan is not None:
            try:
                return self._plan.vpc_routers[vpc_id]
            except KeyError:
                raise LabError(f"VPC {vpc_id!r} is not in the lab's model") from None
        if not naming.ID_PATTERN.match(vpc_id):
            raise LabError(f"{vpc_id!r} is not a valid VPC id")
        return router_ns_name(self.prefix, vpc_id)

    def host_ns(self, name: str) -> str:
        """Namespace of an instance (by instance or ENI id) or external host."""
        if self._plan is not None:
            try:
                return self._plan.host_names[name]
            except KeyError:
                raise LabError(
                    f"{name!r} is no instance, ENI or external host of the lab"
                ) from None
        if naming.ID_PATTERN.match(name):
            present = set(self.existing())
            for ns in (instance_ns_name(self.prefix, name), external_ns_name(self.prefix, name)):
                if ns in present:
                    return ns
        raise LabError(
            f"{name!r} is no instance or external host of lab {self.prefix!r} "
            "(ENI ids resolve only once the lab knows its model)"
        )

    def existing(self) -> list[str]:
        return lab_namespaces(self.prefix)

    def adopt(self, network: Network, name: str, pid: int) -> str:
        """Use the network namespace of process `pid` for instance (or external host)
        `name` of `network`; returns the namespace name.

        Call before `apply()` (or `nftsg lab up`), which then plugs that host's
        ports into it instead of creating a namespace.
        """
        try:
            ns = build_plan(network, self.prefix).host_names[name]
        except KeyError:
            raise LabError(f"{name!r} is no instance or external host of the model") from None
        adopt_namespace(ns, pid)
        return ns

    # -- build / converge -------------------------------------------------------
    def ensure_routers(self, network: Network) -> list[str]:
        """Create only the VPC router namespaces that are missing; returns them all.

        `lab up` calls this first and has the rules put in force in the routers
        before `apply()` plugs in any port, so no port is ever unfiltered.
        """
        plan = build_plan(network, self.prefix)
        present = set(self.existing())
        try:
            for ns in plan.routers:
                if ns not in present:
                    netns.create(ns)
                netns.write_sysctls(ns, _ROUTER_SYSCTLS)
        except (netns.NetnsError, OSError) as exc:
            raise LabError(f"lab {self.prefix!r}: cannot create routers: {exc}") from exc
        self._plan = plan
        return list(plan.routers)

    def apply(self, network: Network, bound: frozenset[str] = frozenset()) -> None:
        """Build or converge the lab to `network`; idempotent. ENIs in `bound` are host
        mode's (`agent/host_mode.py`): their router ports are kept, never built."""
        plan = build_plan(network, self.prefix, bound)
        started = time.perf_counter()
        try:
            _Converger(plan, set(self.existing())).run()
        except (NetlinkError, netns.NetnsError, OSError) as exc:
            raise LabError(f"lab {self.prefix!r}: apply failed: {exc}") from exc
        self._plan = plan
        log.info(
            "lab %s: converged %d namespaces in %.3f s",
            self.prefix,
            len(plan.namespaces),
            time.perf_counter() - started,
        )

    def converge_router(
        self, network: Network, namespace: str, bound: frozenset[str] = frozenset()
    ) -> None:
        """Converge the ports present in one router namespace (sysctls, fe80::1, routes,
        neighbours, up), lab-built and bound alike; nothing is created or removed. For
        host mode, after it moved an interface in."""
        plan = build_plan(network, self.prefix, bound)
        try:
            _Converger(plan, set()).converge_router_only(namespace)
        except (NetlinkError, netns.NetnsError, OSError) as exc:
            raise LabError(f"router {namespace}: converge failed: {exc}") from exc

    def destroy(self) -> None:
        """Remove every namespace of this lab (and so every link); idempotent.

        The kernel frees a namespace and its links once nothing holds it any
        more (a process or thread still inside keeps it, and its links, alive
        until it leaves). Links are not deleted one by one first: each veth
        deletion waits for an RCU grace period (~30 ms here), which made
        tearing down 50 instances take 1.6 s instead of a few ms.
        """
        try:
            for ns in self.existing():
                netns.delete(ns)
        except netns.NetnsError as exc:
            raise LabError(f"lab {self.prefix!r}: destroy failed: {exc}") from exc
        self._plan = None


class _Converger:
    """One apply(): reads each namespace once, changes only the difference."""

    def __init__(self, plan: Plan, present: set[str]) -> None:
        self.plan = plan
        self.present = present
        self.handles: dict[str, IPRoute] = {}
        # Link dumps by namespace; dropped whenever links may have changed.
        self._link_cache: dict[str, dict[str, Any]] = {}

    def run(self) -> None:
        plan = self.plan
        try:
            for ns in plan.namespaces:
                if ns not in self.present:
                    netns.create(ns)
                    log.debug("created namespace %s", ns)
            # Namespace-wide sysctls first: `default` values shape the links
            # created below. Rewriting equal values changes nothing.
            for ns in plan.routers:
                netns.write_sysctls(ns, _ROUTER_SYSCTLS)
            for ns in plan.hosts:
                netns.write_sysctls(ns, _HOST_SYSCTLS)
            self.handles = {ns: netns.iproute(ns) for ns in plan.namespaces}
            self._remove_stale_links()
            for ns in sorted(self.present - set(plan.namespaces)):
                netns.delete(ns)
                log.debug("removed namespace %s", ns)
            self._ensure_links()
            for ns, ports in plan.routers.items():
                self._converge_router(ns, ports)
            for ns, ports in plan.hosts.items():
                self._converge_host(ns, ports)
        finally:
            for handle in self.handles.values():
                handle.close()

    def converge_router_only(self, ns: str) -> None:
        try:
            self.handles = {ns: netns.iproute(ns)}
            self._converge_router(ns, self.plan.routers.get(ns, ()))
        finally:
            for handle in self.handles.values():
                handle.close()

    # -- links ------------------------------------------------------------------
    def _links(self, ns: str) -> dict[str, Any]:
        links = self._link_cache.get(ns)
        if links is None:
            links = {link.get("ifname"): link for link in self.handles[ns].get_links()}
            self._link_cache[ns] = links
        return links

    def _delete(self, ns: str, link: Any) -> None:
        _delete_link(self.handles[ns], link.get("index"))
        # The peer end went too, in a namespace we may not know: forget all.
        self._link_cache.clear()

    def _remove_stale_links(self) -> None:
        # Deleting one end removes the pair at once; removing a namespace
        # would free its links only later, and a re-created ENI reuses names.
        for ns, ports in self.plan.routers.items():
            wanted = {p.router_ifname for p in ports} | {"lo"}
            for link in [x for name, x in self._links(ns).items() if name not in wanted]:
                self._delete(ns, link)
        for ns, ports in self.plan.hosts.items():
            wanted = {p.host_ifname for p in ports} | {"lo"}
            for link in [x for name, x in self._links(ns).items() if name not in wanted]:
                self._delete(ns, link)

    def _ensure_links(self) -> None:
        changed: set[str] = set()  # re-read once at the end, not after every pair
        for ns, ports in self.plan.routers.items():
            for port in ports:
                if port.bound:  # an existing interface: host mode plugs it in
                    continue
                rlink = self._links(ns).get(port.router_ifname)
                hlink = self._links(port.host_ns).get(port.host_ifname)
                if rlink is not None and hlink is not None and _paired(rlink, hlink):
                    if hlink.get("address") != port.mac:
                        self.handles[port.host_ns].link(
                            "set", index=hlink.get("index"), address=port.mac
                        )
                        changed.add(port.host_ns)
                    continue
                # Half a pair, or a pair with the wrong peer: replace it.
                if rlink is not None:
                    self._delete(ns, rlink)
                hlink = self._links(port.host_ns).get(port.host_ifname)
                if hlink is not None:
                    self._delete(port.host_ns, hlink)
                self._create_pair(port)
                changed |= {ns, port.host_ns}
        for ns in changed:
            self._link_cache.pop(ns, None)

    def _create_pair(self, port: Port) -> None:
        fd = netns.open_fd(port.host_ns)
        try:
            self.handles[port.router_ns].link(
                "add",
                ifname=port.router_ifname,
                kind="veth",
                peer={"ifname": port.host_ifname, "address": port.mac, "net_ns_fd": fd},
            )
        finally:
            os.close(fd)
        log.debug(
            "created %s/%s <-> %s/%s",
            port.router_ns,
            port.router_ifname,
            port.host_ns,
            port.host_ifname,
        )

    # -- router -----------------------------------------------------------------
    def _converge_router(self, ns: str, ports: tuple[Port, ...]) -> None:
        ipr = self.handles[ns]
        links = self._links(ns)
        # A bound port is there only while its interface is plugged in.
        ports = tuple(p for p in ports if p.router_ifname in links)
        sysctls: dict[str, int] = {}
        for port in ports:
            sysctls.update(_router_port_sysctls(port.router_ifname))
        netns.write_sysctls(ns, sysctls)
        index = {p.router_ifname: links[p.router_ifname].get("index") for p in ports}
        _set_up(ipr, links.values())

        # fe80::1 on every port, nothing else.
        want_addrs: set[tuple[int, str, int, int]] = {
            (AF_INET6, GATEWAY_V6, 64, index[p.router_ifname]) for p in ports
        }
        _converge_addresses(ipr, want_addrs, set(index.values()), flags=IFA_F_NODAD)

        want_routes: set[tuple[int, str, int]] = set()
        want_neigh: dict[tuple[int, str, int], str] = {}
        for port in ports:
            oif = index[port.router_ifname]
            keys = [(AF_INET, str(a.ip), oif) for a in port.ipv4]
            keys += [(AF_INET6, str(a.ip), oif) for a in port.ipv6]
            for key in keys:
                want_routes.add(key)
                want_neigh[key] = port.mac
        _converge_host_routes(ipr, want_routes)
        _converge_neighbours(ipr, want_neigh, set(index.values()))

    # -- instances and external hosts ---------------------------------------------
    def _converge_host(self, ns: str, ports: tuple[Port, ...]) -> None:
        ipr = self.handles[ns]
        sysctls: dict[str, int] = {}
        for port in ports:
            sysctls.update(_host_port_sysctls(port.host_ifname))
        netns.write_sysctls(ns, sysctls)
        links = self._links(ns)
        index = {p.host_ifname: links[p.host_ifname].get("index") for p in ports}
        _set_up(ipr, links.values())

        want_addrs: set[tuple[int, str, int, int]] = set()
        for port in ports:
            oif = index[port.host_ifname]
            want_addrs |= {(AF_INET, str(a.ip), a.network.prefixlen, oif) for a in port.ipv4}
            want_addrs |= {(AF_INET6, str(a.ip), a.network.prefixlen, oif) for a in port.ipv6}
        _converge_addresses(
            ipr, want_addrs, set(index.values()), flags=IFA_F_NODAD | IFA_F_NOPREFIXROUTE
        )

        # Default routes: main table out of the first port of each family;
        # with several ENIs also one table per ENI, selected by source address.
        want_defaults: set[tuple[int, int, int]] = set()  # (family, table, oif)
        want_rules: set[tuple[int, str, int]] = set()  # (family, source, table)
        for fam, attr in ((AF_INET, "ipv4"), (AF_INET6, "ipv6")):
            owners = [p for p in ports if getattr(p, attr)]
            if owners:
                want_defaults.add((fam, MAIN_TABLE, index[owners[0].host_ifname]))
            for port in owners:
                if port.table is None:
                    continue
                want_defaults.add((fam, port.table, index[port.host_ifname]))
                for a in getattr(port, attr):
                    want_rules.add((fam, str(a.ip), port.table))
        _converge_default_routes(ipr, want_defaults)
        _converge_rules(ipr, want_rules)


# -- helpers: each reads once and changes only the difference ---------------------


def _delete_link(ipr: IPRoute, index: int) -> None:
    try:
        ipr.link("del", index=index)
    except NetlinkError as exc:
        if exc.code != 19:  # ENODEV: went with its peer already
            raise


def _paired(rlink: Any, hlink: Any) -> bool:
    # A veth's IFLA_LINK is its peer's ifindex (in the peer's namespace).
    kind = hlink.get(("linkinfo", "kind"))
    return bool(
        kind == "veth"
        and rlink.get("link") == hlink.get("index")
        and hlink.get("link") == rlink.get("index")
    )


def _set_up(ipr: IPRoute, links: Iterable[Any]) -> None:
    for link in links:
        if not link["flags"] & IFF_UP:
            ipr.link("set", index=link.get("index"), state="up")


def _converge_addresses(
    ipr: IPRoute, want: set[tuple[int, str, int, int]], on: set[int], flags: int
) -> None:
    """Global (and our fe80::1) addresses on the links `on`; kernel link-locals left alone."""
    have: set[tuple[int, str, int, int]] = set()
    for msg in ipr.addr("dump"):
        if msg["index"] not in on:
            continue
        addr = msg.get("address")
        key = (msg["family"], str(ipaddress.ip_address(addr)), msg["prefixlen"], msg["index"])
        if msg["scope"] != RT_SCOPE_UNIVERSE and key not in want:
            continue
        have.add(key)
    # Add before deleting, so a changed primary address never leaves the
    # interface without one (and secondaries get promoted, not dropped).
    for fam, addr, plen, idx in sorted(want - have):
        if fam == AF_INET:
            ipr.addr("add", index=idx, address=addr, prefixlen=plen, family=fam)
        else:
            ipr.addr("add", index=idx, address=addr, prefixlen=plen, family=fam, flags=flags)
    for fam, addr, plen, idx in sorted(have - want):
        try:
            ipr.addr("del", index=idx, address=addr, prefixlen=plen, family=fam)
        except NetlinkError as exc:
            if exc.code != errno.EADDRNOTAVAIL:  # already gone with its primary
                raise


def _route_dumps(ipr: IPRoute) -> list[Any]:
    return [*ipr.route("dump", family=AF_INET), *ipr.route("dump", family=AF_INET6)]


def _converge_host_routes(ipr: IPRoute, want: set[tuple[int, str, int]]) -> None:
    """Router: one static /32 or /128 per ENI address out of its port."""
    have: set[tuple[int, str, int]] = set()
    for msg in _route_dumps(ipr):
        full = 32 if msg["family"] == AF_INET else 128
        if msg["proto"] != RTPROT_STATIC or msg["dst_len"] != full:
            continue
        if msg.get("table") != MAIN_TABLE:
            continue
        have.add((msg["family"], str(ipaddress.ip_address(msg.get("dst"))), msg.get("oif")))
    for fam, dst, oif in have - want:
        # The kernel matches scope on delete (pyroute2 would send universe).
        ipr.route(
            "del",
            family=fam,
            dst=dst,
            dst_len=32 if fam == AF_INET else 128,
            oif=oif,
            proto=RTPROT_STATIC,
            scope=RT_SCOPE_LINK,
        )
    for fam, dst, oif in sorted(want - have):
        ipr.route(
            "replace",
            family=fam,
            dst=dst,
            dst_len=32 if fam == AF_INET else 128,
            oif=oif,
            proto=RTPROT_STATIC,
            scope=RT_SCOPE_LINK,
        )


def _converge_neighbours(ipr: IPRoute, want: dict[tuple[int, str, int], str], on: set[int]) -> None:
    have: dict[tuple[int, str, int], str] = {}
    for msg in ipr.neigh("dump"):
        if msg["ifindex"] not in on or not msg["state"] & NUD_PERMANENT:
            continue
        key = (msg["family"], str(ipaddress.ip_address(msg.get("dst"))), msg["ifindex"])
        have[key] = msg.get("lladdr")
    for fam, dst, idx in set(have) - set(want):
        ipr.neigh("del", family=fam, dst=dst, ifindex=idx)
    for key, mac in sorted(want.items()):
        if have.get(key) != mac:
            fam, dst, idx = key
            ipr.neigh("replace", family=fam, dst=dst, ifindex=idx, lladdr=mac, state=NUD_PERMANENT)


def _converge_default_routes(ipr: IPRoute, want: set[tuple[int, int, int]]) -> None:
    have: set[tuple[int, int, int]] = set()
    for msg in _route_dumps(ipr):
        if msg["dst_len"] != 0 or msg["proto"] != RTPROT_STATIC:
            continue
        have.add((msg["family"], msg.get("table"), msg.get("oif")))
    for fam, table, oif in have - want:
        scope = RT_SCOPE_LINK if fam == AF_INET else RT_SCOPE_UNIVERSE
        ipr.route(
            "del", family=fam, dst_len=0, table=table, oif=oif, proto=RTPROT_STATIC, scope=scope
        )
    for fam, table, oif in sorted(want - have):
        if fam == AF_INET:
            # On-link: the router answers ARP for every address by proxy.
            ipr.route(
                "replace",
                family=fam,
                dst_len=0,
                table=table,
                oif=oif,
                proto=RTPROT_STATIC,
                scope=RT_SCOPE_LINK,
            )
        else:
            ipr.route(
                "replace",
                family=fam,
                dst_len=0,
                table=table,
                oif=oif,
                gateway=GATEWAY_V6,
                proto=RTPROT_STATIC,
            )


def _converge_rules(ipr: IPRoute, want: set[tuple[int, str, int]]) -> None:
    have: set[tuple[int, str, int]] = set()
    for fam in (AF_INET, AF_INET6):
        for msg in ipr.rule("dump", family=fam):
            if msg.get("priority") != RULE_PRIORITY:
                continue
            src = msg.get("src")
            if src is None:
                continue
            have.add((fam, str(ipaddress.ip_address(src)), msg.get("table")))
    for fam, src, table in have - want:
        ipr.rule(
            "del",
            family=fam,
            src=src,
            src_len=32 if fam == AF_INET else 128,
            table=table,
            priority=RULE_PRIORITY,
        )
    for fam, src, table in sorted(want - have):
        ipr.rule(
            "add",
            family=fam,
            src=src,
            src_len=32 if fam == AF_INET else 128,
            table=table,
            priority=RULE_PRIORITY,
        )
