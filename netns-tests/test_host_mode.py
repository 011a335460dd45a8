"""Host mode: an ENI bound to an interface that already exists, hot-plugged under traffic.

The agent runs as its own process. A test namespace stands in for the host
where interfaces appear (`{prefix}hst`: a VM's tap or a container's veth would
appear there), another for the container (`{prefix}ctr`). Plugging the
"container" is creating a veth pair with one end, named as the binding says,
in the host namespace and `eth0` in the container; unplugging is deleting it.

One VPC: a lab-built server (i-srv) and the bound ENI (i-hot). UDP 8000 is
allowed both ways; UDP 7000 to the server and UDP 7001 to the hot ENI are
denied (ingress default). All along each plug, senders in both namespaces
fire datagrams at the denied ports every 2 ms and listeners count what
arrives: not one may ever arrive, before, during or after the plug. The
allowed echo (container -> server:8000 and back) shows when the port is in
force; the time from creating the interface to the first echo is the plug
latency.
"""

from __future__ import annotations

import errno
import os
import select
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import agent_process
import pytest
from nftsg.agent import netns
from nftsg.agent.lab import Lab
from nftsg.agent.lab_commands import give_back_bound_interfaces
from nftsg.agent.store import Store
from nftsg.translators.bindings import bound_eni_ids
from nftsg.translators.model import topology_from_data
from nftsg.translators.validate import build_network
from pyroute2 import IPRoute, NetlinkError

pytestmark = pytest.mark.netns

SERVER, HOT = "10.7.1.20", "10.7.1.30"
HOT_MAC = "02:00:00:07:01:1e"
PORT_MAC = "02:00:00:aa:bb:01"  # the host end's own MAC, for the binding by MAC
ALLOWED, DENIED_TO_SERVER, DENIED_TO_HOT = 8000, 7000, 7001
BOUND_NAME = "tap-hot"
BINDING = {"ifname": BOUND_NAME}


def udp_in(port: int) -> dict[str, Any]:
    return {
        "direction": "ingress",
        "ip_protocol": "UDP",
        "port_range": f"{port}/{port}",
        "source_cidr_ip": "10.7.0.0/16",
    }


def topology(*, hot: bool, binding: dict[str, Any] | None = None) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "vpcs": [
            {
                "vpc_id": "vpc-h",
                "cidr_block": "10.7.0.0/16",
                "vswitches": [{"vswitch_id": "vsw-h", "cidr_block": "10.7.1.0/24"}],
            }
        ],
        "security_groups": [
            {"security_group_id": "sg-srv", "vpc_id": "vpc-h", "permissions": [udp_in(ALLOWED)]},
            {"security_group_id": "sg-hot", "vpc_id": "vpc-h", "permissions": [udp_in(ALLOWED)]},
        ],
        "instances": [
            {
                "instance_id": "i-srv",
                "vswitch_id": "vsw-h",
                "private_ip_address": SERVER,
                "security_group_ids": ["sg-srv"],
            }
        ],
    }
    if hot:
        doc["instances"].append(
            {
                "instance_id": "i-hot",
                "vswitch_id": "vsw-h",
                "private_ip_address": HOT,
                "mac_address": HOT_MAC,
                "security_group_ids": ["sg-hot"],
            }
        )
        if binding is not None:
            doc["bindings"] = [{"network_interface_id": "eni-hot", **binding}]
    return doc


