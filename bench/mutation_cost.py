"""Cost of one `Model.perform` per action kind at 10, 200 and 500 ENIs x 200 rules.

Usage: python bench/mutation_cost.py [repeats]
Prints p50/p99 in milliseconds per action and size, and the ratio to the 10-ENI p50.
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from nftsg.translators import model as m
from nftsg.translators.actions import Model
from nftsg.translators.quotas import Quotas
from test_compiler import scale_topology

NOW = "2026-12-03T00:00:00Z"


def steps(model: Model, i: int) -> dict[str, tuple[str, dict[str, Any]]]:
    net = model.network
    basic = [g for g in net.groups.values() if g.is_basic]
    group = basic[i % len(basic)]
    gid = group.group_id
    multi = [
        e for e in net.enis.values() if len(e.group_ids) > 1 and net.groups[e.group_ids[0]].is_basic
    ]
    eni = multi[i % len(multi)]
    outsider_group = next(g.group_id for g in basic if g.group_id not in eni.group_ids)
    rule = next(r for r in group.rules if r.direction == "ingress")
    perm = {
        "IpProtocol": "TCP",
        "PortRange": f"{40000 + i}/{40000 + i}",
        "SourceCidrIp": "203.0.113.0/24",
    }
    return {
        "Authorize": ("AuthorizeSecurityGroup", {"SecurityGroupId": gid, "Permissions": [perm]}),
        "Revoke": (
            "RevokeSecurityGroup",
            {"SecurityGroupId": gid, "SecurityGroupRuleId": [rule.rule_id]},
        ),
        "ModifyRule": (
            "ModifySecurityGroupRule",
            {"SecurityGroupId": gid, "SecurityGroupRuleId": rule.rule_id, "Description": f"d{i}"},
        ),
        "ModifyPolicy": (
            "ModifySecurityGroupPolicy",
            {
                "SecurityGroupId": gid,
                "InnerAccessPolicy": "Drop" if group.inner_access_policy == "Accept" else "Accept",
            },
        ),
        "Join": (
            "JoinSecurityGroup",
            {"SecurityGroupId": outsider_group, "NetworkInterfaceId": eni.eni_id},
        ),
        "Leave": (
            "LeaveSecurityGroup",
            {"SecurityGroupId": eni.group_ids[0], "NetworkInterfaceId": eni.eni_id},
        ),
    }


def main() -> None:
    repeats = int(sys.argv[1]) if len(sys.argv) > 1 else 200
    base: dict[str, float] = {}
    for n_enis in (10, 200, 500):
        model = Model.load(
            m.topology_from_data(scale_topology(200, n_enis, 200)),
            Quotas(rules_per_group=1000, rules_per_eni=10000),
        )  # room to add one
        times: dict[str, list[float]] = {}
        for i in range(repeats):
            for kind, (action, params) in steps(model, i).items():
                start = time.perf_counter()
                model.perform(action, params, now=NOW)  # each from the same model
                times.setdefault(kind, []).append((time.perf_counter() - start) * 1000)
        for kind, samples in times.items():
            samples.sort()
            p50 = statistics.median(samples)
            p99 = samples[int(len(samples) * 0.99) - 1]
            base.setdefault(kind, p50)
            print(
                f"{n_enis:4d} ENIs {kind:13s} p50 {p50:7.3f} ms  p99 {p99:7.3f} ms  "
                f"x{p50 / base[kind]:.2f} of 10 ENIs"
            )


if __name__ == "__main__":
    main()
