"""AttachNetworkInterface / DetachNetworkInterface through the official SDK, with traffic.

A lab with a lab-built server (i-srv) and an instance whose ENI is bound (host
mode) to an interface that already exists: a veth pair made by the test, its
host end in the agent's namespace named as the ENI's port (the default of
AttachNetworkInterface, whose ECS parameters name no interface), eth0 in a
"container" namespace. Detach gives the interface back and the container is cut
off; Attach plugs it again and TCP to the server works again. Bad calls are
rejected with ECS codes and change nothing (`nftsg ecs` too, with nftsg's own
Netns/Ifname parameters).
"""

from __future__ import annotations

import json
import os
import sqlite3
from collections.abc import Iterator
from typing import Any

import pytest
from alibabacloud_ecs20140526 import models
from alibabacloud_ecs20140526.client import Client
from alibabacloud_tea_openapi import models as openapi_models
from alibabacloud_tea_openapi.exceptions import ClientException
from e2e import CliLab, cli_lab, describe, wait_for, write_yaml
from nftsg.agent import netns
from nftsg.translators.model import topology_from_data
from nftsg.translators.naming import default_primary_eni_id
from nftsg.translators.validate import build_network
from probes import tcp_connect
from pyroute2 import IPRoute
from test_api_lab import free_port

pytestmark = pytest.mark.netns

REGION = "cn-hangzhou"
VPC = "vpc-at"
SERVER, HOT = "10.8.1.20", "10.8.1.30"
HOT_MAC = "02:00:00:08:01:1e"


def _eni(instance_id: str) -> str:
    return default_primary_eni_id(instance_id)


def topology(hot_id: str, port_name: str | None) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "region_id": REGION,
        "vpcs": [
            {
                "vpc_id": VPC,
                "cidr_block": "10.8.0.0/16",
                "vswitches": [{"vswitch_id": "vsw-at", "cidr_block": "10.8.1.0/24"}],
            }
        ],
        "security_groups": [
            {
                "security_group_id": "sg-srv",
                "vpc_id": VPC,
                "permissions": [
                    {
                        "direction": "ingress",
                        "ip_protocol": "TCP",
                        "port_range": "80/80",
                        "source_cidr_ip": "10.8.0.0/16",
                    }
                ],
            },
            {"security_group_id": "sg-hot", "vpc_id": VPC},
        ],
        "instances": [
            {
                "instance_id": "i-srv",
                "vswitch_id": "vsw-at",
                "private_ip_address": SERVER,
                "security_group_ids": ["sg-srv"],
            },
            {
                "instance_id": hot_id,
                "vswitch_id": "vsw-at",
                "private_ip_address": HOT,
                "mac_address": HOT_MAC,
                "security_group_ids": ["sg-hot"],
            },
        ],
    }
    if port_name is not None:
        doc["bindings"] = [{"network_interface_id": _eni(hot_id), "ifname": port_name}]
    return doc


class AttachLab:
    def __init__(self, lab: CliLab, client: Client, hot_id: str, port: str, ctr: str) -> None:
        self.lab, self.client, self.hot_id, self.port, self.ctr = lab, client, hot_id, port, ctr

    def tcp(self) -> bool:
        return tcp_connect(self.ctr, self.lab.instance_ns("i-srv"), SERVER, 80, timeout=0.5)

    def port_in_router(self) -> bool:
        with netns.entered(self.lab.router_ns(VPC)):
            ipr = IPRoute(groups=0)
        try:
            return bool(ipr.link_lookup(ifname=self.port))
        finally:
            ipr.close()

    def journal(self) -> list[Any]:
        db = sqlite3.connect(self.lab.state_dir / "state.db")
        try:
            rows = db.execute("SELECT action FROM mutations ORDER BY revision").fetchall()
        finally:
            db.close()
        return [r[0] for r in rows]


def _container(ctr: str, port: str) -> None:
    """The veth pair: `port` in this (the agent's) namespace, eth0 configured in `ctr`."""
    netns.create(ctr)
    netns.write_sysctls(ctr, {"net/ipv4/conf/all/rp_filter": 2})
    fd = netns.open_fd(ctr)
    try:
        with IPRoute(groups=0) as ipr:
            ipr.link(
                "add",
                ifname=port,
                kind="veth",
                peer={"ifname": "eth0", "address": HOT_MAC, "net_ns_fd": fd},
            )
    finally:
        os.close(fd)
    with netns.entered(ctr):
        ctr_ipr = IPRoute(groups=0)
    try:
        ctr_ipr.link("set", index=ctr_ipr.link_lookup(ifname="lo")[0], state="up")
        index = ctr_ipr.link_lookup(ifname="eth0")[0]
        ctr_ipr.addr("add", index=index, address=HOT, prefixlen=24)
        ctr_ipr.link("set", index=index, state="up")
        ctr_ipr.route("replace", dst="0.0.0.0/0", oif=index, scope=253)
    finally:
        ctr_ipr.close()


