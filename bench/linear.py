"""The contrast rulesets, built by the benchmark (not part of nftsg).

- conntrack only: the cost of connection tracking alone;
- linear: the same ECS rules as one nft rule per ECS rule, in priority order
  with drop before accept at equal priority (what iptables-era drivers do),
  one chain per ENI and direction behind the same ifname dispatch as nftsg,
  with an established/related shortcut first.
Both are nft text, loaded with `nft -f` in the router namespace.
"""

from __future__ import annotations

import ipaddress
import subprocess

from nftsg.translators.network import CidrPeer, GroupPeer, Network, PrefixListPeer, Rule

CT_ONLY_TABLE = "bench_ct"
LINEAR_TABLE = "bench_linear"
_L4 = {"TCP": "tcp", "UDP": "udp", "ICMP": "icmp", "ICMPv6": "ipv6-icmp", "GRE": "gre"}


def conntrack_only_text() -> str:
    return (f"table inet {CT_ONLY_TABLE} {{\n chain forward {{\n"
            "  type filter hook forward priority 0; policy accept;\n"
            "  ct state established,related accept\n  accept\n }\n}\n")


def _addrs(net: Network, rule: Rule, family: int) -> list[str] | None:
    """The peer as nft address literals of one family; None: matches any address."""
    peer = rule.peer
    if isinstance(peer, CidrPeer):
        nets = [peer.network]
    elif isinstance(peer, PrefixListPeer):
        nets = list(net.prefix_lists[peer.prefix_list_id].entries)
    else:
        assert isinstance(peer, GroupPeer)
        nets = [ipaddress.ip_network(a) for eni in net.enis.values()
                if peer.group_id in eni.group_ids for a in eni.addresses]
    nets = [n for n in nets if n.version == family]
    if len(nets) == 1 and nets[0].prefixlen == 0:
        return None
    return [str(n) for n in nets]


def _rule_text(net: Network, rule: Rule, family: int) -> str | None:
    l3 = "ip" if family == 4 else "ip6"
    if (rule.protocol == "ICMP" and family == 6) or (rule.protocol == "ICMPv6" and family == 4):
        return None
    parts = [f"meta nfproto {'ipv4' if family == 4 else 'ipv6'}"]
    addrs = _addrs(net, rule, family)
    if addrs == []:
        return None
    peer_field = "saddr" if rule.direction == "ingress" else "daddr"
    if addrs is not None:
        match = addrs[0] if len(addrs) == 1 else f"{{ {', '.join(addrs)} }}"
        parts.append(f"{l3} {peer_field} {match}")
    if rule.local is not None:
        if rule.local.version != family:
            return None
        parts.append(f"{l3} {'daddr' if rule.direction == 'ingress' else 'saddr'} {rule.local}")
    if rule.protocol in _L4:
        parts.append(f"meta l4proto {_L4[rule.protocol]}")
    if rule.ports is not None and rule.protocol in ("TCP", "UDP"):
        parts.append(f"th dport {rule.ports.start}-{rule.ports.end}")
    if rule.source_ports is not None:
        parts.append(f"th sport {rule.source_ports.start}-{rule.source_ports.end}")
    if rule.policy == "drop":
        parts.append("drop")
    else:  # egress accept: on to the receiver's ingress
        parts.append("accept" if rule.direction == "ingress" else "return")
    return " ".join(parts)


def linear_text(net: Network, vpc_id: str, full: frozenset[str] | None = None) -> str:
    """`full`: the ENIs whose chains get their rules (None: all). nft's userspace needs
    minutes for 10^5 rules in one batch, so large matrices render only the probed
    ENIs' chains in full; a packet of the probed flow walks those and no other, so
    its cost is the same."""
    enis = [e for e in net.enis.values() if e.vpc_id == vpc_id]
    lines = [f"table inet {LINEAR_TABLE} {{"]
    egress, ingress = [], []
    for k, eni in enumerate(enis):
        rules = sorted((r for gid in eni.group_ids for r in net.groups[gid].rules),
                       key=lambda r: (r.priority, r.policy != "drop"))
        if full is not None and eni.eni_id not in full:
            rules = []
        basic = all(net.groups[g].is_basic for g in eni.group_ids)
        for direction, chain in (("egress", f"out_{k}"), ("ingress", f"in_{k}")):
            body = [t for r in rules if r.direction == direction
                    for fam in (4, 6) if (t := _rule_text(net, r, fam)) is not None]
            # Defaults: basic groups accept egress, advanced drop it; ingress drops.
            body.append("return" if direction == "egress" and basic else "drop")
            lines.append(f" chain {chain} {{\n  " + "\n  ".join(body) + "\n }")
        egress.append(f'"{eni.ifname}" : jump out_{k}')
        ingress.append(f'"{eni.ifname}" : jump in_{k}')
    for name, elems in (("egress", egress), ("ingress", ingress)):
        lines.append(f" map {name} {{\n  type ifname : verdict\n"
                     f"  elements = {{ {', '.join(elems)} }}\n }}")
    lines.append(" chain forward {\n  type filter hook forward priority 0; policy drop;\n"
                 "  ct state established,related accept\n  ct state invalid drop\n"
                 "  iifname vmap @egress\n  oifname vmap @ingress\n  accept\n }")
    lines.append("}")
    return "\n".join(lines) + "\n"


def load_text(namespace: str, text: str) -> None:
    subprocess.run(["ip", "netns", "exec", namespace, "nft", "-f", "-"], input=text, text=True,
                   check=True, capture_output=True)


def delete_table(namespace: str, table: str) -> None:
    load_text(namespace, f"table inet {table}\ndelete table inet {table}\n")
