"""Cold-load cost of the rule sets' key: the same compiled program loaded with the
compiler's key order (peer . dport . proto . sport . local), with the order before
it (proto . peer . dport . sport . local) and narrowed (fields no element of a set
constrains dropped from that set), side by side, interleaved per round, each as one
nft text batch into a fresh namespace (bench/nft_load.py).

Run as root: `.venv/bin/python bench/key_order_probe.py [--enis 200] [--rules 200]
[--rounds 3]`.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import model
from layout_conn_probe import narrowed, permuted
from nft_load import load_seconds
from nftsg.translators.compiler import compile_all


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--enis", type=int, default=200)
    ap.add_argument("--rules", type=int, default=200)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    net = model.network(args.enis, args.rules)
    t0 = time.perf_counter()
    prog = compile_all(net)[model.VPC]
    print(f"{args.enis}x{args.rules}: compile {time.perf_counter() - t0:.2f} s, "
          f"{prog.element_count()} elements", flush=True)
    variants = {"key": prog, "proto-first": permuted(prog, (2, 0, 1, 3, 4)),
                "narrow": narrowed(prog)}
    narrow = variants["narrow"]
    print(f"  narrow: {sum(len(s.type) < 5 for s in narrow.sets)} of "
          f"{sum(s.name.startswith('f_') for s in prog.sets)} flat sets narrower, "
          f"{narrow.element_count()} elements", flush=True)
    got: dict[str, list[float]] = {v: [] for v in variants}
    for _ in range(args.rounds):
        for name, p in variants.items():
            got[name].append(load_seconds(p, "kop"))
    for name, xs in got.items():
        print(f"  {name:12} load median {statistics.median(xs):.2f} s "
              f"({', '.join(f'{x:.2f}' for x in xs)})")
    ratio = statistics.median(got["key"]) / statistics.median(got["proto-first"])
    print(f"  key / proto-first: {ratio:.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
