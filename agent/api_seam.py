"""The seam between the HTTP/CLI API layer and the control plane (docs/design.md §"HTTP API").

The API layer (agent/api_server.py) authenticates a request, parses its RPC
parameters and hands one call to a `ControlPlane`; the control plane validates
and applies it (or raises `EcsError`) and returns the ECS response body. This
module is all the two sides share, so either can change behind it.
"""

from __future__ import annotations

from typing import Any, Protocol

API_VERSION = "2014-05-26"

# The actions of docs/api.md: the ECS subset nftsg serves, with the tag actions
# ECS has on these resources.
ACTIONS: frozenset[str] = frozenset(
    {
        "CreateSecurityGroup",
        "CopySecurityGroup",  # nftsg's own: clone a group to try a change on the copy
        "DeleteSecurityGroup",
        "DescribeSecurityGroups",
        "DescribeSecurityGroupAttribute",
        "DescribeSecurityGroupReferences",
        "AuthorizeSecurityGroup",
        "AuthorizeSecurityGroupEgress",
        "RevokeSecurityGroup",
        "RevokeSecurityGroupEgress",
        "ModifySecurityGroupRule",
        "ModifySecurityGroupEgressRule",
        "ModifySecurityGroupPolicy",
        "ModifySecurityGroupAttribute",
        "JoinSecurityGroup",
        "LeaveSecurityGroup",
        "ModifyNetworkInterfaceAttribute",
        "AttachNetworkInterface",  # host mode: add a binding
        "DetachNetworkInterface",  # host mode: remove it
        "DescribeNetworkInterfaces",
        "DescribeInstances",
        "TagResources",
        "UntagResources",
        "ListTagResources",
    }
)


class ControlPlane(Protocol):
    """Applies one ECS action; serialises its own calls (the API layer calls it
    from one worker thread, in arrival order, but makes no other promise).

    `params` has the request's ECS parameter names with repeated parameters
    already gathered: `Permissions.1.IpProtocol` -> `params["Permissions"][0]
    ["IpProtocol"]`, `SecurityGroupId.2` -> `params["SecurityGroupId"][1]`;
    every scalar is the string as received. Common parameters (Action,
    Version, Format) and signature headers are not in it.

    Returns the response body without `RequestId` (the API layer adds it);
    raises `nftsg.translators.errors.EcsError(code, message)` to reject, having
    changed nothing.
    """

    def call(self, action: str, params: dict[str, Any], request_id: str) -> dict[str, Any]: ...
