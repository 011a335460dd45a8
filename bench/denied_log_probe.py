"""Denied-flow log probe: what logging every group costs in rules, compile and load.

For the benchmark model (bench/model.py) and the scale model of
tests/test_compiler.py, compiles the same network without and with denied-flow
logging of EVERY group (`denied_log`), side by side in one run, and loads each
program as one nft text batch into a fresh network namespace (wall time of
`nft -f`). Printed as counts and as ratios logged/plain of the same run.

Run as root: `.venv/bin/python bench/denied_log_probe.py [--enis 200] [--rules 200] [--no-load]`.
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
from nftsg.translators.compiler import DeniedLog, compile_vpc  # noqa: E402
from nftsg.translators.network import Network  # noqa: E402
from nftsg.translators.nft import Program  # noqa: E402
from test_compiler import network_of, scale_topology  # noqa: E402


def _load(prog: Program) -> float:
    return load_seconds(prog, "logprobe")


def _row(name: str, net: Network, vpc: str, load: bool) -> None:
    out: dict[bool, tuple[int, float, float]] = {}
    log = DeniedLog(frozenset(net.groups))
    for logged in (False, True):
        t0 = time.perf_counter()
        prog = compile_vpc(net, vpc, denied_log=log if logged else None)
        compile_s = time.perf_counter() - t0
        rules = sum(len(c.rules) for c in prog.chains)
        load_s = _load(prog) if load else float("nan")
        out[logged] = (rules, compile_s, load_s)
        del prog
    (r0, c0, l0), (r1, c1, l1) = out[False], out[True]
    print(
        f"{name}: rules {r0} -> {r1} ({r1 / r0:.2f}x), "
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
