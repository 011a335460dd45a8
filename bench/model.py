"""The benchmark's topology: N ENIs x R rules per ENI in one VPC.

Every instance has one ENI and its own basic group (inner policy Drop, so no
intra-group shortcut hides the rule chains) holding R rules: accept and drop
at many priorities, CIDRs (some of which contain the VPC's addresses), up to 20
references to other groups, prefix lists, port ranges, source port ranges,
TCP/UDP/ICMP/GRE/ALL. No noise rule matches the probed ports (5001 for new
connections, 5201 for iperf3); the server's only rule that allows the client
is the last of its order (priority 100, an accept after the drops of 100).
"""

from __future__ import annotations

import random
from typing import Any

from nftsg.translators.evaluator import Flow, evaluate
from nftsg.translators.model import topology_from_data
from nftsg.translators.network import Network
from nftsg.translators.quotas import Quotas
from nftsg.translators.validate import build_network

VPC = "vpc-bench"
CONN_PORT = 5001
IPERF_PORT = 5201
PRIORITIES = (1, 2, 5, 10, 20, 30, 50, 70, 90, 99, 100)
PROTOCOLS = ("TCP", "TCP", "TCP", "UDP", "UDP", "ICMP", "GRE", "ALL")


def quotas_for(rules_per_eni: int) -> Quotas:
    n = 4 * max(rules_per_eni, 200)  # a prefix list counts as its max_entries (4)
    return Quotas(rules_per_group=n, rules_per_eni=n, group_reference_rules_per_group=20)


def address(i: int) -> str:
    return f"10.0.{i // 200}.{i % 200 + 10}"


def group_id(i: int) -> str:
    return f"sg-{i:04d}"


def _noise_ports(rnd: random.Random) -> str:
    # Above both probed ports, so no noise rule decides the probed flows.
    lo = rnd.randrange(6000, 60000)
    return f"{lo}/{lo if rnd.random() < 0.6 else lo + rnd.randrange(1, 3000)}"


def _noise_rule(rnd: random.Random, n: int, i: int, n_enis: int, refs: int) -> dict[str, Any]:
    direction = "ingress" if rnd.random() < 0.6 else "egress"
    side = "source" if direction == "ingress" else "dest"
    rule: dict[str, Any] = {
        "direction": direction,
        "priority": rnd.choice(PRIORITIES),
        "policy": "drop" if rnd.random() < 0.3 else "accept",
    }
    kind = rnd.random()
    if kind < 0.1 and refs < 20 and n_enis > 1:
        rule[f"{side}_group_id"] = group_id(rnd.choice([j for j in range(min(n_enis, 50)) if j != i]
                                                      or [0]))
        rule.update(ip_protocol="TCP", port_range=_noise_ports(rnd))
    elif kind < 0.2:
        rule[f"{side}_prefix_list_id"] = f"pl-{rnd.randrange(10)}"
        rule.update(ip_protocol=rnd.choice(["TCP", "UDP"]), port_range=_noise_ports(rnd))
    else:
        proto = rnd.choice(PROTOCOLS)
        if proto == "ALL":  # every port: keep it off the VPC's addresses
            rule[f"{side}_cidr_ip"] = f"172.{16 + n % 16}.{rnd.randrange(256)}.0/24"
        else:
            rule[f"{side}_cidr_ip"] = rnd.choice(
                ["0.0.0.0/0", "10.0.0.0/16", f"192.168.{n % 256}.0/24",
                 f"172.{16 + n % 16}.{rnd.randrange(256)}.{rnd.randrange(256)}/32"])
        if proto in ("TCP", "UDP"):
            rule["port_range"] = _noise_ports(rnd)
            if rnd.random() < 0.1:
                rule["source_port_range"] = "1024/65535"
        else:
            rule["port_range"] = "-1/-1"
        rule["ip_protocol"] = proto
    return rule


def topology(n_enis: int, rules_per_eni: int, seed: int = 7) -> dict[str, Any]:
    """ENI 0 is the client, ENI 1 the server (n_enis >= 2)."""
    if n_enis < 2 or rules_per_eni < 1:
        raise ValueError("the benchmark needs at least 2 ENIs and 1 rule per ENI")
    rnd = random.Random(seed)
    groups = []
    for i in range(n_enis):
        perms: list[dict[str, Any]] = []
        seen: set[tuple[Any, ...]] = set()
        refs = 0
        n = 0
        target = rules_per_eni - (1 if i == 1 else 0)
        while len(perms) < target:
            n += 1
            rule = _noise_rule(rnd, n, i, n_enis, refs)
            ident = tuple(sorted(rule.items()))
            if ident in seen:
                continue
            seen.add(ident)
            refs += any(k.endswith("_group_id") for k in rule)
            perms.append(rule)
        if i == 1:
            perms.append({"direction": "ingress", "priority": 100, "policy": "accept",
                          "ip_protocol": "TCP", "port_range": f"{CONN_PORT}/{IPERF_PORT}",
                          "source_cidr_ip": f"{address(0)}/32"})
        groups.append({"security_group_id": group_id(i), "vpc_id": VPC,
                       "inner_access_policy": "Drop", "permissions": perms})
    return {
        "vpcs": [{"vpc_id": VPC, "cidr_block": "10.0.0.0/16",
                  "vswitches": [{"vswitch_id": "vsw-1", "cidr_block": "10.0.0.0/20"}]}],
        "prefix_lists": [
            {"prefix_list_id": f"pl-{k}", "address_family": "IPv4", "max_entries": 4,
             "entries": [f"198.51.{k}.{j * 16}/28" for j in range(3)]}
            for k in range(10)
        ],
        "security_groups": groups,
        "instances": [
            {"instance_id": f"i-{i:04d}", "vswitch_id": "vsw-1",
             "private_ip_address": address(i), "security_group_ids": [group_id(i)]}
            for i in range(n_enis)
        ],
    }


def network(n_enis: int, rules_per_eni: int) -> Network:
    return build_network(topology_from_data(topology(n_enis, rules_per_eni)),
                         quotas_for(rules_per_eni))


def client_eni(net: Network) -> str:
    return next(e.eni_id for e in net.enis.values() if e.instance_id == "i-0000")


def server_eni(net: Network) -> str:
    return next(e.eni_id for e in net.enis.values() if e.instance_id == "i-0001")


def probed_decision(net: Network) -> dict[str, Any]:
    """The evaluator's verdict for both probed flows; raises unless both are allowed by
    the server's deep rule (priority 100), so the benchmark measures what it claims."""
    out: dict[str, Any] = {}
    for port in (CONN_PORT, IPERF_PORT):
        import ipaddress

        d = evaluate(net, Flow(ipaddress.ip_address(address(0)), ipaddress.ip_address(address(1)),
                               6, port, 40000), vpc_id=VPC)
        ing = d.ingress
        if d.verdict != "accept" or ing is None or ing.rule is None or ing.rule.priority != 100:
            raise RuntimeError(f"probed flow to port {port} is not decided by the deep rule: {d}")
        out[str(port)] = {"verdict": d.verdict, "reason": d.reason,
                          "egress": d.egress.by if d.egress else None,
                          "ingress_rule_priority": ing.rule.priority,
                          "ingress_rule_position": _position(net, ing.rule)}
    return out


def _position(net: Network, rule: Any) -> str:
    """Where the deciding rule sits in the server's ingress order (drop before accept)."""
    rules = sorted((r for r in net.groups[rule.group_id].rules if r.direction == "ingress"),
                   key=lambda r: (r.priority, r.policy != "drop"))
    return f"{rules.index(rule) + 1} of {len(rules)}"
