"""RPC parameter gathering and the ECS code -> HTTP status table."""

from __future__ import annotations

import pytest
from nftsg.agent.api_errors import http_status
from nftsg.agent.api_params import unflatten
from nftsg.translators.errors import EcsError


def test_flat_lists_become_python_lists_in_index_order() -> None:
    pairs = [
        ("SecurityGroupId", "sg-web"),
        ("Permissions.2.IpProtocol", "UDP"),
        ("Permissions.1.IpProtocol", "TCP"),
        ("Permissions.1.PortRange", "22/22"),
        ("Tag.1.Key", "env"),
        ("ResourceId.10", "r10"),
        *[(f"ResourceId.{i}", f"r{i}") for i in range(1, 10)],
        ("Action", "AuthorizeSecurityGroup"),
        ("Version", "2014-05-26"),
    ]
    assert unflatten(pairs) == {
        "SecurityGroupId": "sg-web",
        "Permissions": [{"IpProtocol": "TCP", "PortRange": "22/22"}, {"IpProtocol": "UDP"}],
        "Tag": [{"Key": "env"}],
        "ResourceId": [f"r{i}" for i in range(1, 11)],
    }


@pytest.mark.parametrize(
    "pairs",
    [
        [("SecurityGroupId", "a"), ("SecurityGroupId", "b")],  # twice
        [("SecurityGroupId", "a"), ("SecurityGroupId.1", "b")],  # scalar and list
        [("SecurityGroupId.1", "a"), ("SecurityGroupId.3", "b")],  # hole
        [("SecurityGroupId.0", "a")],  # 0
        [("SecurityGroupId.01", "a")],  # leading zero
        [("Tag.1.Key", "a"), ("Tag.Key", "b")],  # numbered and named
        [("Tag..Key", "a")],  # empty segment
    ],
)
def test_ambiguous_parameters_are_invalid_parameter(pairs: list[tuple[str, str]]) -> None:
    with pytest.raises(EcsError) as error:
        unflatten(pairs)
    assert error.value.code == "InvalidParameter"


@pytest.mark.parametrize(
    ("code", "status"),
    [
        ("InvalidSecurityGroupId.NotFound", 404),
        ("InvalidAccessKeyId.NotFound", 404),
        ("InvalidAction.NotFound", 404),
        ("InvalidNetworkInterfaceId.NotFound", 404),
        ("IncompleteSignature", 400),
        ("SignatureDoesNotMatch", 400),
        ("SignatureNonceUsed", 400),
        ("InvalidTimeStamp.Expired", 400),
        ("InvalidTimeStamp.Format", 400),
        ("MissingParameter", 400),
        ("MissingParameter.PortRange", 400),
        ("InvalidParameter", 400),
        ("InvalidParam.SourceIp", 400),
        ("InvalidIpProtocol.Malformed", 400),
        ("InvalidSecurityGroupId.Duplicate", 400),
        ("Forbidden", 403),
        ("Forbidden.RAM", 403),
        ("OperationDenied", 403),
        ("DependencyViolation", 403),
        ("InvalidGroupAuthParameter.OperationDenied", 403),
        ("AuthorizationLimitExceed", 403),
        ("AuthorizedGroupRule.LimitExceed", 403),
        ("InstanceSecurityGroupLimitExceeded", 403),
        ("SecurityGroupInstanceLimitExceeded", 403),
        ("IncorrectInstanceStatus", 403),
        ("InvalidOperation.ResourceManagedByCloudProduct", 403),
        ("InternalError", 500),
        ("ServiceUnavailable", 503),
    ],
)
def test_ecs_codes_map_to_ecs_statuses(code: str, status: int) -> None:
    assert http_status(code) == status
