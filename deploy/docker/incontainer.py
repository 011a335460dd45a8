"""The Docker lab's steps that run inside the agent container (nftsg's venv).

incontainer.py adopt --prefix P FILE NAME=PID ...
    names the network namespace of each instance container (its PID as the
    host sees it: the agent container shares the host's PID namespace) as
    that host's lab namespace, so `nftsg lab up FILE --prefix P` plugs its
    ENIs into the container instead of into a namespace of its own.
incontainer.py plan FILE --tcp 22 80 --udp 5353
    prints, as JSON, the probes of `nftsg lab check` (every ordered pair of
    hosts in a VPC, every family both have, ping and each port) with the
    verdict the reference evaluator gives each.
"""

from __future__ import annotations

import argparse
import json
import sys

from nftsg.agent import matrix
from nftsg.agent.lab import Lab
from nftsg.agent.lab_commands import read_topology
from nftsg.translators.evaluator import evaluate


def adopt(prefix: str, file: str, pairs: list[str]) -> int:
    _, network = read_topology(file)
    lab = Lab(prefix)
    for pair in pairs:
        name, _, pid = pair.partition("=")
        print(f"{name}: pid {pid} -> {lab.adopt(network, name, int(pid))}")
    return 0


def plan(file: str, tcp: list[int], udp: list[int]) -> int:
    _, network = read_topology(file)
    hosts = matrix.lab_hosts(network, lambda name: name)
    out = []
    for p in matrix.plan(network, hosts, tcp, udp):
        out.append(
            {
                "src": p.src.name,
                "dst": p.dst.name,
                "kind": p.kind,
                "src_ip": str(p.src_ip),
                "dst_ip": str(p.dst_ip),
                "port": p.port,
                "sport": p.sport,
                "label": p.label(),
                "expected": evaluate(network, p.flow()).verdict == "accept",
            }
        )
    json.dump(out, sys.stdout)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="incontainer.py")
    sub = parser.add_subparsers(dest="command", required=True)
    a = sub.add_parser("adopt")
    a.add_argument("--prefix", required=True)
    a.add_argument("file")
    a.add_argument("pairs", nargs="*", metavar="NAME=PID")
    p = sub.add_parser("plan")
    p.add_argument("file")
    p.add_argument("--tcp", type=int, nargs="*", default=[])
    p.add_argument("--udp", type=int, nargs="*", default=[])
    args = parser.parse_args(argv)
    if args.command == "adopt":
        return adopt(args.prefix, args.file, args.pairs)
    return plan(args.file, args.tcp, args.udp)


if __name__ == "__main__":
    sys.exit(main())
