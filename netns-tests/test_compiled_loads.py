"""The compiler's JSON against the real kernel: it loads, and diffs equal full syncs.

Needs root and `nft`. Every namespace gets a unique random name and is deleted
in the fixture's finalizer, whatever happens (and carries the run prefix that
conftest.py sweeps at session end).
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from nftsg.translators.canonical import (
    canonical_listing,
    canonical_program,
    describe_differences,
)
from nftsg.translators.compiler import DeniedLog, compile_vpc, profile_id
from nftsg.translators.diff import diff_programs
from nftsg.translators.nft import Log, envelope
from nftsg.translators.nft_text import full_sync_text
from nftsg.translators.tracer import Ruleset
from nftsg.translators.validate import load_network
from test_compiler import DEMO, GOLDEN_MODELS, scale_topology
from test_diff import EDITS, demo_programs

pytestmark = [
    pytest.mark.netns,
    pytest.mark.skipif(
        os.geteuid() != 0 or shutil.which("nft") is None, reason="needs root and nft"
    ),
]


class Netns:
    def __init__(self, name: str) -> None:
        self.name = name

    def nft(self, *args: str, batch: list[dict[str, Any]] | None = None) -> str:
        cmd = ["ip", "netns", "exec", self.name, "nft", *args]
        stdin = None
        if batch is not None:
            cmd += ["-j", "-f", "-"]
            stdin = json.dumps(envelope(batch))
        res = subprocess.run(cmd, input=stdin, capture_output=True, text=True, timeout=300)
        if res.returncode != 0:
            raise AssertionError(f"nft {args} failed ({res.returncode}): {res.stderr[:2000]}")
        return res.stdout

    def table(self) -> dict[str, Any]:
        return normalise(json.loads(self.nft("-j", "list", "table", "inet", "nftsg")))


@pytest.fixture
def netns(run_prefix: str) -> Iterator[Netns]:
    name = f"{run_prefix}c{secrets.token_hex(4)}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        yield Netns(name)
    finally:
        subprocess.run(["ip", "netns", "delete", name], check=False)


def _strip(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _strip(v) for k, v in obj.items() if k != "handle"}
    if isinstance(obj, list):
        return [_strip(v) for v in obj]
    return obj


def normalise(listing: dict[str, Any]) -> dict[str, Any]:
    """Objects by kind and name, rules in chain order, elements sorted, no handles."""
    out: dict[str, Any] = {"set": {}, "map": {}, "chain": {}, "rule": {}}
    for item in listing["nftables"]:
        ((kind, obj),) = item.items()
        if kind in ("metainfo", "table"):
            continue
        obj = _strip(obj)
        if kind == "rule":
            out["rule"].setdefault(obj["chain"], []).append(obj)
            continue
        if "elem" in obj:
            obj["elem"] = sorted(obj["elem"], key=lambda e: json.dumps(e, sort_keys=True))
        out[kind][obj["name"]] = obj
    return out


def test_demo_program_loads_and_lists_back(netns: Netns) -> None:
    net = load_network(DEMO.read_text())
    prog = compile_vpc(net, "vpc-demo")
    netns.nft(batch=prog.full_sync_commands())
    table = netns.table()
    assert set(table["set"]) == {s.name for s in prog.sets}
    assert set(table["map"]) == {m.name for m in prog.maps}
    assert set(table["chain"]) == {c.name for c in prog.chains}
    fwd = table["chain"]["forward"]
    assert (fwd["type"], fwd["hook"], fwd["prio"], fwd["policy"]) == (
        "filter",
        "forward",
        0,
        "drop",
    )
    for chain in prog.chains:
        listed = table["rule"].get(chain.name, [])
        assert [r.get("comment", "") for r in listed] == [r.comment for r in chain.rules]
    for s in prog.sets:
        assert len(table["set"][s.name].get("elem", [])) == len(s.elements), s.name
    # A second full sync of the same program changes nothing; nor does its diff.
    netns.nft(batch=prog.full_sync_commands())
    assert netns.table() == table
    assert diff_programs(prog, compile_vpc(net, "vpc-demo")) == []
    # Only our table exists: nothing else in the namespace was touched or created.
    assert netns.nft("list", "tables").split() == ["table", "inet", "nftsg"]


@pytest.mark.parametrize("model", sorted(GOLDEN_MODELS))
def test_golden_programs_list_back_for_every_protocol(netns: Netns, model: str) -> None:
    """nft 1.0.6 lists every construct back (ICMP, ICMPv6, GRE, ALL, TCP, UDP through
    `meta l4proto . peer . th dport . th sport . local` in per-group sets holding CIDRs,
    member addresses and prefix-list entries), as text and as JSON, and the JSON
    listing loads back into the same table."""
    net = load_network(GOLDEN_MODELS[model].read_text())
    for vpc_id in sorted(net.vpcs):
        prog = compile_vpc(net, vpc_id)
        netns.nft(batch=prog.full_sync_commands())
        netns.nft("list", "table", "inet", "nftsg")  # raises if nft cannot print it
        raw = json.loads(netns.nft("-j", "list", "table", "inet", "nftsg"))
        table = normalise(raw)
        assert set(table["set"]) == {s.name for s in prog.sets}
        for chain in prog.chains:
            assert len(table["rule"].get(chain.name, [])) == len(chain.rules), chain.name
        # By content: every set lists back with exactly the elements compiled (flat
        # sets hold non-CIDR address ranges, which nft lists as ranges, blocks as
        # prefixes), read by the tracer from both forms.
        ours, kernel = Ruleset(prog.to_json()), Ruleset(raw)
        for s in prog.sets:
            assert sorted(kernel.sets[s.name].elements) == sorted(ours.sets[s.name].elements)
        # Chains before the maps that jump to them, rules last.
        order = ["table", "chain", "set", "map", "rule"]
        listing = sorted(
            (
                {"add": {kind: _strip(obj)}}
                for item in raw["nftables"]
                for kind, obj in item.items()
                if kind != "metainfo"
            ),
            key=lambda c: order.index(next(iter(c["add"]))),
        )
        netns.nft("delete", "table", "inet", "nftsg")
        netns.nft(batch=listing)
        assert netns.table() == table


@pytest.mark.parametrize("name", sorted(EDITS))
def test_diff_on_kernel_equals_full_sync(netns: Netns, name: str) -> None:
    old, new = demo_programs(EDITS[name])
    netns.nft(batch=old.full_sync_commands())
    netns.nft(batch=diff_programs(old, new))
    patched = netns.table()
    netns.nft(batch=new.full_sync_commands())
    assert patched == netns.table()
    # And back.
    netns.nft(batch=diff_programs(new, old))
    back = netns.table()
    netns.nft(batch=old.full_sync_commands())
    assert back == netns.table()


@pytest.mark.slow
def test_scale_program_passes_the_kernel(netns: Netns) -> None:
    net = load_network(json.dumps(scale_topology()))
    prog = compile_vpc(net, "vpc-scale")
    text = json.dumps(prog.to_json())
    t0 = time.perf_counter()
    res = subprocess.run(
        ["ip", "netns", "exec", netns.name, "nft", "-c", "-j", "-f", "-"],
        input=text,
        capture_output=True,
        text=True,
        timeout=600,
    )
    check = time.perf_counter() - t0
    assert res.returncode == 0, res.stderr[:2000]
    t0 = time.perf_counter()
    netns.nft(batch=prog.full_sync_commands())
    load = time.perf_counter() - t0
    print(f"\nscale: {len(text) / 1e6:.1f} MB JSON, nft -c {check:.1f}s, full load {load:.1f}s")
    listed = netns.table()
    assert len(listed["set"]) == len(prog.sets)
    assert sum(len(r) for r in listed["rule"].values()) == sum(len(c.rules) for c in prog.chains)
    # At this size an update costs what it changes: one ENI joins one more group.
    topo = scale_topology()
    inst = topo["instances"][0]
    extra = next(
        g["security_group_id"]
        for g in topo["security_groups"]
        if g["security_group_id"] not in inst["security_group_ids"]
    )
    inst["security_group_ids"].append(extra)
    t0 = time.perf_counter()
    new = compile_vpc(load_network(json.dumps(topo)), "vpc-scale")
    diff = diff_programs(prog, new)
    t1 = time.perf_counter()
    netns.nft(batch=diff)
    t2 = time.perf_counter()
    print(
        f"scale: join -> {len(diff)} commands (validate+compile+diff {t1 - t0:.2f}s), "
        f"applied in {t2 - t1:.2f}s"
    )
    # Only the joining ENI's group lists change structurally (the new list's chains and
    # flat sets appear if no other ENI has it, the old one's go if none keeps it) and
    # its own intra chain; everything else (the flat sets of group lists referencing
    # the joined group, intra sets, dispatch maps) is elements.
    eni_id = "eni-" + inst["instance_id"][2:]
    old_pid = profile_id(net.enis[eni_id].group_ids)
    new_pid = profile_id(inst["security_group_ids"])
    names = [f"{p}{pid}" for p in ("in_", "out_", "f_") for pid in (old_pid, new_pid)]
    own = (*names, f"intra_{eni_id}")
    for c in diff:
        ((_verb, body),) = c.items()
        ((kind, obj),) = body.items()
        if kind != "element":
            assert (obj.get("name") or obj.get("chain", "")).startswith(own), c

    # One rule edited (its port): element commands only. The rule is one whose edit
    # changes some verdict (a rule shadowed by a wider one changes nothing in the flat
    # layout), of a group some ENI is in.
    candidates = (
        (g, p)
        for g in topo["security_groups"]
        if g["security_group_type"] == "normal"
        and any(g["security_group_id"] in i["security_group_ids"] for i in topo["instances"])
        for p in g["permissions"]
        if p["ip_protocol"] == "TCP" and p["direction"] == "ingress"
    )
    for _ in range(30):
        group, perm = next(candidates)
        was = perm["port_range"]
        perm["port_range"] = "60000/60000"
        t0 = time.perf_counter()
        newer = compile_vpc(load_network(json.dumps(topo)), "vpc-scale")
        rule_diff = diff_programs(new, newer)
        t1 = time.perf_counter()
        if rule_diff:
            break
        perm["port_range"] = was
    netns.nft(batch=rule_diff)
    t2 = time.perf_counter()
    kinds = {kind for c in rule_diff for body in c.values() for kind in body}
    print(
        f"scale: one rule edit -> {len(rule_diff)} commands {sorted(kinds)} "
        f"(validate+compile+diff {t1 - t0:.2f}s), applied in {t2 - t1:.3f}s"
    )
    assert kinds == {"element"}
    # ... of the flat sets of the group lists holding the edited group only.
    gid = group["security_group_id"]
    holders = {
        profile_id(e.group_ids)
        for e in load_network(json.dumps(topo)).enis.values()
        if gid in e.group_ids
    }
    assert {body["element"]["name"].split("_")[1] for c in rule_diff for body in c.values()} <= (
        holders
    )


def _text_load(netns: Netns, text: str) -> None:
    res = subprocess.run(
        ["ip", "netns", "exec", netns.name, "nft", "-f", "-"],
        input=text,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode == 0, res.stderr[:2000]


@pytest.mark.parametrize("layout", ["flat", "v4"])
@pytest.mark.parametrize("model", [*sorted(GOLDEN_MODELS), "demo", "scale-20"])
def test_text_full_load_equals_json_full_load(netns: Netns, model: str, layout: str) -> None:
    """The cold-load text batch (`full_sync_text`) leaves the kernel with exactly the
    table of the JSON batch, by listing and by the drift check's canonical form."""
    if model == "demo":
        net = load_network(DEMO.read_text())
    elif model == "scale-20":
        net = load_network(json.dumps(scale_topology(n_groups=20, n_enis=30)))
    else:
        net = load_network(GOLDEN_MODELS[model].read_text())
    for vpc_id in sorted(net.vpcs):
        prog = compile_vpc(net, vpc_id, layout=layout)  # type: ignore[arg-type]
        netns.nft(batch=prog.full_sync_commands())
        via_json = netns.table()
        text, count = full_sync_text(prog)
        assert count == len(prog.full_sync_commands())
        _text_load(netns, text)
        assert netns.table() == via_json
        raw = json.loads(netns.nft("-j", "list", "table", "inet", "nftsg"))
        assert describe_differences(canonical_program(prog), canonical_listing(raw)) == []


