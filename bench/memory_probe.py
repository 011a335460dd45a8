"""Where the agent's memory goes: peak RSS per stage of its real paths.

For each model (`bench`: bench/model.py, every ENI its own group of R rules;
`scale`: the scale model of tests/test_compiler.py, 200 groups of 200 rules)
and each size N ENIs, a child process of its own runs what the agent runs
(daemon.Agent with the real nft backend and the control plane of
agent/control.py attached, as `run_forever` does; the router namespace is a
fresh empty one):

- replay: the store's document (SQLite) -> the control plane's model;
- compile, render, commit: the first round's full sync (the compile cache,
  the nft text batch, libnftables + the kernel);
- verify: the drift check by content (the kernel's JSON listing parsed,
  canonical forms compared);
- changes: --changes ECS calls of each kind (rule added, modified, removed;
  inner policy flipped; ENI joins and leaves a group) through
  `ControlPlane.call`, then a verify again;
- selfcheck: the tracer's parse of the kernel listing (done by the agent only
  when flows are tracked).

Each stage's own peak is read from VmHWM, reset between stages through
/proc/self/clear_refs ("5"), so a figure is that stage's peak RSS, not the
process's; VmHWM over the whole run is printed too. With --tracemalloc the
Python heap's peak per stage and the biggest holders of memory retained after
it (by file:line) are printed as well (slower; the RSS figures then include
tracemalloc's own overhead, so compare RSS runs without it).

Run as root: `.venv/bin/python bench/memory_probe.py [--models bench,scale]
[--sizes 200,500] [--changes 5] [--tracemalloc] [--json PATH]`.
"""

from __future__ import annotations

import argparse
import gc
import json
import re
import shutil
import subprocess
import sys
import tempfile
import time
import tracemalloc
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT / "tests"))


def _status(field: str) -> float:
    text = Path("/proc/self/status").read_text()
    m = re.search(rf"^{field}:\s+(\d+) kB", text, re.M)
    return int(m.group(1)) / 1024 if m else 0.0


def _reset_hwm() -> None:
    # Writing 5 resets the peak RSS (VmHWM) to the current RSS (proc(5), clear_refs).
    Path("/proc/self/clear_refs").write_text("5")


class Stages:
    """Per-stage peak RSS (and Python heap peak with tracemalloc)."""

    def __init__(self, trace: bool, top: int) -> None:
        self.trace = trace
        self.top = top
        self.rows: list[dict[str, Any]] = []
        self.overall = 0.0

    def start(self) -> None:
        gc.collect()
        _reset_hwm()
        if self.trace:
            tracemalloc.reset_peak()

    def end(self, name: str, seconds: float) -> None:
        hwm = _status("VmHWM")
        self.overall = max(self.overall, hwm)
        row: dict[str, Any] = {
            "stage": name,
            "peak_rss_mb": round(hwm, 1),
            "rss_after_mb": round(_status("VmRSS"), 1),
            "seconds": round(seconds, 3),
        }
        if self.trace:
            current, peak = tracemalloc.get_traced_memory()
            row["py_peak_mb"] = round(peak / 2**20, 1)
            row["py_after_mb"] = round(current / 2**20, 1)
            snap = tracemalloc.take_snapshot().filter_traces(
                [tracemalloc.Filter(False, tracemalloc.__file__)]
            )
            row["py_top"] = [
                f"{s.size / 2**20:7.1f} MB {s.traceback[0].filename.split('/nftsg/')[-1]}"
                f":{s.traceback[0].lineno}"
                for s in snap.statistics("lineno")[: self.top]
            ]
        self.rows.append(row)
        print(_row_text(row), file=sys.stderr, flush=True)

    def run(self, name: str, fn: Callable[[], Any]) -> Any:
        self.start()
        t = time.perf_counter()
        out = fn()
        self.end(name, time.perf_counter() - t)
        return out


def _row_text(row: dict[str, Any]) -> str:
    extra = ""
    if "py_peak_mb" in row:
        extra = f"  py peak {row['py_peak_mb']:7.1f} after {row['py_after_mb']:7.1f}"
    text = (
        f"  {row['stage']:<22} peak RSS {row['peak_rss_mb']:7.1f} MB  after "
        f"{row['rss_after_mb']:7.1f} MB  {row['seconds']:6.2f} s{extra}"
    )
    for line in row.get("py_top", []):
        text += f"\n      {line}"
    return text


