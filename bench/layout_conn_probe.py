"""Layout probe: new TCP connections/s through the router, v5 (flat) against v4.

Reuses bench/dataplane.py's lab, topology (the server's group holds R ingress
rules; exactly one, the weakest, allows the client) and client/server loops,
and adds a conntrack-only table as a baseline (what any stateful firewall
pays). Configs are interleaved per round; the best of the rounds is printed as
ratios to no firewall and to conntrack-only.

Run as root: `.venv/bin/python bench/layout_conn_probe.py [--seconds S] [--rounds N]`.
"""

from __future__ import annotations

import argparse
import sys
import uuid
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from dataplane import BIG, conn_rate, naive_linear_program, topology
from nftsg.agent.lab import Lab
from nftsg.agent.nft_backend import NftBackend
from nftsg.agent.reconcile import Reconciler
from nftsg.translators.model import topology_from_data
from nftsg.translators.validate import build_network


def conntrack_only() -> list[dict[str, Any]]:
    t = {"family": "inet", "table": "linear"}
    return [
        {"add": {"table": {"family": "inet", "name": "linear"}}},
        {"add": {"chain": {**t, "name": "forward", "type": "filter", "hook": "forward",
                           "prio": 0, "policy": "accept"}}},
        {"add": {"rule": {**t, "chain": "forward", "expr": [{"vmap": {
            "key": {"ct": {"key": "state"}},
            "data": {"set": [["established", {"accept": None}], ["related", {"accept": None}],
                             ["invalid", {"drop": None}]]}}}]}}},
    ]


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=2.0)
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    lab = Lab("nl" + uuid.uuid4().hex[:6])
    backend = NftBackend()
    try:
        nets = {n: build_network(topology_from_data(topology(n)), BIG) for n in (1000, 10000)}
        lab.apply(nets[1000])
        router = lab.router_ns("vpc-bench")
        server_ifname = nets[1000].enis["eni-server"].ifname
        configs = ["no firewall", "conntrack only", "v4 1000", "flat 1000", "v4 10000",
                   "flat 10000", "naive linear 1000"]
        results: dict[str, list[float]] = {}
        for _ in range(args.rounds):
            for config in configs:
                backend.delete_table(router, "inet", "nftsg")
                backend.delete_table(router, "inet", "linear")
                kind, _, n = config.rpartition(" ")
                if config == "conntrack only":
                    backend.apply(router, conntrack_only())
                elif config.startswith("naive"):
                    backend.apply(router, naive_linear_program(nets[1000], server_ifname))
                elif kind in ("v4", "flat"):
                    layout = "flat" if kind == "flat" else "v4"
                    Reconciler(backend, lambda _v: router, layout=layout).sync(nets[int(n)])
                results.setdefault(config, []).append(conn_rate(lab, args.seconds))
        base = max(results["no firewall"])
        ct = max(results["conntrack only"])
        print(f"new TCP connections/s (best of {args.rounds} x {args.seconds:.0f} s)")
        for config in configs:
            best = max(results[config])
            print(f"  {config:20} {best:8.0f}/s  {best / base:5.2f}x none  {best / ct:5.2f}x ct")
    finally:
        backend.close()
        lab.destroy()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
