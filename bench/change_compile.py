"""Translator-side cost of one change: validation and model update (`Model.perform`),
the incremental compile of the VPC and the diff, without the store or the kernel.

At 10 and 500 ENIs x 200 groups of 200 rules (tests/test_compiler.py's scale model),
in one process, each size loaded and compiled once, then >= N changes of each kind
as bench/control_plane.py makes them (a top-priority drop added, its port modified,
removed; the inner policy flipped; an ENI joins and leaves a basic group). The heap
is frozen after the load and after each change, as the agent does (agent/control.py).
CPU time of the process (`time.process_time`, less disturbed by other load on a
shared machine than wall time), p50/p99 in ms per step and kind, and the 500/10 ratio
of the p50s.

Usage: .venv/bin/python bench/change_compile.py [--changes 50] [--sizes 10,500]
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from nftsg.translators import model as m
from nftsg.translators.actions import Model
from nftsg.translators.diff import diff_programs
from nftsg.translators.incremental import CompileCache, compile_vpc_cached
from nftsg.translators.quotas import Quotas
from test_compiler import scale_topology

NOW = "2026-12-03T00:00:00Z"
KINDS = ("Authorize", "ModifyRule", "Revoke", "ModifyPolicy", "Join", "Leave")


def _p(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, max(0, round(q * len(ordered)) - 1))]


def run(n_enis: int, changes: int) -> dict[str, dict[str, list[float]]]:
    model = Model.load(
        m.topology_from_data(scale_topology(200, n_enis, 200)),
        Quotas(rules_per_group=1000, rules_per_eni=10000),
    )
    vpc = next(iter(model.network.vpcs))
    cache = CompileCache()
    program = compile_vpc_cached(model.network, vpc, cache)
    gc.collect()
    gc.freeze()
    net = model.network
    used = {g for e in net.enis.values() for g in e.group_ids}
    basic = sorted(g.group_id for g in net.groups.values() if g.is_basic and g.group_id in used)
    enis = sorted(
        e.eni_id
        for e in net.enis.values()
        if all(net.groups[g].is_basic for g in e.group_ids) and len(e.group_ids) < 3
    )
    out: dict[str, dict[str, list[float]]] = {
        k: {"perform": [], "compile": [], "diff": [], "total": []} for k in KINDS
    }

    def step(kind: str, action: str, params: dict[str, Any]) -> None:
        nonlocal model, program
        t0 = time.process_time()
        new, _ = model.perform(action, params, now=NOW)
        t1 = time.process_time()
        compiled = compile_vpc_cached(new.network, vpc, cache)
        t2 = time.process_time()
        diff_programs(program, compiled)
        t3 = time.process_time()
        gc.freeze()
        model, program = new, compiled
        row = out[kind]
        row["perform"].append((t1 - t0) * 1e3)
        row["compile"].append((t2 - t1) * 1e3)
        row["diff"].append((t3 - t2) * 1e3)
        row["total"].append((t3 - t0) * 1e3)

    for i in range(changes):
        gid = basic[i % len(basic)]
        perm = {
            "IpProtocol": "TCP",
            "PortRange": f"{40000 + i}/{40000 + i}",
            "SourceCidrIp": "203.0.113.0/24",
            "Policy": "Drop",
            "Priority": "1",
        }
        step("Authorize", "AuthorizeSecurityGroup", {"SecurityGroupId": gid, "Permissions": [perm]})
        group = model.network.groups[gid]
        rid = next(r.rule_id for r in group.rules if r.ports and r.ports.start == 40000 + i)
        step(
            "ModifyRule",
            "ModifySecurityGroupRule",
            {
                "SecurityGroupId": gid,
                "SecurityGroupRuleId": rid,
                "PortRange": f"{50000 + i}/{50000 + i}",
            },
        )
        step(
            "Revoke", "RevokeSecurityGroup", {"SecurityGroupId": gid, "SecurityGroupRuleId": [rid]}
        )
        flip = "Drop" if group.inner_access_policy == "Accept" else "Accept"
        step(
            "ModifyPolicy",
            "ModifySecurityGroupPolicy",
            {"SecurityGroupId": gid, "InnerAccessPolicy": flip},
        )
        eni = model.network.enis[enis[i % len(enis)]]
        other = next(g for g in basic[(i * 7) % len(basic) :] + basic if g not in eni.group_ids)
        join = {"SecurityGroupId": other, "NetworkInterfaceId": eni.eni_id}
        step("Join", "JoinSecurityGroup", join)
        step("Leave", "LeaveSecurityGroup", join)
    gc.unfreeze()
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--changes", type=int, default=50)
    parser.add_argument("--sizes", default="10,500")
    args = parser.parse_args()
    sizes = [int(x) for x in args.sizes.split(",")]
    results = {n: run(n, args.changes) for n in sizes}
    base = results[sizes[0]]
    print(f"{'ENIs':>5} {'change':<13} {'step':<8} {'p50 ms':>8} {'p99 ms':>8} {'x p50':>7}")
    for n in sizes:
        for k in KINDS:
            for part in ("perform", "compile", "diff", "total"):
                v = results[n][k][part]
                p50 = statistics.median(v)
                ratio = p50 / max(statistics.median(base[k][part]), 1e-9)
                print(f"{n:>5} {k:<13} {part:<8} {p50:>8.2f} {_p(v, 0.99):>8.2f} {ratio:>7.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
