"""Where a cold load's time goes, and what the loading levers change.

Builds bench/model.py's N ENIs x R rules (or the scale model of
tests/test_compiler.py with --scale), compiles it, renders the full-sync batch
and loads it into fresh network namespaces in one or more ways, timing each
stage apart:

- compile: the Python compiler (model -> Program);
- render: Program -> libnftables JSON command dicts;
- dumps: the dicts -> JSON text (what the bindings' `json_cmd` does first);
- load: libnftables parse/evaluate (the loading thread's user CPU) and the
  kernel transaction (its system CPU: netlink messages are processed in the
  sender's context), wall time apart.

Variants (--variants, comma-separated): `json` (one `json_cmd` batch, what the
agent does), `json-elem` (sets created empty, their elements in separate add
element commands of at most --chunk elements, same transaction), `text` (the
same table as nft text, from the kernel's own listing of a `json` load, in one
`cmd` call), `chunks` (the table, then the elements in transactions of
--chunk elements each).

Run as root: `.venv/bin/python bench/cold_load_probe.py --enis 200 --rules 200`.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

import model  # noqa: E402
from nftsg.translators.compiler import KEY_ORDER, compile_all  # noqa: E402
from nftsg.translators.nft_text import full_sync_text  # noqa: E402


def _thread_cpu() -> tuple[float, float]:
    ru = resource.getrusage(resource.RUSAGE_THREAD)
    return ru.ru_utime, ru.ru_stime


def in_namespace(ns: str, fn: Callable[[Any], Any]) -> Any:
    """Run fn(ctx) in a thread that entered `ns` and made its own libnftables context."""
    out: dict[str, Any] = {}

    def run() -> None:
        from pyroute2 import netns

        netns.setns(ns, flags=0)
        import nftables

        ctx = nftables.Nftables()
        ctx.set_json_output(True)
        try:
            out["value"] = fn(ctx)
        except BaseException as exc:  # noqa: BLE001
            out["error"] = exc

    t = threading.Thread(target=run)
    t.start()
    t.join()
    if "error" in out:
        raise out["error"]
    return out["value"]


def timed(ctx: Any, send: Callable[[Any], list[tuple[int, str, str]]]) -> dict[str, float]:
    u0, s0 = _thread_cpu()
    w0 = time.perf_counter()
    results = send(ctx)
    wall = time.perf_counter() - w0
    u1, s1 = _thread_cpu()
    for rc, _out, err in results:
        if rc != 0:
            raise RuntimeError(err[-1500:])
    return {"wall_s": wall, "user_s": u1 - u0, "sys_s": s1 - s0, "calls": len(results)}


def split_elements(cmds: list[dict[str, Any]], chunk: int) -> tuple[list[Any], list[Any]]:
    """(commands with sets created empty, add-element commands of <= chunk elements)."""
    head: list[dict[str, Any]] = []
    elems: list[dict[str, Any]] = []
    for c in cmds:
        body = c.get("add", {}).get("set")
        if body is not None and "elem" in body:
            body = dict(body)
            items = body.pop("elem")
            head.append({"add": {"set": body}})
            for i in range(0, len(items), chunk):
                elems.append({"add": {"element": {"family": body["family"], "table": body["table"],
                                                  "name": body["name"],
                                                  "elem": items[i:i + chunk]}}})
        else:
            head.append(c)
    return head, elems


def split_sets(cmds: list[dict[str, Any]], how: str) -> list[dict[str, Any]]:
    """Kernel-cost experiment: every flat set's elements spread over several sets of the
    same type (`split-proto`: TCP / UDP / the rest; `split<k>`: k round-robin parts);
    rules keep looking up the first part (the program is not meant to be right)."""
    out = []
    for c in cmds:
        body = c.get("add", {}).get("set")
        if body is None or not body["name"].startswith("f_") or "elem" not in body:
            out.append(c)
            continue
        items = body["elem"]
        if how == "split-rev":
            out.append({"add": {"set": {**body, "elem": items[::-1]}}})
            continue
        if how == "split-proto":
            groups: dict[str, list[Any]] = {"tcp": [], "udp": [], "o": []}
            for e in items:
                p = e["concat"][KEY_ORDER.index(0)]  # the protocol field
                groups["tcp" if p == 6 else "udp" if p == 17 else "o"].append(e)
            buckets = list(groups.values())
        else:
            k = int(how[len("split"):])
            buckets = [items[i::k] for i in range(k)]
        for i, b in enumerate(buckets):
            name = body["name"] if i == 0 else f"{body['name']}_{i}"
            nb = {**body, "name": name}
            if b:
                nb["elem"] = b
            else:
                nb.pop("elem")
            out.append({"add": {"set": nb}})
    return out


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--enis", type=int, default=200)
    ap.add_argument("--rules", type=int, default=200)
    ap.add_argument("--scale", action="store_true", help="tests/test_compiler.py's scale model")
    ap.add_argument("--layout", default="")
    ap.add_argument("--variants", default="json")
    ap.add_argument("--chunk", type=int, default=5000)
    args = ap.parse_args()

    t0 = time.perf_counter()
    if args.scale:
        from test_compiler import network_of, scale_topology

        net = network_of(scale_topology(n_groups=200, n_enis=args.enis))
        vpc = "vpc-scale"
    else:
        net = model.network(args.enis, args.rules)
        vpc = model.VPC
    t1 = time.perf_counter()
    kw = {"layout": args.layout} if args.layout else {}
    prog = compile_all(net, **kw)[vpc]  # type: ignore[arg-type]
    t2 = time.perf_counter()
    cmds = prog.full_sync_commands()
    t3 = time.perf_counter()
    text = json.dumps({"nftables": cmds})
    t4 = time.perf_counter()
    nft_text, _ = full_sync_text(prog)
    t5 = time.perf_counter()
    flat_sets = [s for s in prog.sets if s.name.startswith("f_")]
    print(json.dumps({
        "model": "scale" if args.scale else "bench", "enis": args.enis, "rules": args.rules,
        "model_s": round(t1 - t0, 3), "compile_s": round(t2 - t1, 3),
        "render_s": round(t3 - t2, 3), "dumps_s": round(t4 - t3, 3),
        "render_text_s": round(t5 - t4, 3), "text_mb": round(len(nft_text) / 1e6, 1),
        "sets": len(prog.sets), "chains": len(prog.chains),
        "rules_nft": sum(len(c.rules) for c in prog.chains), "elements": prog.element_count(),
        "flat_elements": sum(len(s.elements) for s in flat_sets),
        "largest_set": max((len(s.elements) for s in prog.sets), default=0),
        "json_mb": round(len(text) / 1e6, 1),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
    }), flush=True)

    for variant in args.variants.split(","):
        ns = "clp" + uuid.uuid4().hex[:8]
        subprocess.run(["ip", "netns", "add", ns], check=True)
        try:
            if variant == "json":
                r = in_namespace(ns, lambda ctx: timed(ctx, lambda c: [c.json_cmd({"nftables": cmds})]))
            elif variant == "json-elem":
                head, elems = split_elements(cmds, args.chunk)
                r = in_namespace(ns, lambda ctx: timed(
                    ctx, lambda c: [c.json_cmd({"nftables": head + elems})]))
            elif variant.startswith("split"):
                parts = split_sets(cmds, variant)
                r = in_namespace(ns, lambda ctx: timed(ctx, lambda c: [c.json_cmd({"nftables": parts})]))
            elif variant == "chunks":
                head, elems = split_elements(cmds, args.chunk)

                def send(c: Any) -> list[tuple[int, str, str]]:
                    out = [c.json_cmd({"nftables": head})]
                    for i in range(0, len(elems), 20):
                        out.append(c.json_cmd({"nftables": elems[i:i + 20]}))
                    return out

                r = in_namespace(ns, lambda ctx: timed(ctx, send))
            elif variant == "ourtext":
                def send_ours(c: Any) -> list[tuple[int, str, str]]:
                    c.set_json_output(False)
                    return [c.cmd(nft_text)]

                r = in_namespace(ns, lambda ctx: timed(ctx, send_ours))
            elif variant == "text":
                src = "clp" + uuid.uuid4().hex[:8]
                subprocess.run(["ip", "netns", "add", src], check=True)
                try:
                    in_namespace(src, lambda ctx: ctx.json_cmd({"nftables": cmds}))
                    listing = subprocess.run(
                        ["ip", "netns", "exec", src, "nft", "list", "table", "inet", prog.table],
                        capture_output=True, text=True, check=True).stdout
                finally:
                    subprocess.run(["ip", "netns", "delete", src], check=False)

                def send_text(c: Any) -> list[tuple[int, str, str]]:
                    c.set_json_output(False)
                    return [c.cmd(listing)]

                r = in_namespace(ns, lambda ctx: timed(ctx, send_text))
                r["text_mb"] = round(len(listing) / 1e6, 1)
            else:
                raise SystemExit(f"unknown variant {variant}")
            r = {k: round(v, 3) if isinstance(v, float) else v for k, v in r.items()}
            print(json.dumps({"variant": variant, **r}), flush=True)
        finally:
            subprocess.run(["ip", "netns", "delete", ns], check=False)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
