"""The control plane without root: the agent on the fake backend, a real SQLite store.

Checks what a caller relies on: an accepted call is in the store and in the
(fake) kernel when it returns; a rejected one touches neither; a restart
replays the journal into the same model; the agent loop does not redo what
the call did; the incremental compile equals the full one.
"""

from __future__ import annotations

import random
import time
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from nftsg.agent.control import ControlPlane, affected_enis
from nftsg.agent.daemon import Agent
from nftsg.agent.datastore import Conflict, SqliteDatastore, replay
from nftsg.agent.fake_backend import FakeBackend
from nftsg.agent.settings import Settings
from nftsg.agent.store import Store
from nftsg.translators import model as m
from nftsg.translators.actions import Model
from nftsg.translators.compiler import compile_vpc
from nftsg.translators.errors import EcsError
from nftsg.translators.incremental import CompileCache, compile_vpc_cached
from nftsg.translators.validate import build_network
from test_compiler import scale_topology
from test_regional import check_program

PREFIX = "cp"
NOW = "2026-12-03T09:00:00Z"


def small_topology() -> dict[str, Any]:
    return scale_topology(6, 8, 8, seed=5)


class Rig:
    def __init__(self, tmp_path: Path, doc: dict[str, Any] | None = None) -> None:
        self.tmp_path = tmp_path
        self.store = Store(tmp_path / "state.db")
        if doc is not None:
            self.store.save_topology(m.topology_from_data(doc).model_dump(mode="json"))
        network = build_network(m.topology_from_data(doc or small_topology()))
        self.namespaces = [f"{PREFIX}-r-{v}" for v in network.vpcs]
        self.backend = FakeBackend(self.namespaces)
        self.judged: list[str] = []
        self.agent = Agent(
            Settings(state_dir=tmp_path, prefix=PREFIX, table="nftsg"),
            backend=self.backend,
            store=self.store,
            namespace_exists=lambda _ns: True,
            judge_flows=self._judge,
            list_flows=None,
            poll_interval=0,
            verify_every=1e9,
            selfcheck_every=1e9,
        )
        self.control = ControlPlane(
            self.agent, SqliteDatastore(self.store), conntracker=None, clock=lambda: NOW
        )

    def _judge(self, namespace: str, allowed: Any, bit: int) -> int:
        self.judged.append(namespace)
        return 0

    def commands(self) -> int:
        return sum(len(batch) for ns in self.namespaces for batch in self.backend.applied(ns))


def group_of(rig: Rig) -> str:
    assert rig.control.model is not None
    return next(g.group_id for g in rig.control.model.network.groups.values() if g.is_basic)


def test_accepted_call_is_stored_and_in_force_before_it_returns(tmp_path: Path) -> None:
    rig = Rig(tmp_path, small_topology())
    assert rig.agent.step()
    gid = group_of(rig)
    before = rig.commands()
    revision = rig.store.revision()
    perm = {"IpProtocol": "TCP", "PortRange": "4242/4242", "SourceCidrIp": "10.9.0.0/16"}
    rig.control.call("AuthorizeSecurityGroup", {"SecurityGroupId": gid, "Permissions": [perm]}, "r")
    assert rig.store.revision() == revision + 1
    assert rig.commands() > before  # sent by the call itself
    vpc = rig.control.model.network.groups[gid].vpc_id  # type: ignore[union-attr]
    namespace = f"{PREFIX}-r-{vpc}"
    assert "4242" in rig.backend.dump(namespace)
    assert rig.control.last.commands[namespace] > 0
    # The loop finds everything in force at the new revision: it sends nothing.
    sent = rig.commands()
    assert rig.agent.step()
    assert rig.commands() == sent
    assert rig.agent.revision == revision + 1


