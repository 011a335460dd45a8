"""A tiny in-memory ControlPlane for the API layer's tests: records every call,
keeps just enough state to answer with ECS-shaped bodies the SDK parses."""

from __future__ import annotations

import threading
from typing import Any

from nftsg.translators.errors import EcsError


class FakeControlPlane:
    def __init__(self, enis: int = 2) -> None:
        self.calls: list[tuple[str, dict[str, Any], str]] = []
        self.lock = threading.Lock()
        self.groups: dict[str, dict[str, Any]] = {
            "sg-web": {"SecurityGroupName": "web", "VpcId": "vpc-a", "Permissions": [], "Tags": []},
            "sg-db": {"SecurityGroupName": "db", "VpcId": "vpc-a", "Permissions": [], "Tags": []},
        }
        self.enis = [
            {
                "NetworkInterfaceId": f"eni-{i}",
                "InstanceId": f"i-{i}",
                "SecurityGroupIds": ["sg-web"],
                "PrivateIpAddress": f"10.0.{i // 250}.{i % 250 + 1}",
            }
            for i in range(enis)
        ]

    def call(self, action: str, params: dict[str, Any], request_id: str) -> dict[str, Any]:
        with self.lock:
            self.calls.append((action, params, request_id))
            return getattr(self, action)(params)

    def _group(self, group_id: str) -> dict[str, Any]:
        if group_id not in self.groups:
            raise EcsError(
                "InvalidSecurityGroupId.NotFound", "The specified security group does not exist."
            )
        return self.groups[group_id]

    # -- groups -------------------------------------------------------------

    def CreateSecurityGroup(self, p: dict[str, Any]) -> dict[str, Any]:
        group_id = f"sg-{len(self.groups) + 1}"
        self.groups[group_id] = {
            "SecurityGroupName": p.get("SecurityGroupName", ""),
            "VpcId": p.get("VpcId", ""),
            "Permissions": [],
            "Tags": p.get("Tag", []),
        }
        return {"SecurityGroupId": group_id}

    def DeleteSecurityGroup(self, p: dict[str, Any]) -> dict[str, Any]:
        self._group(p["SecurityGroupId"])
        if any(p["SecurityGroupId"] in e["SecurityGroupIds"] for e in self.enis):
            raise EcsError(
                "DependencyViolation", "There is still instance(s) in the specified security group."
            )
        del self.groups[p["SecurityGroupId"]]
        return {}

    def DescribeSecurityGroups(self, p: dict[str, Any]) -> dict[str, Any]:
        items = [
            {
                "SecurityGroupId": gid,
                "SecurityGroupName": g["SecurityGroupName"],
                "VpcId": g["VpcId"],
                "SecurityGroupType": "normal",
                "Tags": {
                    "Tag": [{"TagKey": t["Key"], "TagValue": t.get("Value", "")} for t in g["Tags"]]
                },
            }
            for gid, g in sorted(self.groups.items())
        ]
        return {
            "PageNumber": 1,
            "PageSize": 10,
            "TotalCount": len(items),
            "RegionId": p.get("RegionId", ""),
            "SecurityGroups": {"SecurityGroup": items},
        }

    def DescribeSecurityGroupAttribute(self, p: dict[str, Any]) -> dict[str, Any]:
        g = self._group(p["SecurityGroupId"])
        return {
            "SecurityGroupId": p["SecurityGroupId"],
            "VpcId": g["VpcId"],
            "InnerAccessPolicy": "Accept",
            "SecurityGroupName": g["SecurityGroupName"],
            "Permissions": {"Permission": g["Permissions"]},
        }

    def DescribeSecurityGroupReferences(self, p: dict[str, Any]) -> dict[str, Any]:
        refs = [
            {"SecurityGroupId": gid, "ReferencingSecurityGroups": {"ReferencingSecurityGroup": []}}
            for gid in p["SecurityGroupId"]
        ]
        return {"SecurityGroupReferences": {"SecurityGroupReference": refs}}

    def _authorize(self, p: dict[str, Any], direction: str) -> dict[str, Any]:
        g = self._group(p["SecurityGroupId"])
        for rule in p.get("Permissions", []):
            g["Permissions"].append(
                {
                    "Direction": direction,
                    "Policy": "Accept",
                    "Priority": "1",
                    **rule,
                    "SecurityGroupRuleId": f"sgr-{len(g['Permissions']) + 1}",
                }
            )
        return {}

    def AuthorizeSecurityGroup(self, p: dict[str, Any]) -> dict[str, Any]:
        return self._authorize(p, "ingress")

    def AuthorizeSecurityGroupEgress(self, p: dict[str, Any]) -> dict[str, Any]:
        return self._authorize(p, "egress")

    def _ok(self, p: dict[str, Any]) -> dict[str, Any]:
        if "SecurityGroupId" in p and isinstance(p["SecurityGroupId"], str):
            self._group(p["SecurityGroupId"])
        return {}

    RevokeSecurityGroup = RevokeSecurityGroupEgress = _ok
    ModifySecurityGroupRule = ModifySecurityGroupEgressRule = _ok
    ModifySecurityGroupPolicy = ModifySecurityGroupAttribute = _ok
    JoinSecurityGroup = LeaveSecurityGroup = _ok
    ModifyNetworkInterfaceAttribute = TagResources = UntagResources = _ok
    AttachNetworkInterface = DetachNetworkInterface = _ok

    # -- ENIs, instances, tags ----------------------------------------------

    def DescribeNetworkInterfaces(self, p: dict[str, Any]) -> dict[str, Any]:
        sets = [
            {
                "NetworkInterfaceId": e["NetworkInterfaceId"],
                "InstanceId": e["InstanceId"],
                "VpcId": "vpc-a",
                "VSwitchId": "vsw-a1",
                "Type": "Primary",
                "Status": "InUse",
                "MacAddress": "02:00:00:00:00:01",
                "PrivateIpAddress": e["PrivateIpAddress"],
                "PrivateIpSets": {
                    "PrivateIpSet": [{"PrivateIpAddress": e["PrivateIpAddress"], "Primary": True}]
                },
                "SecurityGroupIds": {"SecurityGroupId": e["SecurityGroupIds"]},
            }
            for e in self.enis
        ]
        return {
            "TotalCount": len(sets),
            "PageNumber": 1,
            "PageSize": len(sets),
            "NextToken": "",
            "NetworkInterfaceSets": {"NetworkInterfaceSet": sets},
        }

    def DescribeInstances(self, p: dict[str, Any]) -> dict[str, Any]:
        instances = [
            {
                "InstanceId": e["InstanceId"],
                "Status": "Running",
                "SecurityGroupIds": {"SecurityGroupId": e["SecurityGroupIds"]},
                "VpcAttributes": {
                    "VpcId": "vpc-a",
                    "VSwitchId": "vsw-a1",
                    "PrivateIpAddress": {"IpAddress": [e["PrivateIpAddress"]]},
                },
                "NetworkInterfaces": {
                    "NetworkInterface": [
                        {
                            "NetworkInterfaceId": e["NetworkInterfaceId"],
                            "Type": "Primary",
                            "PrimaryIpAddress": e["PrivateIpAddress"],
                        }
                    ]
                },
            }
            for e in self.enis
        ]
        return {
            "TotalCount": len(instances),
            "PageNumber": 1,
            "PageSize": 10,
            "NextToken": "",
            "Instances": {"Instance": instances},
        }

    def ListTagResources(self, p: dict[str, Any]) -> dict[str, Any]:
        return {
            "NextToken": "",
            "TagResources": {
                "TagResource": [
                    {
                        "ResourceId": rid,
                        "ResourceType": p.get("ResourceType", ""),
                        "TagKey": "env",
                        "TagValue": "prod",
                    }
                    for rid in p.get("ResourceId", [])
                ]
            },
        }
