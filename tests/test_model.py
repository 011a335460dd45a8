"""The topology file: YAML, JSON and ECS PascalCase names load alike; bad files say why."""

from __future__ import annotations

import json
from typing import Any

import pytest
import yaml
from nftsg.translators.errors import EcsError
from nftsg.translators.model import parse_topology_text
from nftsg.translators.network import CidrPeer, GroupPeer, PortRange, PrefixListPeer
from nftsg.translators.validate import load_network

# The spellings the ECS API uses where capitalising each word is not enough.
_ECS_SPELLING = {"vswitch_id": "VSwitchId", "vswitches": "VSwitches"}


def to_ecs_names(data: Any, *, inside_tags: bool = False) -> Any:
    """Rename every field to its ECS API PascalCase name (tag keys are data, not fields)."""
    if isinstance(data, list):
        return [to_ecs_names(x) for x in data]
    if not isinstance(data, dict) or inside_tags:
        return data
    out = {}
    for key, value in data.items():
        name = _ECS_SPELLING.get(key) or "".join(w.capitalize() for w in key.split("_"))
        out[name] = to_ecs_names(value, inside_tags=key == "tags")
    return out


def test_yaml_json_and_ecs_names_give_the_same_network(three_tier_text: str) -> None:
    from_yaml = load_network(three_tier_text)
    data = yaml.safe_load(three_tier_text)
    from_json = load_network(json.dumps(data, indent=2))
    pascal = to_ecs_names(data)
    assert "IpProtocol" in pascal["SecurityGroups"][0]["Permissions"][0]  # the test converts
    from_pascal_json = load_network(json.dumps(pascal))
    from_pascal_yaml = load_network(yaml.safe_dump(pascal))
    assert from_json == from_yaml
    assert from_pascal_json == from_yaml
    assert from_pascal_yaml == from_yaml


ECS_NAMED = """
RegionId: cn-hangzhou
Vpcs:
  - VpcId: vpc-1
    CidrBlock: 10.0.0.0/16
    Ipv6CidrBlock: 2001:db8:1::/56
    VSwitches:
      - {VSwitchId: vsw-1, CidrBlock: 10.0.1.0/24, Ipv6CidrBlock: "2001:db8:1:1::/64"}
PrefixLists:
  - {PrefixListId: pl-1, AddressFamily: IPv4, MaxEntries: 3, Entries: [198.51.100.0/24]}
SecurityGroups:
  - SecurityGroupId: sg-1
    VpcId: vpc-1
    SecurityGroupType: normal
    InnerAccessPolicy: Drop
    ServiceManaged: true
    Tags: [{Key: env, Value: prod}]
    Permissions:
      - {Direction: ingress, IpProtocol: tcp, PortRange: 22/22, SourceCidrIp: 192.0.2.0/24,
         Policy: Accept, Priority: "5", NicType: intranet, Description: ssh}
      - {Direction: ingress, IpProtocol: TCP, PortRange: 443/443, Ipv6SourceCidrIp: "::/0"}
      - {Direction: ingress, IpProtocol: UDP, PortRange: 53/53, SourceGroupId: sg-2,
         SourcePortRange: 1024/65535}
      - {Direction: egress, IpProtocol: ALL, PortRange: -1/-1, DestPrefixListId: pl-1,
         SecurityGroupRuleId: sgr-given}
  - {SecurityGroupId: sg-2, VpcId: vpc-1}
Instances:
  - InstanceId: i-1
    VSwitchId: vsw-1
    PrivateIpAddress: 10.0.1.10
    Ipv6Address: "2001:db8:1:1::10"
    SecurityGroupId: sg-1
    NetworkInterfaces:
      - {NetworkInterfaceId: eni-1b, PrimaryIpAddress: 10.0.1.11, SecurityGroupIds: [sg-2]}
ExternalHosts:
  - {Name: office, VpcId: vpc-1, IpAddress: 198.51.100.7}
"""


