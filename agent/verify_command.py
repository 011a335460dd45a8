"""`nftsg verify`: is the kernel enforcing the stored model, and do both policy
implementations agree on what it enforces?

For every VPC router of the stored model: the kernel's table is compared with
the program compiled from the model, by content (as the agent's drift check
does); then flows are judged twice, by the reference evaluator and by the
packet tracer over the table *as listed from the kernel*: every flow conntrack
tracks in the router, plus a plan of new flows between the VPC's ENIs and
external hosts (TCP and UDP ports, ICMP/ICMPv6). Prints one JSON report; exit
0 only when every router is in sync and no flow is judged differently. Needs
root (it reads the routers' tables), changes nothing.
"""

from __future__ import annotations

import argparse
import itertools
import json
from typing import Any

from nftsg.translators.evaluator import Flow
from nftsg.translators.network import IPAddress, Network

from .lab_commands import require_root, running_lab
from .settings import settings_from_env

_TCP, _UDP, _ICMP, _ICMPV6 = 6, 17, 1, 58


def planned_flows(
    network: Network, vpc_id: str, tcp: list[int], udp: list[int], limit: int
) -> list[Flow]:
    """New flows between every ordered pair of addresses of the VPC's ports (same
    family), TCP and UDP to the given ports and ICMP, at most `limit`."""
    addresses: list[IPAddress] = []
    for eni in network.enis_in_vpc(vpc_id):
        addresses.extend(eni.addresses)
    for ext in network.externals_in_vpc(vpc_id):
        addresses.extend(ext.addresses)
    flows: list[Flow] = []
    for src, dst in itertools.permutations(addresses, 2):
        if src.version != dst.version:
            continue
        flows.append(Flow(src, dst, _ICMP if src.version == 4 else _ICMPV6))
        flows.extend(Flow(src, dst, _TCP, dport=p, sport=40000) for p in tcp)
        flows.extend(Flow(src, dst, _UDP, dport=p, sport=40000) for p in udp)
        if len(flows) >= limit:
            return flows[:limit]
    return flows


def verify(args: argparse.Namespace) -> int:
    # Imported here: the rest of the command line does not need the kernel-facing modules.
    from .daemon import list_tracked_flows
    from .nft_backend import NftBackend
    from .reconcile import Reconciler
    from .selfcheck import check_flows

    settings = settings_from_env(args.state_dir, args.prefix, args.table)
    require_root()
    lab, network = running_lab(settings)
    report: dict[str, Any] = {"routers": []}
    ok = True
    with NftBackend() as backend:
        reconciler = Reconciler(
            backend, lab.router_ns, table=settings.table, ct_mark_bit=settings.ct_mark_bit
        )
        for vpc_id in sorted(network.vpcs):
            namespace = lab.router_ns(vpc_id)
            entry: dict[str, Any] = {"vpc_id": vpc_id, "namespace": namespace}
            listing = backend.list_table(namespace, "inet", settings.table)
            # The agent's compiler: its layout and conntrack mark bit.
            program = reconciler.compile_program(
                network, vpc_id, settings.table, settings.ct_mark_bit
            )
            differences = reconciler.differences(namespace, program, listing)
            entry["in_sync"] = not differences
            entry["differences"] = differences
            if listing is None:
                ok = False
                report["routers"].append(entry)
                continue
            tracked = list_tracked_flows(namespace)
            planned = planned_flows(network, vpc_id, args.tcp, args.udp, args.max_flows)
            tracked_check = check_flows(network, vpc_id, namespace, listing, tracked)
            planned_check = check_flows(network, vpc_id, namespace, listing, planned)
            entry["tracked_flows"] = tracked_check.as_json()
            entry["planned_flows"] = planned_check.as_json()
            ok = ok and not differences and tracked_check.ok and planned_check.ok
            report["routers"].append(entry)
    report["ok"] = ok
    print(json.dumps(report, indent=2, default=str))
    return 0 if ok else 1


def _port(text: str) -> int:
    port = int(text)
    if not 1 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"port {port} is not 1..65535")
    return port


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = sub.add_parser(
        "verify",
        help="check the kernel holds the stored model and evaluator and kernel program agree",
    )
    parser.add_argument("--state-dir", help="state directory (default /var/lib/nftsg)")
    parser.add_argument("--prefix", help="name prefix of the lab's namespaces (default nftsg)")
    parser.add_argument("--table", help="nftables table name (default nftsg)")
    parser.add_argument("--tcp", type=_port, nargs="*", default=[22, 80, 443, 3389, 5432, 8080])
    parser.add_argument("--udp", type=_port, nargs="*", default=[53, 5353])
    parser.add_argument(
        "--max-flows", type=int, default=20000, help="planned flows per router at most"
    )
    parser.set_defaults(handler=verify)