def _quotas(model_name: str) -> Any:
    """Limits with room for the rules the changes add."""
    if model_name == "bench":
        import model as bench_model

        return bench_model.quotas_for(1000)
    from nftsg.translators.quotas import Quotas

    return Quotas(rules_per_group=1000, rules_per_eni=10000)


def _topology(model_name: str, n_enis: int) -> tuple[dict[str, Any], Any]:
    from nftsg.translators import model as m

    if model_name == "bench":
        import model as bench_model

        data = bench_model.topology(n_enis, 200)
    else:
        from test_compiler import scale_topology

        data = scale_topology(200, n_enis, 200)
    return m.topology_from_data(data).model_dump(mode="json"), _quotas(model_name)


def _wrap(obj: Any, attr: str, stages: Stages, name: str) -> None:
    """Make obj.attr a stage of its own each time it is called."""
    inner = getattr(obj, attr)

    def wrapped(*args: Any, **kwargs: Any) -> Any:
        return stages.run(name, lambda: inner(*args, **kwargs))

    setattr(obj, attr, wrapped)


def prepare(model_name: str, n_enis: int, db: str) -> None:
    """Write the model's document into a store (in a process of its own, so the
    measured child starts from what an agent starts from: a store on disk)."""
    from nftsg.agent.store import Store

    doc, _quotas = _topology(model_name, n_enis)
    with Store(db) as store:
        store.save_topology(doc)


def child(model_name: str, n_enis: int, changes: int, trace: bool, top: int,
          prefix: str, db: str, selfcheck: bool) -> dict[str, Any]:
    from nftsg.agent import netns, reconcile
    from nftsg.agent.control import ControlPlane
    from nftsg.agent.daemon import Agent
    from nftsg.agent.datastore import SqliteDatastore
    from nftsg.agent.settings import Settings
    from nftsg.agent.store import Store

    stages = Stages(trace, top)
    router = f"{prefix}-r-{'vpc-bench' if model_name == 'bench' else 'vpc-scale'}"
    result: dict[str, Any] = {"model": model_name, "enis": n_enis, "changes_per_kind": changes}
    quotas = _quotas(model_name)
    with tempfile.TemporaryDirectory() as tmp:
        store = Store(db)
        if trace:
            tracemalloc.start()
        stages.start()
        stages.end("baseline (imports)", 0.0)
        netns.create(router)
        try:
            agent = Agent(
                Settings(state_dir=Path(tmp), prefix=prefix, table="nftsg"),
                store=store, list_flows=None, verify_every=1e9, selfcheck_every=1e9,
            )
            control = ControlPlane(agent, SqliteDatastore(store), checkpoint_every=10**9,
                                   quotas=quotas)
            # Stage boundaries inside the agent's own round.
            current = control.current
            agent.model_source = lambda: stages.run("replay (model)", current)
            _wrap(agent.reconciler, "compile_program", stages, "compile")
            real_text = reconcile.full_sync_text
            reconcile.full_sync_text = lambda p: stages.run("render text", lambda: real_text(p))
            _wrap(agent.backend, "apply_text", stages, "commit (libnftables)")
            try:
                assert agent.step(), "first round did not put the model in force"
            finally:
                reconcile.full_sync_text = real_text
                agent.reconciler.compile_program = control.compile
            result["cold_load_peak_rss_mb"] = max(r["peak_rss_mb"] for r in stages.rows)
            stages.run("verify", lambda: agent.reconciler.verify())
            assert control.model is not None
            net = control.model.network
            result["rules"] = sum(len(g.rules) for g in net.groups.values())
            stages.run("changes", lambda: _changes(control, changes))
            stages.run("verify after changes", lambda: agent.reconciler.verify())
            if selfcheck:
                stages.run("selfcheck listing", lambda: agent._ruleset(router))
            agent.backend.close()
            store.close()
        finally:
            netns.delete(router)
    result["stages"] = stages.rows
    result["peak_rss_mb"] = stages.overall
    return result


