"""Store -> kernel: compile the model, apply one transaction per VPC router, cut flows.

The reconciler remembers the program it last applied to each namespace and
sends only the difference. When it does not know (start, restart, after an
error, or when verification finds the kernel differs) it sends a full sync:
one batch that deletes and recreates the table, which the kernel applies
atomically, so there is never a moment without rules. After a change, every
tracked flow is judged against the new model: flows it denies are marked (the
ruleset drops marked flows both ways), flows it allows again are unmarked, so a
change applies to established flows too; flows that stay allowed are left
alone and lose no packet.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass, field

from nftsg.translators.compiler import Layout, compile_all
from nftsg.translators.diff import diff_programs
from nftsg.translators.errors import EcsError
from nftsg.translators.evaluator import Flow, evaluate
from nftsg.translators.network import Network
from nftsg.translators.nft import Program

from .nft_backend import Backend, NftError
from .settings import layout_from_env

log = logging.getLogger(__name__)

# Given a namespace and a predicate over conntrack entries ("is this flow still
# allowed?"), cut the flows the predicate rejects; returns how many were cut.
FlowPruner = Callable[[str, Callable[[Flow], bool]], int]


def program_digest(program: Program) -> str:
    return hashlib.sha256(
        json.dumps(program.to_json(), sort_keys=True, separators=(",", ":")).encode()
    ).hexdigest()


@dataclass
class SyncReport:
    """What one sync did, per namespace: commands sent, full or incremental, flows cut."""

    commands: dict[str, int] = field(default_factory=dict)
    full: dict[str, bool] = field(default_factory=dict)
    flows_cut: dict[str, int] = field(default_factory=dict)
    digests: dict[str, str] = field(default_factory=dict)

    @property
    def changed(self) -> bool:
        return any(self.commands.values())


class Reconciler:
    def __init__(
        self,
        backend: Backend,
        namespace_of: Callable[[str], str],
        *,
        table: str = "nftsg",
        prune_flows: FlowPruner | None = None,
        namespace_exists: Callable[[str], bool] = lambda _ns: True,
        layout: Layout | None = None,
    ) -> None:
        self.backend = backend
        self.layout: Layout = layout or layout_from_env()
        self.namespace_of = namespace_of
        self.table = table
        self.prune_flows = prune_flows
        self.namespace_exists = namespace_exists
        self.applied: dict[str, Program] = {}
        # What verify() expects of each namespace, for the program last applied there.
        self._summaries: dict[str, tuple[Program, Summary]] = {}

    def forget(self, namespace: str | None = None) -> None:
        """Drop what we believe the kernel holds, so the next sync is a full one."""
        if namespace is None:
            self.applied.clear()
        else:
            self.applied.pop(namespace, None)

    def sync(self, network: Network) -> SyncReport:
        """Bring every VPC router namespace to `network`. Raises NftError on the first failure
        (that namespace keeps its last good rules and will get a full sync next time)."""
        report = SyncReport()
        programs = compile_all(network, self.table, self.layout)
        for vpc_id, program in sorted(programs.items()):
            namespace = self.namespace_of(vpc_id)
            if not self.namespace_exists(namespace):
                log.warning(
                    "router namespace %s of %s is missing; not enforcing", namespace, vpc_id
                )
                self.applied.pop(namespace, None)
                continue
            old = self.applied.get(namespace)
            commands = diff_programs(old, program)
            report.full[namespace] = old is None
            report.commands[namespace] = len(commands)
            if commands:
                try:
                    self.backend.apply(namespace, commands)
                except NftError:
                    self.applied.pop(namespace, None)
                    raise
            self.applied[namespace] = program
            # A full sync prunes too: after a restart the kernel may still track
            # flows that an older model allowed and the current one denies.
            if commands and self.prune_flows is not None:
                report.flows_cut[namespace] = self.prune_flows(
                    namespace, functools.partial(still_allowed, network, vpc_id)
                )
            # After the commit and the flow judging, not before: at 40k rules the
            # digest (a full render) costs more than the change itself.
            report.digests[namespace] = program_digest(program)
        return report

    def verify(self) -> list[str]:
        """Namespaces whose kernel table does not hold what we applied; they are forgotten
        so that the next sync rewrites them in full."""
        drifted = []
        for namespace, program in sorted(self.applied.items()):
            listing = self.backend.list_table(namespace, "inet", self.table)
            cached = self._summaries.get(namespace)
            if cached is None or cached[0] is not program:
                cached = (program, program_summary(program))
                self._summaries[namespace] = cached
            expected = cached[1]
            if listing is None or kernel_summary(listing) != expected:
                drifted.append(namespace)
        for namespace in drifted:
            log.warning("kernel table in %s differs from the applied program", namespace)
            self.applied.pop(namespace, None)
        return drifted


def still_allowed(network: Network, vpc_id: str, flow: Flow) -> bool:
    """Would the model accept this tracked flow as new? Anything the evaluator cannot
    judge is cut: a failure never keeps a flow open."""
    try:
        return evaluate(network, flow, vpc_id=vpc_id).verdict == "accept"
    except EcsError as exc:
        log.warning("cutting flow %s the evaluator cannot judge: %s", flow, exc)
        return False


Summary = dict[str, object]


def program_summary(program: Program) -> Summary:
    """Object names, rule counts per chain and element counts per set/map of a program."""
    return _summarise(program.full_sync_commands(), adds=True)


def kernel_summary(listing: dict[str, object]) -> Summary:
    items = listing.get("nftables", [])
    assert isinstance(items, list)
    return _summarise(items, adds=False)


def _summarise(items: list[dict[str, object]], *, adds: bool) -> Summary:
    chains: dict[str, int] = {}
    sets: dict[str, int] = {}
    for item in items:
        if adds:
            if "add" not in item:
                continue
            obj = item["add"]
            assert isinstance(obj, dict)
        else:
            obj = item
        for kind, body in obj.items():
            if not isinstance(body, dict):
                continue
            if kind == "chain":
                chains.setdefault(str(body["name"]), 0)
            elif kind == "rule":
                name = str(body["chain"])
                chains[name] = chains.get(name, 0) + 1
            elif kind in ("set", "map"):
                elems = body.get("elem", [])
                sets[str(body["name"])] = sets.get(str(body["name"]), 0) + (
                    len(elems) if isinstance(elems, list) else 0
                )
            elif kind == "element":
                elems = body.get("elem", [])
                name = str(body["name"])
                sets[name] = sets.get(name, 0) + (len(elems) if isinstance(elems, list) else 0)
    return {"chains": chains, "sets": sets}
