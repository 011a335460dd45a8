"""Hit-counter probe: what counting costs in elements, compile time and kernel load.

For the benchmark model (bench/model.py) and the scale model of
tests/test_compiler.py, compiles the same network without and with per-rule hit
counters (`counters=True`), side by side in one run, and loads each program as
one nft text batch into a fresh network namespace (wall time of `nft -f`).
Figures are printed as counts and as ratios counted/plain of the same run.

Run as root: `.venv/bin/python bench/counters_probe.py [--enis 200] [--rules 200] [--no-load]`.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "bench"))

import model as bench_model  # noqa: E402
from nft_load import load_seconds  # noqa: E402
from nftsg.translators.compiler import compile_vpc  # noqa: E402
from nftsg.translators.network import Network  # noqa: E402
from nftsg.translators.nft import Program  # noqa: E402
from test_compiler import network_of, scale_topology  # noqa: E402


def _load(prog: Program) -> float:
    return load_seconds(prog, "ctrprobe")


def _row(name: str, net: Network, vpc: str, load: bool) -> None:
    out: dict[bool, tuple[int, int, float, float]] = {}
    for counters in (False, True):
        t0 = time.perf_counter()
        prog = compile_vpc(net, vpc, counters=counters)
        compile_s = time.perf_counter() - t0
        elements = sum(len(s.elements) for s in prog.sets)
        load_s = _load(prog) if load else float("nan")
        out[counters] = (len(prog.sets), elements, compile_s, load_s)
        del prog
    (s0, e0, c0, l0), (s1, e1, c1, l1) = out[False], out[True]
    print(
        f"{name}: sets {s0} -> {s1}, set elements {e0} -> {e1} ({e1 / e0:.2f}x), "
        f"compile {c0:.2f} -> {c1:.2f} s ({c1 / c0:.2f}x), "
        f"load {l0:.2f} -> {l1:.2f} s ({l1 / l0:.2f}x)"
    )


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--enis", type=int, default=200)
    ap.add_argument("--rules", type=int, default=200, help="rules per ENI (bench) / group (scale)")
    ap.add_argument("--no-load", action="store_true")
    args = ap.parse_args()
    load = not args.no_load
    _row(
        f"bench model {args.enis} x {args.rules}",
        bench_model.network(args.enis, args.rules),
        bench_model.VPC,
        load,
    )
    _row(
        f"scale model {args.enis} x {args.enis} groups x {args.rules}",
        network_of(
            scale_topology(n_groups=args.enis, n_enis=args.enis, rules_per_group=args.rules)
        ),
        "vpc-scale",
        load,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
