"""Where one element change's kernel time goes: netlink batch vs libnftables, by set size.

The scale model (tests/test_compiler.py) at --enis ENIs x 200 groups is compiled and
loaded into a fresh namespace; then, for sets of several sizes, one element is
added and deleted again --reps times each way, interleaved (same table, same
moment): through the backend's netlink path (split into the set descriptions
asked of the kernel and the batch itself) and through libnftables (which reads
the table's sets into its cache first). Also timed:
libnftables' dry run of the add (`nft -c`: cache fetch, parse and evaluation, no
transaction). Printed: medians in ms (add and delete pooled).

Run as root: `.venv/bin/python bench/element_path_probe.py [--enis 500] [--reps 20]`.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--enis", type=int, default=500)
    parser.add_argument("--reps", type=int, default=20)
    args = parser.parse_args(argv)
    sys.path.insert(0, str(ROOT / "tests"))
    from nftsg.agent import nft_fastpath
    from nftsg.agent.nft_backend import NftBackend
    from nftsg.agent.nft_wire import element_ops
    from nftsg.translators.compiler import compile_vpc
    from nftsg.translators.nft import Span, Writer
    from nftsg.translators.nft_text import full_sync_text
    from nftsg.translators.validate import load_network
    from test_compiler import scale_topology

    network = load_network(json.dumps(scale_topology(200, args.enis, 200)))
    (vpc,) = sorted(network.vpcs)
    program = compile_vpc(network, vpc, "nftsg")
    ns = f"epp-{uuid.uuid4().hex[:8]}"
    subprocess.run(["ip", "netns", "add", ns], check=True)
    backend = NftBackend()
    try:
        text, count = full_sync_text(program)
        t = time.perf_counter()
        backend.apply_text(ns, text, count)
        print(
            f"{args.enis} ENIs: {len(program.sets)} sets, {program.element_count()} elements, "
            f"loaded in {time.perf_counter() - t:.1f} s"
        )
        flat = sorted(
            (s for s in program.sets if "interval" in s.flags), key=lambda s: len(s.elements)
        )
        picks = {
            "ports (ifname)": program.set_by_name["ports"],
            "smallest flat set": flat[0],
            "median flat set": flat[len(flat) // 2],
            "largest flat set": flat[-1],
        }
        w = Writer(program.family, program.table)
        rng = random.Random(1)

        def free_box(elements: Any, bits: int) -> Any:
            """A point no element holds (the kernel refuses overlaps)."""
            while True:
                peer, local = rng.getrandbits(bits), rng.getrandbits(bits)
                point = (rng.randrange(256), peer, rng.randrange(65536), 1, local)
                if not any(
                    all(f.lo <= v <= f.hi for f, v in zip(e, point, strict=True)) for e in elements
                ):
                    return tuple(Span(v, v) for v in point)

        spent: dict[str, float] = {}
        real_sets = nft_fastpath.ElementChannel.sets

        def timed_sets(self: Any, keys: Any) -> Any:
            t = time.perf_counter()
            try:
                return real_sets(self, keys)
            finally:
                spent["describe"] = spent.get("describe", 0.0) + time.perf_counter() - t

        nft_fastpath.ElementChannel.sets = timed_sets  # type: ignore[method-assign]
        rows = []
        for label, s in picks.items():
            bits = 32 if "ipv4_addr" in s.type else 128
            key = ("fresh0",) if s.type == ("ifname",) else free_box(s.elements, bits)
            add = [w.add_elements(s.name, w.set_elements(s.type, [key]))]
            delete = [w.delete_elements(s.name, w.set_elements(s.type, [key]))]
            assert element_ops(add) is not None
            times: dict[str, list[float]] = {"netlink": [], "describe": [], "libnftables": []}
            for rep in range(args.reps):
                for path in ("netlink", "libnftables")[:: 1 if rep % 2 else -1]:
                    backend.netlink_elements = path == "netlink"
                    for batch in (add, delete):
                        spent.clear()
                        t = time.perf_counter()
                        backend.apply(ns, batch)
                        times[path].append((time.perf_counter() - t) * 1000)
                        assert backend.last_path[ns] == path
                        if path == "netlink":
                            times["describe"].append(spent["describe"] * 1000)
            med = {k: statistics.median(v) for k, v in times.items()}
            # libnftables' dry run of the same batch: cache fetch, parse, evaluation,
            # and no kernel transaction.
            checks = []
            for _ in range(args.reps):
                t = time.perf_counter()
                backend.check(ns, add)
                checks.append((time.perf_counter() - t) * 1000)
            med["check"] = statistics.median(checks)
            rows.append((label, len(s.elements), med))
        print(
            f"{'set':<20} {'elements':>8} {'netlink':>9} {'(describe)':>10} {'libnft':>9} "
            f"{'ratio':>6} {'libnft -c':>9}"
        )
        for label, n, med in rows:
            print(
                f"{label:<20} {n:>8} {med['netlink']:>9.2f} {med['describe']:>10.2f} "
                f"{med['libnftables']:>9.2f} {med['libnftables'] / med['netlink']:>5.1f}x "
                f"{med['check']:>9.2f}"
            )
    finally:
        backend.close()
        subprocess.run(["ip", "netns", "del", ns], check=False)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
