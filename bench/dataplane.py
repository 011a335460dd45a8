"""Dataplane benchmark: what the firewall costs per packet and per change.

Everything is measured side by side in one run on this machine and printed as
ratios to a baseline from the same run (the machines are shared and noisy:
absolute numbers mean little, ratios do).

1. New TCP connections per second from a client instance to a server instance
   through the VPC router, with: no table at all (baseline); nftsg with 10,
   1000 and 10000 ingress rules on the server; and, for contrast, the same
   1000 rules compiled the naive way (one nft rule per ECS rule, first match,
   as iptables-era drivers do).
2. Change latency at scale (200 ENIs x 200 rules): the time to compile, diff and
   commit one added rule, against a full reload of the same program.

Run as root: `.venv/bin/python bench/dataplane.py [--seconds S]`.
"""

from __future__ import annotations

import argparse
import ipaddress
import random
import subprocess
import sys
import time
import uuid
from dataclasses import replace
from typing import Any

from nftsg.agent.lab import Lab
from nftsg.agent.nft_backend import NftBackend
from nftsg.agent.reconcile import Reconciler
from nftsg.translators.model import topology_from_data
from nftsg.translators.network import Network
from nftsg.translators.quotas import Quotas
from nftsg.translators.validate import build_network

BIG = Quotas(rules_per_group=20000, rules_per_eni=20000, group_reference_rules_per_group=20)

SERVER_LOOP = r"""
import socket, sys
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((sys.argv[1], 5001)); s.listen(4096)
print("ready", flush=True)
while True:
    c, _ = s.accept(); c.close()
"""

CLIENT_LOOP = r"""
import socket, sys, time
dst, seconds = sys.argv[1], float(sys.argv[2])
n = 0; end = time.monotonic() + seconds
while time.monotonic() < end:
    c = socket.socket(); c.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\0\0\0\0\0\0\0")
    c.settimeout(1.0)
    try:
        c.connect((dst, 5001)); n += 1
    except OSError:
        pass
    c.close()
print(n / seconds)
"""


def topology(n_rules: int, seed: int = 7) -> dict[str, Any]:
    """A client and a server; the server's group holds n_rules ingress rules of which
    exactly one (the weakest: priority 100) allows the client."""
    rng = random.Random(seed)
    rules: list[dict[str, Any]] = []
    seen = set()
    while len(rules) < n_rules - 1:
        net = ipaddress.IPv4Network((rng.randrange(1 << 32) & 0xFFFFFF00, 24))
        if net.overlaps(ipaddress.IPv4Network("10.0.0.0/8")):
            continue
        port = rng.randrange(1, 60000)
        key = (str(net), port)
        if key in seen:
            continue
        seen.add(key)
        rules.append({
            "direction": "ingress", "ip_protocol": rng.choice(["TCP", "UDP"]),
            "port_range": f"{port}/{port + rng.randrange(0, 50)}", "source_cidr_ip": str(net),
            "policy": rng.choice(["accept", "drop"]), "priority": rng.choice([1, 10, 50, 99]),
        })
    rules.append({"direction": "ingress", "ip_protocol": "TCP", "port_range": "5001/5001",
                  "source_cidr_ip": "10.0.1.0/24", "policy": "accept", "priority": 100})
    return {
        "vpcs": [{"vpc_id": "vpc-bench", "cidr_block": "10.0.0.0/16",
                  "vswitches": [{"vswitch_id": "vsw-1", "cidr_block": "10.0.1.0/24"}]}],
        "security_groups": [
            {"security_group_id": "sg-client", "vpc_id": "vpc-bench"},
            {"security_group_id": "sg-server", "vpc_id": "vpc-bench",
             "inner_access_policy": "Drop", "permissions": rules},
        ],
        "instances": [
            {"instance_id": "i-client", "vswitch_id": "vsw-1", "private_ip_address": "10.0.1.10",
             "security_group_ids": ["sg-client"]},
            {"instance_id": "i-server", "vswitch_id": "vsw-1", "private_ip_address": "10.0.1.20",
             "security_group_ids": ["sg-server"]},
        ],
    }