def test_ecs_api_names_are_accepted() -> None:
    net = load_network(ECS_NAMED)
    group = net.groups["sg-1"]
    assert (group.inner_access_policy, group.managed, group.tags) == (
        "Drop",
        True,
        (("env", "prod"),),
    )
    by_port = {r.ports: r for r in group.rules}
    ssh = by_port[PortRange(22, 22)]
    assert (ssh.protocol, ssh.policy, ssh.priority, ssh.description) == ("TCP", "accept", 5, "ssh")
    assert isinstance(by_port[PortRange(443, 443)].peer, CidrPeer)
    assert by_port[PortRange(443, 443)].peer.network.version == 6  # type: ignore[union-attr]
    assert by_port[PortRange(53, 53)].peer == GroupPeer("sg-2")
    assert by_port[PortRange(53, 53)].source_ports == PortRange(1024, 65535)
    everything = by_port[None]
    assert (everything.direction, everything.peer, everything.rule_id) == (
        "egress",
        PrefixListPeer("pl-1"),
        "sgr-given",
    )
    assert net.enis["eni-1"].group_ids == ("sg-1",)  # one SecurityGroupId, as RunInstances
    assert net.enis["eni-1b"].group_ids == ("sg-2",)
    assert net.region_id == "cn-hangzhou"


def test_empty_file_is_an_empty_network() -> None:
    net = load_network("")
    assert (net.vpcs, net.groups, net.enis) == ({}, {}, {})


@pytest.mark.parametrize(
    ("text", "code", "path", "words"),
    [
        pytest.param(
            "vpcs: [{vpc_id: v, cidr_block: 10.0.0.0/8, colour: red}]",
            "InvalidParameter",
            "vpcs[0].colour",
            "unknown field 'colour'",
            id="unknown field",
        ),
        pytest.param(
            "SecurityGroups: [{SecurityGroupId: a, VpcId: v, Permissions: "
            "[{Direction: ingress, IpProtocol: TCP, Port: 22}]}]",
            "InvalidParameter",
            "security_groups[0].permissions[0].Port",
            "unknown field 'Port'",
            id="unknown ECS-style field",
        ),
        pytest.param(
            "instances: [{vswitch_id: s, private_ip_address: 10.0.0.1}]",
            "MissingParameter",
            "instances[0].instance_id",
            "instance_id is required",
            id="missing field",
        ),
        pytest.param(
            "vpcs: {vpc_id: v}",
            "InvalidParameter",
            "vpcs",
            "vpcs",
            id="mapping where a list belongs",
        ),
        pytest.param(
            "prefix_lists: [{prefix_list_id: p, max_entries: many}]",
            "InvalidParameter",
            "prefix_lists[0].max_entries",
            "max_entries",
            id="text where a number belongs",
        ),
        pytest.param(
            "vpcs: [{vpc_id: v, VpcId: w, cidr_block: 10.0.0.0/8}]",
            "InvalidParameter",
            "vpcs[0]",
            "vpc_id is given twice",
            id="two spellings of one field",
        ),
        pytest.param(
            "security_groups: [{security_group_id: a, vpc_id: v, tags: [x]}]",
            "InvalidParameter",
            "security_groups[0].tags",
            "Key and Value",
            id="tag list without Key",
        ),
        pytest.param(
            "vpcs: []\nvpcs: []\n",
            "InvalidParameter",
            "",
            "'vpcs' appears twice",
            id="duplicate YAML key",
        ),
        pytest.param(
            '{"vpcs": [], "vpcs": []}',
            "InvalidParameter",
            "",
            "'vpcs' appears twice",
            id="duplicate JSON key",
        ),
        pytest.param("vpcs: [", "InvalidParameter", "", "not valid YAML or JSON", id="broken YAML"),
        pytest.param(
            '{"vpcs": [}', "InvalidParameter", "", "not valid YAML or JSON", id="broken JSON"
        ),
        pytest.param(
            "- a\n- b\n", "InvalidParameter", "", "mapping at the top level", id="top level list"
        ),
    ],
)
def test_structural_errors_name_the_field(text: str, code: str, path: str, words: str) -> None:
    with pytest.raises(EcsError) as caught:
        parse_topology_text(text)
    assert (caught.value.code, caught.value.path) == (code, path)
    assert words in str(caught.value)


def test_numbers_where_text_is_expected_reach_validation(three_tier_text: str) -> None:
    # YAML reads `port_range: 22` as a number: the user gets ECS's port-range error.
    text = three_tier_text.replace("port_range: 80/80", "port_range: 80", 1)
    with pytest.raises(EcsError) as caught:
        load_network(text)
    assert caught.value.code == "InvalidPortRange.Malformed"
    assert caught.value.path == "security_groups[0].permissions[0].port_range"


def test_loaded_model_is_frozen() -> None:
    topo = parse_topology_text("region_id: r")
    with pytest.raises(ValueError):
        topo.region_id = "other"  # type: ignore[misc]
