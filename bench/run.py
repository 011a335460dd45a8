"""The dataplane benchmark: the one entry point.

    .venv/bin/python bench/run.py [--smoke] [--json PATH] [--enis 10,50,200]
        [--rules 10,200,1000] [--extra 10x10000] [--reps 3] [--load 200x200,500x200]

For every N ENIs x R rules per ENI (bench/model.py) it builds a real VPC router
namespace with N instance namespaces, and between two ENIs through the router
measures new TCP connections/s (C load generator, bench/loadgen.c) and TCP
throughput of one established flow (iperf3) under four rulesets:
(a) no firewall, (b) conntrack only, (c) the same rules as one linear nft rule
per ECS rule (bench/linear.py), (d) nftsg (`compile_all`, loaded through the
agent's nft backend). Each figure is the median of --reps windows with min and
max, and a ratio to the no-firewall median of the same N and R in the same run.
Then the cold load of the full program into a fresh router namespace (model,
compile, render, commit) and the peak RSS of a child process doing it, at each
--load size. Prints a table, writes JSON (--json). Root only.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import secrets
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import linear
import model
import traffic
from nftsg.agent import netns
from nftsg.agent.lab import Lab
from nftsg.agent.nft_backend import NftBackend
from nftsg.translators.compiler import compile_all
from nftsg.translators.diff import diff_programs
from nftsg.translators.network import Network
from nftsg.translators.nft_text import full_sync_text

CONFIGS = ("none", "conntrack", "linear", "nftsg")
LABELS = {"none": "no firewall", "conntrack": "conntrack only",
          "linear": "linear rules", "nftsg": "nftsg"}
NFTSG_TABLE = "nftsg"
REPO = Path(__file__).resolve().parent.parent


def _sizes(text: str) -> list[tuple[int, int]]:
    out = []
    for item in filter(None, text.split(",")):
        n, r = item.lower().split("x")
        out.append((int(n), int(r)))
    return out


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def stats(values: list[float], base: float | None) -> dict[str, Any]:
    med = statistics.median(values)
    out: dict[str, Any] = {"values": values, "median": med, "min": min(values), "max": max(values)}
    if base:
        out.update(ratio=med / base, ratio_min=min(values) / base, ratio_max=max(values) / base)
    return out


# -- rulesets -------------------------------------------------------------------------


class Rulesets:
    """Puts one of the four configurations in force in the router, removing the others."""

    def __init__(self, router: str, linear_full_max: int) -> None:
        self.router = router
        self.linear_full_max = linear_full_max
        self.linear_scope = ""
        self.backend = NftBackend()

    def clear(self) -> None:
        self.backend.delete_table(self.router, "inet", NFTSG_TABLE)
        for table in (linear.CT_ONLY_TABLE, linear.LINEAR_TABLE):
            linear.delete_table(self.router, table)

    def load(self, config: str, net: Network) -> float:
        self.clear()
        started = time.perf_counter()
        if config == "conntrack":
            linear.load_text(self.router, linear.conntrack_only_text())
        elif config == "linear":
            full = None
            if sum(len(g.rules) for g in net.groups.values()) > self.linear_full_max:
                full = frozenset({model.client_eni(net), model.server_eni(net)})
            self.linear_scope = "all ENIs" if full is None else "probed ENIs"
            linear.load_text(self.router, linear.linear_text(net, model.VPC, full))
        elif config == "nftsg":
            program = compile_all(net)[model.VPC]
            self.backend.apply(self.router, program.full_sync_commands())
        return time.perf_counter() - started

    def close(self) -> None:
        self.clear()
        self.backend.close()


# -- traffic matrix -------------------------------------------------------------------


def bench_matrix(args: argparse.Namespace, prefix: str, loadgen: str) -> dict[str, Any]:
    points: list[dict[str, Any]] = []
    loopback: dict[str, Any] | None = None
    sizes = [(n, r) for n in args.enis for r in args.rules] + args.extra
    by_n: dict[int, list[int]] = {}
    for n, r in sizes:
        by_n.setdefault(n, []).append(r)
    for n_enis, rule_counts in by_n.items():
        lab = Lab(f"{prefix}n{n_enis}")
        try:
            lab.apply(model.network(n_enis, 1))  # the same instances at every R
            router = lab.router_ns(model.VPC)
            client, server = lab.host_ns("i-0000"), lab.host_ns("i-0001")
            try:  # conntrack entries of short connections linger 10 s in CLOSE
                netns.write_sysctls(router, {"net/netfilter/nf_conntrack_max": 1 << 20})
            except (OSError, netns.NetnsError):
                pass  # only the initial namespace may set it; the host's value holds
            netns.write_sysctls(client, {"net/ipv4/ip_local_port_range": "1024 65535"})
            if loopback is None:
                lb = [traffic.loopback_rate(loadgen, client, args.conn_seconds)
                      for _ in range(args.reps)]
                loopback = stats(lb, None)
            rulesets = Rulesets(router, args.linear_full_max)
            try:
                for r in rule_counts:
                    points.append(bench_point(args, rulesets, n_enis, r, client, server, loadgen))
                    print_point(points[-1])
            finally:
                rulesets.close()
        finally:
            lab.destroy()
    return {"loopback_conn_per_s": loopback, "points": points}


def bench_point(args: argparse.Namespace, rulesets: Rulesets, n_enis: int, rules: int,
                client: str, server: str, loadgen: str) -> dict[str, Any]:
    started = time.perf_counter()
    net = model.network(n_enis, rules)
    probed = model.probed_decision(net)
    dst = model.address(1)
    raw: dict[str, dict[str, list[float]]] = {}
    load_s: dict[str, float] = {}
    for config in CONFIGS:
        load_s[config] = rulesets.load(config, net)
        conns = [traffic.conn_rate(loadgen, server, client, dst, model.CONN_PORT,
                                   args.conn_seconds) for _ in range(args.reps)]
        tput = [traffic.throughput(server, client, dst, model.IPERF_PORT, args.iperf_seconds)
                for _ in range(args.reps)]
        raw[config] = {"conn": conns, "tput": tput}
    base_c = statistics.median(raw["none"]["conn"])
    base_t = statistics.median(raw["none"]["tput"])
    configs = {c: {"conn_per_s": stats(raw[c]["conn"], base_c),
                   "throughput_bps": stats(raw[c]["tput"], base_t),
                   "load_s": load_s[c]} for c in CONFIGS}
    nft_c = configs["nftsg"]["conn_per_s"]["median"]
    return {
        "enis": n_enis, "rules_per_eni": rules,
        "total_rules": sum(len(g.rules) for g in net.groups.values()),
        "probed_flow": probed, "configs": configs, "linear_rules_of": rulesets.linear_scope,
        "nftsg_vs_conntrack_conn": nft_c / configs["conntrack"]["conn_per_s"]["median"],
        "nftsg_vs_linear_conn": nft_c / configs["linear"]["conn_per_s"]["median"],
        "seconds": time.perf_counter() - started,
    }


def _r(s: dict[str, Any]) -> str:
    return f"{s['ratio']:.2f} ({s['ratio_min']:.2f}-{s['ratio_max']:.2f})"


def print_point(p: dict[str, Any]) -> None:
    c = p["configs"]
    print(f"N={p['enis']:<4} R={p['rules_per_eni']:<5} "
          f"conn/s: none {c['none']['conn_per_s']['median']:8.0f}/s  "
          + "  ".join(f"{k} {_r(c[k]['conn_per_s'])}" for k in CONFIGS[1:])
          + f" | tput: none {c['none']['throughput_bps']['median'] / 1e9:5.1f} Gbit/s  "
          + "  ".join(f"{k} {_r(c[k]['throughput_bps'])}" for k in CONFIGS[1:]),
          flush=True)


# -- cold load ------------------------------------------------------------------------


def _peak_rss_mb() -> float:
    """This process's own peak RSS. Not ru_maxrss: Linux carries that over exec from
    the parent's memory at fork, so a child of a big benchmark process reported the
    parent's peak; VmHWM belongs to the process's own address space."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def cold_load_child(n_enis: int, rules: int, ns: str) -> dict[str, Any]:
    """Runs in its own process so ru_maxrss is this load's peak alone."""
    t0 = time.perf_counter()
    net = model.network(n_enis, rules)
    t1 = time.perf_counter()
    program = compile_all(net)[model.VPC]
    t2 = time.perf_counter()
    # The agent's cold-load path (agent/reconcile.py): the full program as one nft
    # text batch.
    text, n_commands = full_sync_text(program)
    t3 = time.perf_counter()
    netns.create(ns)
    backend = NftBackend()
    try:
        backend.apply_text(ns, text, n_commands)
        del text
        t4 = time.perf_counter()
        # One more rule in one group: what a change costs after the full load.
        changed = model.topology(n_enis, rules)
        changed["security_groups"][0]["permissions"].append(
            {"direction": "ingress", "ip_protocol": "UDP", "port_range": "53/53",
             "source_cidr_ip": "192.0.2.1/32", "priority": 50})
        from nftsg.translators.model import topology_from_data
        from nftsg.translators.validate import build_network

        new_net = build_network(topology_from_data(changed), model.quotas_for(rules + 1))
        t5 = time.perf_counter()
        new_program = compile_all(new_net)[model.VPC]
        delta = diff_programs(program, new_program)
        backend.apply(ns, delta)
        t6 = time.perf_counter()
    finally:
        backend.close()
        netns.delete(ns)
    return {
        "enis": n_enis, "rules_per_eni": rules,
        "total_rules": sum(len(g.rules) for g in net.groups.values()),
        "nft_commands": n_commands, "set_elements": program.element_count(),
        "model_s": t1 - t0, "compile_s": t2 - t1, "render_s": t3 - t2, "commit_s": t4 - t3,
        "cold_load_s": t4 - t1, "one_rule_change_s": t6 - t5, "one_rule_change_commands":
        len(delta), "peak_rss_mb": _peak_rss_mb(),
    }


