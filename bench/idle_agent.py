"""CPU an idle agent burns, at the scale model (200 ENIs x 200 rules), in CPU seconds
per minute of wall time.

Starts `nftsg agent` as a child process on a private state dir and lab prefix,
stores the scale model of tests/test_compiler.py, waits until the router
enforces it, lets the agent settle, then reads the child's user+system CPU time
from /proc over a window in which nothing changes. With `--src DIR` the agent
runs from another checkout of the project (e.g. an older commit, for a before/
after figure in the same run). Needs root; removes its namespaces and state.

    .venv/bin/python bench/idle_agent.py [--window 60] [--src OLD_CHECKOUT]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from nftsg.agent.lab import Lab  # noqa: E402
from nftsg.agent.store import Store  # noqa: E402
from nftsg.translators.model import topology_from_data  # noqa: E402
from nftsg.translators.validate import build_network  # noqa: E402
from test_compiler import scale_topology  # noqa: E402

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS  # utime + stime


def measure(src: Path | None, window: float, settle: float) -> dict[str, float]:
    prefix = f"idl{os.getpid() % 100000}"
    state = Path(tempfile.mkdtemp(prefix="nftsg-idle-"))
    topo = scale_topology()
    network = build_network(topology_from_data(topo))
    lab = Lab(prefix)
    env = dict(os.environ)
    if src is not None:
        # A tree with nftsg/{translators,agent} linked to the other checkout; it is
        # found before the editable install's finder.
        shim = state / "src" / "nftsg"
        shim.mkdir(parents=True)
        (shim / "translators").symlink_to(src / "translators")
        (shim / "agent").symlink_to(src / "agent")
        env["PYTHONPATH"] = str(state / "src")
    agent = None
    try:
        lab.ensure_routers(network)
        with Store(state / "state.db") as store:
            revision = store.save_topology(topo)
        started = time.monotonic()
        agent = subprocess.Popen(
            [sys.executable, "-m", "nftsg.agent.cli", "agent", "--state-dir", str(state),
             "--prefix", prefix],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=open(state / "agent.log", "w"),
        )
        namespaces = [lab.router_ns(v) for v in network.vpcs]
        with Store(state / "state.db") as store:
            while True:
                records = [store.applied(ns) for ns in namespaces]
                if all(r is not None and r.revision >= revision for r in records):
                    break
                if agent.poll() is not None:
                    raise SystemExit(f"agent exited: {(state / 'agent.log').read_text()[-2000:]}")
                if time.monotonic() - started > 600:
                    raise SystemExit("agent did not enforce the model in 600 s")
                time.sleep(0.2)
        in_force = time.monotonic() - started
        time.sleep(settle)
        cpu0, t0 = cpu_seconds(agent.pid), time.monotonic()
        time.sleep(window)
        cpu1, t1 = cpu_seconds(agent.pid), time.monotonic()
        return {
            "in_force_s": round(in_force, 2),
            "cpu_s_per_min": round((cpu1 - cpu0) / (t1 - t0) * 60, 3),
        }
    finally:
        if agent is not None:
            agent.terminate()
            agent.wait(timeout=30)
        lab.destroy()
        shutil.rmtree(state, ignore_errors=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--window", type=float, default=60.0, help="seconds measured")
    parser.add_argument("--settle", type=float, default=10.0, help="seconds after in force")
    parser.add_argument("--src", type=Path, help="another checkout to measure first")
    args = parser.parse_args()
    results = {}
    if args.src is not None:
        results["other checkout"] = measure(args.src.resolve(), args.window, args.settle)
    results["this checkout"] = measure(None, args.window, args.settle)
    print(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
