"""RuleHits (agent/hits.py): monotone per-rule totals from kernel counter readings.

Readings are listings in nft 1.0.6's JSON form, built from a compiled program; the
real-kernel side is netns-tests/test_rule_hits.py."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from nftsg.agent.hits import RuleHits, hits_path, read_hits
from nftsg.translators.compiler import compile_vpc
from nftsg.translators.nft import NftSet, Program, Writer
from strategies import VPC_ID, network_of, random_model


def _counted(seed: int = 3) -> tuple[Program, NftSet]:
    prog = compile_vpc(network_of(random_model(seed)), VPC_ID, counters=True)
    s = next(s for s in prog.sets if s.counter and s.elements)
    return prog, s


def _listing(prog: Program, s: NftSet, packets: list[int]) -> dict[str, Any]:
    w = Writer(prog.family, prog.table)
    elems = [
        {"elem": {"val": e, "counter": {"packets": p, "bytes": 60 * p}}}
        for e, p in zip(w.set_elements(s.type, s.elements), packets, strict=False)
    ]
    body = {"name": s.name, "type": list(s.type), "flags": ["interval"]}
    body |= {"stmt": [{"counter": None}], "elem": elems}
    return {"nftables": [{"set": body}]}


def test_totals_only_grow_across_resets_and_restarts(tmp_path: Path) -> None:
    prog, s = _counted()
    label = s.labels[0]
    clock = iter(range(100, 200)).__next__
    hits = RuleHits(hits_path(tmp_path), clock=lambda: float(clock()))
    assert hits.observe("ns", prog, _listing(prog, s, [3])) == 3
    assert hits.observe("ns", prog, _listing(prog, s, [5])) == 2  # +2 since the last
    assert hits.observe("ns", prog, _listing(prog, s, [1])) == 1  # recreated: all new
    assert hits.rules[label][0] == 6 and hits.rules[label][1] == 360
    # Forgotten elements (about to be recreated) count from zero again.
    hits.forget("ns", [s.name])
    assert hits.observe("ns", prog, _listing(prog, s, [4])) == 4
    # Another agent on the same state reads on where this one stopped.
    again = RuleHits(hits_path(tmp_path))
    assert again.rules[label][0] == 10
    assert again.observe("ns", prog, _listing(prog, s, [4])) == 0
    doc = read_hits(tmp_path)
    assert doc is not None and doc["rules"][label][:2] == [10, 600]


def test_routers_count_apart_and_unlabelled_elements_name_no_rule(tmp_path: Path) -> None:
    prog, s = _counted()
    hits = RuleHits(tmp_path / "h.json")
    # A set the program does not have (another table's): nothing is credited.
    renamed = _listing(prog, s, [7])
    renamed["nftables"][0]["set"]["name"] = "f_elsewhere"
    assert hits.observe("ns", prog, renamed) == 0 and hits.rules == {}
    hits.observe("a", prog, _listing(prog, s, [2]))
    hits.observe("b", prog, _listing(prog, s, [2]))
    assert hits.rules[s.labels[0]][0] == 4
