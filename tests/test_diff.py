"""Incremental transactions: touch only what changed, in an order the kernel accepts.

`FakeTable` applies a batch all-or-nothing with the reference checks the
kernel makes (a rule's sets and a map element's chain must exist; a chain or
set still referenced cannot be deleted; an element must exist to be deleted),
so ordering mistakes fail here without root. netns-tests/test_compiled_loads.py
proves the same equivalences against the real kernel.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from typing import Any

import pytest
import yaml
from nftsg.translators.compiler import DEFAULT_LAYOUT, Layout, compile_vpc, profile_id
from nftsg.translators.diff import diff_programs
from nftsg.translators.network import Network
from nftsg.translators.nft import Program
from nftsg.translators.validate import load_network
from test_compiler import DEMO

Topo = dict[str, Any]


def demo_topology() -> Topo:
    topo: Topo = yaml.safe_load(DEMO.read_text())
    return topo


def _group(topo: Topo, gid: str) -> dict[str, Any]:
    return next(g for g in topo["security_groups"] if g["security_group_id"] == gid)


def _instance(topo: Topo, iid: str) -> dict[str, Any]:
    return next(i for i in topo["instances"] if i["instance_id"] == iid)


def add_rule(t: Topo) -> None:
    _group(t, "sg-web")["permissions"].append(
        {
            "direction": "ingress",
            "ip_protocol": "TCP",
            "port_range": "8443/8443",
            "source_cidr_ip": "0.0.0.0/0",
            "priority": 5,
        }
    )


def add_rule_in_bucket(t: Topo) -> None:
    # Ingress, priority 10, accept, TCP, IPv4: that bucket already exists (sg-web's 80/443).
    _group(t, "sg-web")["permissions"].append(
        {
            "direction": "ingress",
            "ip_protocol": "TCP",
            "port_range": "8443/8443",
            "source_cidr_ip": "0.0.0.0/0",
            "priority": 10,
        }
    )


def remove_rule_in_bucket(t: Topo) -> None:
    del _group(t, "sg-web")["permissions"][2]  # 443; the 80 rule keeps the bucket


def move_rule_between_buckets(t: Topo) -> None:
    _group(t, "sg-web")["permissions"][2]["priority"] = 1  # 10 -> 1: both buckets exist


def remove_rule(t: Topo) -> None:
    del _group(t, "sg-bastion")["permissions"][1]


def change_priority(t: Topo) -> None:
    _group(t, "sg-web")["permissions"][0]["priority"] = 20


def join_group(t: Topo) -> None:
    _instance(t, "i-app1")["security_group_ids"].append("sg-bastion")


def leave_group(t: Topo) -> None:
    _instance(t, "i-web2")["security_group_ids"] = ["sg-app"]


def inner_policy(t: Topo) -> None:
    _group(t, "sg-web")["inner_access_policy"] = "Drop"
    _group(t, "sg-app")["inner_access_policy"] = "Accept"


def prefix_list_entry(t: Topo) -> None:
    t["prefix_lists"][0]["entries"] = ["198.51.100.0/25", "192.0.2.0/24"]


def add_eni(t: Topo) -> None:
    t["instances"].append(
        {
            "instance_id": "i-web3",
            "vswitch_id": "vsw-web",
            "private_ip_address": "10.0.1.12",
            "security_group_ids": ["sg-web"],
        }
    )


def remove_eni(t: Topo) -> None:
    t["instances"] = [i for i in t["instances"] if i["instance_id"] != "i-db1"]


EDITS: dict[str, Callable[[Topo], None]] = {
    f.__name__: f
    for f in (
        add_rule,
        remove_rule,
        change_priority,
        add_rule_in_bucket,
        remove_rule_in_bucket,
        move_rule_between_buckets,
        join_group,
        leave_group,
        inner_policy,
        prefix_list_entry,
        add_eni,
        remove_eni,
    )
}


def edited(edit: Callable[[Topo], None]) -> Network:
    topo = copy.deepcopy(demo_topology())
    edit(topo)
    return load_network(json.dumps(topo))


def demo_programs(
    edit: Callable[[Topo], None], layout: Layout = DEFAULT_LAYOUT
) -> tuple[Program, Program]:
    old = compile_vpc(load_network(DEMO.read_text()), "vpc-demo", layout=layout)
    return old, compile_vpc(edited(edit), "vpc-demo", layout=layout)


# --------------------------------------------------------------------------- fake kernel


class BatchError(Exception):
    pass


def _refs(rule_expr: list[Any]) -> tuple[set[str], set[str]]:
    """(sets/maps looked up, chains jumped to) by a rule."""
    sets: set[str] = set()
    jumps: set[str] = set()
    for d in _walk(rule_expr):
        for v in d.values():
            if isinstance(v, str) and v.startswith("@"):
                sets.add(v[1:])
        if "jump" in d:
            jumps.add(d["jump"]["target"])
    return sets, jumps


def _walk(obj: Any) -> list[dict[str, Any]]:
    out = []
    if isinstance(obj, dict):
        out.append(obj)
        for v in obj.values():
            out.extend(_walk(v))
    elif isinstance(obj, list):
        for v in obj:
            out.extend(_walk(v))
    return out


class FakeTable:
    """One inet table, applied batch by batch, all or nothing."""

    def __init__(self) -> None:
        self.state: dict[str, Any] | None = None

    def apply(self, commands: list[dict[str, Any]]) -> None:
        state = copy.deepcopy(self.state)
        for cmd in commands:
            ((verb, body),) = cmd.items()
            ((kind, obj),) = body.items()
            state = self._one(state, verb, kind, obj)
        self.state = state

    @staticmethod
    def _key(e: Any) -> str:
        return json.dumps(e[0] if isinstance(e, list) else e, sort_keys=True)

    def _one(self, st: dict[str, Any] | None, verb: str, kind: str, o: dict[str, Any]) -> Any:
        if kind == "table":
            if verb == "add":
                return st or {"sets": {}, "maps": {}, "chains": {}}
            if verb == "delete":
                if st is None:
                    raise BatchError("delete of a missing table")
                return None
        if st is None:
            raise BatchError(f"{verb} {kind} without a table")
        chains, sets, maps = st["chains"], st["sets"], st["maps"]
        name = o.get("name")

        def referenced_set(n: str) -> bool:
            return any(n in _refs(r)[0] for c in chains.values() for r in c["rules"])

        def jumped_to(n: str) -> bool:
            by_rules = any(n in _refs(r)[1] for c in chains.values() for r in c["rules"])
            by_maps = any(
                v == {"jump": {"target": n}} for m in maps.values() for v in m["elem"].values()
            )
            return by_rules or by_maps

        if verb == "add" and kind == "chain":
            chains.setdefault(name, {"def": {k: v for k, v in o.items()}, "rules": []})
        elif verb == "add" and kind in ("set", "map"):
            if name in sets or name in maps:
                raise BatchError(f"{kind} {name} exists")
            store = sets if kind == "set" else maps
            store[name] = {
                "def": {k: v for k, v in o.items() if k != "elem"},
                "elem": {} if kind == "map" else set(),
            }
            if o.get("elem"):
                self._one(st, "add", "element", {"name": name, "elem": o["elem"]})
        elif verb == "add" and kind == "rule":
            if o["chain"] not in chains:
                raise BatchError(f"rule in missing chain {o['chain']}")
            used, jumps = _refs(o["expr"])
            for s in used:
                if s not in sets and s not in maps:
                    raise BatchError(f"rule uses missing set {s}")
            for j in jumps:
                if j not in chains:
                    raise BatchError(f"rule jumps to missing chain {j}")
            chains[o["chain"]]["rules"].append(o["expr"] + [o.get("comment")])
        elif verb == "flush" and kind == "chain":
            if name not in chains:
                raise BatchError(f"flush of missing chain {name}")
            chains[name]["rules"] = []
        elif verb == "delete" and kind == "chain":
            if name not in chains or chains[name]["rules"] or jumped_to(name):
                raise BatchError(f"cannot delete chain {name}")
            del chains[name]
        elif verb == "delete" and kind in ("set", "map"):
            store = sets if kind == "set" else maps
            if name not in store or referenced_set(name):
                raise BatchError(f"cannot delete {kind} {name}")
            del store[name]
        elif kind == "element":
            if name in maps:
                elems = maps[name]["elem"]
                for e in o["elem"]:
                    k = self._key(e)
                    if verb == "add":
                        if k in elems:
                            raise BatchError(f"map element {k} exists in {name}")
                        jump = e[1].get("jump") if isinstance(e[1], dict) else None
                        if jump is not None and jump["target"] not in chains:
                            raise BatchError("map element jumps to a missing chain")
                        elems[k] = e[1]
                    elif elems.pop(k, None) is None:
                        raise BatchError(f"delete of missing element {k} from {name}")
            elif name in sets:
                elems = sets[name]["elem"]
                for e in o["elem"]:
                    k = self._key(e)
                    if verb == "add":
                        elems.add(k)
                    elif k not in elems:
                        raise BatchError(f"delete of missing element {k} from {name}")
                    else:
                        elems.discard(k)
            else:
                raise BatchError(f"elements of missing set {name}")
        else:
            raise BatchError(f"unknown command {verb} {kind}")
        return st


def _touched(commands: list[dict[str, Any]]) -> list[tuple[str, str, str]]:
    out = []
    for c in commands:
        ((verb, body),) = c.items()
        ((kind, obj),) = body.items()
        out.append((verb, kind, obj.get("name") or obj.get("chain", "")))
    return out


# --------------------------------------------------------------------------- tests


def test_no_old_program_means_full_sync() -> None:
    old, _ = demo_programs(add_rule)
    assert diff_programs(None, old) == old.full_sync_commands()


def test_same_program_means_no_command() -> None:
    old, _ = demo_programs(add_rule)
    again = compile_vpc(load_network(DEMO.read_text()), "vpc-demo")
    assert diff_programs(old, again) == []


@pytest.mark.parametrize("layout", ["flat", "v4"])
@pytest.mark.parametrize("name", sorted(EDITS))
def test_diff_applied_equals_full_sync(name: str, layout: Layout) -> None:
    old, new = demo_programs(EDITS[name], layout)
    diff = diff_programs(old, new)
    if old == new:  # flat layout: an edit that changes no verdict (a shadowed rule)
        assert diff == []
        return
    assert diff and diff != new.full_sync_commands()
    assert "table" not in {k for _, k, _ in _touched(diff)}
    patched, fresh = FakeTable(), FakeTable()
    patched.apply(old.full_sync_commands())
    patched.apply(diff)
    fresh.apply(new.full_sync_commands())
    assert patched.state == fresh.state
    # And back again.
    patched.apply(diff_programs(new, old))
    fresh.apply(old.full_sync_commands())
    assert patched.state == fresh.state


def test_fake_table_catches_a_misordered_batch() -> None:
    old, new = demo_programs(leave_group)
    diff = diff_programs(old, new)
    deletes = [c for c in diff if "delete" in c and "chain" in c["delete"]]
    assert deletes
    t = FakeTable()
    t.apply(old.full_sync_commands())
    with pytest.raises(BatchError):
        t.apply(deletes + [c for c in diff if c not in deletes])


def _elements_touched(commands: list[dict[str, Any]]) -> set[str]:
    return {name for _, kind, name in _touched(commands) if kind == "element"}


def _group_of(set_name: str) -> str:
    """`g_<group>_<in|out>_p<prio>_<a|d>_<v4|v6>_<part>` -> `<group>`."""
    assert set_name.startswith("g_"), set_name
    return set_name[2:].rsplit("_", 5)[0]


# Groups whose rules reference each group of the demo.
REFERENCED_BY = {
    "sg-bastion": {"sg-web", "sg-app", "sg-db"},
    "sg-web": {"sg-app"},
    "sg-app": {"sg-db"},
}


def test_v4_membership_change_is_element_only_but_for_the_joining_enis_own_objects() -> None:
    # i-app1 (IPv4 and IPv6) joins sg-bastion (basic, Accept), which sg-web, sg-app and
    # sg-db reference.
    old, new = demo_programs(join_group, layout="v4")
    diff = diff_programs(old, new)
    touched = _touched(diff)
    own = ("intra_eni-app1", "in_eni-app1", "out_eni-app1")
    # Other ENIs: nothing; groups referencing sg-bastion: elements of their sets, in
    # both families; no set appears or disappears.
    others = {(v, k, n) for v, k, n in touched if not n.startswith(own)}
    assert {k for _, k, _ in others} == {"element"}, others
    elements = _elements_touched(diff)
    assert elements - {"intra_sg-bastion", "intra_dispatch"} == {
        f"g_{g}_in_p1_a_{fam}_0" for g in REFERENCED_BY["sg-bastion"] for fam in ("v4", "v6")
    }
    assert all(verb == "add" for verb, kind, _ in touched if kind == "element")
    # app1 itself gained sg-bastion's ingress rules (its chain rewritten, no set of its
    # own) and an intra chain; sg-bastion has no egress rule: out_eni-app1 is untouched.
    assert ("add", "chain", "intra_eni-app1") in touched
    assert ("flush", "chain", "in_eni-app1") in touched
    assert not any(n == "out_eni-app1" for _, _, n in touched)
    assert not any(k == "set" for _, k, _ in touched)


def test_v4_leaving_a_referenced_group_deletes_only_elements_of_the_referencing_groups() -> None:
    # i-web2 moves from sg-web (referenced by sg-app) to sg-app.
    old, new = demo_programs(leave_group, layout="v4")
    diff = diff_programs(old, new)
    touched = _touched(diff)
    own = ("intra_eni-web2", "in_eni-web2", "out_eni-web2")
    assert all(kind == "element" for _, kind, name in touched if not name.startswith(own))
    assert ("delete", "element", "g_sg-app_in_p1_a_v4_0") in touched
    assert ("delete", "element", "g_sg-app_in_p1_a_v6_0") in touched
    assert ("delete", "element", "intra_sg-web") in touched
    # ... and, as a new member of sg-app, adds to those of sg-db (which references sg-app).
    assert ("add", "element", "g_sg-db_in_p1_a_v4_0") in touched
    assert {_group_of(n) for n in _elements_touched(diff) if n.startswith("g_")} == {
        *REFERENCED_BY["sg-web"],
        *REFERENCED_BY["sg-app"],
    }
    assert not any(
        n.startswith(("in_eni-app1", "in_eni-db1", "in_eni-web1")) for _, _, n in touched
    )


def test_v4_membership_change_of_an_unreferenced_group_is_element_only() -> None:
    # A new member of sg-db (Drop, referenced by nobody): its own chains appear (sg-db's
    # sets exist already); nothing of another ENI or group changes.
    old, new = demo_programs(_add_db_eni, layout="v4")
    touched = _touched(diff_programs(old, new))
    structural = {(v, k, n) for v, k, n in touched if k != "element"}
    assert {(v, k) for v, k, n in structural} == {("add", "chain"), ("add", "rule")}
    assert all(n in ("in_eni-db2", "out_eni-db2") for _, _, n in structural)
    assert {n for _, k, n in touched if k == "element"} == {
        "ports",
        "port_addrs_v4",
        "egress_dispatch",
        "ingress_dispatch",
    }
    # An ENI of sg-db leaving the VPC: its chains go, and the port elements.
    old, new = demo_programs(remove_eni, layout="v4")
    touched = _touched(diff_programs(old, new))
    assert {n for _, k, n in touched if k != "element"} == {"in_eni-db1", "out_eni-db1"}
    assert not any(n.startswith("g_") for _, _, n in touched)


def _add_db_eni(t: Topo) -> None:
    # sg-db is a Drop group: no intra chain for the new ENI.
    db1 = _instance(t, "i-db1")
    head, last = db1["private_ip_address"].rsplit(".", 1)
    t["instances"].append(
        {
            "instance_id": "i-db2",
            "vswitch_id": db1["vswitch_id"],
            "private_ip_address": f"{head}.{int(last) + 1}",
            "security_group_ids": ["sg-db"],
        }
    )


def test_v4_joining_a_referenced_group_adds_elements_to_the_referencing_groups_sets() -> None:
    # A new web ENI (IPv4 only): sg-app's references to sg-web gain its address.
    old, new = demo_programs(add_eni, layout="v4")
    touched = _touched(diff_programs(old, new))
    others = {(v, k, n) for v, k, n in touched if not n.startswith(("in_eni-web3", "out_eni-web3"))}
    others.discard(("add", "chain", "intra_eni-web3"))
    others.discard(("add", "rule", "intra_eni-web3"))
    assert {k for _, k, _ in others} == {"element"}, others
    assert {n for _, _, n in others} == {
        "g_sg-app_in_p1_a_v4_0",
        "intra_sg-web",
        "intra_dispatch",
        "egress_dispatch",
        "ingress_dispatch",
        "ports",
        "port_addrs_v4",
    }
    # Two elements: 8080/tcp and 5353/udp from the new address.
    assert sum(1 for v, _, n in others if n == "g_sg-app_in_p1_a_v4_0") == 1
    (cmd,) = [
        c
        for c in diff_programs(old, new)
        if c.get("add", {}).get("element", {}).get("name") == "g_sg-app_in_p1_a_v4_0"
    ]
    assert len(cmd["add"]["element"]["elem"]) == 2


def test_v4_prefix_list_change_is_element_only_in_the_sets_of_groups_using_it() -> None:
    old, new = demo_programs(prefix_list_entry, layout="v4")
    touched = _touched(diff_programs(old, new))
    assert {(kind, name) for _, kind, name in touched} == {
        ("element", "g_sg-web_in_p50_a_v4_0"),
        ("element", "g_sg-bastion_in_p1_a_v4_0"),
    }


@pytest.mark.parametrize(
    "edit", [add_rule_in_bucket, remove_rule_in_bucket, move_rule_between_buckets]
)
def test_v4_rule_change_within_existing_buckets_is_element_only(
    edit: Callable[[Topo], None],
) -> None:
    old, new = demo_programs(edit, layout="v4")
    diff = diff_programs(old, new)
    touched = _touched(diff)
    assert touched and {kind for _, kind, _ in touched} == {"element"}, touched
    # Only the group's own sets change, never per member.
    assert {_group_of(n) for n in _elements_touched(diff)} == {"sg-web"}


def _many_web_members(t: Topo) -> None:
    for n in range(100):
        t["instances"].append(
            {
                "instance_id": f"i-w{n}",
                "vswitch_id": "vsw-web",
                "private_ip_address": f"10.0.1.{100 + n}",
                "security_group_ids": ["sg-web"],
            }
        )


def test_v4_rule_change_costs_the_same_however_many_members_the_group_has() -> None:
    small = diff_programs(*demo_programs(add_rule_in_bucket, layout="v4"))

    def big_then(edit: Callable[[Topo], None]) -> Callable[[Topo], None]:
        def both(t: Topo) -> None:
            _many_web_members(t)
            edit(t)

        return both

    base = compile_vpc(edited(_many_web_members), "vpc-demo", layout="v4")
    bigger = compile_vpc(edited(big_then(add_rule_in_bucket)), "vpc-demo", layout="v4")
    big = diff_programs(base, bigger)
    assert big == small
    assert len(big) == 1


def test_v4_rule_change_making_a_new_bucket_adds_a_set_and_rewrites_the_members_chains() -> None:
    for edit in (add_rule, change_priority):
        old, new = demo_programs(edit, layout="v4")
        touched = _touched(diff_programs(old, new))
        structural = {(v, k, n) for v, k, n in touched if k not in ("element", "rule")}
        assert {n for v, k, n in structural if k == "chain"} == {"in_eni-web1", "in_eni-web2"}
        assert {("add", "set")} == {(v, k) for v, k, n in structural if k == "set"}
        assert {_group_of(n) for v, k, n in structural if k == "set"} == {"sg-web"}
        assert {n for _, k, n in touched if k == "rule"} == {"in_eni-web1", "in_eni-web2"}


def test_inner_policy_change_touches_only_intra_objects() -> None:
    old, new = demo_programs(inner_policy)
    touched = _touched(diff_programs(old, new))
    assert all(n.startswith("intra_") for _, _, n in touched), touched
    assert ("delete", "set", "intra_sg-web") in touched
    assert ("add", "set", "intra_sg-app") in touched
    assert ("delete", "chain", "intra_eni-web1") in touched


def test_changed_definition_falls_back_to_full_sync() -> None:
    old, _ = demo_programs(add_rule)
    renamed = compile_vpc(load_network(DEMO.read_text()), "vpc-demo", table="other")
    assert diff_programs(old, renamed) == renamed.full_sync_commands()


# --------------------------------------------------------------------------- flat layout (v5)


def _profiles(net: Network) -> set[str]:
    return {profile_id(e.group_ids) for e in net.enis_in_vpc("vpc-demo")}


def _holders(net: Network, gid: str) -> set[str]:
    return {profile_id(e.group_ids) for e in net.enis_in_vpc("vpc-demo") if gid in e.group_ids}


@pytest.mark.parametrize(
    "edit",
    [add_rule, add_rule_in_bucket, remove_rule_in_bucket, move_rule_between_buckets,
     change_priority],
)
def test_flat_rule_change_is_element_only_in_the_sets_of_group_lists_with_the_group(
    edit: Callable[[Topo], None],
) -> None:
    # Even a rule at a new priority: the flat layout has no per-bucket object.
    old, new = demo_programs(edit)
    touched = _touched(diff_programs(old, new))
    assert touched or old == new  # an edit that changes no verdict changes nothing
    assert {k for _, k, _ in touched} <= {"element"}
    net = load_network(DEMO.read_text())
    assert {n.split("_")[1] for _, _, n in touched} <= _holders(net, "sg-web")


def test_flat_rule_change_costs_the_same_however_many_members_the_group_has() -> None:
    small = diff_programs(*demo_programs(add_rule_in_bucket))
    base = compile_vpc(edited(_many_web_members), "vpc-demo")

    def both(t: Topo) -> None:
        _many_web_members(t)
        add_rule_in_bucket(t)

    big = diff_programs(base, compile_vpc(edited(both), "vpc-demo"))
    assert big == small
    assert 1 <= len(big) <= 2


@pytest.mark.parametrize("edit", [join_group, leave_group, add_eni, remove_eni, _add_db_eni])
def test_flat_membership_change_flushes_no_chain_and_adds_only_new_group_lists(
    edit: Callable[[Topo], None],
) -> None:
    old, new = demo_programs(edit)
    before, after = _profiles(load_network(DEMO.read_text())), _profiles(edited(edit))
    touched = _touched(diff_programs(old, new))
    deleted = {n for v, _, n in touched if v == "delete"}
    flushed = {n for v, _, n in touched if v == "flush"}
    assert all(n in deleted or n.startswith("intra_") for n in flushed), touched
    structural = {(v, k, n) for v, k, n in touched if k in ("chain", "set", "map")}
    born, gone = after - before, before - after
    for verb, _kind, name in structural:
        if name.startswith("intra_") or (verb == "flush" and name in deleted):
            continue  # the ENI's own intra chain (docs/dataplane.md)
        pid = name.split("_")[1]
        assert (verb == "add" and pid in born) or (verb == "delete" and pid in gone), name
    # Rules are written only into chains created by this very transaction.
    added_chains = {n for v, k, n in touched if (v, k) == ("add", "chain")}
    assert {n for _, k, n in touched if k == "rule"} <= added_chains


def test_flat_enis_with_the_same_groups_share_chains_and_sets() -> None:
    net = edited(_many_web_members)
    prog = compile_vpc(net, "vpc-demo")
    eg = dict(prog.map_by_name["egress_dispatch"].elements)
    web = [e for e in net.enis_in_vpc("vpc-demo") if list(e.group_ids) == ["sg-web"]]
    assert len(web) > 100
    assert len({eg[(e.ifname,)].target for e in web}) == 1
    rule_chains = [c for c in prog.chains if c.name.startswith(("in_", "out_"))]
    assert len(rule_chains) == 2 * len(_profiles(net))
