"""ECS security-group actions as validated mutations of the in-memory model.

`Model.perform(action, params, now=...)` returns a new `Model` and an `Outcome`
(new topology, new checked network, ECS response body, what changed), or raises
`EcsError` and changes nothing (models are immutable).

Only what a change touches is validated: the new or changed rules (with the
same per-rule checks as `validate.build_network`), the touched group's quotas,
the rule totals of its members, and for membership changes the ENI's group
list. The new `Network` shares every untouched object with the old one; only
the membership indexes of touched groups are recomputed.

Decisions where ECS leaves room:
- `Model.load` rewrites each defined group's permissions as its checked rules
  (canonical order, explicit rule ids), so the document and the network stay
  aligned rule for rule; the rebuilt network is identical.
- The VPC default group, created on demand by validation, is written into the
  document the first time an action touches it.
- New rule ids are ``sgr-`` + a hash of the group, the rule's identity and a
  counter kept in the model: deterministic, and unique even after a revoke
  and re-authorize of the same permission.
- New group ids are ``sg-`` + a hash of the VPC, name and the counter.
- Permissions are given as ``Permissions`` (a list of ECS-named mappings) or,
  as the older API form, as top-level parameters; owner-account fields are
  ignored (one account here).
- ModifySecurityGroupRule keeps every field the request does not give; a
  change of peer kind is ``InvalidParameter``, a result equal to another rule
  of the group ``InvalidParam.DuplicatePermissions``; the rule keeps its id.
- More than `permissions_per_request` permissions: ``InvalidParam.PermissionsCount``.
- Join/Leave name the ENI by NetworkInterfaceId, or the instance (its primary
  ENI) by InstanceId; unknown ones are ``InvalidEniId.NotFound`` /
  ``InvalidInstanceId.NotFound``.
- Re-authorizing an existing rule, revoking a spec that matches nothing and
  setting the current inner policy return the unchanged model with an empty
  `Change`.
"""

from __future__ import annotations

import bisect
import hashlib
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from pydantic import ValidationError

from . import model as m
from . import naming
from .bindings import check_bindings
from .errors import EcsError
from .network import (
    CidrPeer,
    Eni,
    GroupPeer,
    GroupType,
    InnerPolicy,
    Network,
    PrefixListPeer,
    Rule,
    SecurityGroup,
)
from .quotas import DEFAULT_QUOTAS, Quotas
from .validate import build_network, rule_checker, rule_identity_text, rule_sort_key

# ECS request field -> Permission field (the direction is set by the action).
_PERMISSION_FIELDS = {
    "IpProtocol": "ip_protocol",
    "PortRange": "port_range",
    "SourcePortRange": "source_port_range",
    "SourceCidrIp": "source_cidr_ip",
    "Ipv6SourceCidrIp": "ipv6_source_cidr_ip",
    "DestCidrIp": "dest_cidr_ip",
    "Ipv6DestCidrIp": "ipv6_dest_cidr_ip",
    "SourceGroupId": "source_group_id",
    "DestGroupId": "dest_group_id",
    "SourcePrefixListId": "source_prefix_list_id",
    "DestPrefixListId": "dest_prefix_list_id",
    "Policy": "policy",
    "Priority": "priority",
    "Description": "description",
    "NicType": "nic_type",
}


@dataclass(frozen=True)
class Change:
    """What an accepted mutation touched."""

    groups: frozenset[str] = frozenset()
    enis: frozenset[str] = frozenset()
    vpcs: frozenset[str] = frozenset()
    members_changed: frozenset[str] = frozenset()


@dataclass(frozen=True)
class Outcome:
    topology: m.Topology
    network: Network
    response: dict[str, Any]
    change: Change | None


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def permission_of(rule: Rule) -> m.Permission:
    """The document form of a checked rule, with its id: it rebuilds to the same rule."""
    ingress = rule.direction == "ingress"
    values: dict[str, Any] = {
        "direction": rule.direction,
        "ip_protocol": rule.protocol,
        "port_range": str(rule.ports) if rule.ports else "-1/-1",
        "source_port_range": str(rule.source_ports) if rule.source_ports else None,
        "policy": rule.policy,
        "priority": rule.priority,
        "description": rule.description or None,
        "security_group_rule_id": rule.rule_id,
    }
    peer = rule.peer
    if isinstance(peer, CidrPeer):
        v4 = peer.network.version == 4
        name = ("source" if ingress else "dest") + "_cidr_ip"
        values[name if v4 else "ipv6_" + name] = str(peer.network)
    elif isinstance(peer, GroupPeer):
        values["source_group_id" if ingress else "dest_group_id"] = peer.group_id
    else:
        values["source_prefix_list_id" if ingress else "dest_prefix_list_id"] = peer.prefix_list_id
    if rule.local is not None:
        name = ("dest" if ingress else "source") + "_cidr_ip"
        values[name if rule.local.version == 4 else "ipv6_" + name] = str(rule.local)
    return m.Permission.model_construct(**values)


def _required(params: Mapping[str, Any], name: str) -> str:
    value = params.get(name)
    if value is None or (isinstance(value, str) and value.strip() == ""):
        raise EcsError(f"MissingParameter.{name}", f"{name} is required", name)
    if not isinstance(value, str):
        raise EcsError("InvalidParameter", f"{name} is one value", name)
    return value


def _id_list(params: Mapping[str, Any], name: str) -> list[str]:
    value = params.get(name)
    if value is None or value == []:
        return []
    items = value if isinstance(value, list) else [value]
    if not all(isinstance(x, str) for x in items):
        raise EcsError("InvalidParameter", f"{name}.N are ids", name)
    return list(items)


def _permission(raw: Mapping[str, Any], direction: str, path: str) -> m.Permission:
    values: dict[str, Any] = {"direction": direction}
    for key, value in raw.items():
        name = _PERMISSION_FIELDS.get(key)
        if name is not None and value is not None:
            values[name] = value
    if "ip_protocol" not in values:
        raise EcsError("MissingParameter.IpProtocol", "IpProtocol is required", path)
    try:
        return m.Permission.model_validate(values)
    except ValidationError as exc:
        raise EcsError("InvalidParameter", str(exc.errors()[0]["msg"]), path) from None