def naive_linear_program(network: Network, server_ifname: str) -> list[dict[str, Any]]:
    """The contrast case: one nft rule per ECS rule, sorted, first match wins."""
    table = {"family": "inet", "table": "linear"}
    cmds: list[dict[str, Any]] = [
        {"add": {"table": {"family": "inet", "name": "linear"}}},
        {"add": {"chain": {**table, "name": "forward", "type": "filter", "hook": "forward",
                           "prio": 0, "policy": "drop"}}},
        {"add": {"rule": {**table, "chain": "forward", "expr": [
            {"match": {"op": "in", "left": {"ct": {"key": "state"}},
                       "right": ["established", "related"]}}, {"accept": None}]}}},
    ]
    rules = sorted(network.groups["sg-server"].rules,
                   key=lambda r: (r.priority, r.policy != "drop"))
    for rule in rules:
        net = rule.peer.network  # type: ignore[union-attr]
        assert rule.ports is not None
        cmds.append({"add": {"rule": {**table, "chain": "forward", "expr": [
            {"match": {"op": "==", "left": {"meta": {"key": "oifname"}}, "right": server_ifname}},
            {"match": {"op": "==", "left": {"payload": {"protocol": "ip", "field": "saddr"}},
                       "right": {"prefix": {"addr": str(net.network_address),
                                            "len": net.prefixlen}}}},
            {"match": {"op": "==", "left": {"meta": {"key": "l4proto"}},
                       "right": 6 if rule.protocol == "TCP" else 17}},
            {"match": {"op": "==", "left": {"payload": {"protocol": "th", "field": "dport"}},
                       "right": {"range": [rule.ports.start, rule.ports.end]}}},
            {"accept": None} if rule.policy == "accept" else {"drop": None}]}}})
    cmds.append({"add": {"rule": {**table, "chain": "forward", "expr": [{"accept": None}]}}})
    return cmds


def conn_rate(lab: Lab, seconds: float) -> float:
    server = subprocess.Popen(
        ["ip", "netns", "exec", lab.host_ns("i-server"), sys.executable, "-c", SERVER_LOOP,
         "10.0.1.20"], stdout=subprocess.PIPE, text=True)
    try:
        assert server.stdout is not None and server.stdout.readline().strip() == "ready"
        out = subprocess.run(
            ["ip", "netns", "exec", lab.host_ns("i-client"), sys.executable, "-c", CLIENT_LOOP,
             "10.0.1.20", str(seconds)], capture_output=True, text=True, check=True)
        return float(out.stdout.strip())
    finally:
        server.kill()
        server.wait()


def bench_connections(seconds: float, rounds: int) -> None:
    prefix = "nb" + uuid.uuid4().hex[:6]
    lab = Lab(prefix)
    backend = NftBackend()
    try:
        results: dict[str, list[float]] = {}
        configs = ["no firewall", "nftsg 10 rules", "nftsg 1000 rules",
                   "nftsg 1000 rules + 40k other", "nftsg 10000 rules", "naive linear 1000 rules"]
        networks: dict[int | str, Network] = {
            n: build_network(topology_from_data(topology(n)), BIG) for n in (10, 1000, 10000)
        }
        # The same two instances in a crowded VPC: 200 more ENIs with 200 rules each
        # (not plugged in: only their rules matter to the router's program).
        networks["crowded"] = build_network(topology_from_data(crowded(topology(1000))), BIG)
        lab.apply(networks[10])
        router = lab.router_ns("vpc-bench")
        server_ifname = networks[10].enis["eni-server"].ifname
        for _ in range(rounds):  # interleaved, so drift hits every config alike
            for config in configs:
                backend.delete_table(router, "inet", "nftsg")
                backend.delete_table(router, "inet", "linear")
                if config.startswith("nftsg"):
                    key: int | str = "crowded" if "other" in config else int(config.split()[1])
                    Reconciler(backend, lambda _v: router).sync(networks[key])
                elif config.startswith("naive"):
                    backend.apply(router, naive_linear_program(networks[1000], server_ifname))
                results.setdefault(config, []).append(conn_rate(lab, seconds))
        base = max(results["no firewall"])
        print("\nnew TCP connections/s through the VPC router (best of "
              f"{rounds} x {seconds:.0f} s; ratio to no firewall, same run)")
        for config in configs:
            best = max(results[config])
            print(f"  {config:26} {best:9.0f}/s  {best / base:5.2f}x")
    finally:
        backend.close()
        lab.destroy()


