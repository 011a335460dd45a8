"""The topology file as written by users (docs/design.md §"Topology file"), as pydantic models.

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
from collections.abc import Hashable
from dataclasses import dataclass
from typing import Any

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic.alias_generators import to_pascal
from pydantic_core import PydanticCustomError

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


def spellings(name: str) -> tuple[str, ...]:
    """Every accepted spelling of a field: snake_case, PascalCase, ECS's odd forms."""
    out = [name, to_pascal(name), *_ODD_ALIASES.get(name, ())]
    return tuple(dict.fromkeys(out))


class _Strict(BaseModel):
    """Frozen, no unknown fields, snake_case or PascalCase on input.

    Numbers are accepted where text is expected (YAML reads ``zone_id: 1`` or
    ``port_range: 22`` as numbers); validate.py then judges the text, so a bare
    ``22`` gets ECS's port-range error instead of a type error.
    """

    model_config = ConfigDict(
        frozen=True, extra="forbid", populate_by_name=True, coerce_numbers_to_str=True
    )

    @model_validator(mode="before")
    @classmethod
    def _canonical_names(cls, data: Any) -> Any:
        """Rename every accepted spelling to the field's snake_case name.

        One dict pass per object: pydantic's own alias matching tried every
        spelling of every field and made a 40k-rule file take seconds to load.
        Two spellings of one field are an error (pydantic would silently take one).
        """
        if not isinstance(data, dict):
            return data
        table = _spelling_table(cls)
        out: dict[Any, Any] = {}
        given: dict[str, str] = {}
        for key, value in data.items():
            name = table.get(key, key) if isinstance(key, str) else key
            if name in out:
                raise PydanticCustomError(
                    "field_given_twice",
                    "the field {field} is given twice (as {given})",
                    {"field": name, "given": f"{given[name]} and {key}"},
                )
            out[name] = value
            given[name] = key
        return out


_SPELLINGS: dict[type[BaseModel], dict[str, str]] = {}


def _spelling_table(cls: type[BaseModel]) -> dict[str, str]:
    table = _SPELLINGS.get(cls)
    if table is None:
        table = {alias: name for name in cls.model_fields for alias in spellings(name)}
        _SPELLINGS[cls] = table
    return table


def _f(default: Any = None) -> Any:
    # Spellings are renamed in `_Strict._canonical_names`: no per-field aliases.
    return Field(default=default)


def _tags_from_ecs_list(value: Any) -> Any:
    """ECS writes tags as ``[{Key: k, Value: v}]``; the file format as a mapping."""
    if not isinstance(value, list):
        return value
    tags: dict[str, Any] = {}
    for item in value:
        if not isinstance(item, dict) or set(item) - {"Key", "Value", "key", "value"}:
            raise PydanticCustomError(
                "tag_shape", "a tag in list form is a mapping with Key and Value"
            )
        key = item.get("Key", item.get("key"))
        if key is None:
            raise PydanticCustomError("tag_shape", "a tag in list form needs a Key")
        tags[str(key)] = item.get("Value", item.get("value", ""))
    return tags


def _group_ids_from_one_string(value: Any) -> Any:
    """RunInstances' SecurityGroupId is one id; the file format takes a list."""
    return (value,) if isinstance(value, str) else value


class VSwitch(_Strict):
    vswitch_id: str = _f(...)
    cidr_block: str = _f(...)
    ipv6_cidr_block: str | None = _f(None)
    zone_id: str | None = _f(None)


class Vpc(_Strict):
    vpc_id: str = _f(...)
    cidr_block: str = _f(...)
    ipv6_cidr_block: str | None = _f(None)
    vpc_name: str | None = _f(None)
    vswitches: tuple[VSwitch, ...] = _f(())


class PrefixList(_Strict):
    prefix_list_id: str = _f(...)
    address_family: str = _f("IPv4")
    max_entries: int = _f(...)
    entries: tuple[str, ...] = _f(())
    prefix_list_name: str | None = _f(None)
    description: str | None = _f(None)


