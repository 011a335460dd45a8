"""`nftsg plan FILE`, `nftsg apply FILE` and `nftsg clone GROUP`: the seed's workflow.

"Never modify a production group directly; clone it, validate, then apply":

- `nftsg clone sg-web --name web-trial` copies a group (CopySecurityGroup on
  the running agent) so a change can be tried on the copy first;
- `nftsg plan FILE` prints what enforcing FILE would change against the
  running agent's model: groups, rules, memberships, and the nft commands each
  VPC router would get. It changes nothing (it reads the store, never writes);
- `nftsg apply FILE` stores FILE as the new model and waits until every router
  enforces it (the agent's loop does it; the hosts must already exist, as
  `nftsg lab up` builds them).
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

from nftsg.translators.compiler import compile_vpc
from nftsg.translators.diff import diff_programs
from nftsg.translators.errors import EcsError
from nftsg.translators.network import Network, Rule
from nftsg.translators.validate import rule_identity_text

from .api_paths import api_socket_path
from .ecs_cli import call_agent
from .lab import Lab
from .lab_commands import (
    LabCommandError,
    agent_pid,
    read_topology,
    require_root,
    stored_network,
    wait_in_force,
)
from .settings import layout_from_env, settings_from_env
from .store import Store


def _rule_text(rule: Rule) -> str:
    return f"{rule.direction} {rule_identity_text(rule)}"


def model_changes(old: Network | None, new: Network) -> list[str]:
    """One line per group, rule and membership that differs (sorted, stable)."""
    lines: list[str] = []
    old_groups = old.groups if old is not None else {}
    for gid in sorted(set(old_groups) | set(new.groups)):
        was, now = old_groups.get(gid), new.groups.get(gid)
        if was is None and now is not None:
            lines.append(f"+ group {gid} ({now.group_type}, {len(now.rules)} rules)")
        elif now is None and was is not None:
            lines.append(f"- group {gid}")
        if was is None or now is None:
            continue
        if was.inner_access_policy != now.inner_access_policy:
            lines.append(
                f"~ group {gid}: inner policy {was.inner_access_policy} -> "
                f"{now.inner_access_policy}"
            )
        if (was.name, was.description, was.tags) != (now.name, now.description, now.tags):
            lines.append(f"~ group {gid}: name, description or tags")
        before = {_rule_text(r) for r in was.rules}
        after = {_rule_text(r) for r in now.rules}
        lines.extend(f"- rule {gid}: {t}" for t in sorted(before - after))
        lines.extend(f"+ rule {gid}: {t}" for t in sorted(after - before))
    old_enis = old.enis if old is not None else {}
    for eni_id in sorted(set(old_enis) | set(new.enis)):
        was_e, now_e = old_enis.get(eni_id), new.enis.get(eni_id)
        before_g = list(was_e.group_ids) if was_e else []
        after_g = list(now_e.group_ids) if now_e else []
        if before_g != after_g:
            lines.append(f"~ eni {eni_id}: groups {before_g} -> {after_g}")
    return lines


def plan(old: Network | None, new: Network, table: str, prefix: str) -> dict[str, Any]:
    layout = layout_from_env()
    lab = Lab(prefix)
    routers: dict[str, list[dict[str, Any]]] = {}
    for vpc_id in sorted(set(new.vpcs) | set(old.vpcs if old else ())):
        namespace = lab.router_ns(vpc_id)
        before = (
            compile_vpc(old, vpc_id, table, layout=layout)
            if old is not None and vpc_id in old.vpcs
            else None
        )
        if vpc_id not in new.vpcs:
            routers[namespace] = [{"delete": {"table": {"family": "inet", "name": table}}}]
            continue
        after = compile_vpc(new, vpc_id, table, layout=layout)
        routers[namespace] = [] if before == after else diff_programs(before, after)
    return {"changes": model_changes(old, new), "routers": routers}


def _current(settings: Any) -> tuple[int, Network] | None:
    if not settings.db_path.exists():
        return None
    store = Store(settings.db_path)
    try:
        return stored_network(store)
    finally:
        store.close()


def run_plan(args: argparse.Namespace) -> int:
    settings = settings_from_env(args.state_dir, args.prefix, args.table)
    _topology, network = read_topology(args.file)
    current = _current(settings)
    result = plan(current[1] if current else None, network, settings.table, settings.prefix)
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    revision = current[0] if current else 0
    print(f"plan: {args.file} against revision {revision}")
    for line in result["changes"] or ["(no change to groups, rules or memberships)"]:
        print(f"  {line}")
    for namespace, commands in result["routers"].items():
        print(f"router {namespace}: {len(commands)} nft commands")
        for command in commands:
            print(f"  {json.dumps(command, separators=(',', ':'))}")
    return 0


def run_apply(args: argparse.Namespace) -> int:
    settings = settings_from_env(args.state_dir, args.prefix, args.table)
    topology, network = read_topology(args.file)
    require_root()
    current = _current(settings)
    if current is None:
        raise LabCommandError("nothing is running here: build the lab first (nftsg lab up FILE)")
    old = current[1]
    if set(old.vpcs) != set(network.vpcs) or set(old.enis) != set(network.enis):
        raise LabCommandError(
            "FILE adds or removes VPCs or ENIs: hosts are built by `nftsg lab up FILE`"
        )
    pid = agent_pid(settings)
    if pid is None:
        raise LabCommandError("no agent is running: start one (nftsg agent) or nftsg lab up")
    store = Store(settings.db_path)
    try:
        started = time.monotonic()
        revision = store.save_topology(topology.model_dump(mode="json"))
        wait_in_force(settings, store, Lab(settings.prefix), network, revision, args.timeout, pid)
    finally:
        store.close()
    print(f"revision {revision} in force ({time.monotonic() - started:.2f} s)")
    return 0


def run_clone(args: argparse.Namespace) -> int:
    settings = settings_from_env(args.state_dir)
    pairs = [("SecurityGroupId", args.group)]
    if args.name:
        pairs.append(("SecurityGroupName", args.name))
    status, body = call_agent(api_socket_path(settings.state_dir), "CopySecurityGroup", pairs)
    if status != 200:
        raise EcsError(str(body.get("Code", "InternalError")), str(body.get("Message", "")))
    print(json.dumps(body, indent=2))
    return 0


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--state-dir", help="state directory (default /var/lib/nftsg)")
    common.add_argument("--prefix", help="name prefix of the lab's namespaces (default nftsg)")
    common.add_argument("--table", help="nftables table name (default nftsg)")

    p = sub.add_parser(
        "plan",
        parents=[common],
        help="what enforcing FILE would change (groups, rules, members, nft commands)",
        description="Compare FILE with the running agent's model and print what would "
        "change, and the nft commands per VPC router. Changes nothing.",
    )
    p.add_argument("file", metavar="FILE")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    p.set_defaults(handler=run_plan)

    a = sub.add_parser(
        "apply",
        parents=[common],
        help="store FILE as the model and wait until it is in force",
    )
    a.add_argument("file", metavar="FILE")
    a.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for enforcement")
    a.set_defaults(handler=run_apply)

    c = sub.add_parser(
        "clone",
        parents=[common],
        help="copy a security group on the running agent (CopySecurityGroup)",
    )
    c.add_argument("group", metavar="GROUP", help="the security group to copy")
    c.add_argument("--name", help="the copy's name (default: NAME-copy)")
    c.set_defaults(handler=run_clone)