def _permissions(params: Mapping[str, Any], direction: str, limit: int) -> list[m.Permission]:
    raw = params.get("Permissions")
    if raw is None:
        raws: list[Any] = [params] if "IpProtocol" in params else []
    elif isinstance(raw, list):
        raws = raw
    else:
        raise EcsError("InvalidParameter", "Permissions.N is a list", "Permissions")
    if not raws:
        raise EcsError("MissingParameter.Permissions", "Permissions is required", "Permissions")
    if len(raws) > limit:
        raise EcsError(
            "InvalidParam.PermissionsCount",
            f"at most {limit} permissions per request, not {len(raws)}",
            "Permissions",
        )
    out = []
    for i, item in enumerate(raws):
        if not isinstance(item, Mapping):
            raise EcsError("InvalidParameter", "a permission is a mapping", f"Permissions.{i + 1}")
        out.append(_permission(item, direction, f"Permissions.{i + 1}"))
    return out


def _rule_json(rule: Rule, network: Network, create_time: str) -> dict[str, Any]:
    ingress = rule.direction == "ingress"
    out: dict[str, Any] = {
        "SecurityGroupRuleId": rule.rule_id,
        "Direction": rule.direction,
        "IpProtocol": rule.protocol,
        "PortRange": str(rule.ports) if rule.ports else "-1/-1",
        "SourcePortRange": str(rule.source_ports) if rule.source_ports else "",
        "Policy": "Accept" if rule.policy == "accept" else "Drop",
        "Priority": str(rule.priority),
        "Description": rule.description,
        "NicType": "intranet",
        "CreateTime": create_time,
    }
    for k in (
        "SourceCidrIp",
        "Ipv6SourceCidrIp",
        "DestCidrIp",
        "Ipv6DestCidrIp",
        "SourceGroupId",
        "DestGroupId",
        "SourcePrefixListId",
        "DestPrefixListId",
    ):
        out[k] = ""
    side = "Source" if ingress else "Dest"
    local = "Dest" if ingress else "Source"
    peer = rule.peer
    if isinstance(peer, CidrPeer):
        out[f"{side}CidrIp" if peer.network.version == 4 else f"Ipv6{side}CidrIp"] = str(
            peer.network
        )
    elif isinstance(peer, GroupPeer):
        out[f"{side}GroupId"] = peer.group_id
        ref = network.groups.get(peer.group_id)
        out[f"{side}GroupName"] = ref.name if ref else ""
    elif isinstance(peer, PrefixListPeer):
        out[f"{side}PrefixListId"] = peer.prefix_list_id
        pl = network.prefix_lists.get(peer.prefix_list_id)
        out[f"{side}PrefixListName"] = pl.name if pl else ""
    if rule.local is not None:
        out[f"{local}CidrIp" if rule.local.version == 4 else f"Ipv6{local}CidrIp"] = str(rule.local)
    return out