class Permission(_Strict):
    """One rule. `priority` and ports accept numbers or strings, as the API does."""

    direction: str = _f(...)
    ip_protocol: str = _f(...)
    port_range: str | None = _f(None)
    source_port_range: str | None = _f(None)
    source_cidr_ip: str | None = _f(None)
    ipv6_source_cidr_ip: str | None = _f(None)
    dest_cidr_ip: str | None = _f(None)
    ipv6_dest_cidr_ip: str | None = _f(None)
    source_group_id: str | None = _f(None)
    dest_group_id: str | None = _f(None)
    source_prefix_list_id: str | None = _f(None)
    dest_prefix_list_id: str | None = _f(None)
    # None (an empty API parameter) means the default, as in ECS.
    policy: str | None = _f("accept")
    priority: int | str | None = _f(1)
    description: str | None = _f(None)
    security_group_rule_id: str | None = _f(None)
    nic_type: str | None = _f(None)

    @field_validator("priority", mode="before")
    @classmethod
    def _bool_is_not_a_priority(cls, value: Any) -> Any:
        # YAML reads `yes` as True and pydantic would take it for 1.
        return str(value).lower() if isinstance(value, bool) else value


class SecurityGroup(_Strict):
    security_group_id: str = _f(...)
    vpc_id: str = _f(...)
    security_group_type: str = _f("normal")
    inner_access_policy: str | None = _f(None)
    security_group_name: str | None = _f(None)
    description: str | None = _f(None)
    service_managed: bool = _f(False)
    tags: dict[str, str] = _f({})
    permissions: tuple[Permission, ...] = _f(())

    _tags = field_validator("tags", mode="before")(_tags_from_ecs_list)


class NetworkInterface(_Strict):
    """A secondary ENI of an instance."""

    network_interface_id: str = _f(...)
    vswitch_id: str | None = _f(None)
    primary_ip_address: str = _f(...)
    secondary_private_ip_addresses: tuple[str, ...] = _f(())
    ipv6_address: str | None = _f(None)
    ipv6_addresses: tuple[str, ...] = _f(())
    mac_address: str | None = _f(None)
    security_group_ids: tuple[str, ...] | None = _f(None)
    description: str | None = _f(None)

    _one_group = field_validator("security_group_ids", mode="before")(_group_ids_from_one_string)


class Instance(_Strict):
    instance_id: str = _f(...)
    vswitch_id: str = _f(...)
    private_ip_address: str = _f(...)
    secondary_private_ip_addresses: tuple[str, ...] = _f(())
    ipv6_address: str | None = _f(None)
    ipv6_addresses: tuple[str, ...] = _f(())
    # The primary ENI; its id defaults to "eni-" + the instance id without "i-".
    network_interface_id: str | None = _f(None)
    mac_address: str | None = _f(None)
    security_group_ids: tuple[str, ...] | None = _f(None)
    instance_name: str | None = _f(None)
    network_interfaces: tuple[NetworkInterface, ...] = _f(())
    tags: dict[str, str] = _f({})

    _one_group = field_validator("security_group_ids", mode="before")(_group_ids_from_one_string)
    _tags = field_validator("tags", mode="before")(_tags_from_ecs_list)


class ExternalHost(_Strict):
    name: str = _f(...)
    vpc_id: str = _f(...)
    ip_address: str | None = _f(None)
    ipv6_address: str | None = _f(None)
    mac_address: str | None = _f(None)


class Binding(_Strict):
    """Host mode: an ENI enforced on an interface that already exists (a VM's tap, the
    host end of a container's veth) instead of a veth built by the lab.

    The interface is named by `ifname` or by its own `mac_address` (one of the
    two), in the named namespace `netns` (iproute2's, under /run/netns) or, when
    `netns` is omitted, in the agent's own namespace. Checked by
    `bindings.check_bindings`; the agent moves it into the VPC router
    (`agent/host_mode.py`).
    """

    network_interface_id: str = _f(...)
    netns: str | None = _f(None)
    ifname: str | None = _f(None)
    mac_address: str | None = _f(None)


class Topology(_Strict):
    region_id: str | None = _f(None)
    vpcs: tuple[Vpc, ...] = _f(())
    prefix_lists: tuple[PrefixList, ...] = _f(())
    security_groups: tuple[SecurityGroup, ...] = _f(())
    instances: tuple[Instance, ...] = _f(())
    external_hosts: tuple[ExternalHost, ...] = _f(())
    bindings: tuple[Binding, ...] = _f(())


