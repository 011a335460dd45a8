"""Layout probe: new TCP connections/s through the router, nftsg program variants side
by side with no firewall and conntrack only, on bench/run.py's model and traffic.

N ENIs x R rules per ENI (bench/model.py: the probed flow is allowed by the
server's deepest rule), the C load generator (bench/traffic.py). Configs are
interleaved per round, so the machine's noise hits them alike; the median of
the rounds is printed as ratios to no firewall and to conntrack only of the same
run. `--perf DIR` also samples the whole machine (`perf record -a -g`) during one
extra window per nftsg variant and prints where the router's kernel time went
(the split of docs/dataplane.md, "Per-packet cost").

Run as root:
  .venv/bin/python bench/layout_conn_probe.py [--points 200x1000,10x10000]
      [--variants key,proto-first] [--seconds S] [--rounds N] [--perf DIR]
"""

from __future__ import annotations

import argparse
import secrets
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import linear
import model
import traffic
from nftsg.agent import netns
from nftsg.agent.lab import Lab
from nftsg.agent.nft_backend import NftBackend
from nftsg.translators.compiler import compile_all
from nftsg.translators.network import Network
from nftsg.translators.nft import Program


# Variant name -> how to compile the model's VPC program (the keys a layout change
# adds to compile_all are selected here, so old and new run in one process).
def permuted(prog: Program, order: tuple[int, ...]) -> Program:
    """The program with the 5-field key of every rule set (type, elements, lookup) in
    `order` (indices into the compiled key's fields): same decisions, another field
    order for the kernel's lookup."""
    import dataclasses

    from nftsg.translators.nft import Concat, Match, NftRule

    def perm(t: tuple) -> tuple:  # type: ignore[type-arg]
        return tuple(t[i] for i in order)

    sets = tuple(dataclasses.replace(s, type=perm(s.type), elements=tuple(sorted(
        perm(e) for e in s.elements))) if len(s.type) == 5 else s for s in prog.sets)
    chains = []
    for c in prog.chains:
        rules = []
        for r in c.rules:
            st = tuple(dataclasses.replace(x, left=Concat(perm(x.left.items)))
                       if isinstance(x, Match) and isinstance(x.left, Concat)
                       and len(x.left.items) == 5 else x for x in r.statements)
            rules.append(NftRule(st, r.comment))
        chains.append(dataclasses.replace(c, rules=tuple(rules)))
    return dataclasses.replace(prog, sets=sets, chains=tuple(chains))


def narrowed(prog: Program) -> Program:
    """The program with every field that no element of a rule set constrains (the whole
    range in every element, e.g. source port or local address) dropped from that set's
    type, elements and lookup: same decisions, a narrower key (measured, not the
    compiler's layout)."""
    import dataclasses

    from nftsg.translators.nft import Concat, Match, NftRule, SetRef

    full = {"inet_proto": (0, 255), "inet_service": (0, 65535), "ipv4_addr": (0, (1 << 32) - 1),
            "ipv6_addr": (0, (1 << 128) - 1)}
    keep: dict[str, tuple[int, ...]] = {}
    sets = []
    for s in prog.sets:
        if len(s.type) == 5 and s.elements:
            k = tuple(i for i, t in enumerate(s.type)
                      if any(tuple(e[i]) != full[t] for e in s.elements))
            if not k:  # one field at least: a set needs a key
                k = (0,)
            keep[s.name] = k
            s = dataclasses.replace(s, type=tuple(s.type[i] for i in k), elements=tuple(sorted(
                {tuple(e[i] for i in k) for e in s.elements})))
        sets.append(s)
    chains = []
    for c in prog.chains:
        rules = []
        for r in c.rules:
            st = tuple(dataclasses.replace(x, left=Concat(tuple(
                x.left.items[i] for i in keep[x.right.name])))
                if isinstance(x, Match) and isinstance(x.left, Concat)
                and isinstance(x.right, SetRef) and x.right.name in keep else x
                for x in r.statements)
            rules.append(NftRule(st, r.comment))
        chains.append(dataclasses.replace(c, rules=tuple(rules)))
    return dataclasses.replace(prog, sets=tuple(sets), chains=tuple(chains))


_CACHE: dict[int, Program] = {}


def _compiled(net: Network) -> Program:
    if id(net) not in _CACHE:
        _CACHE[id(net)] = compile_all(net)[model.VPC]
    return _CACHE[id(net)]


# "key": the compiler's key order (peer . dport . proto . sport . local); "proto-first":
# the same elements in the order before it (proto . peer . dport . sport . local).
VARIANTS: dict[str, Callable[[Network], Program]] = {
    "key": _compiled,
    "proto-first": lambda net: permuted(_compiled(net), (2, 0, 1, 3, 4)),
    "narrow": lambda net: narrowed(_compiled(net)),
    "limit64": lambda net: _with_limit(net, 64),
}


def _with_limit(net: Network, per_element: int) -> Program:
    """Compiled with FLAT_LIMIT_PER_ELEMENT raised (a side falls back to bucket sets
    later), to compare one big flat set against the fallback's many lookups."""
    from nftsg.translators import compiler

    saved = compiler.FLAT_LIMIT_PER_ELEMENT
    compiler.FLAT_LIMIT_PER_ELEMENT = per_element
    try:
        return compile_all(net)[model.VPC]
    finally:
        compiler.FLAT_LIMIT_PER_ELEMENT = saved