@dataclass(frozen=True)
class Model:
    """The validated model: document + checked network + the indexes actions need.

    Immutable: `perform` returns a new model sharing every untouched object.
    """

    topology: m.Topology
    network: Network
    quotas: Quotas = DEFAULT_QUOTAS
    counter: int = 0
    # group id -> (index in topology.security_groups, the document group)
    raw_groups: dict[str, tuple[int, m.SecurityGroup]] = field(default_factory=dict)
    # ENI id -> (instance index, secondary index or None for the primary ENI)
    eni_places: dict[str, tuple[int, int | None]] = field(default_factory=dict)
    weights: dict[str, int] = field(default_factory=dict)  # group id -> its rule weight
    create_times: dict[str, dict[str, str]] = field(default_factory=dict)

    @classmethod
    def load(cls, topology: m.Topology, quotas: Quotas = DEFAULT_QUOTAS) -> Model:
        network = build_network(topology, quotas)
        groups = tuple(
            sg.model_copy(
                update={
                    "permissions": tuple(
                        permission_of(r) for r in network.groups[sg.security_group_id].rules
                    )
                }
            )
            for sg in topology.security_groups
        )
        topology = topology.model_copy(update={"security_groups": groups})
        places: dict[str, tuple[int, int | None]] = {}
        for i, inst in enumerate(topology.instances):
            primary = inst.network_interface_id or naming.default_primary_eni_id(inst.instance_id)
            places[primary] = (i, None)
            for j, nic in enumerate(inst.network_interfaces):
                places[nic.network_interface_id] = (i, j)
        model = cls(
            topology=topology,
            network=network,
            quotas=quotas,
            raw_groups={sg.security_group_id: (i, sg) for i, sg in enumerate(groups)},
            eni_places=places,
        )
        model.weights.update({gid: model._weight(g.rules) for gid, g in network.groups.items()})
        return model

    # -- helpers ----------------------------------------------------------
    def _weight(self, rules: tuple[Rule, ...]) -> int:
        pls = self.network.prefix_lists
        return sum(
            pls[r.peer.prefix_list_id].max_entries if isinstance(r.peer, PrefixListPeer) else 1
            for r in rules
        )

    def _group(self, params: Mapping[str, Any], *, write: bool) -> SecurityGroup:
        gid = _required(params, "SecurityGroupId")
        group = self.network.groups.get(gid)
        if group is None:
            raise EcsError(
                "InvalidSecurityGroupId.NotFound",
                f"security group {gid} does not exist",
                "SecurityGroupId",
            )
        if write and group.managed:
            raise EcsError(
                "InvalidOperation.ResourceManagedByCloudProduct",
                f"security group {gid} is managed by a cloud product and cannot be changed",
                "SecurityGroupId",
            )
        return group

    def _materialised(self) -> dict[str, tuple[int, m.SecurityGroup]]:
        return self.raw_groups

    def _with_group(
        self, group: SecurityGroup, times: dict[str, str] | None = None
    ) -> tuple[Model, m.Topology, Network]:
        """Replace (or add) one group in the document, the network and the indexes."""
        gid = group.group_id
        doc = m.SecurityGroup.model_construct(
            security_group_id=gid,
            vpc_id=group.vpc_id,
            security_group_type=group.group_type,
            inner_access_policy=group.inner_access_policy,
            security_group_name=group.name or None,
            description=group.description or None,
            service_managed=group.managed,
            tags=dict(group.tags),
            permissions=tuple(permission_of(r) for r in group.rules)
            if gid not in self.raw_groups
            else self.raw_groups[gid][1].permissions,
        )
        return self._with_group_doc(group, doc, times)

    def _with_group_doc(
        self, group: SecurityGroup, doc: m.SecurityGroup, times: dict[str, str] | None = None
    ) -> tuple[Model, m.Topology, Network]:
        gid = group.group_id
        raw = dict(self.raw_groups)
        docs = list(self.topology.security_groups)
        if gid in raw:
            index = raw[gid][0]
            docs[index] = doc
        else:
            index = len(docs)
            docs.append(doc)
        raw[gid] = (index, doc)
        topology = self.topology.model_copy(update={"security_groups": tuple(docs)})
        groups = dict(self.network.groups)
        new_group = gid not in groups
        groups[gid] = group
        if new_group:
            groups = dict(sorted(groups.items()))
        network = _network(self.network, groups=groups)
        if new_group:
            network._members[gid] = ()
            network._member_addresses[gid] = frozenset()
        weights = dict(self.weights)
        weights[gid] = self._weight(group.rules)
        create_times = self.create_times
        if times is not None:
            create_times = {**create_times, gid: times}
        model = replace(
            self,
            topology=topology,
            network=network,
            raw_groups=raw,
            weights=weights,
            create_times=create_times,
            counter=self.counter + 1,
        )
        return model, topology, network

    def _check_group_quotas(self, group: SecurityGroup) -> None:
        refs = sum(1 for r in group.rules if isinstance(r.peer, GroupPeer))
        if refs > self.quotas.group_reference_rules_per_group:
            raise EcsError(
                "AuthorizedGroupRule.LimitExceed",
                f"group {group.group_id} would have more than "
                f"{self.quotas.group_reference_rules_per_group} group-reference rules",
                "Permissions",
            )
        weight = self._weight(group.rules)
        if weight > self.quotas.rules_per_group:
            raise EcsError(
                "AuthorizationLimitExceed",
                f"group {group.group_id} would have more than {self.quotas.rules_per_group} "
                "rules (a prefix list counts as its max_entries)",
                "Permissions",
            )
        grown = weight - self.weights.get(group.group_id, 0)
        if grown <= 0:
            return
        for eni_id in self.network.members(group.group_id):
            total = grown + sum(self.weights[g] for g in self.network.enis[eni_id].group_ids)
            if total > self.quotas.rules_per_eni:
                raise EcsError(
                    "AuthorizationLimitExceed",
                    f"{eni_id} would be subject to {total} rules across its groups; "
                    f"the limit is {self.quotas.rules_per_eni}",
                    "Permissions",
                )

    def _new_rule_id(self, gid: str, rule: Rule, taken: set[str], salt: int) -> str:
        n = 0
        while True:
            rid = "sgr-" + _digest(f"{gid}|{rule_identity_text(rule)}|{self.counter}|{salt}|{n}")
            if rid not in taken:
                return rid
            n += 1

    def _change(self, group: SecurityGroup, *, members: bool = False) -> Change:
        return Change(
            groups=frozenset({group.group_id}),
            vpcs=frozenset({group.vpc_id}),
            members_changed=frozenset({group.group_id}) if members else frozenset(),
        )

    def _outcome(
        self, model: Model, response: dict[str, Any], change: Change
    ) -> tuple[Model, Outcome]:
        return model, Outcome(model.topology, model.network, response, change)

    def _read(self, response: dict[str, Any]) -> tuple[Model, Outcome]:
        return self, Outcome(self.topology, self.network, response, None)

    # -- actions ----------------------------------------------------------
    def perform(self, action: str, params: Mapping[str, Any], *, now: str) -> tuple[Model, Outcome]:
        handler = _ACTIONS.get(action)
        if handler is None:
            raise EcsError(
                "InvalidAction.NotFound", f"the action {action!r} is not supported", "Action"
            )
        outcome: tuple[Model, Outcome] = handler(self, params, now)
        return outcome

    def authorize(
        self, params: Mapping[str, Any], now: str, direction: str
    ) -> tuple[Model, Outcome]:
        group = self._group(params, write=True)
        perms = _permissions(params, direction, self.quotas.permissions_per_request)
        checker = rule_checker(self.network, self.raw_groups, self.quotas)
        existing = {r.identity() for r in group.rules}
        seen: dict[tuple[object, ...], int] = {}
        fresh: list[tuple[Rule, m.Permission]] = []
        for i, perm in enumerate(perms):
            rule = checker.build_rule(
                group.group_id, group.group_type, group.vpc_id, perm, f"Permissions.{i + 1}"
            )
            ident = rule.identity()
            if ident in seen:
                raise EcsError(
                    "InvalidParam.DuplicatePermissions",
                    f"Permissions.{i + 1} repeats Permissions.{seen[ident] + 1}",
                    f"Permissions.{i + 1}",
                )
            seen[ident] = i
            if ident not in existing:  # an identical rule again adds nothing
                fresh.append((rule, perm))
        missing_defaults = {
            gid: vpc
            for gid, vpc in checker.default_groups_needed.items()
            if gid not in self.network.groups
        }
        if not fresh:
            return self._outcome(self, {}, Change())
        rules = list(group.rules)
        docs = (
            list(self.raw_groups[group.group_id][1].permissions)
            if (group.group_id in self.raw_groups)
            else [permission_of(r) for r in rules]
        )
        taken = {r.rule_id for r in rules}
        times = dict(self.create_times.get(group.group_id, {}))
        for salt, (rule, _perm) in enumerate(fresh):
            rid = self._new_rule_id(group.group_id, rule, taken, salt)
            taken.add(rid)
            rule = replace(rule, rule_id=rid)
            at = bisect.bisect(rules, rule_sort_key(rule), key=rule_sort_key)
            rules.insert(at, rule)
            docs.insert(at, permission_of(rule))
            times[rid] = now
        new_group = replace(group, rules=tuple(rules))
        self._check_group_quotas(new_group)
        model = self
        changed = {group.group_id}
        for gid, vpc in missing_defaults.items():
            model = model._add_default_group(gid, vpc)
            changed.add(gid)
        doc = model._doc_of(new_group).model_copy(update={"permissions": tuple(docs)})
        model, _, _ = model._with_group_doc(new_group, doc, times)
        return self._outcome(
            model, {}, Change(groups=frozenset(changed), vpcs=frozenset({group.vpc_id}))
        )

    def _doc_of(self, group: SecurityGroup) -> m.SecurityGroup:
        if group.group_id in self.raw_groups:
            return self.raw_groups[group.group_id][1]
        model, _, _ = self._with_group(group)
        return model.raw_groups[group.group_id][1]

    def _add_default_group(self, gid: str, vpc_id: str) -> Model:
        checker = rule_checker(self.network, self.raw_groups, self.quotas)
        checker.default_groups_needed = {gid: vpc_id}
        checker.add_default_groups()
        model, _, _ = self._with_group(checker.groups[gid])
        return model

    def revoke(self, params: Mapping[str, Any], now: str, direction: str) -> tuple[Model, Outcome]:
        group = self._group(params, write=True)
        ids = _id_list(params, "SecurityGroupRuleId")
        has_spec = "Permissions" in params or "IpProtocol" in params
        if ids and has_spec:
            raise EcsError(
                "InvalidParameter",
                "give SecurityGroupRuleId.N or permissions, not both",
                "SecurityGroupRuleId",
            )
        drop: set[str] = set()
        if ids:
            by_id = {r.rule_id: r for r in group.rules}
            for k, rid in enumerate(ids):
                if rid in drop:
                    raise EcsError(
                        "InvalidParam.SecurityGroupRuleIdRepeated",
                        f"rule id {rid} is given twice",
                        f"SecurityGroupRuleId.{k + 1}",
                    )
                rule = by_id.get(rid)
                if rule is None or rule.direction != direction:
                    raise EcsError(
                        "InvalidParam.SecurityGroupRuleId",
                        f"{group.group_id} has no {direction} rule {rid}",
                        f"SecurityGroupRuleId.{k + 1}",
                    )
                drop.add(rid)
        else:
            perms = _permissions(params, direction, self.quotas.permissions_per_request)
            checker = rule_checker(self.network, self.raw_groups, self.quotas)
            by_ident = {r.identity(): r.rule_id for r in group.rules}
            for i, perm in enumerate(perms):
                rule = checker.build_rule(
                    group.group_id, group.group_type, group.vpc_id, perm, f"Permissions.{i + 1}"
                )
                match = by_ident.get(rule.identity())
                if match is not None:  # a spec matching nothing is a silent success
                    drop.add(match)
        if not drop:
            return self._outcome(self, {}, Change())
        doc = self._doc_of(group)
        keep = [k for k, r in enumerate(group.rules) if r.rule_id not in drop]
        new_group = replace(group, rules=tuple(group.rules[k] for k in keep))
        doc = doc.model_copy(update={"permissions": tuple(doc.permissions[k] for k in keep)})
        times = {
            k: v for k, v in self.create_times.get(group.group_id, {}).items() if k not in drop
        }
        model, _, _ = self._with_group_doc(new_group, doc, times)
        return self._outcome(model, {}, self._change(group))

    def modify_policy(self, params: Mapping[str, Any], now: str) -> tuple[Model, Outcome]:
        group = self._group(params, write=True)
        raw = _required(params, "InnerAccessPolicy").strip().lower()
        if raw not in ("accept", "drop"):
            raise EcsError(
                "InvalidInnerAccessPolicy.Malformed",
                f"InnerAccessPolicy is Accept or Drop, not {params['InnerAccessPolicy']!r}",
                "InnerAccessPolicy",
            )
        if not group.is_basic:
            raise EcsError(
                "InvalidInnerAccessPolicy.NotSupported",
                "an advanced (enterprise) group always isolates its members",
                "InnerAccessPolicy",
            )
        policy: InnerPolicy = "Accept" if raw == "accept" else "Drop"
        if policy == group.inner_access_policy:
            return self._outcome(self, {}, Change())
        new_group = replace(group, inner_access_policy=policy)
        doc = self._doc_of(group).model_copy(update={"inner_access_policy": policy})
        model, _, _ = self._with_group_doc(new_group, doc)
        return self._outcome(model, {}, self._change(group))

    def _eni_of(self, params: Mapping[str, Any]) -> Eni:
        if params.get("NetworkInterfaceId"):
            eni_id = _required(params, "NetworkInterfaceId")
            eni = self.network.enis.get(eni_id)
            if eni is None:
                raise EcsError(
                    "InvalidEniId.NotFound", f"ENI {eni_id} does not exist", "NetworkInterfaceId"
                )
            return eni
        inst_id = _required(params, "InstanceId")
        inst = self.network.instances.get(inst_id)
        if inst is None:
            raise EcsError(
                "InvalidInstanceId.NotFound", f"instance {inst_id} does not exist", "InstanceId"
            )
        return self.network.enis[inst.eni_ids[0]]

    def join(self, params: Mapping[str, Any], now: str) -> tuple[Model, Outcome]:
        group = self._group(params, write=True)
        eni = self._eni_of(params)
        if group.group_id in eni.group_ids:
            raise EcsError(
                "InvalidInstanceId.AlreadyExists",
                f"{eni.eni_id} is already in {group.group_id}",
                "SecurityGroupId",
            )
        return self._set_groups(eni, (*eni.group_ids, group.group_id))

    def leave(self, params: Mapping[str, Any], now: str) -> tuple[Model, Outcome]:
        group = self._group(params, write=True)
        eni = self._eni_of(params)
        if group.group_id not in eni.group_ids:
            raise EcsError(
                "InstanceNotInSecurityGroup",
                f"{eni.eni_id} is not in {group.group_id}",
                "SecurityGroupId",
            )
        if len(eni.group_ids) == 1:
            raise EcsError(
                "InstanceLastSecurityGroup",
                f"{group.group_id} is the last group of {eni.eni_id}",
                "SecurityGroupId",
            )
        return self._set_groups(eni, tuple(g for g in eni.group_ids if g != group.group_id))

    def _set_groups(self, eni: Eni, ids: tuple[str, ...]) -> tuple[Model, Outcome]:
        """Check an ENI's new group list as validation does, and apply it."""
        if len(ids) > self.quotas.groups_per_eni:
            raise EcsError(
                "InstanceSecurityGroupLimitExceeded",
                f"{eni.eni_id} would be in {len(ids)} groups; "
                f"the limit is {self.quotas.groups_per_eni}",
                "SecurityGroupId",
            )
        types: set[str] = set()
        for gid in ids:
            group = self.network.groups.get(gid)
            if group is None:
                raise EcsError(
                    "InvalidSecurityGroupId.NotFound",
                    f"security group {gid} does not exist",
                    "SecurityGroupId",
                )
            if group.vpc_id != eni.vpc_id:
                raise EcsError(
                    "InvalidInstanceId.Mismatch",
                    f"{eni.eni_id} is in VPC {eni.vpc_id} but group {gid} is in {group.vpc_id}",
                    "SecurityGroupId",
                )
            types.add(group.group_type)
        if len(types) > 1:
            raise EcsError(
                "InvalidSecurityGroupType.Mixed",
                f"{eni.eni_id} would mix basic (normal) and advanced (enterprise) groups",
                "SecurityGroupId",
            )
        added = set(ids) - set(eni.group_ids)
        removed = set(eni.group_ids) - set(ids)
        for gid in added:
            group = self.network.groups[gid]
            members = self.network.members(gid)
            if group.is_basic:
                count = len(eni.addresses) + sum(
                    len(self.network.enis[e].addresses) for e in members
                )
                limit = self.quotas.private_addresses_per_basic_group
            else:
                count, limit = len(members) + 1, self.quotas.enis_per_advanced_group
            if count > limit:
                raise EcsError(
                    "SecurityGroupInstanceLimitExceeded",
                    f"group {gid} would exceed its member limit ({limit})",
                    "SecurityGroupId",
                )
        total = sum(self.weights[g] for g in ids)
        if total > self.quotas.rules_per_eni:
            raise EcsError(
                "AuthorizationLimitExceed",
                f"{eni.eni_id} would be subject to {total} rules across its groups; "
                f"the limit is {self.quotas.rules_per_eni}",
                "SecurityGroupId",
            )
        model = self
        for gid in (*added, *removed):  # an on-demand default group enters the document
            if gid not in model.raw_groups:
                model, _, _ = model._with_group(model.network.groups[gid])
        new_eni = replace(eni, group_ids=tuple(sorted(ids)))
        inst_index, nic_index = model.eni_places[eni.eni_id]
        instances = list(model.topology.instances)
        inst = instances[inst_index]
        if nic_index is None:
            inst = inst.model_copy(update={"security_group_ids": tuple(ids)})
        else:
            nics = list(inst.network_interfaces)
            nics[nic_index] = nics[nic_index].model_copy(update={"security_group_ids": tuple(ids)})
            inst = inst.model_copy(update={"network_interfaces": tuple(nics)})
        instances[inst_index] = inst
        topology = model.topology.model_copy(update={"instances": tuple(instances)})
        enis = dict(model.network.enis)
        enis[eni.eni_id] = new_eni
        network = _network(model.network, enis=enis)
        owners = dict(network._owners)  # the index holds the ENI objects themselves
        for address in eni.addresses:
            owners[address] = tuple(
                new_eni if isinstance(o, Eni) and o.eni_id == eni.eni_id else o
                for o in owners[address]
            )
        object.__setattr__(network, "_owners", owners)
        for gid in added | removed:
            mem = set(network._members.get(gid, ()))
            if gid in added:
                mem.add(eni.eni_id)
            else:
                mem.discard(eni.eni_id)
            network._members[gid] = tuple(sorted(mem))
            network._member_addresses[gid] = frozenset(
                a for e in network._members[gid] for a in enis[e].addresses
            )
        model = replace(model, topology=topology, network=network, counter=model.counter + 1)
        change = Change(
            enis=frozenset({eni.eni_id}),
            vpcs=frozenset({eni.vpc_id}),
            members_changed=frozenset(added | removed),
        )
        return self._outcome(model, {}, change)

    def modify_eni(self, params: Mapping[str, Any], now: str) -> tuple[Model, Outcome]:
        eni = self._eni_of({"NetworkInterfaceId": _required(params, "NetworkInterfaceId")})
        ids = _id_list(params, "SecurityGroupId")
        if not ids:
            return self._outcome(self, {}, Change())
        for k, gid in enumerate(ids):
            if gid in ids[:k]:
                raise EcsError(
                    "InvalidSecurityGroupId.Duplicate",
                    f"group {gid} is given twice",
                    f"SecurityGroupId.{k + 1}",
                )
            group = self.network.groups.get(gid)
            if group is not None and group.managed and gid not in eni.group_ids:
                raise EcsError(
                    "InvalidOperation.ResourceManagedByCloudProduct",
                    f"security group {gid} is managed by a cloud product",
                    f"SecurityGroupId.{k + 1}",
                )
        return self._set_groups(eni, tuple(ids))

    # -- host mode: ENIs on existing interfaces (the topology's `bindings`) -----------
    def _bound_eni(self, params: Mapping[str, Any]) -> tuple[Eni, int | None]:
        """The ENI of an Attach/Detach call, checked against its InstanceId, and the index
        of its binding (None when unbound)."""
        eni_id = _required(params, "NetworkInterfaceId")
        eni = self.network.enis.get(eni_id)
        if eni is None:
            raise EcsError(
                "InvalidEniId.NotFound", f"ENI {eni_id} does not exist", "NetworkInterfaceId"
            )
        inst_id = _required(params, "InstanceId")
        if inst_id not in self.network.instances:
            raise EcsError(
                "InvalidInstanceId.NotFound", f"instance {inst_id} does not exist", "InstanceId"
            )
        if eni.instance_id != inst_id:
            # ENIs are declared with their instance here: they do not move between them.
            raise EcsError(
                "InvalidOperation.InvalidEniState",
                f"ENI {eni_id} belongs to instance {eni.instance_id}, not {inst_id}",
                "InstanceId",
            )
        for i, b in enumerate(self.topology.bindings):
            if b.network_interface_id == eni_id:
                return eni, i
        return eni, None

    def attach_eni(self, params: Mapping[str, Any], now: str) -> tuple[Model, Outcome]:
        """AttachNetworkInterface: bind the ENI to an existing interface (host mode). ECS's
        parameters (InstanceId, NetworkInterfaceId) do not name an interface, so by
        default it is the one named as the ENI's router port (its `ifname`, which
        DescribeNetworkInterfaces does not show but `nftsg` derives from the id) in
        the agent's namespace; nftsg's own parameters name another: `Netns`, and
        `Ifname` or `MacAddress`."""
        eni, index = self._bound_eni(params)
        if index is not None:
            raise EcsError(
                "InvalidOperation.InvalidEniState",
                f"ENI {eni.eni_id} is already attached "
                f"({self.topology.bindings[index].model_dump(exclude_none=True)})",
                "NetworkInterfaceId",
            )
        ifname = params.get("Ifname") or None
        mac = params.get("MacAddress") or None
        if ifname is None and mac is None:
            ifname = eni.ifname
        try:
            binding = m.Binding(
                network_interface_id=eni.eni_id,
                netns=params.get("Netns") or None,
                ifname=ifname,
                mac_address=mac,
            )
        except ValidationError as exc:
            raise EcsError("InvalidParameter", f"binding: {exc.errors()[0]['msg']}") from None
        topology = self.topology.model_copy(update={"bindings": (*self.topology.bindings, binding)})
        check_bindings(topology, self.network)  # names the bad field; nothing changed
        return self._rebound(topology)

    def detach_eni(self, params: Mapping[str, Any], now: str) -> tuple[Model, Outcome]:
        """DetachNetworkInterface: remove the ENI's binding; the agent gives the interface
        back to its namespace (down, under its bound name). The ENI stays in the model
        and its rules stay compiled, with no port."""
        eni, index = self._bound_eni(params)
        if index is None:
            raise EcsError(
                "InvalidOperation.InvalidEniState",
                f"ENI {eni.eni_id} is not attached to an interface (no binding)",
                "NetworkInterfaceId",
            )
        bindings = tuple(b for i, b in enumerate(self.topology.bindings) if i != index)
        return self._rebound(self.topology.model_copy(update={"bindings": bindings}))

    def _rebound(self, topology: m.Topology) -> tuple[Model, Outcome]:
        # The network (rules, members) does not change: no router is recompiled;
        # host mode reads the new bindings (agent/control.py).
        model = replace(self, topology=topology, counter=self.counter + 1)
        return self._outcome(model, {}, Change())

    def create_group(self, params: Mapping[str, Any], now: str) -> tuple[Model, Outcome]:
        vpc_id = _required(params, "VpcId")
        if vpc_id not in self.network.vpcs:
            raise EcsError("InvalidVpcId.NotFound", f"VPC {vpc_id} does not exist", "VpcId")
        raw_type = str(params.get("SecurityGroupType") or "normal").strip().lower()
        if raw_type not in ("normal", "enterprise"):
            raise EcsError(
                "InvalidSecurityGroupType.Malformed",
                "SecurityGroupType is normal or enterprise",
                "SecurityGroupType",
            )
        gtype: GroupType = "normal" if raw_type == "normal" else "enterprise"
        name = str(params.get("SecurityGroupName") or "")
        tags = _tags(params.get("Tag") or [])
        gid = "sg-" + _digest(f"{vpc_id}|{name}|{self.counter}")
        group = SecurityGroup(
            group_id=gid,
            vpc_id=vpc_id,
            group_type=gtype,
            inner_access_policy="Accept" if gtype == "normal" else "Drop",
            rules=(),
            name=name,
            description=str(params.get("Description") or ""),
            tags=tuple(sorted(tags.items())),
        )
        model, _, _ = self._with_group(group, {})
        return self._outcome(model, {"SecurityGroupId": gid}, self._change(group))

    def copy_group(self, params: Mapping[str, Any], now: str) -> tuple[Model, Outcome]:
        """CopySecurityGroup: a new group of the same VPC, type, inner policy, tags and
        rules (new rule ids, same order), with no members: the copy can be changed and
        tried before the original is touched. Managed groups can be copied (reading is
        allowed); the copy is not managed."""
        group = self._group(params, write=False)
        name = params.get("SecurityGroupName")
        if name is None:
            name = params.get("TargetSecurityGroupName")
        name = f"{group.name or group.group_id}-copy" if name is None else str(name)
        description = params.get("Description")
        gid = "sg-" + _digest(f"{group.vpc_id}|{name}|copy|{group.group_id}|{self.counter}")
        if gid in self.network.groups:
            raise EcsError(
                "InvalidSecurityGroupId.Duplicate", f"group {gid} exists", "SecurityGroupId"
            )
        taken: set[str] = set()
        rules: list[Rule] = []
        for salt, rule in enumerate(group.rules):
            rid = self._new_rule_id(gid, rule, taken, salt)
            taken.add(rid)
            rules.append(replace(rule, rule_id=rid, group_id=gid))
        copy = replace(
            group,
            group_id=gid,
            rules=tuple(rules),
            name=name,
            description=group.description if description is None else str(description),
            managed=False,
            is_vpc_default=False,
        )
        model, _, _ = self._with_group(copy, dict.fromkeys(taken, now))
        return self._outcome(model, {"SecurityGroupId": gid}, self._change(copy))

    def _tagged_groups(self, params: Mapping[str, Any], *, write: bool) -> list[SecurityGroup]:
        kind = str(params.get("ResourceType") or "").strip().lower()
        if kind != "securitygroup":
            raise EcsError(
                "InvalidResourceType.NotSupported",
                "tags are kept on security groups only (ResourceType securitygroup)",
                "ResourceType",
            )
        ids = _id_list(params, "ResourceId")
        if not ids and write:
            raise EcsError("MissingParameter.ResourceId", "ResourceId is required", "ResourceId")
        if not ids:
            return list(self.network.groups.values())
        return [self._group({"SecurityGroupId": gid}, write=write) for gid in ids]

    def tag(self, params: Mapping[str, Any], now: str) -> tuple[Model, Outcome]:
        groups = self._tagged_groups(params, write=True)
        raw = params.get("Tag") or []
        if not isinstance(raw, list) or not raw:
            raise EcsError("MissingParameter.Tag", "Tag.N is required", "Tag")
        new_tags = _tags(raw)
        return self._retag(groups, lambda tags: {**tags, **new_tags})

    def untag(self, params: Mapping[str, Any], now: str) -> tuple[Model, Outcome]:
        groups = self._tagged_groups(params, write=True)
        keys = set(_id_list(params, "TagKey"))
        every = str(params.get("All") or "").lower() == "true"
        return self._retag(
            groups, lambda tags: {} if every else {k: v for k, v in tags.items() if k not in keys}
        )

    def _retag(self, groups: list[SecurityGroup], update: Any) -> tuple[Model, Outcome]:
        model = self
        touched = set()
        for group in groups:
            current = model.network.groups[group.group_id]
            tags = update(dict(current.tags))
            new_tags = tuple(sorted(tags.items()))
            if new_tags == current.tags:
                continue
            new_group = replace(current, tags=new_tags)
            doc = model._doc_of(current).model_copy(update={"tags": dict(new_tags)})
            model, _, _ = model._with_group_doc(new_group, doc)
            touched.add(group.group_id)
        if not touched:
            return self._outcome(self, {}, Change())
        return self._outcome(model, {}, Change(groups=frozenset(touched)))

    def list_tags(self, params: Mapping[str, Any], now: str) -> tuple[Model, Outcome]:
        groups = self._tagged_groups(params, write=False)
        rows = [
            {
                "ResourceId": g.group_id,
                "ResourceType": "securitygroup",
                "TagKey": k,
                "TagValue": v,
            }
            for g in groups
            for k, v in g.tags
        ]
        return self._read({"NextToken": "", "TagResources": {"TagResource": rows}})

    def delete_group(self, params: Mapping[str, Any], now: str) -> tuple[Model, Outcome]:
        group = self._group(params, write=True)
        gid = group.group_id
        if self.network.members(gid):
            raise EcsError(
                "DependencyViolation",
                f"security group {gid} still has members",
                "SecurityGroupId",
            )
        referencing = _referencing(self.network, gid)
        if referencing:
            raise EcsError(
                "DependencyViolation",
                f"security group {gid} is referenced by {', '.join(referencing)}",
                "SecurityGroupId",
            )
        docs = tuple(d for d in self.topology.security_groups if d.security_group_id != gid)
        topology = self.topology.model_copy(update={"security_groups": docs})
        groups = {k: v for k, v in self.network.groups.items() if k != gid}
        network = _network(self.network, groups=groups)
        network._members.pop(gid, None)
        network._member_addresses.pop(gid, None)
        model = replace(
            self,
            topology=topology,
            network=network,
            raw_groups={d.security_group_id: (i, d) for i, d in enumerate(docs)},
            weights={k: v for k, v in self.weights.items() if k != gid},
            create_times={k: v for k, v in self.create_times.items() if k != gid},
            counter=self.counter + 1,
        )
        return self._outcome(model, {}, self._change(group))

    def modify_rule(
        self, params: Mapping[str, Any], now: str, direction: str
    ) -> tuple[Model, Outcome]:
        group = self._group(params, write=True)
        rid = _required(params, "SecurityGroupRuleId")
        index = next(
            (k for k, r in enumerate(group.rules) if r.rule_id == rid and r.direction == direction),
            None,
        )
        if index is None:
            raise EcsError(
                "InvalidParam.SecurityGroupRuleId",
                f"{group.group_id} has no {direction} rule {rid}",
                "SecurityGroupRuleId",
            )
        old = group.rules[index]
        values = permission_of(old).model_dump()
        values.pop("security_group_rule_id")
        for key, value in params.items():
            name = _PERMISSION_FIELDS.get(key)
            if name is not None and value is not None:
                values[name] = value
        try:
            perm = m.Permission.model_validate(values)
        except ValidationError as exc:
            raise EcsError("InvalidParameter", str(exc.errors()[0]["msg"]), "Permission") from None
        checker = rule_checker(self.network, self.raw_groups, self.quotas)
        rule = checker.build_rule(group.group_id, group.group_type, group.vpc_id, perm, "")
        if rule.peer.kind != old.peer.kind:
            raise EcsError(
                "InvalidParameter",
                f"a rule's peer kind ({old.peer.kind}) cannot change to {rule.peer.kind}",
                "SecurityGroupRuleId",
            )
        rule = replace(rule, rule_id=rid)
        rules = list(group.rules)
        del rules[index]
        if any(r.identity() == rule.identity() for r in rules):
            raise EcsError(
                "InvalidParam.DuplicatePermissions",
                "the modified rule would repeat another rule of the group",
                "SecurityGroupRuleId",
            )
        docs = list(self._doc_of(group).permissions)
        del docs[index]
        at = bisect.bisect(rules, rule_sort_key(rule), key=rule_sort_key)
        rules.insert(at, rule)
        docs.insert(at, permission_of(rule))
        new_group = replace(group, rules=tuple(rules))
        self._check_group_quotas(new_group)
        missing = {
            g: v for g, v in checker.default_groups_needed.items() if g not in self.network.groups
        }
        model = self
        for g, v in missing.items():
            model = model._add_default_group(g, v)
        doc = model._doc_of(group).model_copy(update={"permissions": tuple(docs)})
        model, _, _ = model._with_group_doc(new_group, doc)
        return self._outcome(model, {}, self._change(group))

    def describe_references(self, params: Mapping[str, Any], now: str) -> tuple[Model, Outcome]:
        ids = _id_list(params, "SecurityGroupId")
        if not ids:
            raise EcsError(
                "MissingParameter.SecurityGroupId", "SecurityGroupId is required", "SecurityGroupId"
            )
        refs = [
            {
                "SecurityGroupId": gid,
                "ReferencingSecurityGroups": {
                    "ReferencingSecurityGroup": [
                        {"SecurityGroupId": r, "AliUid": ""}
                        for r in _referencing(self.network, gid)
                    ]
                },
            }
            for gid in ids
        ]
        return self._read({"SecurityGroupReferences": {"SecurityGroupReference": refs}})

    def modify_attribute(self, params: Mapping[str, Any], now: str) -> tuple[Model, Outcome]:
        group = self._group(params, write=True)
        name = params.get("SecurityGroupName")
        description = params.get("Description")
        if name is None and description is None:
            return self._outcome(self, {}, Change())
        if description is not None and len(str(description)) > 512:
            raise EcsError(
                "InvalidDescription.Malformed",
                "Description is at most 512 characters",
                "Description",
            )
        new_group = replace(
            group,
            name=group.name if name is None else str(name),
            description=group.description if description is None else str(description),
        )
        doc = self._doc_of(group).model_copy(
            update={
                "security_group_name": new_group.name or None,
                "description": new_group.description or None,
            }
        )
        model, _, _ = self._with_group_doc(new_group, doc)
        return self._outcome(model, {}, Change(groups=frozenset({group.group_id})))

    def describe_groups(self, params: Mapping[str, Any], now: str) -> tuple[Model, Outcome]:
        wanted = set(_id_list(params, "SecurityGroupIds") or _id_list(params, "SecurityGroupId"))
        vpc = params.get("VpcId")
        rows = [
            {
                "SecurityGroupId": g.group_id,
                "SecurityGroupName": g.name,
                "Description": g.description,
                "VpcId": g.vpc_id,
                "SecurityGroupType": g.group_type,
                "ServiceManaged": g.managed,
                "RuleCount": len(g.rules),
                "GroupToGroupRuleCount": sum(isinstance(r.peer, GroupPeer) for r in g.rules),
                "EcsCount": len(self.network.members(g.group_id)),
                "Tags": {"Tag": [{"TagKey": k, "TagValue": v} for k, v in g.tags]},
            }
            for g in self.network.groups.values()
            if (not wanted or g.group_id in wanted) and (not vpc or g.vpc_id == vpc)
        ]
        return self._read(
            {
                "RegionId": self.network.region_id,
                "TotalCount": len(rows),
                "PageNumber": 1,
                "PageSize": len(rows),
                "SecurityGroups": {"SecurityGroup": rows},
            }
        )

    def describe_attribute(self, params: Mapping[str, Any], now: str) -> tuple[Model, Outcome]:
        group = self._group(params, write=False)
        direction = str(params.get("Direction") or "all").lower()
        times = self.create_times.get(group.group_id, {})
        perms = [
            _rule_json(r, self.network, times.get(r.rule_id, ""))
            for r in group.rules
            if direction == "all" or r.direction == direction
        ]
        return self._read(
            {
                "SecurityGroupId": group.group_id,
                "SecurityGroupName": group.name,
                "Description": group.description,
                "VpcId": group.vpc_id,
                "RegionId": self.network.region_id,
                "InnerAccessPolicy": group.inner_access_policy,
                "Permissions": {"Permission": perms},
            }
        )