def bench_cold_load(sizes: list[tuple[int, int]], prefix: str) -> list[dict[str, Any]]:
    out = []
    for n, r in sizes:
        ns = f"{prefix}cold"
        try:
            proc = subprocess.run([sys.executable, __file__, "--cold-load-child", f"{n}x{r}",
                                   "--prefix", ns], capture_output=True, text=True, check=True)
        finally:
            if ns in netns.list_namespaces():
                netns.delete(ns)
        out.append(json.loads(proc.stdout.strip().splitlines()[-1]))
        x = out[-1]
        print(f"cold load {n}x{r} ({x['total_rules']} rules): {x['cold_load_s']:.2f} s "
              f"(compile {x['compile_s']:.2f}, render {x['render_s']:.2f}, commit "
              f"{x['commit_s']:.2f}; model {x['model_s']:.2f}); peak RSS "
              f"{x['peak_rss_mb']:.0f} MB; one-rule change {x['one_rule_change_s'] * 1000:.0f} ms",
              flush=True)
    return out


# -- targets and table ----------------------------------------------------------------


def targets(result: dict[str, Any]) -> list[dict[str, Any]]:
    checks: list[dict[str, Any]] = []

    def add(what: str, value: float, op: str, limit: float) -> None:
        ok = value >= limit if op == ">=" else value < limit
        checks.append({"target": f"{what} {op} {limit}", "value": round(value, 3), "met": ok})

    for p in result["matrix"]["points"]:
        c, tag = p["configs"], f"N={p['enis']} R={p['rules_per_eni']}"
        add(f"throughput nftsg/none {tag}", c["nftsg"]["throughput_bps"]["ratio"], ">=", 0.9)
        if p["rules_per_eni"] >= 1000:
            add(f"conn/s nftsg/conntrack {tag}", p["nftsg_vs_conntrack_conn"], ">=",
                0.95 if p["rules_per_eni"] < 10000 else 0.9)
            if p["rules_per_eni"] < 10000:
                add(f"conn/s nftsg/none {tag}", c["nftsg"]["conn_per_s"]["ratio"], ">=", 0.85)
                add(f"conn/s nftsg/linear {tag}", p["nftsg_vs_linear_conn"], ">=", 2.0)
    limits = {(200, 200): 1.5, (500, 200): 4.0}
    for x in result["cold_load"]:
        key = (x["enis"], x["rules_per_eni"])
        if key in limits:
            add(f"cold load s {key[0]}x{key[1]}", x["cold_load_s"], "<", limits[key])
            add(f"agent peak RSS MB {key[0]}x{key[1]}", x["peak_rss_mb"], "<", 200)
    return checks