@pytest.mark.parametrize("counters", [False, True])
@pytest.mark.parametrize("model", [*sorted(GOLDEN_MODELS), "demo"])
def test_denied_log_rules_list_back_equal(netns: Netns, model: str, counters: bool) -> None:
    """With denied-flow logging on every group, the `limit ... log prefix ... group`
    rules load as JSON and as text, list back equal both ways, and the drift check's
    canonical form of the listing equals the program's."""
    net = load_network(DEMO.read_text() if model == "demo" else GOLDEN_MODELS[model].read_text())
    log = DeniedLog(frozenset(net.groups), 3, 10)
    for vpc_id in sorted(net.vpcs):
        prog = compile_vpc(net, vpc_id, counters=counters, denied_log=log)
        assert any(isinstance(s, Log) for c in prog.chains for r in c.rules for s in r.statements)
        netns.nft(batch=prog.full_sync_commands())
        via_json = netns.table()
        raw = json.loads(netns.nft("-j", "list", "table", "inet", "nftsg"))
        assert describe_differences(canonical_program(prog), canonical_listing(raw)) == []
        text_listing = netns.nft("list", "table", "inet", "nftsg")
        assert 'log prefix "nftsg:p' in text_listing and "limit rate 10/second" in text_listing
        text, _ = full_sync_text(prog)
        _text_load(netns, text)
        assert netns.table() == via_json
        # The text listing loads back to the same table.
        netns.nft("delete", "table", "inet", "nftsg")
        _text_load(netns, text_listing)
        assert netns.table() == via_json
        netns.nft("delete", "table", "inet", "nftsg")