def _tags(raw: Any) -> dict[str, str]:
    """`Tag.N.Key` / `Tag.N.Value` as gathered by the API layer; every tag needs a Key."""
    if not isinstance(raw, list):
        raise EcsError("InvalidTagKey.Malformed", "Tag.N is a list of Key and Value", "Tag")
    tags: dict[str, str] = {}
    for i, item in enumerate(raw):
        key = str(item.get("Key") or "") if isinstance(item, Mapping) else ""
        if not key:
            raise EcsError("InvalidTagKey.Malformed", "a tag needs a Key", f"Tag.{i + 1}")
        tags[key] = str(item.get("Value") or "")
    return tags


def _referencing(network: Network, gid: str) -> list[str]:
    """Ids of the other groups with a rule naming `gid` as its peer."""
    return [
        other.group_id
        for other in network.groups.values()
        if other.group_id != gid
        and any(isinstance(r.peer, GroupPeer) and r.peer.group_id == gid for r in other.rules)
    ]


def _network(
    old: Network,
    *,
    groups: dict[str, SecurityGroup] | None = None,
    enis: dict[str, Eni] | None = None,
) -> Network:
    """A network sharing `old`'s objects, without recomputing every index.

    The membership indexes are copied shallowly; the caller updates the
    entries of the groups whose membership changed.
    """
    new = object.__new__(Network)
    values = {
        "vpcs": old.vpcs,
        "groups": old.groups if groups is None else groups,
        "enis": old.enis if enis is None else enis,
        "instances": old.instances,
        "externals": old.externals,
        "prefix_lists": old.prefix_lists,
        "region_id": old.region_id,
        "_members": dict(old._members),
        "_owners": old._owners,
        "_member_addresses": dict(old._member_addresses),
    }
    for name, value in values.items():
        object.__setattr__(new, name, value)
    return new


