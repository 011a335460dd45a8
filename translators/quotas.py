"""Configurable limits (semantics.md "Limits"), with ECS's defaults."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Quotas:
    groups_per_eni: int = 10
    rules_per_group: int = 200
    rules_per_eni: int = 1000
    group_reference_rules_per_group: int = 20
    private_addresses_per_basic_group: int = 6000
    enis_per_advanced_group: int = 65536
    permissions_per_request: int = 100


DEFAULT_QUOTAS = Quotas()
