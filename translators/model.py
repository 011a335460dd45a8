"""The topology file as written by users (design.md §3), as pydantic models.

These models check structure only (which fields exist, their JSON types).
Every value constraint with an ECS error code lives in `validate.py`, which
turns a `Topology` into a checked `network.Network`; so the fields that ECS
validates (protocol, ports, policy, priority...) stay loosely typed here and
carry their ECS meaning there.

Field names are the snake_case forms of the ECS API parameters; the API's
PascalCase names are accepted as aliases (``IpProtocol``, ``SourceCidrIp``...).
"""

from __future__ import annotations

import json
from typing import Any

import yaml
from pydantic import AliasChoices, BaseModel, ConfigDict, Field, ValidationError
from pydantic.alias_generators import to_pascal

from .errors import EcsError

# Fields whose PascalCase alias is not the plain to_pascal() of their name.
_ODD_ALIASES: dict[str, tuple[str, ...]] = {
    "ipv6_source_cidr_ip": ("Ipv6SourceCidrIp",),
    "ipv6_dest_cidr_ip": ("Ipv6DestCidrIp",),
    "ipv6_cidr_block": ("Ipv6CidrBlock",),
    "ipv6_address": ("Ipv6Address",),
    "ipv6_addresses": ("Ipv6Addresses", "Ipv6Sets"),
    "vswitch_id": ("VSwitchId", "VswitchId"),
    "vswitches": ("VSwitches", "Vswitches"),
    "vpc_id": ("VpcId",),
    "vpcs": ("Vpcs",),
    "security_group_ids": ("SecurityGroupIds", "SecurityGroupId"),
}


def _alias(name: str) -> AliasChoices:
    extra = _ODD_ALIASES.get(name, ())
    return AliasChoices(name, to_pascal(name), *extra)


class _Strict(BaseModel):
    """Frozen, no unknown fields, snake_case or PascalCase on input."""

    model_config = ConfigDict(frozen=True, extra="forbid", populate_by_name=True)


def _f(default: Any = None, name: str = "") -> Any:
    return Field(default=default, validation_alias=_alias(name))


class VSwitch(_Strict):
    vswitch_id: str = _f(..., "vswitch_id")
    cidr_block: str = _f(..., "cidr_block")
    ipv6_cidr_block: str | None = _f(None, "ipv6_cidr_block")
    zone_id: str | None = _f(None, "zone_id")


class Vpc(_Strict):
    vpc_id: str = _f(..., "vpc_id")
    cidr_block: str = _f(..., "cidr_block")
    ipv6_cidr_block: str | None = _f(None, "ipv6_cidr_block")
    vpc_name: str | None = _f(None, "vpc_name")
    vswitches: tuple[VSwitch, ...] = _f((), "vswitches")


class PrefixList(_Strict):
    prefix_list_id: str = _f(..., "prefix_list_id")
    address_family: str = _f("IPv4", "address_family")
    max_entries: int = _f(..., "max_entries")
    entries: tuple[str, ...] = _f((), "entries")
    prefix_list_name: str | None = _f(None, "prefix_list_name")
    description: str | None = _f(None, "description")


class Permission(_Strict):
    """One rule. `priority` and ports accept numbers or strings, as the API does."""

    direction: str = _f(..., "direction")
    ip_protocol: str = _f(..., "ip_protocol")
    port_range: str | None = _f(None, "port_range")
    source_port_range: str | None = _f(None, "source_port_range")
    source_cidr_ip: str | None = _f(None, "source_cidr_ip")
    ipv6_source_cidr_ip: str | None = _f(None, "ipv6_source_cidr_ip")
    dest_cidr_ip: str | None = _f(None, "dest_cidr_ip")
    ipv6_dest_cidr_ip: str | None = _f(None, "ipv6_dest_cidr_ip")
    source_group_id: str | None = _f(None, "source_group_id")
    dest_group_id: str | None = _f(None, "dest_group_id")
    source_prefix_list_id: str | None = _f(None, "source_prefix_list_id")
    dest_prefix_list_id: str | None = _f(None, "dest_prefix_list_id")
    policy: str = _f("accept", "policy")
    priority: int | str = _f(1, "priority")
    description: str | None = _f(None, "description")
    security_group_rule_id: str | None = _f(None, "security_group_rule_id")
    nic_type: str | None = _f(None, "nic_type")


