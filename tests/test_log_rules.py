"""Denied-flow log rules in the compiled program (compiler `denied_log`).

Only profiles holding a logged group get log rules; each dropping rule is preceded
by a copy of its matches with `limit` and `log` and NO verdict (so the drop is never
rate-limited); the program decides exactly as without logging."""

from __future__ import annotations

from nftsg.translators.compiler import DeniedLog, compile_vpc, log_prefix, profile_id
from nftsg.translators.evaluator import evaluate
from nftsg.translators.nft import DROP, Limit, Log, Match, Verdict
from nftsg.translators.nft_text import full_sync_text
from nftsg.translators.tracer import Ruleset
from strategies import VPC_ID, network_of, random_flows, random_model
from test_trace_vs_evaluator import packet_of


def test_only_profiles_of_logged_groups_get_log_rules_before_each_drop() -> None:
    checked = 0
    for seed in range(0, 60, 3):
        network = network_of(random_model(seed))
        groups = sorted(g for g, sg in network.groups.items() if sg.vpc_id == VPC_ID)
        logged = frozenset(groups[:1])
        for counters in (False, True):
            plain = compile_vpc(network, VPC_ID, counters=counters)
            prog = compile_vpc(
                network, VPC_ID, counters=counters, denied_log=DeniedLog(logged, 7, 3)
            )
            assert plain.sets == prog.sets and plain.maps == prog.maps
            before = plain.chain_by_name
            for chain in prog.chains:
                old = before[chain.name].rules
                pid = chain.name.split("_", 1)[1] if chain.name[:3] in ("in_", "out") else ""
                eni_groups = {
                    g
                    for e in network.enis.values()
                    if e.vpc_id == VPC_ID and profile_id(e.group_ids) == pid
                    for g in e.group_ids
                }
                if not eni_groups & logged:
                    assert chain.rules == old, chain.name  # no cost where nothing is logged
                    continue
                direction = "ingress" if chain.name.startswith("in_") else "egress"
                rules = list(chain.rules)
                kept = [r for r in rules if not any(isinstance(s, Log) for s in r.statements)]
                assert tuple(kept) == old
                drops = [r for r in old if r.statements[-1] == DROP]
                logs = [r for r in rules if any(isinstance(s, Log) for s in r.statements)]
                assert len(logs) == len(drops)
                for i, rule in enumerate(rules):
                    st = rule.statements
                    if rule not in logs:
                        continue
                    checked += 1
                    # No verdict in the log rule; the rule after it drops, with the same matches.
                    assert not any(isinstance(s, Verdict) for s in st)
                    assert st[-2:] == (Limit(3), Log(log_prefix(pid, direction), 7))
                    nxt = rules[i + 1].statements
                    assert nxt[-1] == DROP
                    assert [s for s in nxt if isinstance(s, Match)] == list(st[:-2])
            # Decides as the evaluator (the tracer reads limit/log as deciding nothing).
            ruleset = Ruleset(prog.to_json())
            for flow in random_flows(network, seed, 15):
                assert ruleset.trace(packet_of(network, flow)).verdict == (
                    evaluate(network, flow).verdict
                )
            text, _ = full_sync_text(prog)
            if any(logged):
                assert ("log prefix" in text) == any(
                    isinstance(s, Log) for c in prog.chains for r in c.rules for s in r.statements
                )
    assert checked > 0


def test_log_rule_json_and_text_forms() -> None:
    network = network_of(random_model(1))
    groups = frozenset(g for g, sg in network.groups.items() if sg.vpc_id == VPC_ID)
    prog = compile_vpc(network, VPC_ID, denied_log=DeniedLog(groups, 5, 20))
    rendered = str(prog.to_json())
    assert "{'limit': {'rate': 20, 'burst': 5, 'per': 'second'}}" in rendered
    assert "{'log': {'prefix': 'nftsg:p" in rendered
    text, _ = full_sync_text(prog)
    assert 'limit rate 20/second log prefix "nftsg:p' in text
    assert " group 5" in text
