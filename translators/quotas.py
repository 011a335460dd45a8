"""Configurable limits (docs/semantics.md §Limits), with ECS's defaults.

Where validation enforces each one, and with which ECS code:
- groups_per_eni: InstanceSecurityGroupLimitExceeded
- rules_per_group (both directions), rules_per_eni (across its groups):
  AuthorizationLimitExceed; a prefix-list rule counts as the list's max_entries
- group_reference_rules_per_group: AuthorizedGroupRule.LimitExceed
- private_addresses_per_basic_group, enis_per_advanced_group:
  SecurityGroupInstanceLimitExceeded
- permissions_per_request: for the API (one request), not for a topology file
"""

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