@dataclass
class Traffic:
    """Denied senders, denied listeners and the allowed echo, in one thread."""

    server_ns: str
    container_ns: str
    denied_received: list[tuple[float, str]] = field(default_factory=list)
    echoes: list[float] = field(default_factory=list)
    sent: int = 0

    def __post_init__(self) -> None:
        self._stop = threading.Event()
        with netns.entered(self.server_ns):
            self.srv_denied = self._bound(DENIED_TO_SERVER)
            self.srv_echo = self._bound(ALLOWED)
            self.srv_send = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        with netns.entered(self.container_ns):
            self.ctr_denied = self._bound(DENIED_TO_HOT)
            self.ctr_send = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    @staticmethod
    def _bound(port: int) -> socket.socket:
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.bind(("0.0.0.0", port))
        return sock

    def _send(self, sock: socket.socket, data: bytes, to: tuple[str, int]) -> None:
        try:
            sock.sendto(data, to)
            self.sent += 1
        except OSError:  # no interface or route yet
            pass

    def _run(self) -> None:
        readable = [self.srv_denied, self.srv_echo, self.ctr_denied, self.ctr_send]
        while not self._stop.is_set():
            self._send(self.ctr_send, b"deny", (SERVER, DENIED_TO_SERVER))
            self._send(self.srv_send, b"deny", (HOT, DENIED_TO_HOT))
            self._send(self.ctr_send, b"allow", (SERVER, ALLOWED))
            deadline = time.monotonic() + 0.002
            while (left := deadline - time.monotonic()) > 0:
                ready, _, _ = select.select(readable, [], [], left)
                for sock in ready:
                    try:
                        data, peer = sock.recvfrom(2048)
                    except OSError:
                        continue
                    if sock is self.srv_echo:
                        self._send(self.srv_echo, data, peer)
                    elif sock is self.ctr_send:
                        self.echoes.append(time.monotonic())
                    else:
                        where = "server" if sock is self.srv_denied else "container"
                        self.denied_received.append((time.monotonic(), where))

    def first_echo_after(self, since: float, timeout: float = 10.0) -> float | None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            later = [t for t in self.echoes if t > since]
            if later:
                return later[0]
            time.sleep(0.002)
        return None

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        for sock in (self.srv_denied, self.srv_echo, self.srv_send, self.ctr_denied, self.ctr_send):
            sock.close()


