"""Every action of docs/api.md through Alibaba's unmodified SDK (HTTP + ACS3 signing)
against the real server: the control plane gets the parsed ECS parameters, the
SDK parses the ECS-shaped answer."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from alibabacloud_ecs20140526 import models as m
from alibabacloud_tea_openapi import models as openapi_models
from alibabacloud_tea_openapi.exceptions import ClientException
from api_support import running_server, snake
from darabonba.runtime import RuntimeOptions
from nftsg.agent.api_seam import ACTIONS

R = "cn-hangzhou"
SSH = m.AuthorizeSecurityGroupRequestPermissions(
    ip_protocol="TCP", port_range="22/22", source_cidr_ip="198.51.100.0/24", priority="1"
)
WEB = m.AuthorizeSecurityGroupRequestPermissions(
    ip_protocol="TCP", port_range="443/443", source_group_id="sg-lb", policy="accept"
)

# action -> (request, parameters the control plane must receive)
CASES: dict[str, tuple[Any, dict[str, Any]]] = {
    "CreateSecurityGroup": (
        m.CreateSecurityGroupRequest(
            region_id=R,
            vpc_id="vpc-a",
            security_group_name="db",
            security_group_type="normal",
            tag=[m.CreateSecurityGroupRequestTag(key="env", value="prod")],
        ),
        {
            "RegionId": R,
            "VpcId": "vpc-a",
            "SecurityGroupName": "db",
            "SecurityGroupType": "normal",
            "Tag": [{"Key": "env", "Value": "prod"}],
        },
    ),
    "DeleteSecurityGroup": (
        m.DeleteSecurityGroupRequest(region_id=R, security_group_id="sg-db"),
        {"RegionId": R, "SecurityGroupId": "sg-db"},
    ),
    "DescribeSecurityGroups": (
        m.DescribeSecurityGroupsRequest(
            region_id=R,
            vpc_id="vpc-a",
            security_group_ids='["sg-web"]',
            tag=[m.DescribeSecurityGroupsRequestTag(key="env", value="prod")],
        ),
        {
            "RegionId": R,
            "VpcId": "vpc-a",
            "SecurityGroupIds": '["sg-web"]',
            "Tag": [{"Key": "env", "Value": "prod"}],
        },
    ),
    "DescribeSecurityGroupAttribute": (
        m.DescribeSecurityGroupAttributeRequest(
            region_id=R, security_group_id="sg-web", direction="ingress"
        ),
        {"RegionId": R, "SecurityGroupId": "sg-web", "Direction": "ingress"},
    ),
    "DescribeSecurityGroupReferences": (
        m.DescribeSecurityGroupReferencesRequest(
            region_id=R, security_group_id=["sg-web", "sg-lb"]
        ),
        {"RegionId": R, "SecurityGroupId": ["sg-web", "sg-lb"]},
    ),
    "AuthorizeSecurityGroup": (
        m.AuthorizeSecurityGroupRequest(
            region_id=R, security_group_id="sg-web", permissions=[SSH, WEB]
        ),
        {
            "RegionId": R,
            "SecurityGroupId": "sg-web",
            "Permissions": [
                {
                    "IpProtocol": "TCP",
                    "PortRange": "22/22",
                    "SourceCidrIp": "198.51.100.0/24",
                    "Priority": "1",
                },
                {
                    "IpProtocol": "TCP",
                    "PortRange": "443/443",
                    "SourceGroupId": "sg-lb",
                    "Policy": "accept",
                },
            ],
        },
    ),
    "AuthorizeSecurityGroupEgress": (
        m.AuthorizeSecurityGroupEgressRequest(
            region_id=R,
            security_group_id="sg-web",
            permissions=[
                m.AuthorizeSecurityGroupEgressRequestPermissions(
                    ip_protocol="UDP", port_range="53/53", dest_cidr_ip="10.0.0.2/32"
                )
            ],
        ),
        {
            "RegionId": R,
            "SecurityGroupId": "sg-web",
            "Permissions": [
                {"IpProtocol": "UDP", "PortRange": "53/53", "DestCidrIp": "10.0.0.2/32"}
            ],
        },
    ),
    "RevokeSecurityGroup": (
        m.RevokeSecurityGroupRequest(
            region_id=R, security_group_id="sg-web", security_group_rule_id=["sgr-1", "sgr-2"]
        ),
        {"RegionId": R, "SecurityGroupId": "sg-web", "SecurityGroupRuleId": ["sgr-1", "sgr-2"]},
    ),
    "RevokeSecurityGroupEgress": (
        m.RevokeSecurityGroupEgressRequest(
            region_id=R,
            security_group_id="sg-web",
            permissions=[
                m.RevokeSecurityGroupEgressRequestPermissions(
                    ip_protocol="ALL", port_range="-1/-1", dest_cidr_ip="0.0.0.0/0"
                )
            ],
        ),
        {
            "RegionId": R,
            "SecurityGroupId": "sg-web",
            "Permissions": [{"IpProtocol": "ALL", "PortRange": "-1/-1", "DestCidrIp": "0.0.0.0/0"}],
        },
    ),
    "ModifySecurityGroupRule": (
        m.ModifySecurityGroupRuleRequest(
            region_id=R,
            security_group_id="sg-web",
            security_group_rule_id="sgr-1",
            port_range="2222/2222",
        ),
        {
            "RegionId": R,
            "SecurityGroupId": "sg-web",
            "SecurityGroupRuleId": "sgr-1",
            "PortRange": "2222/2222",
        },
    ),
    "ModifySecurityGroupEgressRule": (
        m.ModifySecurityGroupEgressRuleRequest(
            region_id=R, security_group_id="sg-web", security_group_rule_id="sgr-3", policy="drop"
        ),
        {
            "RegionId": R,
            "SecurityGroupId": "sg-web",
            "SecurityGroupRuleId": "sgr-3",
            "Policy": "drop",
        },
    ),
    "ModifySecurityGroupPolicy": (
        m.ModifySecurityGroupPolicyRequest(
            region_id=R, security_group_id="sg-web", inner_access_policy="Drop"
        ),
        {"RegionId": R, "SecurityGroupId": "sg-web", "InnerAccessPolicy": "Drop"},
    ),
    "ModifySecurityGroupAttribute": (
        m.ModifySecurityGroupAttributeRequest(
            region_id=R,
            security_group_id="sg-web",
            security_group_name="web2",
            description="front ends",
        ),
        {
            "RegionId": R,
            "SecurityGroupId": "sg-web",
            "SecurityGroupName": "web2",
            "Description": "front ends",
        },
    ),
    "JoinSecurityGroup": (
        m.JoinSecurityGroupRequest(
            region_id=R, security_group_id="sg-web", network_interface_id="eni-1"
        ),
        {"RegionId": R, "SecurityGroupId": "sg-web", "NetworkInterfaceId": "eni-1"},
    ),
    "LeaveSecurityGroup": (
        m.LeaveSecurityGroupRequest(region_id=R, security_group_id="sg-web", instance_id="i-1"),
        {"RegionId": R, "SecurityGroupId": "sg-web", "InstanceId": "i-1"},
    ),
    "ModifyNetworkInterfaceAttribute": (
        m.ModifyNetworkInterfaceAttributeRequest(
            region_id=R, network_interface_id="eni-1", security_group_id=["sg-web", "sg-db"]
        ),
        {"RegionId": R, "NetworkInterfaceId": "eni-1", "SecurityGroupId": ["sg-web", "sg-db"]},
    ),
    "DescribeNetworkInterfaces": (
        m.DescribeNetworkInterfacesRequest(
            region_id=R, network_interface_id=["eni-0", "eni-1"], security_group_id="sg-web"
        ),
        {"RegionId": R, "NetworkInterfaceId": ["eni-0", "eni-1"], "SecurityGroupId": "sg-web"},
    ),
    "DescribeInstances": (
        m.DescribeInstancesRequest(
            region_id=R,
            instance_ids='["i-0"]',
            security_group_id="sg-web",
            tag=[m.DescribeInstancesRequestTag(key="env", value="prod")],
        ),
        {
            "RegionId": R,
            "InstanceIds": '["i-0"]',
            "SecurityGroupId": "sg-web",
            "Tag": [{"Key": "env", "Value": "prod"}],
        },
    ),
    "TagResources": (
        m.TagResourcesRequest(
            region_id=R,
            resource_type="securitygroup",
            resource_id=["sg-web"],
            tag=[
                m.TagResourcesRequestTag(key="env", value="prod"),
                m.TagResourcesRequestTag(key="team", value="a"),
            ],
        ),
        {
            "RegionId": R,
            "ResourceType": "securitygroup",
            "ResourceId": ["sg-web"],
            "Tag": [{"Key": "env", "Value": "prod"}, {"Key": "team", "Value": "a"}],
        },
    ),
    "UntagResources": (
        m.UntagResourcesRequest(
            region_id=R, resource_type="eni", resource_id=["eni-1"], tag_key=["env"]
        ),
        {"RegionId": R, "ResourceType": "eni", "ResourceId": ["eni-1"], "TagKey": ["env"]},
    ),
    "ListTagResources": (
        m.ListTagResourcesRequest(
            region_id=R, resource_type="securitygroup", resource_id=["sg-web", "sg-2"]
        ),
        {"RegionId": R, "ResourceType": "securitygroup", "ResourceId": ["sg-web", "sg-2"]},
    ),
    "AttachNetworkInterface": (
        m.AttachNetworkInterfaceRequest(
            region_id=R, instance_id="i-web1", network_interface_id="eni-web1-b"
        ),
        {"RegionId": R, "InstanceId": "i-web1", "NetworkInterfaceId": "eni-web1-b"},
    ),
    "DetachNetworkInterface": (
        m.DetachNetworkInterfaceRequest(
            region_id=R, instance_id="i-web1", network_interface_id="eni-web1-b"
        ),
        {"RegionId": R, "InstanceId": "i-web1", "NetworkInterfaceId": "eni-web1-b"},
    ),
}


def test_every_action_is_covered() -> None:
    # CopySecurityGroup is nftsg's own (ECS has no such action, so the SDK has no
    # request model for it): the netns tests call it through the SDK's call_api.
    assert set(CASES) == ACTIONS - {"CopySecurityGroup"}


@pytest.mark.parametrize("action", sorted(CASES))
def test_sdk_call_reaches_the_control_plane_parsed(tmp_path: Path, action: str) -> None:
    request, expected = CASES[action]
    with running_server(tmp_path) as api:
        response = getattr(api.client(), snake(action))(request)
        assert response.status_code == 200
        assert [(a, p) for a, p, _ in api.control_plane.calls] == [(action, expected)]
        # The RequestId the control plane was given is the one the caller sees.
        assert response.body.request_id == api.control_plane.calls[0][2]


def test_sdk_parses_ecs_shaped_bodies(tmp_path: Path) -> None:
    with running_server(tmp_path) as api:
        client = api.client()
        client.authorize_security_group(
            m.AuthorizeSecurityGroupRequest(
                region_id=R, security_group_id="sg-web", permissions=[SSH]
            )
        )
        attribute = client.describe_security_group_attribute(
            m.DescribeSecurityGroupAttributeRequest(region_id=R, security_group_id="sg-web")
        ).body
        rule = attribute.permissions.permission[0]
        assert (rule.ip_protocol, rule.port_range, rule.source_cidr_ip) == (
            "TCP",
            "22/22",
            "198.51.100.0/24",
        )
        groups = client.describe_security_groups(m.DescribeSecurityGroupsRequest(region_id=R)).body
        assert [g.security_group_id for g in groups.security_groups.security_group] == [
            "sg-db",
            "sg-web",
        ]
        enis = client.describe_network_interfaces(
            m.DescribeNetworkInterfacesRequest(region_id=R)
        ).body
        assert [
            e.security_group_ids.security_group_id
            for e in enis.network_interface_sets.network_interface_set
        ] == [["sg-web"], ["sg-web"]]
        instances = client.describe_instances(m.DescribeInstancesRequest(region_id=R)).body
        assert instances.instances.instance[1].vpc_attributes.private_ip_address.ip_address == [
            "10.0.0.2"
        ]
        created = client.create_security_group(
            m.CreateSecurityGroupRequest(region_id=R, vpc_id="vpc-a")
        ).body
        assert created.security_group_id == "sg-3"


def test_control_plane_rejection_keeps_ecs_code_status_and_request_id(tmp_path: Path) -> None:
    with running_server(tmp_path) as api:
        client = api.client()
        with pytest.raises(ClientException) as missing:
            client.describe_security_group_attribute(
                m.DescribeSecurityGroupAttributeRequest(region_id=R, security_group_id="sg-nope")
            )
        assert (missing.value.status_code, missing.value.code) == (
            404,
            "InvalidSecurityGroupId.NotFound",
        )
        assert missing.value.request_id == api.control_plane.calls[-1][2]
        with pytest.raises(ClientException) as busy:
            client.delete_security_group(
                m.DeleteSecurityGroupRequest(region_id=R, security_group_id="sg-web")
            )
        assert (busy.value.status_code, busy.value.code) == (403, "DependencyViolation")
        assert "sg-web" in api.control_plane.groups


def _generic_call(
    api: Any, action: str, method: str = "POST", query: dict[str, str] | None = None
) -> Any:
    params = openapi_models.Params(
        action=action,
        version="2014-05-26",
        protocol="HTTP",
        pathname="/",
        method=method,
        auth_type="AK",
        style="RPC",
        req_body_type="formData",
        body_type="json",
    )
    return api.client().call_api(
        params, openapi_models.OpenApiRequest(query=query or {}), RuntimeOptions()
    )


def test_unknown_action_is_404_invalid_action_and_reaches_nothing(tmp_path: Path) -> None:
    with running_server(tmp_path) as api:
        with pytest.raises(ClientException) as error:
            _generic_call(api, "RunInstances", query={"RegionId": R})
        assert (error.value.status_code, error.value.code) == (404, "InvalidAction.NotFound")
        assert api.control_plane.calls == []


def test_get_requests_are_signed_and_served_too(tmp_path: Path) -> None:
    with running_server(tmp_path) as api:
        result = _generic_call(
            api, "DescribeSecurityGroups", method="GET", query={"RegionId": R, "Tag.1.Key": "a"}
        )
        assert result["statusCode"] == 200
        assert api.control_plane.calls[0][:2] == (
            "DescribeSecurityGroups",
            {"RegionId": R, "Tag": [{"Key": "a"}]},
        )


def test_a_hundred_rules_in_one_call_fit_the_request_line(tmp_path: Path) -> None:
    rules = [
        m.AuthorizeSecurityGroupRequestPermissions(
            ip_protocol="TCP",
            port_range=f"{1000 + i}/{1000 + i}",
            source_cidr_ip=f"203.0.113.{i}/32",
            description=f"rule number {i} for the load balancers of the front end",
            priority=str(1 + i % 100),
        )
        for i in range(100)
    ]
    with running_server(tmp_path) as api:
        api.client().authorize_security_group(
            m.AuthorizeSecurityGroupRequest(
                region_id=R, security_group_id="sg-web", permissions=rules
            )
        )
        received = api.control_plane.calls[0][1]["Permissions"]
        assert [r["PortRange"] for r in received] == [f"{1000 + i}/{1000 + i}" for i in range(100)]


def test_a_control_plane_crash_is_500_internal_error_and_the_server_goes_on(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from alibabacloud_tea_openapi.exceptions import ServerException

    with running_server(tmp_path) as api:
        original = api.control_plane.call

        def crash(action: str, params: dict[str, Any], request_id: str) -> dict[str, Any]:
            raise RuntimeError("bug in the control plane")

        api.control_plane.call = crash  # type: ignore[method-assign]
        client = api.client()
        with pytest.raises(ServerException) as error:
            client.describe_security_groups(m.DescribeSecurityGroupsRequest(region_id=R))
        assert (error.value.status_code, error.value.code) == (500, "InternalError")
        assert "bug in the control plane" in caplog.text  # logged, with its traceback
        api.control_plane.call = original  # type: ignore[method-assign]
        assert (
            client.describe_security_groups(
                m.DescribeSecurityGroupsRequest(region_id=R)
            ).status_code
            == 200
        )