def table(result: dict[str, Any]) -> str:
    lines = [
        "new TCP connections/s and TCP throughput between two ENIs, ratio to no firewall "
        "(median of the reps; min-max in parentheses)",
        "",
        "| N | R | no fw conn/s | conntrack | linear | nftsg | nftsg/ct | nftsg/linear "
        "| no fw Gbit/s | conntrack | linear | nftsg |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for p in result["matrix"]["points"]:
        c = p["configs"]
        lines.append(
            f"| {p['enis']} | {p['rules_per_eni']} | {c['none']['conn_per_s']['median']:.0f} | "
            + " | ".join(_r(c[k]["conn_per_s"]) for k in CONFIGS[1:])
            + f" | {p['nftsg_vs_conntrack_conn']:.2f} | {p['nftsg_vs_linear_conn']:.2f} | "
            + f"{c['none']['throughput_bps']['median'] / 1e9:.1f} | "
            + " | ".join(_r(c[k]["throughput_bps"]) for k in CONFIGS[1:]) + " |")
    lb = result["matrix"]["loopback_conn_per_s"]
    if lb:
        lines += ["", f"load generator on loopback (no router): {lb['median']:.0f} conn/s"]
    if result["cold_load"]:
        lines += ["", "| cold load | rules | model s | compile s | render s | commit s "
                  "| compile+render+commit s | peak RSS MB | one-rule change ms |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for x in result["cold_load"]:
            lines.append(
                f"| {x['enis']}x{x['rules_per_eni']} | {x['total_rules']} | {x['model_s']:.2f} "
                f"| {x['compile_s']:.2f} | {x['render_s']:.2f} | {x['commit_s']:.2f} | "
                f"{x['cold_load_s']:.2f} | {x['peak_rss_mb']:.0f} | "
                f"{x['one_rule_change_s'] * 1000:.0f} |")
    lines += ["", "targets:"] + [
        f"  {'met ' if t['met'] else 'MISS'} {t['target']}: {t['value']}" for t in result["targets"]
    ]
    return "\n".join(lines)


def _commit() -> str:
    try:
        return subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"],
                              capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true",
                    help="tiny matrix (N=2,3 x R=5, 1 rep, short windows): CI keeps it running")
    ap.add_argument("--enis", type=_ints, default=[10, 50, 200])
    ap.add_argument("--rules", type=_ints, default=[10, 200, 1000])
    ap.add_argument("--extra", type=_sizes, default=[],
                    help="more NxR points, e.g. 10x10000 (10x the rule quota)")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--linear-full-max", type=int, default=20000,
                    help="above this many rules, the linear ruleset holds only the probed "
                    "ENIs' rules (nft needs minutes for 10^5 rules)")
    ap.add_argument("--conn-seconds", type=float, default=1.0)
    ap.add_argument("--iperf-seconds", type=int, default=1)
    ap.add_argument("--load", type=_sizes, default=[(200, 200), (500, 200)],
                    help="cold load sizes NxR")
    ap.add_argument("--json", default="bench-result.json", help="where to write the results")
    ap.add_argument("--prefix", default="", help="namespace prefix (default: random)")
    ap.add_argument("--cold-load-child", type=_sizes, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.smoke:
        args.enis, args.rules, args.extra, args.reps = [2, 3], [5], [], 1
        args.conn_seconds, args.iperf_seconds, args.load = 0.3, 1, [(3, 5)]
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.cold_load_child:
        ((n, r),) = args.cold_load_child
        print(json.dumps(cold_load_child(n, r, args.prefix)))
        return 0
    if os.geteuid() != 0:
        print("bench/run.py needs root (namespaces, veths, nftables)", file=sys.stderr)
        return 2
    prefix = args.prefix or "nb" + secrets.token_hex(3)
    started = time.perf_counter()
    with traffic.scratch_dir() as work:
        loadgen = traffic.build_loadgen(work)
        result: dict[str, Any] = {
            "command": " ".join(["bench/run.py", *(argv if argv is not None else sys.argv[1:])]),
            "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "commit": _commit(), "machine": {"cpus": os.cpu_count(), "kernel": platform.release()},
            "settings": {"reps": args.reps, "conn_seconds": args.conn_seconds,
                         "iperf_seconds": args.iperf_seconds,
                         "client_procs": traffic.CLIENT_PROCS,
                         "server_workers": traffic.SERVER_WORKERS},
        }
        result["matrix"] = bench_matrix(args, prefix, loadgen)
    result["cold_load"] = bench_cold_load(args.load, prefix)
    result["targets"] = targets(result)
    result["seconds"] = time.perf_counter() - started
    Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
    print()
    print(table(result))
    print(f"\n{result['command']}  ({result['date']}, commit {result['commit']}, "
          f"{result['seconds']:.0f} s); JSON: {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
