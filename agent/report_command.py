"""`nftsg report unused-rules` and `nftsg report rule-hits`: per-rule hits from the kernel.

The running agent (with `rule_counters: true`) keeps monotone per-rule totals in
its state directory (agent/hits.py); these commands join them with the stored
model, so they read the same state directory as `nftsg explain` without FILE
and need no call into the agent. Totals are as of the agent's last reading
(`last_reading`: every `rule_counters_interval`, default 10 s, and before changes).

"Unused since T": no packet counted for the rule at or after T. Counted are the
packets that reach the rule chains: the first packet of each new flow, and each
retry of a refused one (established traffic is accepted before the rules).
"""

from __future__ import annotations

import argparse
import json
import re
from datetime import UTC, datetime
from typing import Any

from nftsg.translators.errors import EcsError
from nftsg.translators.network import CidrPeer, GroupPeer, Network, Rule

from .hits import read_hits
from .settings import settings_from_env

_DURATION = re.compile(r"^(\d+(?:\.\d+)?)\s*([smhdw])$")
_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def parse_since(text: str, now: float) -> float:
    """An ISO 8601 time (naive means UTC) or a duration back from now (30m, 2h, 7d)."""
    m = _DURATION.match(text.strip())
    if m:
        return now - float(m.group(1)) * _SECONDS[m.group(2)]
    try:
        when = datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    except ValueError:
        raise EcsError(
            "InvalidParameter.Since",
            f"--since {text!r}: give an ISO 8601 time (2026-01-31T12:00:00Z) or a "
            "duration back from now (30m, 2h, 7d)",
        ) from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return when.timestamp()


def describe_match(rule: Rule) -> str:
    """The rule's match in ECS terms, one line."""
    peer = rule.peer
    if isinstance(peer, CidrPeer):
        who = str(peer.network)
    elif isinstance(peer, GroupPeer):
        who = f"group {peer.group_id}"
    else:
        who = f"prefix list {peer.prefix_list_id}"
    side = "from" if rule.direction == "ingress" else "to"
    ports = "-1/-1" if rule.ports is None else f"{rule.ports.start}/{rule.ports.end}"
    text = f"{rule.protocol} {ports} {side} {who}"
    if rule.source_ports is not None:
        text += f" source ports {rule.source_ports.start}/{rule.source_ports.end}"
    if rule.local is not None:
        text += f" local {rule.local}"
    return text


def _iso(ts: float | None) -> str | None:
    return None if ts is None else datetime.fromtimestamp(ts, UTC).isoformat(timespec="seconds")


def rule_rows(network: Network, hits: dict[str, Any]) -> list[dict[str, Any]]:
    """Every rule of the model with its totals, ordered by group, direction, priority."""
    totals = hits.get("rules", {})
    rows = []
    for gid in sorted(network.groups):
        group = network.groups[gid]
        for rule in group.rules:
            packets, octets, last = totals.get(rule.rule_id, (0, 0, None))
            rows.append(
                {
                    "SecurityGroupId": gid,
                    "SecurityGroupRuleId": rule.rule_id,
                    "Direction": rule.direction,
                    "Priority": rule.priority,
                    "Policy": rule.policy.capitalize(),
                    "Match": describe_match(rule),
                    "Description": rule.description,
                    "Packets": packets,
                    "Bytes": octets,
                    "LastHit": _iso(last),
                    "_last": last,
                }
            )
    rows.sort(
        key=lambda r: (
            r["SecurityGroupId"],
            r["Direction"],
            r["Priority"],
            r["SecurityGroupRuleId"],
        )
    )
    return rows


def unused_rules(
    network: Network, hits: dict[str, Any], since: float | None
) -> list[dict[str, Any]]:
    """Rules without a counted packet at or after `since` (None: since counting started)."""
    out = []
    for row in rule_rows(network, hits):
        last = row["_last"]
        if last is None or (since is not None and last < since):
            out.append(row)
    return out


def _load() -> tuple[Network, dict[str, Any]]:
    from .cli import _running_state_network

    settings = settings_from_env()
    network = _running_state_network()
    hits = read_hits(settings.state_dir)
    if hits is None:
        raise EcsError(
            "RuleCounters.Off",
            f"no rule hits in {settings.state_dir}: run the agent with rule_counters: true "
            "(settings file, NFTSG_RULE_COUNTERS=true or --rule-counters true)",
        )
    return network, hits


def _print(rows: list[dict[str, Any]], hits: dict[str, Any], as_json: bool, **extra: Any) -> None:
    head = {
        "CountingSince": _iso(hits.get("started")),
        "LastReading": _iso(hits.get("last_reading")),
        **extra,
    }
    clean = [{k: v for k, v in r.items() if not k.startswith("_")} for r in rows]
    if as_json:
        print(json.dumps({**head, "Rules": clean}, indent=2))
        return
    for k, v in head.items():
        print(f"# {k}: {v}")
    for r in clean:
        print(
            f"{r['SecurityGroupId']}  {r['SecurityGroupRuleId']}  {r['Direction']}  "
            f"p{r['Priority']}  {r['Policy']}  {r['Match']}  packets={r['Packets']}  "
            f"last={r['LastHit'] or '-'}" + (f"  ({r['Description']})" if r["Description"] else "")
        )


def run_unused(args: argparse.Namespace) -> int:
    network, hits = _load()
    now = datetime.now(UTC).timestamp()
    since = parse_since(args.since, now) if args.since else None
    rows = unused_rules(network, hits, since)
    _print(rows, hits, args.json, Since=_iso(since) if since is not None else "counting start")
    return 0


def run_hits(args: argparse.Namespace) -> int:
    network, hits = _load()
    rows = rule_rows(network, hits)
    defaults = {
        k: {"Packets": v[0], "Bytes": v[1], "LastHit": _iso(v[2])}
        for k, v in sorted(hits.get("defaults", {}).items())
    }
    _print(rows, hits, args.json, Defaults=defaults)
    return 0


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    report = sub.add_parser("report", help="reports from the running agent's hit counters")
    kinds = report.add_subparsers(dest="report", metavar="REPORT", required=True)
    unused = kinds.add_parser(
        "unused-rules",
        help="rules with no hits since a time (default: since counting started)",
    )
    unused.add_argument(
        "--since", metavar="TIME", help="ISO 8601 time or a duration back from now (30m, 2h, 7d)"
    )
    unused.add_argument("--json", action="store_true", help="JSON instead of one line per rule")
    unused.set_defaults(handler=run_unused)
    hits = kinds.add_parser("rule-hits", help="every rule with its packets, bytes and last hit")
    hits.add_argument("--json", action="store_true", help="JSON instead of one line per rule")
    hits.set_defaults(handler=run_hits)