# Kernel symbols -> the part of the per-packet path they belong to.
BUCKETS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("pipapo lookup", ("pipapo", "nft_pipapo")),
    ("other nft (rules, hash/vmap lookups, ct expr)", (
        "nft_do_chain", "nft_hash", "nft_rhash", "nft_lookup", "nft_meta", "nft_payload",
        "nft_ct", "nft_cmp", "nft_bitwise", "nft_immediate", "nft_range", "nft_bitmap",
        "nft_set_", "nft_objref", "nft_rbtree", "nft_counter", "nft_dynset", "nft_")),
    ("conntrack", ("nf_conntrack", "nf_ct_", "__nf_conntrack", "nf_nat", "hash_conntrack",
                   "tcp_packet", "nf_confirm", "__nf_ct", "ipv4_conntrack", "ipv6_conntrack",
                   "nf_tcp", "tcp_in_window", "nf_ct")),
)


def _rate(loadgen: str, server: str, client: str, seconds: float) -> float:
    return traffic.conn_rate(loadgen, server, client, model.address(1), model.CONN_PORT, seconds)


def perf_window(out: Path, loadgen: str, server: str, client: str,
                seconds: float) -> dict[str, float]:
    """conn/s load for `seconds` while perf samples every CPU; the share of the load
    generator's samples (user, kernel and the softirqs of the forwarding) per bucket,
    from `perf report --no-children` (self time per symbol)."""
    data = out.with_suffix(".data")
    rec = subprocess.Popen(["perf", "record", "-a", "-g", "-F", "2999", "-o", str(data), "--",
                            "sleep", str(seconds + 1)],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        time.sleep(0.3)
        _rate(loadgen, server, client, seconds)
    finally:
        rec.wait()
    rep = subprocess.run(["perf", "report", "-i", str(data), "--no-children", "--stdio",
                          "--sort", "sym", "-g", "none", "--percent-limit", "0.01",
                          # The router's forwarding runs in the senders' softirq context:
                          # the load generator's processes; other jobs on the machine not.
                          "--comm", "loadgen", "--percentage", "relative"],
                         capture_output=True, text=True, check=True).stdout
    out.write_text(rep)
    shares = {name: 0.0 for name, _ in BUCKETS}
    shares["all nf_tables"] = 0.0
    for line in rep.splitlines():
        parts = line.split()
        if len(parts) < 3 or not parts[0].endswith("%") or parts[1] not in ("[k]", "[.]"):
            continue
        pct, sym = float(parts[0].rstrip("%")), parts[2]
        for name, prefixes in BUCKETS:
            if sym.startswith(prefixes):
                shares[name] += pct
                break
        if sym.startswith(("nft_", "pipapo", "nf_tables")):
            shares["all nf_tables"] += pct
    return shares


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--points",
                    type=lambda s: [tuple(map(int, x.split("x"))) for x in s.split(",")],
                    default=[(200, 1000), (10, 10000)])
    ap.add_argument("--variants", default="key,proto-first")
    ap.add_argument("--seconds", type=float, default=2.0)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--perf", type=Path, help="directory for perf reports of the nftsg variants")
    args = ap.parse_args()
    variants = args.variants.split(",")
    prefix = "nc" + secrets.token_hex(3)
    with traffic.scratch_dir() as work:
        loadgen = traffic.build_loadgen(work)
        for n_enis, rules in args.points:
            lab = Lab(f"{prefix}n{n_enis}")
            backend = NftBackend()
            try:
                lab.apply(model.network(n_enis, 1))
                router = lab.router_ns(model.VPC)
                client, server = lab.host_ns("i-0000"), lab.host_ns("i-0001")
                try:
                    netns.write_sysctls(router, {"net/netfilter/nf_conntrack_max": 1 << 20})
                except (OSError, netns.NetnsError):
                    pass
                netns.write_sysctls(client, {"net/ipv4/ip_local_port_range": "1024 65535"})
                net = model.network(n_enis, rules)
                model.probed_decision(net)
                programs = {}
                for v in variants:
                    t0 = time.perf_counter()
                    programs[v] = VARIANTS[v](net)
                    took = time.perf_counter() - t0
                    print(f"N={n_enis} R={rules} {v}: compiled in {took:.2f} s, "
                          f"{programs[v].element_count()} elements", flush=True)

                def clear() -> None:
                    backend.delete_table(router, "inet", "nftsg")
                    linear.delete_table(router, linear.CT_ONLY_TABLE)

                def put(config: str) -> None:
                    clear()
                    if config == "conntrack":
                        linear.load_text(router, linear.conntrack_only_text())
                    elif config != "none":
                        backend.apply(router, programs[config].full_sync_commands())

                configs = ["none", "conntrack", *variants]
                results: dict[str, list[float]] = {c: [] for c in configs}
                for _ in range(args.rounds):
                    for config in configs:
                        put(config)
                        results[config].append(_rate(loadgen, server, client, args.seconds))
                base = statistics.median(results["none"])
                ct = statistics.median(results["conntrack"])
                print(f"N={n_enis} R={rules}: new TCP conn/s, median of {args.rounds} x "
                      f"{args.seconds:g} s")
                for config in configs:
                    med = statistics.median(results[config])
                    print(f"  {config:12} {med:8.0f}/s  {med / base:5.2f}x none  "
                          f"{med / ct:5.2f}x ct"
                          f"   ({', '.join(f'{x:.0f}' for x in results[config])})", flush=True)
                if args.perf:
                    args.perf.mkdir(parents=True, exist_ok=True)
                    for config in ["conntrack", *variants]:
                        put(config)
                        shares = perf_window(args.perf / f"n{n_enis}r{rules}-{config}.txt",
                                             loadgen, server, client, args.seconds)
                        print(f"  perf {config:10} " + ", ".join(
                            f"{k} {v:.1f} %" for k, v in shares.items()), flush=True)
                clear()
            finally:
                backend.close()
                lab.destroy()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