_ACTIONS: dict[str, Any] = {
    "AuthorizeSecurityGroup": lambda s, p, n: s.authorize(p, n, "ingress"),
    "AuthorizeSecurityGroupEgress": lambda s, p, n: s.authorize(p, n, "egress"),
    "RevokeSecurityGroup": lambda s, p, n: s.revoke(p, n, "ingress"),
    "RevokeSecurityGroupEgress": lambda s, p, n: s.revoke(p, n, "egress"),
    "ModifySecurityGroupPolicy": Model.modify_policy,
    "JoinSecurityGroup": Model.join,
    "LeaveSecurityGroup": Model.leave,
    "ModifyNetworkInterfaceAttribute": Model.modify_eni,
    "AttachNetworkInterface": Model.attach_eni,
    "DetachNetworkInterface": Model.detach_eni,
    "DescribeSecurityGroupAttribute": Model.describe_attribute,
    "DescribeSecurityGroupReferences": Model.describe_references,
    "DescribeSecurityGroups": Model.describe_groups,
    "ModifySecurityGroupAttribute": Model.modify_attribute,
    "CreateSecurityGroup": Model.create_group,
    "CopySecurityGroup": Model.copy_group,
    "TagResources": Model.tag,
    "UntagResources": Model.untag,
    "ListTagResources": Model.list_tags,
    "DeleteSecurityGroup": Model.delete_group,
    "ModifySecurityGroupRule": lambda s, p, n: s.modify_rule(p, n, "ingress"),
    "ModifySecurityGroupEgressRule": lambda s, p, n: s.modify_rule(p, n, "egress"),
}
