"""ECS actions on the in-memory model: success, error codes, and equivalence with
full validation (the incremental network equals `build_network` of the new document)."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from nftsg.translators import model as m
from nftsg.translators.actions import Model
from nftsg.translators.errors import EcsError
from nftsg.translators.validate import build_network
from test_compiler import scale_topology

NOW = "2026-12-03T09:00:00Z"


def small_model(n_groups: int = 4, n_enis: int = 6, rules: int = 6) -> Model:
    return Model.load(m.topology_from_data(scale_topology(n_groups, n_enis, rules, seed=3)))


def perm(port: int, **extra: Any) -> dict[str, Any]:
    return {
        "IpProtocol": "TCP",
        "PortRange": f"{port}/{port}",
        "SourceCidrIp": "10.9.0.0/16",
        **extra,
    }


def check_equivalent(model: Model) -> None:
    assert build_network(model.topology, model.quotas) == model.network


def test_authorize_adds_rule_and_is_idempotent() -> None:
    model = small_model()
    gid = next(iter(model.network.groups))
    before = len(model.network.groups[gid].rules)
    new, out = model.perform(
        "AuthorizeSecurityGroup", {"SecurityGroupId": gid, "Permissions": [perm(4242)]}, now=NOW
    )
    assert len(new.network.groups[gid].rules) == before + 1
    assert out.change is not None and gid in out.change.groups
    check_equivalent(new)
    again, _ = new.perform(
        "AuthorizeSecurityGroup", {"SecurityGroupId": gid, "Permissions": [perm(4242)]}, now=NOW
    )
    assert again.network == new.network
    described = again.perform("DescribeSecurityGroupAttribute", {"SecurityGroupId": gid}, now=NOW)[
        1
    ].response
    ports = [p["PortRange"] for p in described["Permissions"]["Permission"]]
    assert ports.count("4242/4242") == 1


@pytest.mark.parametrize(
    ("action", "params", "code"),
    [
        ("Nope", {}, "InvalidAction.NotFound"),
        ("AuthorizeSecurityGroup", {"Permissions": [perm(1)]}, "MissingParameter.SecurityGroupId"),
        (
            "AuthorizeSecurityGroup",
            {"SecurityGroupId": "sg-none", "Permissions": [perm(1)]},
            "InvalidSecurityGroupId.NotFound",
        ),
        (
            "AuthorizeSecurityGroup",
            {"SecurityGroupId": "G", "Permissions": [perm(1), perm(1)]},
            "InvalidParam.DuplicatePermissions",
        ),
        (
            "AuthorizeSecurityGroup",
            {"SecurityGroupId": "G", "Permissions": [perm(p) for p in range(1, 102)]},
            "InvalidParam.PermissionsCount",
        ),
        ("AuthorizeSecurityGroup", {"SecurityGroupId": "G"}, "MissingParameter.Permissions"),
        (
            "AuthorizeSecurityGroup",
            {"SecurityGroupId": "G", "Permissions": [{"PortRange": "1/1"}]},
            "MissingParameter.IpProtocol",
        ),
        (
            "AuthorizeSecurityGroup",
            {"SecurityGroupId": "G", "Permissions": [perm(1, PortRange="9/1")]},
            "InvalidPortRange.Malformed",
        ),
        (
            "RevokeSecurityGroup",
            {"SecurityGroupId": "G", "SecurityGroupRuleId": ["sgr-x"]},
            "InvalidParam.SecurityGroupRuleId",
        ),
        (
            "RevokeSecurityGroup",
            {"SecurityGroupId": "G", "SecurityGroupRuleId": ["R", "R"]},
            "InvalidParam.SecurityGroupRuleIdRepeated",
        ),
        (
            "RevokeSecurityGroup",
            {"SecurityGroupId": "G", "SecurityGroupRuleId": ["R"], "Permissions": [perm(1)]},
            "InvalidParameter",
        ),
        (
            "ModifySecurityGroupPolicy",
            {"SecurityGroupId": "G", "InnerAccessPolicy": "x"},
            "InvalidInnerAccessPolicy.Malformed",
        ),
        (
            "ModifySecurityGroupPolicy",
            {"SecurityGroupId": "ADV", "InnerAccessPolicy": "Accept"},
            "InvalidInnerAccessPolicy.NotSupported",
        ),
        (
            "JoinSecurityGroup",
            {"SecurityGroupId": "G", "NetworkInterfaceId": "MEMBER"},
            "InvalidInstanceId.AlreadyExists",
        ),
        (
            "JoinSecurityGroup",
            {"SecurityGroupId": "ADV", "NetworkInterfaceId": "MEMBER"},
            "InvalidSecurityGroupType.Mixed",
        ),
        (
            "JoinSecurityGroup",
            {"SecurityGroupId": "G", "InstanceId": "i-none"},
            "InvalidInstanceId.NotFound",
        ),
        (
            "JoinSecurityGroup",
            {"SecurityGroupId": "G", "NetworkInterfaceId": "eni-none"},
            "InvalidEniId.NotFound",
        ),
        (
            "LeaveSecurityGroup",
            {"SecurityGroupId": "G", "NetworkInterfaceId": "OUTSIDER"},
            "InstanceNotInSecurityGroup",
        ),
        (
            "LeaveSecurityGroup",
            {"SecurityGroupId": "G", "NetworkInterfaceId": "LONE"},
            "InstanceLastSecurityGroup",
        ),
        (
            "ModifyNetworkInterfaceAttribute",
            {"NetworkInterfaceId": "MEMBER", "SecurityGroupId": ["G", "G"]},
            "InvalidSecurityGroupId.Duplicate",
        ),
    ],
)
def test_rejections_change_nothing(action: str, params: dict[str, Any], code: str) -> None:
    model = Model.load(m.topology_from_data(scale_topology(6, 12, 6, seed=3)))
    net = model.network
    basic = [g for g in net.groups.values() if g.is_basic]
    adv = next(g for g in net.groups.values() if not g.is_basic)
    g = next(
        g for g in basic if any(len(net.enis[e].group_ids) == 1 for e in net.members(g.group_id))
    )
    lone = next(e for e in net.members(g.group_id) if len(net.enis[e].group_ids) == 1)
    outsider = next(
        e
        for e in net.enis.values()
        if g.group_id not in e.group_ids and adv.group_id not in e.group_ids
    )
    names = {
        "G": g.group_id,
        "ADV": adv.group_id,
        "MEMBER": lone,
        "LONE": lone,
        "OUTSIDER": outsider.eni_id,
        "R": next(r.rule_id for r in g.rules if r.direction == "ingress"),
    }

    def sub(v: Any) -> Any:
        if isinstance(v, str):
            return names.get(v, v)
        if isinstance(v, list):
            return [sub(x) for x in v]
        return v

    with pytest.raises(EcsError) as caught:
        model.perform(action, {k: sub(v) for k, v in params.items()}, now=NOW)
    assert caught.value.code == code, caught.value
    assert model.network == net


def random_step(model: Model, draw: Any) -> tuple[str, dict[str, Any]]:
    net = model.network
    gids = sorted(net.groups)
    enis = sorted(net.enis)
    gid = draw(st.sampled_from(gids))
    kind = draw(
        st.sampled_from(
            [
                "auth",
                "auth_e",
                "revoke_id",
                "revoke_spec",
                "policy",
                "join",
                "leave",
                "modify_eni",
                "create",
                "delete",
                "modify_rule",
            ]
        )
    )
    if kind in ("auth", "auth_e"):
        side = "Source" if kind == "auth" else "Dest"
        peer = draw(st.sampled_from(["cidr", "group"]))
        p: dict[str, Any] = {
            "IpProtocol": draw(st.sampled_from(["TCP", "UDP", "ICMP"])),
            "Priority": str(draw(st.integers(1, 3))),
        }
        p["PortRange"] = f"{draw(st.integers(1, 5))}/{draw(st.integers(5, 9))}"
        if p["IpProtocol"] == "ICMP":
            p["PortRange"] = "-1/-1"
        if peer == "cidr":
            p[f"{side}CidrIp"] = draw(st.sampled_from(["10.0.0.0/8", "0.0.0.0/0"]))
        else:
            p[f"{side}GroupId"] = draw(st.sampled_from(gids))
        action = "AuthorizeSecurityGroup" if kind == "auth" else "AuthorizeSecurityGroupEgress"
        return action, {"SecurityGroupId": gid, "Permissions": [p]}
    if kind == "revoke_id":
        rules = net.groups[gid].rules
        rid = draw(st.sampled_from([r.rule_id for r in rules] or ["sgr-none"]))
        return "RevokeSecurityGroup", {"SecurityGroupId": gid, "SecurityGroupRuleId": [rid]}
    if kind == "revoke_spec":
        return "RevokeSecurityGroupEgress", {
            "SecurityGroupId": gid,
            "Permissions": [{"IpProtocol": "ALL", "PortRange": "-1/-1", "DestCidrIp": "0.0.0.0/0"}],
        }
    if kind == "policy":
        return "ModifySecurityGroupPolicy", {
            "SecurityGroupId": gid,
            "InnerAccessPolicy": draw(st.sampled_from(["Accept", "Drop"])),
        }
    if kind == "create":
        return "CreateSecurityGroup", {
            "VpcId": "vpc-scale",
            "SecurityGroupType": draw(st.sampled_from(["normal", "enterprise"])),
        }
    if kind == "delete":
        return "DeleteSecurityGroup", {"SecurityGroupId": gid}
    if kind == "modify_rule":
        rules = [r for r in net.groups[gid].rules if r.direction == "ingress"]
        rid = draw(st.sampled_from([r.rule_id for r in rules] or ["sgr-none"]))
        return "ModifySecurityGroupRule", {
            "SecurityGroupId": gid,
            "SecurityGroupRuleId": rid,
            "Priority": str(draw(st.integers(1, 3))),
            "Policy": draw(st.sampled_from(["accept", "drop"])),
        }
    eni = draw(st.sampled_from(enis))
    if kind == "modify_eni":
        ids = draw(st.lists(st.sampled_from(gids), min_size=1, max_size=3, unique=True))
        return "ModifyNetworkInterfaceAttribute", {
            "NetworkInterfaceId": eni,
            "SecurityGroupId": ids,
        }
    action = "JoinSecurityGroup" if kind == "join" else "LeaveSecurityGroup"
    return action, {"SecurityGroupId": gid, "NetworkInterfaceId": eni}


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_incremental_equals_full_validation(data: st.DataObject) -> None:
    model = small_model()
    for _ in range(12):
        action, params = random_step(model, data.draw)
        before = model.network
        try:
            model, outcome = model.perform(action, params, now=NOW)
        except EcsError:
            assert model.network == before
            continue
        assert outcome.network is model.network
        assert build_network(outcome.topology, model.quotas) == model.network


def test_create_modify_delete_group_and_sdk_shapes() -> None:
    from alibabacloud_ecs20140526 import models as sdk

    model = small_model()
    model, out = model.perform(
        "CreateSecurityGroup", {"VpcId": "vpc-scale", "SecurityGroupName": "web"}, now=NOW
    )
    gid = out.response["SecurityGroupId"]
    assert sdk.CreateSecurityGroupResponseBody().from_map(out.response).security_group_id == gid
    assert model.network.groups[gid].rules == ()
    assert model.network.groups[gid].inner_access_policy == "Accept"
    other = next(g for g in model.network.groups if g != gid and model.network.groups[g].is_basic)
    model, _ = model.perform(
        "AuthorizeSecurityGroup",
        {"SecurityGroupId": other, "Permissions": [perm(80, SourceCidrIp=None, SourceGroupId=gid)]},
        now=NOW,
    )
    with pytest.raises(EcsError) as caught:
        model.perform("DeleteSecurityGroup", {"SecurityGroupId": gid}, now=NOW)
    assert caught.value.code == "DependencyViolation"
    refs = model.perform("DescribeSecurityGroupReferences", {"SecurityGroupId": [gid]}, now=NOW)
    body = sdk.DescribeSecurityGroupReferencesResponseBody().from_map(refs[1].response)
    ref = body.security_group_references.security_group_reference[0]
    assert [
        r.security_group_id for r in ref.referencing_security_groups.referencing_security_group
    ] == [other]
    model, _ = model.perform(
        "AuthorizeSecurityGroup", {"SecurityGroupId": gid, "Permissions": [perm(22)]}, now=NOW
    )
    rule = model.network.groups[gid].rules[0]
    model, _ = model.perform(
        "ModifySecurityGroupRule",
        {"SecurityGroupId": gid, "SecurityGroupRuleId": rule.rule_id, "PortRange": "23/23"},
        now=NOW,
    )
    check_equivalent(model)
    with pytest.raises(EcsError) as caught:
        model.perform(
            "ModifySecurityGroupRule",
            {
                "SecurityGroupId": gid,
                "SecurityGroupRuleId": rule.rule_id,
                "SourceCidrIp": "",
                "Ipv6SourceCidrIp": "2001:db8::/32",
            },
            now=NOW,
        )
    assert caught.value.code == "InvalidParameter"
    attr = model.perform("DescribeSecurityGroupAttribute", {"SecurityGroupId": gid}, now=NOW)
    body2 = sdk.DescribeSecurityGroupAttributeResponseBody().from_map(attr[1].response)
    (p,) = body2.permissions.permission
    assert (p.security_group_rule_id, p.port_range, p.source_cidr_ip, p.create_time) == (
        rule.rule_id,
        "23/23",
        "10.9.0.0/16",
        NOW,
    )
    model, _ = model.perform(
        "RevokeSecurityGroup",
        {"SecurityGroupId": other, "Permissions": [perm(80, SourceCidrIp=None, SourceGroupId=gid)]},
        now=NOW,
    )
    model, out = model.perform("DeleteSecurityGroup", {"SecurityGroupId": gid}, now=NOW)
    assert gid not in model.network.groups
    check_equivalent(model)


def test_managed_group_refuses_writes_and_quotas_are_enforced() -> None:
    from nftsg.translators.quotas import Quotas

    data = scale_topology(4, 6, 6, seed=3)
    data["security_groups"][0]["service_managed"] = True
    gid = data["security_groups"][0]["security_group_id"]
    model = Model.load(m.topology_from_data(data), Quotas(rules_per_group=8))
    with pytest.raises(EcsError) as caught:
        model.perform(
            "ModifySecurityGroupPolicy",
            {"SecurityGroupId": gid, "InnerAccessPolicy": "Drop"},
            now=NOW,
        )
    assert caught.value.code == "InvalidOperation.ResourceManagedByCloudProduct"
    other = data["security_groups"][1]["security_group_id"]
    room = 8 - len(model.network.groups[other].rules)
    model.perform(
        "AuthorizeSecurityGroup",
        {"SecurityGroupId": other, "Permissions": [perm(p) for p in range(1, room + 1)]},
        now=NOW,
    )
    with pytest.raises(EcsError) as caught:
        model.perform(
            "AuthorizeSecurityGroup",
            {"SecurityGroupId": other, "Permissions": [perm(p) for p in range(1, room + 2)]},
            now=NOW,
        )
    assert caught.value.code == "AuthorizationLimitExceed"


def test_modify_attribute_and_describe_groups() -> None:
    from alibabacloud_ecs20140526 import models as sdk

    model = small_model()
    gid = next(iter(model.network.groups))
    model, _ = model.perform(
        "ModifySecurityGroupAttribute",
        {"SecurityGroupId": gid, "SecurityGroupName": "db", "Description": "x"},
        now=NOW,
    )
    check_equivalent(model)
    out = model.perform("DescribeSecurityGroups", {"SecurityGroupIds": [gid]}, now=NOW)[1]
    body = sdk.DescribeSecurityGroupsResponseBody().from_map(out.response)
    (row,) = body.security_groups.security_group
    assert (row.security_group_id, row.security_group_name, row.description) == (gid, "db", "x")
    assert row.ecs_count == len(model.network.members(gid))
    with pytest.raises(EcsError) as caught:
        model.perform(
            "ModifySecurityGroupAttribute",
            {"SecurityGroupId": gid, "Description": "y" * 513},
            now=NOW,
        )
    assert caught.value.code == "InvalidDescription.Malformed"


def test_create_group_refuses_a_tag_without_a_key() -> None:
    model = small_model()
    vpc_id = next(iter(model.network.vpcs))
    for tags in ([{"Value": "no key"}], [{"Key": "", "Value": "x"}], "not a list"):
        with pytest.raises(EcsError) as caught:
            model.perform("CreateSecurityGroup", {"VpcId": vpc_id, "Tag": tags}, now=NOW)
        assert caught.value.code == "InvalidTagKey.Malformed"
    new, out = model.perform(
        "CreateSecurityGroup", {"VpcId": vpc_id, "Tag": [{"Key": "team", "Value": "web"}]}, now=NOW
    )
    gid = out.response["SecurityGroupId"]
    assert new.network.groups[gid].tags == (("team", "web"),)


# -- AttachNetworkInterface / DetachNetworkInterface (host mode bindings) -------------


def test_attach_and_detach_edit_the_bindings_only() -> None:
    model = small_model()
    eni = next(iter(model.network.enis.values()))
    call = {"NetworkInterfaceId": eni.eni_id, "InstanceId": eni.instance_id}
    attached, out = model.perform("AttachNetworkInterface", call, now=NOW)
    assert out.response == {} and out.change is not None and not out.change.vpcs
    (binding,) = attached.topology.bindings
    # By default: the interface named as the ENI's port, in the agent's namespace.
    assert (binding.network_interface_id, binding.ifname, binding.netns) == (
        eni.eni_id,
        eni.ifname,
        None,
    )
    assert attached.network is model.network
    with pytest.raises(EcsError) as again:
        attached.perform("AttachNetworkInterface", call, now=NOW)
    assert again.value.code == "InvalidOperation.InvalidEniState"
    detached, _ = attached.perform("DetachNetworkInterface", call, now=NOW)
    assert detached.topology.bindings == ()
    with pytest.raises(EcsError) as twice:
        detached.perform("DetachNetworkInterface", call, now=NOW)
    assert twice.value.code == "InvalidOperation.InvalidEniState"
    named, _ = model.perform(
        "AttachNetworkInterface", {**call, "Netns": "cni-1", "Ifname": "veth1"}, now=NOW
    )
    assert named.topology.bindings[0].model_dump(exclude_none=True) == {
        "network_interface_id": eni.eni_id,
        "netns": "cni-1",
        "ifname": "veth1",
    }


@pytest.mark.parametrize(
    ("params", "code"),
    [
        ({}, "MissingParameter.NetworkInterfaceId"),
        ({"NetworkInterfaceId": "eni-nope", "InstanceId": "i-x"}, "InvalidEniId.NotFound"),
        ({"InstanceId": "i-nope"}, "InvalidInstanceId.NotFound"),
        ({"InstanceId": "OTHER"}, "InvalidOperation.InvalidEniState"),
        ({"Ifname": "bad/name"}, "InvalidParameter"),
        ({"Ifname": "veth1", "MacAddress": "02:00:00:00:00:01"}, "InvalidParameter"),
        ({"MacAddress": "ff:ff:ff:ff:ff:ff"}, "InvalidMacAddress.Malformed"),
    ],
)
def test_attach_rejects_bad_input_and_changes_nothing(params: dict[str, Any], code: str) -> None:
    model = small_model()
    enis = list(model.network.enis.values())
    eni, other = enis[0], next(e for e in enis if e.instance_id != enis[0].instance_id)
    call: dict[str, Any] = {"NetworkInterfaceId": eni.eni_id, "InstanceId": eni.instance_id}
    call.update(params)
    if call["InstanceId"] == "OTHER":
        call["InstanceId"] = other.instance_id
    if code.startswith("MissingParameter"):
        del call["NetworkInterfaceId"]
    with pytest.raises(EcsError) as caught:
        model.perform("AttachNetworkInterface", call, now=NOW)
    assert caught.value.code == code
    assert model.topology.bindings == ()