@dataclass
class HostLab:
    lab: Lab
    state_dir: Path
    store: Store
    proc: Any
    router: str
    server: str
    host_ns: str
    container_ns: str
    port_name: str  # the ENI's port name in the router

    def save(self, doc: dict[str, Any]) -> None:
        revision = self.store.save_topology(doc)
        agent_process.wait_applied(self.store, self.router, revision, self.proc)

    def links(self, ns: str) -> dict[str, Any]:
        with netns.entered(ns):
            ipr = IPRoute(groups=0)
        try:
            return {link.get("ifname"): link for link in ipr.get_links()}
        finally:
            ipr.close()

    def plug(self, name: str = BOUND_NAME, mac: str | None = None) -> None:
        """A veth pair: `name` in the host namespace, a configured eth0 in the container."""
        fd = netns.open_fd(self.container_ns)
        try:
            with netns.entered(self.host_ns):
                ipr = IPRoute(groups=0)
            try:
                extra = {"address": mac} if mac else {}
                ipr.link(
                    "add",
                    ifname=name,
                    kind="veth",
                    peer={"ifname": "eth0", "address": HOT_MAC, "net_ns_fd": fd},
                    **extra,
                )
                # The agent may already have taken it into the router (it watches
                # links and moves a bound one at once; a move brings it down and the
                # agent brings it up there): then there is nothing left to bring up.
                for index in ipr.link_lookup(ifname=name):
                    try:
                        ipr.link("set", index=index, state="up")
                    except NetlinkError as exc:
                        if exc.code != errno.ENODEV:
                            raise
            finally:
                ipr.close()
        finally:
            os.close(fd)
        ctr = self._container()
        try:
            index = ctr.link_lookup(ifname="eth0")[0]
            ctr.addr("add", index=index, address=HOT, prefixlen=24)
            ctr.link("set", index=index, state="up")
            ctr.route("replace", dst="0.0.0.0/0", oif=index, scope=253)
        finally:
            ctr.close()

    def wait_port_up(self, timeout: float = 10.0) -> float | None:
        """When the ENI's port is up in the router (polled every few ms)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            link = self.links(self.router).get(self.port_name)
            if link is not None and link["flags"] & 1:
                return time.monotonic()
            time.sleep(0.003)
        return None

    def unplug(self) -> None:
        ctr = self._container()
        try:
            for index in ctr.link_lookup(ifname="eth0"):
                ctr.link("del", index=index)
        finally:
            ctr.close()

    def _container(self) -> IPRoute:
        with netns.entered(self.container_ns):
            return IPRoute(groups=0)

    def log(self) -> str:
        return agent_process.log_text(self.state_dir)


@pytest.fixture
def host_lab(lab: Lab, tmp_path: Path) -> Iterator[HostLab]:
    host_ns, container_ns = f"{lab.prefix}hst", f"{lab.prefix}ctr"
    binding = {"netns": host_ns, "ifname": BOUND_NAME}
    doc = topology(hot=True, binding=binding)
    network = build_network(topology_from_data(doc))
    proc = None
    store = Store(tmp_path / "state.db")
    try:
        netns.create(host_ns)
        netns.create(container_ns)
        netns.write_sysctls(container_ns, {"net/ipv4/conf/all/rp_filter": 2})
        with netns.entered(container_ns):
            ipr = IPRoute(groups=0)
        ipr.link("set", index=ipr.link_lookup(ifname="lo")[0], state="up")
        ipr.close()
        lab.ensure_routers(network)
        proc = agent_process.start(tmp_path, lab.prefix)
        hl = HostLab(
            lab=lab,
            state_dir=tmp_path,
            store=store,
            proc=proc,
            router=lab.router_ns("vpc-h"),
            server="",
            host_ns=host_ns,
            container_ns=container_ns,
            port_name=network.enis["eni-hot"].ifname,
        )
        hl.save(doc)
        lab.apply(network, bound_eni_ids(topology_from_data(doc)))
        hl.server = lab.host_ns("i-srv")
        yield hl
    finally:
        if proc is not None:
            agent_process.stop(proc)
        store.close()
        for ns in (container_ns, host_ns):
            if netns.exists(ns):
                netns.delete(ns)


def _wait(predicate: Any, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.01)
    return False


ITERATIONS = 21  # seven of each way the plug can meet the model
MODES = ("known ENI", "interface before model", "interface with model")


def test_hot_plug_race_never_lets_a_denied_packet_through(host_lab: HostLab) -> None:
    hl = host_lab
    binding = {"netns": hl.host_ns, "ifname": BOUND_NAME}
    full, base = topology(hot=True, binding=binding), topology(hot=False)
    traffic = Traffic(hl.server, hl.container_ns)
    latencies: dict[str, list[float]] = {m: [] for m in MODES}
    plug_times: dict[str, list[float]] = {m: [] for m in MODES}
    try:
        for n in range(ITERATIONS):
            mode = MODES[n % len(MODES)]
            if mode != "known ENI":
                hl.save(base)  # the ENI is not in the model (nor in the table)
            started = time.monotonic()
            if mode == "known ENI":
                hl.plug()
                reference = started
            elif mode == "interface before model":
                hl.plug()
                time.sleep(0.3)
                assert BOUND_NAME in hl.links(hl.host_ns), "plugged an ENI the model lacks"
                assert hl.port_name not in hl.links(hl.router)
                assert not [t for t in traffic.echoes if t > started]
                reference = time.monotonic()
                revision = hl.store.save_topology(full)
            else:
                reference = time.monotonic()
                revision = hl.store.save_topology(full)
                hl.plug()
            up = hl.wait_port_up()
            assert up is not None, f"iteration {n} ({mode}): not plugged\n" + hl.log()[-3000:]
            plug_times[mode].append(up - reference)
            if mode != "known ENI":
                agent_process.wait_applied(hl.store, hl.router, revision, hl.proc)
            echo = traffic.first_echo_after(started)
            assert echo is not None, (
                f"iteration {n} ({mode}): allowed traffic never worked\n" + (hl.log()[-3000:])
            )
            latencies[mode].append(echo - started)
            assert hl.port_name in hl.links(hl.router)
            assert BOUND_NAME not in hl.links(hl.host_ns)
            time.sleep(0.2)  # denied traffic keeps coming while the port is in force
            assert not traffic.denied_received, f"iteration {n} ({mode}): {traffic.denied_received}"
            hl.unplug()  # removal: the router end goes with its pair
            assert _wait(lambda: hl.port_name not in hl.links(hl.router))
            assert _wait(lambda: "interface is gone" in hl.log().split("plugged into")[-1])
    finally:
        traffic.close()
    assert not traffic.denied_received, traffic.denied_received
    assert traffic.sent > 1000
    for mode in MODES:
        plugs, echoes = sorted(plug_times[mode]), sorted(latencies[mode])
        print(
            f"{mode}: port up in the router after median {plugs[len(plugs) // 2] * 1000:.0f} ms "
            f"(max {plugs[-1] * 1000:.0f}); first allowed echo after median "
            f"{echoes[len(echoes) // 2]:.3f} s (max {echoes[-1]:.3f}; includes the "
            f"container's ARP retry) over {len(plugs)}"
        )
    assert hl.log().count("plugged into") >= ITERATIONS


def test_rename_removal_mac_binding_and_unbinding(host_lab: HostLab) -> None:
    hl = host_lab
    traffic = Traffic(hl.server, hl.container_ns)
    try:
        # Appears under another name: not ours, so it stays where it is.
        started = time.monotonic()
        hl.plug(name="tmp-hot")
        time.sleep(0.5)
        assert "tmp-hot" in hl.links(hl.host_ns)
        assert hl.port_name not in hl.links(hl.router)
        assert not [t for t in traffic.echoes if t > started]

        # Renamed to the bound name: plugged.
        with netns.entered(hl.host_ns):
            ipr = IPRoute(groups=0)
        try:
            ipr.link("set", index=ipr.link_lookup(ifname="tmp-hot")[0], ifname=BOUND_NAME)
        finally:
            ipr.close()
        renamed = time.monotonic()
        assert traffic.first_echo_after(renamed) is not None
        print(f"renamed to the bound name -> allowed echo: {traffic.echoes[-1] - renamed:.3f} s")

        # Renamed inside the router by someone else: its packets are an unknown
        # port's (dropped) until the agent renames it back.
        router = hl.links(hl.router)
        with netns.entered(hl.router):
            ipr = IPRoute(groups=0)
        try:
            ipr.link("set", index=router[hl.port_name]["index"], ifname="stray0")
        finally:
            ipr.close()
        strayed = time.monotonic()
        assert _wait(lambda: hl.port_name in hl.links(hl.router), timeout=5)
        assert "renamed back" in hl.log()
        assert traffic.first_echo_after(strayed) is not None
        print(f"renamed in the router -> allowed echo again: {traffic.echoes[-1] - strayed:.3f} s")

        # Removed, then the binding by MAC: any name, the host end's own MAC.
        hl.unplug()
        assert _wait(lambda: hl.port_name not in hl.links(hl.router))
        hl.save(topology(hot=True, binding={"netns": hl.host_ns, "mac_address": PORT_MAC}))
        started = time.monotonic()
        hl.plug(name="vnet7", mac=PORT_MAC)
        assert traffic.first_echo_after(started) is not None
        assert "vnet7" not in hl.links(hl.host_ns)

        # Unbound (the ENI stays in the model): given back to the host
        # namespace, down; the MAC binding keeps the port's name.
        hl.save(topology(hot=True, binding=None))
        assert _wait(lambda: hl.port_name in hl.links(hl.host_ns))
        assert hl.port_name not in hl.links(hl.router)
        assert not hl.links(hl.host_ns)[hl.port_name]["flags"] & 1
        time.sleep(0.3)
    finally:
        traffic.close()
    assert not traffic.denied_received, traffic.denied_received


def test_lab_down_gives_bound_interfaces_back_before_removing_routers(host_lab: HostLab) -> None:
    hl = host_lab
    hl.plug()
    assert hl.wait_port_up() is not None
    agent_process.stop(hl.proc)
    # What `nftsg lab down` does before it removes the namespaces: removing the
    # router would delete the virtual link in it, and the container's eth0 with it.
    give_back_bound_interfaces(hl.lab, topology(hot=True, binding=dict(BINDING, netns=hl.host_ns)))
    assert BOUND_NAME in hl.links(hl.host_ns)
    assert hl.port_name not in hl.links(hl.router)
    hl.lab.destroy()
    assert "eth0" in hl.links(hl.container_ns)