def test_the_answer_waits_for_the_store_fsync(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The journal's fsync overlaps the kernel commit but the call does not answer
    before it is done; a failed fsync answers ServiceUnavailable (the change is in
    force, committed, and not known to be on disk)."""
    rig = Rig(tmp_path, small_topology())
    assert rig.agent.step()
    gid = group_of(rig)
    order: list[str] = []
    real_sync, real_apply = rig.store.sync_journal, rig.backend.apply

    def sync_journal() -> None:
        real_sync()
        time.sleep(0.3)  # a slow disk: an answer that did not wait would come first
        order.append("fsync")

    def apply(namespace: str, commands: list[dict[str, Any]]) -> None:
        order.append("kernel")
        real_apply(namespace, commands)

    monkeypatch.setattr(rig.store, "sync_journal", sync_journal)
    monkeypatch.setattr(rig.backend, "apply", apply)
    perm = {"IpProtocol": "TCP", "PortRange": "4243/4243", "SourceCidrIp": "10.9.0.0/16"}
    call = {"SecurityGroupId": gid, "Permissions": [perm]}
    rig.control.call("AuthorizeSecurityGroup", call, "r")
    assert order == ["kernel", "fsync"]  # overlapped, and both done when it returned

    def failing() -> None:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(rig.store, "sync_journal", failing)
    revision = rig.store.revision()
    perm2 = {**perm, "PortRange": "4244/4244"}
    with pytest.raises(EcsError) as error:
        rig.control.call("AuthorizeSecurityGroup", {**call, "Permissions": [perm2]}, "r")
    assert error.value.code == "ServiceUnavailable" and "disk" in error.value.message
    assert rig.store.revision() == revision + 1  # committed, in force
    assert rig.control.revision == revision + 1


@pytest.mark.parametrize(
    ("action", "params", "code"),
    [
        ("AuthorizeSecurityGroup", {"SecurityGroupId": "sg-nope"}, "InvalidSecurityGroupId"),
        ("JoinSecurityGroup", {"SecurityGroupId": "sg-000"}, "MissingParameter"),
        ("ModifySecurityGroupPolicy", {"SecurityGroupId": "sg-000", "InnerAccessPolicy": "x"}, ""),
    ],
)
def test_rejected_call_changes_neither_store_nor_kernel(
    tmp_path: Path, action: str, params: dict[str, Any], code: str
) -> None:
    rig = Rig(tmp_path, small_topology())
    assert rig.agent.step()
    revision, sent = rig.store.revision(), rig.commands()
    with pytest.raises(EcsError) as error:
        rig.control.call(action, params, "r")
    assert error.value.code.startswith(code)
    assert rig.store.revision() == revision
    assert rig.store.journal() == []
    assert rig.commands() == sent


def test_restart_replays_the_journal_into_the_same_model(tmp_path: Path) -> None:
    rig = Rig(tmp_path, small_topology())
    assert rig.agent.step()
    gid = group_of(rig)
    out = rig.control.call("CopySecurityGroup", {"SecurityGroupId": gid}, "r")
    copy = out["SecurityGroupId"]
    perm = {"IpProtocol": "UDP", "PortRange": "53/53", "SourceCidrIp": "10.9.0.0/16"}
    rig.control.call("AuthorizeSecurityGroup", {"SecurityGroupId": copy, "Permissions": [perm]}, "")
    rig.control.call(
        "ModifySecurityGroupPolicy", {"SecurityGroupId": gid, "InnerAccessPolicy": "Drop"}, ""
    )
    before = rig.control.model
    assert before is not None and len(rig.store.journal()) == 3
    # A new process: document + journal -> the same model, ids and all.
    snapshot = SqliteDatastore(Store(tmp_path / "state.db")).load()
    assert snapshot is not None and snapshot.head == rig.store.revision()
    again = replay(snapshot)
    assert again.network == before.network
    assert again.counter == before.counter
    # A checkpoint folds the journal; loading it gives the same model again.
    rig.control.checkpoint()
    assert rig.store.journal() == []
    folded = SqliteDatastore(Store(tmp_path / "state.db")).load()
    assert folded is not None and folded.journal == ()
    assert replay(folded).network == before.network
    # And the ids the next call makes are the same either way.
    nxt = {"SecurityGroupId": gid}
    assert (
        replay(folded).perform("CopySecurityGroup", nxt, now=NOW)[1].response
        == before.perform("CopySecurityGroup", nxt, now=NOW)[1].response
    )


def test_append_refuses_a_moved_store_and_a_saved_document_supersedes_the_journal(
    tmp_path: Path,
) -> None:
    store = Store(tmp_path / "state.db")
    store.save_topology(m.topology_from_data(small_topology()).model_dump(mode="json"))
    data = SqliteDatastore(store)
    assert data.load() is not None
    data.append(1, "ModifySecurityGroupAttribute", {"SecurityGroupId": "sg-000"}, NOW)
    with pytest.raises(Conflict):
        data.append(1, "ModifySecurityGroupAttribute", {"SecurityGroupId": "sg-000"}, NOW)
    assert store.revision() == 2
    assert store.save_topology(m.topology_from_data(small_topology()).model_dump(mode="json")) == 3
    assert store.journal() == []


def test_a_document_saved_under_the_control_plane_is_loaded_once(tmp_path: Path) -> None:
    rig = Rig(tmp_path, small_topology())
    assert rig.agent.step()
    doc = small_topology()
    doc["security_groups"][0]["security_group_name"] = "renamed"
    Store(tmp_path / "state.db").save_topology(m.topology_from_data(doc).model_dump(mode="json"))
    assert rig.agent.step()
    assert rig.control.model is not None
    assert rig.control.model.network.groups[
        doc["security_groups"][0]["security_group_id"]
    ].name == ("renamed")


def test_copy_and_tags() -> None:
    model = Model.load(m.topology_from_data(small_topology()))
    gid = next(g for g, grp in model.network.groups.items() if grp.is_basic and grp.rules)
    new, out = model.perform("CopySecurityGroup", {"SecurityGroupId": gid}, now=NOW)
    cid = out.response["SecurityGroupId"]
    a, b = new.network.groups[gid], new.network.groups[cid]
    assert [r.identity() for r in a.rules] == [r.identity() for r in b.rules]
    assert not {r.rule_id for r in a.rules} & {r.rule_id for r in b.rules}
    assert new.network.members(cid) == ()
    assert build_network(new.topology, new.quotas) == new.network
    tagged, _ = new.perform(
        "TagResources",
        {"ResourceType": "securitygroup", "ResourceId": [cid], "Tag": [{"Key": "k", "Value": "v"}]},
        now=NOW,
    )
    assert ("k", "v") in tagged.network.groups[cid].tags
    listed = tagged.perform(
        "ListTagResources", {"ResourceType": "securitygroup", "ResourceId": [cid]}, now=NOW
    )[1].response
    assert {"ResourceId": cid, "ResourceType": "securitygroup", "TagKey": "k", "TagValue": "v"} in (
        listed["TagResources"]["TagResource"]
    )
    untagged, _ = tagged.perform(
        "UntagResources",
        {"ResourceType": "securitygroup", "ResourceId": [cid], "TagKey": ["k"]},
        now=NOW,
    )
    assert dict(untagged.network.groups[cid].tags).get("k") is None
    assert build_network(untagged.topology, untagged.quotas) == untagged.network


def _steps(model: Model, i: int) -> list[tuple[str, dict[str, Any]]]:
    net = model.network
    basic = [g for g in net.groups.values() if g.is_basic]
    group = basic[i % len(basic)]
    eni = sorted(net.enis.values(), key=lambda e: e.eni_id)[i % len(net.enis)]
    other = next((g for g in basic if g.group_id not in eni.group_ids), None)
    out: list[tuple[str, dict[str, Any]]] = [
        (
            "AuthorizeSecurityGroup",
            {
                "SecurityGroupId": group.group_id,
                "Permissions": [
                    {
                        "IpProtocol": "TCP",
                        "PortRange": f"{3000 + i}/{3000 + i}",
                        "SourceGroupId": basic[(i + 1) % len(basic)].group_id,
                    }
                ],
            },
        ),
        (
            "ModifySecurityGroupPolicy",
            {
                "SecurityGroupId": group.group_id,
                "InnerAccessPolicy": "Drop" if group.inner_access_policy == "Accept" else "Accept",
            },
        ),
    ]
    if group.rules:
        out.append(
            (
                "RevokeSecurityGroup"
                if group.rules[0].direction == "ingress"
                else "RevokeSecurityGroupEgress",
                {
                    "SecurityGroupId": group.group_id,
                    "SecurityGroupRuleId": [group.rules[0].rule_id],
                },
            )
        )
    if other is not None and net.groups[eni.group_ids[0]].is_basic:
        out.append(
            (
                "JoinSecurityGroup",
                {"SecurityGroupId": other.group_id, "NetworkInterfaceId": eni.eni_id},
            )
        )
    if len(eni.group_ids) > 1:
        out.append(
            (
                "LeaveSecurityGroup",
                {"SecurityGroupId": eni.group_ids[-1], "NetworkInterfaceId": eni.eni_id},
            )
        )
    return out


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.integers(0, 40), min_size=1, max_size=8), st.sampled_from(["v4", "flat"]))
def test_incremental_compile_equals_the_full_compile(picks: list[int], layout: str) -> None:
    model = Model.load(m.topology_from_data(scale_topology(6, 10, 10, seed=9)))
    vpc = next(iter(model.network.vpcs))
    cache = CompileCache()
    compile_vpc_cached(model.network, vpc, cache, layout=layout)  # type: ignore[arg-type]
    for i in picks:
        steps = _steps(model, i)
        action, params = steps[i % len(steps)]
        try:
            new, out = model.perform(action, params, now=NOW)
        except EcsError:
            continue
        got = compile_vpc_cached(new.network, vpc, cache, layout=layout)  # type: ignore[arg-type]
        if layout == "v4":
            assert got == compile_vpc(new.network, vpc, layout=layout)  # type: ignore[arg-type]
        else:
            # Flat sets updated in place hold the cold compile's region, maybe cut
            # differently; everything else is equal (tests/test_regional.py).
            check_program(got, new.network, random.Random(i))
        if out.change is not None:
            # The ENIs whose flows are judged include every ENI whose program changed.
            affected = affected_enis(model.network, new.network, out.change)
            for eni in new.network.enis.values():
                if eni.eni_id not in affected:
                    old = model.network.enis.get(eni.eni_id)
                    assert old is not None and old.group_ids == eni.group_ids
        model = new


def test_a_call_leaves_no_cyclic_garbage_and_freezes_what_it_kept(tmp_path: Path) -> None:
    # The control plane freezes the heap after each call (agent/control.py): that
    # is only safe while a call leaves no garbage cycle behind (a frozen cycle is
    # never collected). Each kind of change, through the whole path, is checked.
    import gc

    rig = Rig(tmp_path, small_topology())
    assert rig.agent.step()
    assert rig.control.model is not None
    net = rig.control.model.network
    gid = group_of(rig)
    eni = next(
        e for e in sorted(net.enis.values(), key=lambda e: e.eni_id) if gid not in e.group_ids
    )
    perm = {"IpProtocol": "TCP", "PortRange": "4242/4242", "SourceCidrIp": "10.9.0.0/16"}
    calls: list[tuple[str, dict[str, Any]]] = [
        ("AuthorizeSecurityGroup", {"SecurityGroupId": gid, "Permissions": [perm]}),
        ("JoinSecurityGroup", {"SecurityGroupId": gid, "NetworkInterfaceId": eni.eni_id}),
        ("LeaveSecurityGroup", {"SecurityGroupId": gid, "NetworkInterfaceId": eni.eni_id}),
        ("ModifySecurityGroupPolicy", {"SecurityGroupId": gid, "InnerAccessPolicy": "Drop"}),
        ("RevokeSecurityGroup", {"SecurityGroupId": gid, "Permissions": [perm]}),
    ]
    rig.control.call(*calls[0], "warm-up")  # first-use caches (renderers, imports)
    was = gc.isenabled()
    try:
        for action, params in calls[1:]:
            gc.unfreeze()  # the test runner's own garbage, frozen by the call before
            gc.collect()
            gc.disable()
            rig.control.call(action, params, "r")
            assert gc.get_freeze_count() > 0
            gc.unfreeze()
            assert gc.collect() == 0, action
    finally:
        gc.unfreeze()
        if was:
            gc.enable()