class SecurityGroup(_Strict):
    security_group_id: str = _f(..., "security_group_id")
    vpc_id: str = _f(..., "vpc_id")
    security_group_type: str = _f("normal", "security_group_type")
    inner_access_policy: str | None = _f(None, "inner_access_policy")
    security_group_name: str | None = _f(None, "security_group_name")
    description: str | None = _f(None, "description")
    service_managed: bool = _f(False, "service_managed")
    tags: dict[str, str] = _f({}, "tags")
    permissions: tuple[Permission, ...] = _f((), "permissions")


class NetworkInterface(_Strict):
    """A secondary ENI of an instance."""

    network_interface_id: str = _f(..., "network_interface_id")
    vswitch_id: str | None = _f(None, "vswitch_id")
    primary_ip_address: str = _f(..., "primary_ip_address")
    secondary_private_ip_addresses: tuple[str, ...] = _f((), "secondary_private_ip_addresses")
    ipv6_address: str | None = _f(None, "ipv6_address")
    ipv6_addresses: tuple[str, ...] = _f((), "ipv6_addresses")
    mac_address: str | None = _f(None, "mac_address")
    security_group_ids: tuple[str, ...] | None = _f(None, "security_group_ids")
    description: str | None = _f(None, "description")


class Instance(_Strict):
    instance_id: str = _f(..., "instance_id")
    vswitch_id: str = _f(..., "vswitch_id")
    private_ip_address: str = _f(..., "private_ip_address")
    secondary_private_ip_addresses: tuple[str, ...] = _f((), "secondary_private_ip_addresses")
    ipv6_address: str | None = _f(None, "ipv6_address")
    ipv6_addresses: tuple[str, ...] = _f((), "ipv6_addresses")
    # The primary ENI; its id defaults to "eni-" + the instance id without "i-".
    network_interface_id: str | None = _f(None, "network_interface_id")
    mac_address: str | None = _f(None, "mac_address")
    security_group_ids: tuple[str, ...] | None = _f(None, "security_group_ids")
    instance_name: str | None = _f(None, "instance_name")
    network_interfaces: tuple[NetworkInterface, ...] = _f((), "network_interfaces")
    tags: dict[str, str] = _f({}, "tags")


class ExternalHost(_Strict):
    name: str = _f(..., "name")
    vpc_id: str = _f(..., "vpc_id")
    ip_address: str | None = _f(None, "ip_address")
    ipv6_address: str | None = _f(None, "ipv6_address")
    mac_address: str | None = _f(None, "mac_address")


class Topology(_Strict):
    region_id: str | None = _f(None, "region_id")
    vpcs: tuple[Vpc, ...] = _f((), "vpcs")
    prefix_lists: tuple[PrefixList, ...] = _f((), "prefix_lists")
    security_groups: tuple[SecurityGroup, ...] = _f((), "security_groups")
    instances: tuple[Instance, ...] = _f((), "instances")
    external_hosts: tuple[ExternalHost, ...] = _f((), "external_hosts")


def _loc_to_path(loc: tuple[int | str, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + part
    return out


def topology_from_data(data: Any) -> Topology:
    """Build a `Topology` from parsed YAML/JSON; structural errors become `EcsError`."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise EcsError("InvalidParameter", "the topology must be a mapping at the top level")
    try:
        return Topology.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        path = _loc_to_path(tuple(first["loc"]))
        code = "MissingParameter" if first["type"] == "missing" else "InvalidParameter"
        raise EcsError(code, f"{first['msg']}", path) from None


def parse_topology_text(text: str, *, source: str = "<topology>") -> Topology:
    """Parse YAML or JSON text (JSON is YAML's subset, but try JSON first for its errors)."""
    stripped = text.lstrip()
    try:
        data = json.loads(text) if stripped.startswith(("{", "[")) else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as exc:
        raise EcsError("InvalidParameter", f"{source} is not valid YAML or JSON: {exc}") from None
    return topology_from_data(data)