def scale_topology() -> dict[str, Any]:
    rng = random.Random(11)
    groups, instances = [], []
    for g in range(200):
        rules = []
        for r in range(200):
            direction = rng.choice(["ingress", "egress"])
            peer = "source_cidr_ip" if direction == "ingress" else "dest_cidr_ip"
            rules.append({
                "direction": direction, "ip_protocol": "TCP",
                "port_range": f"{1000 + r}/{1000 + r + rng.randrange(5)}",
                peer: f"172.{16 + r % 16}.{g}.0/24",
                "policy": rng.choice(["accept", "drop"]), "priority": rng.choice([1, 10, 50, 100]),
            })
        groups.append({"security_group_id": f"sg-{g}", "vpc_id": "vpc-scale",
                       "permissions": rules})
        instances.append({"instance_id": f"i-{g}", "vswitch_id": "vsw-1",
                          "private_ip_address": f"10.1.{g // 250}.{g % 250 + 2}",
                          "security_group_ids": [f"sg-{g}"]})
    return {"vpcs": [{"vpc_id": "vpc-scale", "cidr_block": "10.1.0.0/16",
                      "vswitches": [{"vswitch_id": "vsw-1", "cidr_block": "10.1.0.0/16"}]}],
            "security_groups": groups, "instances": instances}


def crowded(topo: dict[str, Any]) -> dict[str, Any]:
    scale = scale_topology()
    return {
        **topo,
        "vpcs": [{**topo["vpcs"][0], "vswitches": [
            *topo["vpcs"][0]["vswitches"],
            {"vswitch_id": "vsw-scale", "cidr_block": "10.0.128.0/17"}]}],
        "security_groups": [
            *topo["security_groups"],
            *({**g, "vpc_id": "vpc-bench"} for g in scale["security_groups"]),
        ],
        "instances": [
            *topo["instances"],
            *({**i, "vswitch_id": "vsw-scale", "private_ip_address": f"10.0.{128 + n // 250}."
               f"{n % 250 + 2}"} for n, i in enumerate(scale["instances"])),
        ],
    }


def bench_changes() -> None:
    ns = "nb" + uuid.uuid4().hex[:6] + "-scale"
    subprocess.run(["ip", "netns", "add", ns], check=True)
    backend = NftBackend()
    try:
        topo = scale_topology()
        network = build_network(topology_from_data(topo), BIG)
        rec = Reconciler(backend, lambda _v: ns)
        started = time.perf_counter()
        rec.sync(network)
        full = time.perf_counter() - started
        changes = []
        for i in range(5):
            groups = topo["security_groups"]
            groups[i] = {**groups[i], "permissions": [*groups[i]["permissions"], {
                "direction": "ingress", "ip_protocol": "UDP", "port_range": "53/53",
                "source_cidr_ip": f"192.0.2.{i}/32", "priority": 50}]}
            changed = build_network(topology_from_data(topo), BIG)
            started = time.perf_counter()
            report = rec.sync(changed)
            changes.append((time.perf_counter() - started, sum(report.commands.values())))
        best = min(t for t, _ in changes)
        print("\nchange latency at 200 ENIs x 200 rules (same run)")
        print(f"  full reload (compile + one transaction)   {full * 1000:8.1f} ms  1.00x")
        print(f"  add one rule (compile + diff + commit)     {best * 1000:8.1f} ms  "
              f"{best / full:5.3f}x  ({changes[0][1]} commands)")
    finally:
        backend.close()
        subprocess.run(["ip", "netns", "del", ns], check=False)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=2.0)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    bench_connections(args.seconds, args.rounds)
    bench_changes()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
