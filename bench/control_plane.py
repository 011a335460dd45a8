"""Control-plane cost of one ECS call, from the call to its commit in the kernel.

At 10, 50, 200 and 500 ENIs x 200 groups of 200 rules (the scale model of
tests/test_compiler.py: one VPC, ECS's default limits), each size in a child
process of its own (so peak RSS is that size's): the agent (daemon.Agent with
the real nft backend, on an empty router namespace: rules name interfaces,
they need none to exist) gets the model, a first full sync is loaded, then
`ControlPlane.call` is timed for >= N changes of each kind:

- AuthorizeSecurityGroup (one rule added) / RevokeSecurityGroup (that rule removed),
- ModifySecurityGroupRule (one rule's port moved),
- JoinSecurityGroup / LeaveSecurityGroup (one ENI, one basic group),
- ModifySecurityGroupPolicy (inner policy flipped).

Each call: validation on the model, one SQLite transaction (synchronous=FULL),
the incremental compile of the VPC, the diff, the nft transaction, judging
the (here: no) tracked flows of the affected ENIs. Printed: p50/p99 per kind,
the commands each change sent, peak RSS; with --sdk, the same Authorize/Revoke
pairs through Alibaba's SDK (HTTP + ACS3 signing, the agent's server in the same
process, so the client's Python shares the GIL with the agent: a pessimistic
figure) at the largest size. JSON goes to --json (default control_plane.json).

Not measured: prefix-list entry changes (no ECS action changes a prefix list;
they come with a new document, `nftsg apply`).

Run as root: `.venv/bin/python bench/control_plane.py [--changes 200] [--sizes 10,50,200,500]`.
"""

from __future__ import annotations

import argparse
import collections
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
KINDS = ("Authorize", "Revoke", "ModifyRule", "Join", "Leave", "ModifyPolicy")


def _p(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, max(0, round(q * len(ordered)) - 1))]


STAGES = ("perform", "persist", "compile", "nft", "in_worker", "judge", "rest", "fsync_wait")


def _instrument(agent: Any, control: Any) -> dict[str, float]:
    """Per-call stage times (ms), by wrapping the compile, the nft call and the flow
    listing of the agent in place; `perform`/`persist` come from CallStats,
    `in_worker` is the part of `nft` inside the namespace worker, and `rest` (diff,
    bookkeeping) is what enforce spent outside the others."""
    spent: dict[str, float] = {k: 0.0 for k in STAGES}
    rec = agent.reconciler
    backend = rec.backend

    def timer(stage: str, fn: Any) -> Any:
        def wrapped(*args: Any, **kwargs: Any) -> Any:
            t = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                spent[stage] += (time.perf_counter() - t) * 1000

        return wrapped

    control.compile = timer("compile", control.compile)
    rec.compile_program = control.compile
    backend.apply = timer("nft", backend.apply)
    factory = control._ct_factory
    if factory is not None:

        def ct_factory() -> Any:
            ct = factory()
            ct.list_flows = timer("judge", ct.list_flows)
            ct.set_mark_bit = timer("judge", ct.set_mark_bit)
            return ct

        control._ct_factory = ct_factory
    return spent


