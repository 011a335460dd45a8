"""Layout probe: object counts, lookups per chain and the cold load of the scale model.

Builds the scale model of tests/test_compiler.py (N ENIs x G groups x 200 rules),
compiles it with the chosen layout, and loads the whole program into a fresh
network namespace with `nft -j -f`, timing userspace (nft's parse and
evaluation: user CPU) apart from the kernel transaction (system CPU).

Run as root: `.venv/bin/python bench/layout_probe.py --enis 200 --groups 200 [--layout v4]`.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from nftsg.translators.compiler import compile_vpc
from nftsg.translators.nft import Match, SetRef
from test_compiler import network_of, scale_topology


def lookups_per_chain(prog: object) -> float:
    chains = [c for c in prog.chains if c.name.startswith(("in_", "out_"))]  # type: ignore[attr-defined]
    n = sum(
        1
        for c in chains
        for r in c.rules
        for st in r.statements
        if isinstance(st, Match) and isinstance(st.right, SetRef)
    )
    return n / max(len(chains), 1)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--enis", type=int, default=200)
    ap.add_argument("--groups", type=int, default=200)
    ap.add_argument("--layout", default="")
    ap.add_argument("--no-load", action="store_true")
    args = ap.parse_args()
    t0 = time.perf_counter()
    net = network_of(scale_topology(n_groups=args.groups, n_enis=args.enis))
    t1 = time.perf_counter()
    kw = {"layout": args.layout} if args.layout else {}
    prog = compile_vpc(net, "vpc-scale", **kw)  # type: ignore[arg-type]
    t2 = time.perf_counter()
    text = json.dumps(prog.to_json())
    t3 = time.perf_counter()
    rules = sum(len(c.rules) for c in prog.chains)
    print(
        f"model {args.enis} ENIs x {args.groups} groups: build {t1 - t0:.2f}s "
        f"compile {t2 - t1:.2f}s "
        f"render {t3 - t2:.2f}s; {len(prog.sets)} sets, {len(prog.maps)} maps, "
        f"{len(prog.chains)} chains, {rules} rules, {prog.element_count()} elements, "
        f"{len(text) / 1e6:.1f} MB; {lookups_per_chain(prog):.1f} lookups per rule chain; "
        f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB"
    )
    if args.no_load:
        return 0
    ns = "lp" + uuid.uuid4().hex[:8]
    subprocess.run(["ip", "netns", "add", ns], check=True)
    try:
        with tempfile.NamedTemporaryFile("w", suffix=".json") as f:
            f.write(text)
            f.flush()
            t4 = time.perf_counter()
            res = subprocess.run(
                ["ip", "netns", "exec", ns, "/usr/bin/time", "-f", "%U %S %M",
                 "nft", "-j", "-f", f.name],
                capture_output=True, text=True,
            )
            wall = time.perf_counter() - t4
        if res.returncode != 0:
            print(res.stderr[-2000:])
            return 1
        user, system, rss = res.stderr.strip().splitlines()[-1].split()
        print(
            f"kernel load: {wall:.2f}s wall, nft user {user}s, system {system}s, "
            f"nft peak RSS {int(rss) / 1024:.0f} MB"
        )
    finally:
        subprocess.run(["ip", "netns", "delete", ns], check=False)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
