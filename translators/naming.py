"""Deterministic names derived from ids: interface names, MACs, default ids.

Pure functions of the id, so the same ENI keeps the same veth name and MAC
across models, syncs and restarts.
"""

from __future__ import annotations

import hashlib
import re

ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def port_ifname(kind: str, ident: str) -> str:
    """Host-side veth name in the VPC router: ``e`` (ENI) or ``x`` (external) + 12 hex."""
    return f"{kind}{_digest(kind + ':' + ident)[:12]}"


def derived_mac(ident: str) -> str:
    """A locally administered unicast MAC derived from the id."""
    raw = bytes.fromhex(_digest("mac:" + ident)[:12])
    first = (raw[0] | 0x02) & 0xFE
    return ":".join(f"{b:02x}" for b in (first, *raw[1:]))


def default_primary_eni_id(instance_id: str) -> str:
    stem = instance_id[2:] if instance_id.startswith("i-") else instance_id
    return f"eni-{stem}"


def default_group_id(vpc_id: str) -> str:
    stem = vpc_id[4:] if vpc_id.startswith("vpc-") else vpc_id
    return f"sg-default-{stem}"


def rule_id(group_id: str, identity: str) -> str:
    """A stable rule id for a rule given without one: from the group and the rule's identity."""
    return "sgr-" + _digest(f"{group_id}|{identity}")[:16]