def child(n_enis: int, changes: int, sdk: bool, prefix: str, paths: list[str]) -> dict[str, Any]:
    sys.path.insert(0, str(ROOT / "tests"))
    from nftsg.agent import netns
    from nftsg.agent.control import ControlPlane
    from nftsg.agent.daemon import Agent
    from nftsg.agent.datastore import SqliteDatastore
    from nftsg.agent.settings import Settings
    from nftsg.agent.store import Store
    from nftsg.translators import model as m
    from nftsg.translators.quotas import Quotas
    from test_compiler import scale_topology

    doc = m.topology_from_data(scale_topology(200, n_enis, 200)).model_dump(mode="json")
    router = f"{prefix}-r-vpc-scale"
    result: dict[str, Any] = {"enis": n_enis, "rules_per_group": 200, "groups": 200}
    netns.create(router)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            store = Store(Path(tmp) / "state.db")
            store.save_topology(doc)
            agent = Agent(
                Settings(state_dir=Path(tmp), prefix=prefix, table="nftsg"),
                store=store,
                list_flows=None,
                verify_every=1e9,
                selfcheck_every=1e9,
            )
            control = ControlPlane(
                agent,
                SqliteDatastore(store),
                checkpoint_every=10**9,
                quotas=Quotas(rules_per_group=1000, rules_per_eni=10000),  # room to add
            )
            started = time.perf_counter()
            assert agent.step(), "first sync failed"
            result["first_sync_s"] = round(time.perf_counter() - started, 3)
            result["layout"] = agent.reconciler.layout
            backend = agent.reconciler.backend
            spent = _instrument(agent, control)
            # Per path (element batches over netlink, or all through libnftables),
            # interleaved cycle by cycle in this one process, so both see the same
            # table, model and machine load.
            times = {p: {k: [] for k in KINDS} for p in paths}
            commands = {p: {k: [] for k in KINDS} for p in paths}
            stages = {p: {k: {s: [] for s in STAGES} for k in KINDS} for p in paths}
            sent_by = {p: {k: collections.Counter() for k in KINDS} for p in paths}
            path = paths[0]

            def timed(kind: str, action: str, params: dict[str, Any]) -> dict[str, Any]:
                for stage in STAGES:
                    spent[stage] = 0.0
                backend.last_path.clear()
                backend.last_timing.clear()
                t = time.perf_counter()
                out = control.call(action, params, "bench")
                total = (time.perf_counter() - t) * 1000
                times[path][kind].append(total)
                commands[path][kind].append(sum(control.last.commands.values()))
                last = control.last
                spent["perform"], spent["persist"] = last.perform_ms, last.persist_ms
                spent["rest"] = last.enforce_ms - spent["compile"] - spent["nft"] - spent["judge"]
                # Of "nft": the time inside the namespace worker (the libnftables call or
                # the netlink exchange), the rest being the hand-over and encoding.
                spent["in_worker"] = sum(backend.last_timing.values()) * 1000
                # What the store's overlapped fsync still made the answer wait.
                spent["fsync_wait"] = getattr(last, "sync_wait_ms", 0.0)
                for stage in STAGES:
                    stages[path][kind][stage].append(spent[stage])
                for how in backend.last_path.values():
                    sent_by[path][kind][how] += 1
                return out

            assert control.model is not None
            net = control.model.network
            # Groups with members: a rule of a group nobody is in compiles to nothing.
            used = {g for e in net.enis.values() for g in e.group_ids}
            basic = sorted(
                g.group_id for g in net.groups.values() if g.is_basic and g.group_id in used
            )
            enis = sorted(
                e.eni_id
                for e in net.enis.values()
                if all(net.groups[g].is_basic for g in e.group_ids) and len(e.group_ids) < 3
            )
            for cycle in range(changes * len(paths)):
                # Alternate the path, and which path goes first, cycle by cycle.
                path = paths[(cycle + cycle // len(paths)) % len(paths)]
                backend.netlink_elements = path == "netlink"
                i = cycle
                gid = basic[i % len(basic)]
                perm = {
                    "IpProtocol": "TCP",
                    "PortRange": f"{40000 + i}/{40000 + i}",
                    "SourceCidrIp": "203.0.113.0/24",
                    # A drop at the top priority decides where the group's accepts
                    # reach (an accept there was shadowed in the scale model: the
                    # change then cost no kernel work and measured nothing of it).
                    "Policy": "Drop",
                    "Priority": "1",
                }
                timed(
                    "Authorize",
                    "AuthorizeSecurityGroup",
                    {"SecurityGroupId": gid, "Permissions": [perm]},
                )
                group = control.model.network.groups[gid]
                rid = next(r.rule_id for r in group.rules if r.ports and r.ports.start == 40000 + i)
                timed(
                    "ModifyRule",
                    "ModifySecurityGroupRule",
                    {
                        "SecurityGroupId": gid,
                        "SecurityGroupRuleId": rid,
                        "PortRange": f"{50000 + i}/{50000 + i}",
                    },
                )
                timed(
                    "Revoke",
                    "RevokeSecurityGroup",
                    {"SecurityGroupId": gid, "SecurityGroupRuleId": [rid]},
                )
                flip = "Drop" if group.inner_access_policy == "Accept" else "Accept"
                timed(
                    "ModifyPolicy",
                    "ModifySecurityGroupPolicy",
                    {"SecurityGroupId": gid, "InnerAccessPolicy": flip},
                )
                eni = control.model.network.enis[enis[i % len(enis)]]
                other = next(
                    g for g in basic[(i * 7) % len(basic) :] + basic if g not in eni.group_ids
                )
                timed(
                    "Join",
                    "JoinSecurityGroup",
                    {"SecurityGroupId": other, "NetworkInterfaceId": eni.eni_id},
                )
                timed(
                    "Leave",
                    "LeaveSecurityGroup",
                    {"SecurityGroupId": other, "NetworkInterfaceId": eni.eni_id},
                )
            result["paths"] = {
                p: {
                    k: {
                        "n": len(v),
                        "p50_ms": round(statistics.median(v), 2),
                        "p99_ms": round(_p(v, 0.99), 2),
                        "commands_median": statistics.median(commands[p][k]),
                        "stages_p50_ms": {
                            s: round(statistics.median(x), 2) for s, x in stages[p][k].items()
                        },
                        "sent_by": dict(sent_by[p][k]),
                    }
                    for k, v in times[p].items()
                }
                for p in paths
            }
            result["kinds"] = result["paths"][paths[0]]
            backend.netlink_elements = paths[0] == "netlink"
            if sdk:
                result["sdk"] = sdk_calls(control, changes, basic)
            result["peak_rss_mb"] = round(
                resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1
            )
            agent.backend.close()
            store.close()
    finally:
        netns.delete(router)
    return result


def sdk_calls(control: Any, changes: int, basic: list[str]) -> dict[str, Any]:
    from alibabacloud_ecs20140526 import models
    from alibabacloud_ecs20140526.client import Client
    from alibabacloud_tea_openapi import models as openapi_models
    from nftsg.agent.api_keys import KeyStore
    from nftsg.agent.api_server import ApiServer

    with tempfile.TemporaryDirectory() as tmp:
        keystore = KeyStore(Path(tmp) / "api-keys.json")
        key = keystore.create()
        with ApiServer(control, keystore, listen="127.0.0.1:0") as server:
            assert server.address is not None
            host, port = server.address
            client = Client(
                openapi_models.Config(
                    access_key_id=key.access_key_id,
                    access_key_secret=key.access_key_secret,
                    endpoint=f"{host}:{port}",
                    protocol="http",
                    region_id="cn-hangzhou",
                )
            )
            times: list[float] = []
            # The control plane's own time per call, so HTTP + signing + the SDK
            # client are the difference (same call, same process).
            inside: list[float] = []
            real_call = control.call

            def timed_call(*args: Any) -> Any:
                t = time.perf_counter()
                try:
                    return real_call(*args)
                finally:
                    inside.append((time.perf_counter() - t) * 1000)

            control.call = timed_call
            for i in range(changes):
                gid = basic[i % len(basic)]
                spec = {
                    "ip_protocol": "TCP",
                    "port_range": f"{60000 + i}/{60000 + i}",
                    "source_cidr_ip": "203.0.113.0/24",
                }
                t = time.perf_counter()
                client.authorize_security_group(
                    models.AuthorizeSecurityGroupRequest(
                        region_id="cn-hangzhou",
                        security_group_id=gid,
                        permissions=[models.AuthorizeSecurityGroupRequestPermissions(**spec)],
                    )
                )
                times.append((time.perf_counter() - t) * 1000)
                t = time.perf_counter()
                client.revoke_security_group(
                    models.RevokeSecurityGroupRequest(
                        region_id="cn-hangzhou",
                        security_group_id=gid,
                        permissions=[models.RevokeSecurityGroupRequestPermissions(**spec)],
                    )
                )
                times.append((time.perf_counter() - t) * 1000)
    control.call = real_call
    outside = [t - c for t, c in zip(times, inside, strict=True)]
    return {
        "n": len(times),
        "p50_ms": round(statistics.median(times), 2),
        "p99_ms": round(_p(times, 0.99), 2),
        "control_plane_p50_ms": round(statistics.median(inside), 2),
        "http_sdk_overhead_p50_ms": round(statistics.median(outside), 2),
        "http_sdk_overhead_p99_ms": round(_p(outside, 0.99), 2),
    }


def table(results: list[dict[str, Any]]) -> str:
    paths = list(results[0].get("paths", {"": None})) if results else []
    lines = [
        f"{'ENIs':>5} {'path':<11} {'change':<13} {'p50 ms':>8} {'p99 ms':>8} {'x10 p50':>8} "
        f"{'cmds':>6}  stage p50 ms: " + " ".join(f"{s:>7}" for s in STAGES),
    ]
    for r in results:
        for path in paths:
            kinds = r["paths"][path] if path else r["kinds"]
            base = results[0]["paths"][path] if path else results[0]["kinds"]
            for k in KINDS:
                s = kinds[k]
                st = s.get("stages_p50_ms", {})
                lines.append(
                    f"{r['enis']:>5} {path:<11} {k:<13} {s['p50_ms']:>8.2f} {s['p99_ms']:>8.2f} "
                    f"{s['p50_ms'] / base[k]['p50_ms']:>8.2f} {s['commands_median']:>6}  "
                    f"{'':14}" + " ".join(f"{st.get(x, 0):>7.2f}" for x in STAGES)
                )
        extra = (
            f", SDK authorize/revoke p50 {r['sdk']['p50_ms']} ms p99 {r['sdk']['p99_ms']} ms "
            f"(HTTP + signing + SDK client p50 {r['sdk'].get('http_sdk_overhead_p50_ms')} ms)"
            if "sdk" in r
            else ""
        )
        lines.append(
            f"{r['enis']:>5} peak RSS {r['peak_rss_mb']} MB, first full sync "
            f"{r['first_sync_s']} s ({r['layout']} layout){extra}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="10,50,200,500")
    parser.add_argument("--changes", type=int, default=200)
    parser.add_argument("--no-sdk", action="store_true")
    parser.add_argument(
        "--sdk-everywhere", action="store_true", help="the SDK calls at every size, not the largest"
    )
    parser.add_argument(
        "--paths",
        default="netlink",
        help="comma list of netlink,libnftables: how element-only batches are sent; "
        "several are interleaved in one run, each getting --changes cycles (the SDK "
        "calls use the first)",
    )
    parser.add_argument("--json", default="control_plane.json")
    parser.add_argument("--child", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--prefix", default=f"cpb{int(time.time()) % 100000}")
    args = parser.parse_args(argv)
    sizes = [int(x) for x in args.sizes.split(",")]
    if args.child is not None:
        sdk = not args.no_sdk and (args.sdk_everywhere or args.child == max(sizes))
        paths = args.paths.split(",")
        print(json.dumps(child(args.child, args.changes, sdk, args.prefix, paths)))
        return 0
    results = []
    for n in sizes:
        proc = subprocess.run(
            [
                sys.executable,
                __file__,
                "--child",
                str(n),
                "--changes",
                str(args.changes),
                "--sizes",
                args.sizes,
                "--prefix",
                args.prefix,
                "--paths",
                args.paths,
                *(["--no-sdk"] if args.no_sdk else []),
                *(["--sdk-everywhere"] if args.sdk_everywhere else []),
            ],
            capture_output=True,
            text=True,
            check=False,
        )
        if proc.returncode != 0:
            print(proc.stderr[-3000:], file=sys.stderr)
            return 1
        results.append(json.loads(proc.stdout.strip().splitlines()[-1]))
        print(f"{n} ENIs done", file=sys.stderr, flush=True)
    print()
    print(table(results))
    Path(args.json).write_text(json.dumps({"results": results}, indent=2) + "\n")
    print(f"JSON: {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