def _changes(control: Any, changes: int) -> None:
    """`changes` ECS calls of each kind, as bench/control_plane.py makes them."""
    net = control.model.network
    basic = sorted(g.group_id for g in net.groups.values() if g.is_basic)
    enis = sorted(e.eni_id for e in net.enis.values()
                  if all(net.groups[g].is_basic for g in e.group_ids) and len(e.group_ids) < 3)
    for i in range(changes):
        gid = basic[i % len(basic)]
        perm = {"IpProtocol": "TCP", "PortRange": f"{40000 + i}/{40000 + i}",
                "SourceCidrIp": "203.0.113.0/24"}
        control.call("AuthorizeSecurityGroup", {"SecurityGroupId": gid, "Permissions": [perm]},
                     "probe")
        group = control.model.network.groups[gid]
        rid = next(r.rule_id for r in group.rules if r.ports and r.ports.start == 40000 + i)
        control.call("ModifySecurityGroupRule", {"SecurityGroupId": gid,
                     "SecurityGroupRuleId": rid, "PortRange": f"{50000 + i}/{50000 + i}"},
                     "probe")
        control.call("RevokeSecurityGroup", {"SecurityGroupId": gid,
                     "SecurityGroupRuleId": [rid]}, "probe")
        flip = "Drop" if group.inner_access_policy == "Accept" else "Accept"
        control.call("ModifySecurityGroupPolicy", {"SecurityGroupId": gid,
                     "InnerAccessPolicy": flip}, "probe")
        eni = control.model.network.enis[enis[i % len(enis)]]
        other = next(g for g in basic[(i * 7) % len(basic):] + basic if g not in eni.group_ids)
        for action in ("JoinSecurityGroup", "LeaveSecurityGroup"):
            control.call(action, {"SecurityGroupId": other, "NetworkInterfaceId": eni.eni_id},
                         "probe")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="bench,scale")
    ap.add_argument("--sizes", default="200,500")
    ap.add_argument("--changes", type=int, default=5, help="ECS calls of each kind")
    ap.add_argument("--tracemalloc", action="store_true")
    ap.add_argument("--selfcheck", action="store_true",
                    help="also the self-check's parse of the listing (slow)")
    ap.add_argument("--top", type=int, default=8, help="holders listed per stage")
    ap.add_argument("--json", default="memory_probe.json")
    ap.add_argument("--prefix", default=f"mp{int(time.time()) % 100000}")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--prepare", help=argparse.SUPPRESS)
    ap.add_argument("--db", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.prepare:
        model_name, n = args.prepare.split(":")
        prepare(model_name, int(n), args.db)
        return 0
    if args.child:
        model_name, n = args.child.split(":")
        out = child(model_name, int(n), args.changes, args.tracemalloc, args.top, args.prefix,
                    args.db, args.selfcheck)
        print(json.dumps(out))
        return 0
    results = []
    for model_name in args.models.split(","):
        for n in (int(x) for x in args.sizes.split(",")):
            print(f"{model_name} model, {n} ENIs x 200 rules:", flush=True)
            tmp = tempfile.mkdtemp(prefix="memprobe")
            db = str(Path(tmp) / "state.db")
            subprocess.run([sys.executable, __file__, "--prepare", f"{model_name}:{n}", "--db",
                            db], check=True)
            cmd = [sys.executable, __file__, "--child", f"{model_name}:{n}", "--changes",
                   str(args.changes), "--top", str(args.top), "--prefix", args.prefix, "--db", db]
            cmd += ["--tracemalloc"] * args.tracemalloc + ["--selfcheck"] * args.selfcheck
            try:
                proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, check=False)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
            if proc.returncode != 0:
                print(f"child {model_name}:{n} failed (rc {proc.returncode})", file=sys.stderr)
                return 1
            results.append(json.loads(proc.stdout.strip().splitlines()[-1]))
            r = results[-1]
            print(f"  => {r['rules']} rules: cold load peak {r['cold_load_peak_rss_mb']:.0f} MB,"
                  f" whole run peak {r['peak_rss_mb']:.0f} MB", flush=True)
    Path(args.json).write_text(json.dumps({"results": results}, indent=1) + "\n")
    print(f"JSON: {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