@pytest.fixture(scope="module")
def alab(tmp_path_factory: pytest.TempPathFactory, run_prefix: str) -> Iterator[AttachLab]:
    state = tmp_path_factory.mktemp("attach-lab")
    hot_id = f"i-{run_prefix}at"
    doc = topology(hot_id, None)
    port = build_network(topology_from_data(doc)).enis[_eni(hot_id)].ifname
    ctr = f"{run_prefix}atc"
    api_port = free_port()
    with cli_lab(f"{run_prefix}a", state) as lab:
        try:
            created = lab.run("api-key", "create")
            assert created.returncode == 0, describe(created)
            key = json.loads(created.stdout)
            path = write_yaml(state / "lab.yaml", topology(hot_id, port))
            proc = lab.run(
                "lab", "up", str(path), "--api-listen", f"127.0.0.1:{api_port}", timeout=120
            )
            assert proc.returncode == 0, f"{describe(proc)}\n{lab.log_tail()}"
            # The interface appears once the lab is up (a container started later): an
            # interface there before `lab up` can race the lab's own router setup
            # (EEXIST when the agent plugs it first). Deleting the container
            # namespace deletes the pair, wherever its host end is.
            _container(ctr, port)
            client = Client(
                openapi_models.Config(
                    access_key_id=key["AccessKeyId"],
                    access_key_secret=key["AccessKeySecret"],
                    endpoint=f"127.0.0.1:{api_port}",
                    protocol="http",
                    region_id=REGION,
                    read_timeout=30000,
                    connect_timeout=5000,
                )
            )
            yield AttachLab(lab, client, hot_id, port, ctr)
        finally:
            if netns.exists(ctr):
                netns.delete(ctr)


def _attach(a: AttachLab, **extra: Any) -> Any:
    return a.client.attach_network_interface(
        models.AttachNetworkInterfaceRequest(
            region_id=REGION,
            instance_id=extra.get("instance_id", a.hot_id),
            network_interface_id=extra.get("eni", _eni(a.hot_id)),
        )
    )


def _detach(a: AttachLab, **extra: Any) -> Any:
    return a.client.detach_network_interface(
        models.DetachNetworkInterfaceRequest(
            region_id=REGION,
            instance_id=extra.get("instance_id", a.hot_id),
            network_interface_id=extra.get("eni", _eni(a.hot_id)),
        )
    )


def _code(call: Any) -> str:
    with pytest.raises(ClientException) as caught:
        call()
    return str(caught.value.code)


def test_detach_cuts_the_interface_off_and_attach_plugs_it_again(alab: AttachLab) -> None:
    assert wait_for(alab.port_in_router, timeout=10), alab.lab.log_tail()
    assert wait_for(alab.tcp, timeout=10, interval=0.2)

    _detach(alab)
    assert wait_for(lambda: not alab.port_in_router(), timeout=10), alab.lab.log_tail()
    assert not alab.tcp()
    assert _code(lambda: _detach(alab)) == "InvalidOperation.InvalidEniState"

    _attach(alab)
    assert wait_for(alab.port_in_router, timeout=10), alab.lab.log_tail()
    assert wait_for(alab.tcp, timeout=10, interval=0.2)
    assert _code(lambda: _attach(alab)) == "InvalidOperation.InvalidEniState"


def test_bad_calls_are_rejected_and_change_nothing(alab: AttachLab) -> None:
    before = alab.journal()
    assert _code(lambda: _attach(alab, eni="eni-nope")) == "InvalidEniId.NotFound"
    assert _code(lambda: _detach(alab, instance_id="i-nope")) == "InvalidInstanceId.NotFound"
    assert _code(lambda: _detach(alab, instance_id="i-srv")) == "InvalidOperation.InvalidEniState"
    bad = alab.lab.run(
        "ecs",
        "AttachNetworkInterface",
        "--InstanceId",
        "i-srv",
        "--NetworkInterfaceId",
        "eni-srv",
        "--Netns",
        "a/b",
        "--Ifname",
        "x",
    )
    assert bad.returncode != 0 and "InvalidParameter" in bad.stdout + bad.stderr, describe(bad)
    assert alab.journal() == before
    assert alab.tcp()