def _loc_to_path(loc: tuple[int | str, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + part
    return out


def _describe(error: Any) -> tuple[str, str]:
    """(ECS code, message) for one pydantic error, in the words of the file format."""
    loc = tuple(error["loc"])
    field = str(loc[-1]) if loc else "topology"
    kind = error["type"]
    if kind == "missing":
        return "MissingParameter", f"the field {field} is required"
    if kind == "extra_forbidden":
        return "InvalidParameter", f"unknown field {field!r}"
    if kind in ("field_given_twice", "tag_shape"):
        return "InvalidParameter", str(error["msg"])
    shown = repr(error.get("input"))
    if len(shown) > 60:
        shown = shown[:57] + "..."
    return "InvalidParameter", f"{field}: {error['msg']} (got {shown})"


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
        code, message = _describe(first)
        raise EcsError(code, message, _loc_to_path(tuple(first["loc"]))) from None


class _DuplicateKey(Exception):
    def __init__(self, key: object, where: str) -> None:
        super().__init__(f"the key {key!r} appears twice in one mapping{where}")


@dataclass(frozen=True, slots=True)
class DocumentLimits:
    """Bounds on one input document (a topology file now, an API body later).

    `max_bytes`: a 500 ENIs x 200 rules topology is 14.6 MB of YAML (the
    scale model of tests/test_compiler.py; it parses in ~14 s here, JSON in
    well under 1 s), so 32 MiB leaves room, refuses an endless or absurd input
    before it is parsed, and bounds the parse time of the largest accepted
    YAML file to about half a minute. `max_depth`: topology
    documents are 6 levels deep; 64 refuses deliberate nesting long before
    Python's recursion limit. `max_nodes`: values visited in the parsed
    document, counting every use of a YAML alias again, so an alias bomb
    (a few hundred bytes expanding to billions of values) is refused after
    visiting at most this many; a 500 x 200 topology has 0.64 million.
    """

    max_bytes: int = 32 << 20
    max_depth: int = 64
    max_nodes: int = 3_000_000


DEFAULT_LIMITS = DocumentLimits()


def check_document_shape(data: Any, limits: DocumentLimits, source: str) -> None:
    """Walk the parsed document once, iteratively (no recursion), within the limits."""
    budget = limits.max_nodes
    stack: list[tuple[Any, int]] = [(data, 1)]
    while stack:
        value, depth = stack.pop()
        budget -= 1
        if budget < 0:
            raise EcsError(
                "InvalidParameter.TooManyValues",
                f"{source} holds more than {limits.max_nodes} values "
                "(YAML aliases count each time they are used)",
            )
        if isinstance(value, dict | list):
            if depth > limits.max_depth:
                raise EcsError(
                    "InvalidParameter.TooDeep",
                    f"{source} is nested deeper than {limits.max_depth} levels",
                )
            items = value.values() if isinstance(value, dict) else value
            stack.extend((v, depth + 1) for v in items)


_SafeLoader: Any = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # libyaml when present


class _UniqueKeyLoader(_SafeLoader):  # type: ignore[misc]
    """SafeLoader that refuses a repeated key instead of keeping the last one silently."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if not isinstance(key, Hashable):
                continue  # SafeLoader's own error names it
            if key in seen:
                line = key_node.start_mark.line + 1
                raise _DuplicateKey(key, f" (line {line})")
            seen.add(key)
        mapping: dict[Any, Any] = super().construct_mapping(node, deep=deep)
        return mapping


def _unique_json_object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise _DuplicateKey(key, "")
        out[key] = value
    return out


def parse_document(
    text: str, *, source: str = "<topology>", limits: DocumentLimits = DEFAULT_LIMITS
) -> Any:
    """YAML or JSON text to plain data, within `limits` (size, depth, values), or an
    EcsError naming the limit (JSON is YAML's subset, but try JSON first for its errors)."""
    if len(text) > limits.max_bytes:  # characters <= bytes: a cheap first check
        raise EcsError(
            "InvalidParameter.TooLarge", f"{source} is larger than {limits.max_bytes} bytes"
        )
    stripped = text.lstrip()
    try:
        if stripped.startswith(("{", "[")):
            data = json.loads(text, object_pairs_hook=_unique_json_object)
        else:
            data = yaml.load(text, Loader=_UniqueKeyLoader)  # a SafeLoader: no objects
    except (json.JSONDecodeError, yaml.YAMLError) as exc:
        raise EcsError("InvalidParameter", f"{source} is not valid YAML or JSON: {exc}") from None
    except _DuplicateKey as exc:
        raise EcsError("InvalidParameter", f"{source}: {exc}") from None
    except RecursionError:
        raise EcsError(
            "InvalidParameter.TooDeep", f"{source} is nested deeper than {limits.max_depth} levels"
        ) from None
    check_document_shape(data, limits, source)
    return data


def parse_topology_text(
    text: str, *, source: str = "<topology>", limits: DocumentLimits = DEFAULT_LIMITS
) -> Topology:
    """A topology from YAML or JSON text, within `limits`."""
    return topology_from_data(parse_document(text, source=source, limits=limits))
