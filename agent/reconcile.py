"""Store -> kernel: compile the model, apply one transaction per VPC router, judge flows.

The reconciler remembers the program it last applied to each router namespace
and sends only the difference. When it does not know (start, restart, after an
error, or when verification finds the kernel differs) it either adopts what the
kernel holds, if that is the program by content, or sends a full sync: one
batch that deletes and recreates the table, which the kernel applies
atomically, so there is never a moment without rules.

Every namespace is its own unit of failure: `sync_namespace` raises
`SyncFailed` naming the namespace and the step (compile, apply), and that
namespace alone is forgotten (its next sync is a full one); the kernel keeps
its last good rules because nft transactions are atomic. Judging the
established flows after a commit can fail too (conntrack); that never undoes
or blocks the commit: the namespace is reported as having flows to judge, and
the caller retries.

After a change every tracked flow is judged against the new model: flows it
denies are marked (the ruleset drops marked flows both ways), flows it allows
again are unmarked, so a change applies to established flows too; flows that
stay allowed are left alone and lose no packet (docs/semantics.md §State).
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from nftsg.translators.canonical import (
    Digests,
    differences_streaming,
    listing_objects,
    program_digests,
)
from nftsg.translators.compiler import (
    DEFAULT_CT_MARK_BIT,
    DeniedLog,
    Layout,
    check_ct_mark_bit,
    compile_vpc,
)
from nftsg.translators.counters import program_key
from nftsg.translators.diff import diff_programs
from nftsg.translators.errors import EcsError
from nftsg.translators.evaluator import Flow, evaluate
from nftsg.translators.network import Network
from nftsg.translators.nft import Program
from nftsg.translators.nft_text import full_sync_text

from .hits import RuleHits
from .nft_backend import Backend
from .settings import layout_from_env

log = logging.getLogger(__name__)

# Given a namespace, a predicate over conntrack entries ("is this flow still
# allowed?") and the conntrack mark bit of revoked flows, mark the flows the
# predicate rejects (and unmark those it accepts again); returns how many were cut.
FlowJudge = Callable[[str, Callable[[Flow], bool], int], int]
# (model, vpc id, table name, ct mark bit) -> the program of that VPC router.
Compile = Callable[[Network, str, str, int], Program]

# How many differences a drift log line names (the rest are counted).
_DIFFERENCES_LOGGED = 12


class SyncFailed(Exception):
    """One namespace could not be brought to the model; its last good rules stay."""

    def __init__(self, namespace: str, step: str, cause: BaseException) -> None:
        super().__init__(f"{step} failed for {namespace}: {type(cause).__name__}: {cause}")
        self.namespace = namespace
        self.step = step
        self.cause = cause
        # From `Reconciler.sync`: what it did for the other namespaces.
        self.report: SyncReport | None = None


@dataclass
class SyncReport:
    """What one sync did, per namespace: commands sent, full or incremental, flows cut.

    `adopted`: after a restart the kernel already held the program (checked by
    content), so nothing was sent. `unjudged`: the commit is in force but the
    tracked flows could not be judged (the error text); the caller retries.
    """

    commands: dict[str, int] = field(default_factory=dict)
    full: dict[str, bool] = field(default_factory=dict)
    adopted: dict[str, bool] = field(default_factory=dict)
    flows_cut: dict[str, int] = field(default_factory=dict)
    unjudged: dict[str, str] = field(default_factory=dict)
    failed: dict[str, SyncFailed] = field(default_factory=dict)

    @property
    def changed(self) -> bool:
        return any(self.commands.values())

    def merge(self, other: SyncReport) -> None:
        for name in ("commands", "full", "adopted", "flows_cut", "unjudged", "failed"):
            getattr(self, name).update(getattr(other, name))


class Reconciler:
    def __init__(
        self,
        backend: Backend,
        namespace_of: Callable[[str], str],
        *,
        table: str = "nftsg",
        prune_flows: FlowJudge | None = None,
        namespace_exists: Callable[[str], bool] = lambda _ns: True,
        compile_program: Compile | None = None,
        ct_mark_bit: int = DEFAULT_CT_MARK_BIT,
        layout: Layout | None = None,
        counters: bool = False,
        hits: RuleHits | None = None,
        denied_log: DeniedLog | None = None,
    ) -> None:
        self.backend = backend
        # Denied-flow log rules for the profiles of these groups (agent/nflog.py).
        self.denied_log = denied_log
        self.layout: Layout = layout or layout_from_env()
        # Per-rule hit counters in the programs (docs/dataplane.md "Hit counters"),
        # read into `hits` by every listing and before changes that recreate them.
        self.counters = counters
        self.hits = hits
        self.namespace_of = namespace_of
        self.table = table
        self.ct_mark_bit = check_ct_mark_bit(ct_mark_bit)
        self.prune_flows = prune_flows
        self.namespace_exists = namespace_exists
        self.compile_program: Compile = compile_program or self._compile
        self.applied: dict[str, Program] = {}
        # One digest per object of the program last applied to each namespace,
        # computed once per program (verify runs every few seconds); not the whole
        # canonical form, which at scale is far bigger than the program itself.
        self._digests: dict[str, tuple[Program, Digests]] = {}
        # What the last verify found different, per drifted namespace (for logs and tests).
        self.last_differences: dict[str, list[str]] = {}

    def _compile(self, network: Network, vpc_id: str, table: str, ct_mark_bit: int) -> Program:
        return compile_vpc(
            network,
            vpc_id,
            table,
            ct_mark_bit,
            layout=self.layout,
            counters=self.counters,
            denied_log=self.denied_log,
        )

    def forget(self, namespace: str | None = None) -> None:
        """Drop what we believe the kernel holds, so the next sync is a full one."""
        if namespace is None:
            self.applied.clear()
        else:
            self.applied.pop(namespace, None)

    # -- kernel -> model -------------------------------------------------------

    def sync(self, network: Network) -> SyncReport:
        """Bring every VPC router namespace to `network`, each on its own.

        A namespace that fails keeps its last good rules and is forgotten; the
        others are still synced. Raises the first `SyncFailed` after trying
        them all (the report of the rest is on the exception's `report`).
        """
        report = SyncReport()
        for vpc_id in sorted(network.vpcs):
            try:
                report.merge(self.sync_namespace(network, vpc_id))
            except SyncFailed as exc:
                report.failed[exc.namespace] = exc
        if report.failed:
            first = next(iter(sorted(report.failed.items())))[1]
            first.report = report
            raise first
        return report

    def sync_namespace(self, network: Network, vpc_id: str, *, adopt: bool = False) -> SyncReport:
        """Bring one VPC router to `network`. With `adopt`, a namespace we know nothing
        about is first compared with the kernel: if it already holds the program (by
        content), nothing is sent (a restart that changes nothing rewrites nothing)."""
        report = SyncReport()
        namespace = self.namespace_of(vpc_id)
        if not self.namespace_exists(namespace):
            log.warning("router namespace %s of %s is missing; not enforcing", namespace, vpc_id)
            self.applied.pop(namespace, None)
            return report
        try:
            program = self.compile_program(network, vpc_id, self.table, self.ct_mark_bit)
        except Exception as exc:
            self.applied.pop(namespace, None)
            raise SyncFailed(namespace, "compile", exc) from exc
        old = self.applied.get(namespace)
        if old is None and adopt:
            try:
                if not self.differences(namespace, program):
                    old = program
                    report.adopted[namespace] = True
            except Exception as exc:  # cannot tell: rewrite in full
                log.warning("cannot compare %s with the kernel, rewriting it: %s", namespace, exc)
        try:
            apply_text = getattr(self.backend, "apply_text", None)
            if self.hits is not None and old is None and not report.adopted.get(namespace):
                self._read_counters_before_rewrite(namespace, program)
            if old is None and apply_text is not None:
                # A full load as one nft text batch: the same transaction as the JSON
                # full sync, measured faster for big tables (docs/dataplane.md).
                text, count = full_sync_text(program)
                apply_text(namespace, text, count)
                del text
            else:
                commands = diff_programs(old, program)
                count = len(commands)
                if self.hits is not None and old is not None and commands:
                    self.read_counters_before_diff(namespace, old, program, commands)
                self.backend.apply(namespace, commands)
                del commands
        except Exception as exc:
            self.applied.pop(namespace, None)
            raise SyncFailed(namespace, "apply", exc) from exc
        report.full[namespace] = old is None
        report.commands[namespace] = count
        self.applied[namespace] = program
        # Adopted or freshly written after a restart, the kernel may still track
        # flows that an older model allowed and this one denies: judge them too.
        if count or old is None or report.adopted.get(namespace):
            self._judge(network, vpc_id, namespace, report)
        return report

    # -- hit counters ------------------------------------------------------------

    def _read_counters_before_rewrite(self, namespace: str, program: Program) -> None:
        """A full rewrite zeroes every counter: read the table first (best effort; the
        labels are the new program's, the kernel's own program being unknown)."""
        assert self.hits is not None
        try:
            listing = self.counter_listing(namespace)
            if listing is not None:
                self.hits.observe(namespace, program, listing)
        except Exception as exc:
            log.warning("rule hits: cannot read %s before rewriting it: %s", namespace, exc)
        self.hits.forget(namespace)

    def read_counters_before_diff(
        self, namespace: str, old: Program, new: Program, commands: list[dict[str, Any]]
    ) -> None:
        """Read the counted sets whose elements (or the whole set) this diff deletes,
        then drop their last readings: what they counted is kept, and the recreated
        elements start from zero."""
        assert self.hits is not None
        full = len(commands) > 1 and "table" in commands[1].get("delete", {})
        gone: dict[str, list[Any] | None] = {}  # set name -> deleted keys (None: all)
        for s in old.sets:
            if not s.counter:
                continue
            now = new.set_by_name.get(s.name)
            if full or now is None or now.definition() != s.definition():
                gone[s.name] = None
            else:
                deleted = set(s.elements) - set(now.elements)
                if deleted:
                    gone[s.name] = [program_key(k) for k in deleted]
        list_set = getattr(self.backend, "list_set", None)
        if full:
            self._read_counters_before_rewrite(namespace, old)
            return
        for name, keys in sorted(gone.items()):
            try:
                if list_set is not None:
                    listing = list_set(namespace, "inet", self.table, name)
                    if listing is not None:
                        self.hits.observe(namespace, old, listing)
            except Exception as exc:
                log.warning("rule hits: cannot read set %s in %s: %s", name, namespace, exc)
            if keys is None:
                self.hits.forget(namespace, [name])
            else:
                self.hits.forget_elements(namespace, name, keys)
        for chain in old.chains:
            now_chain = new.chain_by_name.get(chain.name)
            if now_chain is None or now_chain.rules != chain.rules:
                self.hits.forget(namespace, [chain.name])  # its default counter restarts

    def judge_flows(self, network: Network, vpc_id: str) -> SyncReport:
        """Judge the tracked flows of one router against `network` (a retry after a
        conntrack failure, or after a restart)."""
        report = SyncReport()
        self._judge(network, vpc_id, self.namespace_of(vpc_id), report)
        return report

    def _judge(self, network: Network, vpc_id: str, namespace: str, report: SyncReport) -> None:
        if self.prune_flows is None:
            return
        try:
            report.flows_cut[namespace] = self.prune_flows(
                namespace, functools.partial(still_allowed, network, vpc_id), self.ct_mark_bit
            )
        except Exception as exc:
            # The rules are committed and stay; only the flows wait for a retry.
            log.error("judging the tracked flows of %s failed, will retry: %s", namespace, exc)
            report.unjudged[namespace] = f"{type(exc).__name__}: {exc}"

    # -- verification ------------------------------------------------------------

    def digests_applied(self, namespace: str, program: Program) -> Digests:
        cached = self._digests.get(namespace)
        if cached is None or cached[0] is not program:
            cached = (program, program_digests(program))
            self._digests[namespace] = cached
        return cached[1]

    def listing(self, namespace: str) -> dict[str, Any] | None:
        return self.backend.list_table(namespace, "inet", self.table)

    def counter_listing(self, namespace: str) -> dict[str, Any] | None:
        """The table with counter values (a backend that has none: the plain listing)."""
        lister = getattr(self.backend, "list_table_counters", None)
        if lister is None:
            return self.listing(namespace)
        listing = lister(namespace, "inet", self.table)
        return listing if isinstance(listing, dict) else None

    def _items(self, namespace: str) -> Iterable[Any] | None:
        """The kernel table's listing items, streamed when the backend can."""
        stream = getattr(self.backend, "table_items", None)
        if stream is not None:
            items: Iterable[Any] | None = stream(namespace, "inet", self.table)
            return items
        listing = self.listing(namespace)
        return None if listing is None else listing.get("nftables", [])

    def differences(
        self, namespace: str, program: Program, listing: dict[str, Any] | None = None
    ) -> list[str]:
        """What the kernel's table in `namespace` has that `program` has not, or lacks
        (content: hooks, policies, rules, elements). Empty when they are equal.

        The kernel is read set by set and compared by digest as it is read; the read
        is not one snapshot, so it is repeated when the table's generation moved
        meanwhile (another commit could mix two states into a false verdict)."""
        digests = self.digests_applied(namespace, program)
        if listing is not None:
            return differences_streaming(program, digests, listing_objects(listing["nftables"]))
        found: list[str] = []
        for _attempt in range(3):
            before = self._generation(namespace)
            items = self._items(namespace)
            if items is None:
                return [f"table inet {self.table} is missing"]
            found = differences_streaming(program, digests, listing_objects(items))
            if before is None or before == self._generation(namespace):
                break
        return found

    def _generation(self, namespace: str) -> int | None:
        probe = getattr(self.backend, "generation", None)
        if probe is None:
            return None
        try:
            value = probe(namespace)
        except Exception:
            return None
        return value if isinstance(value, int) else None

    def verify(self, namespaces: list[str] | None = None) -> list[str]:
        """Namespaces whose kernel table does not hold, by content, what we applied;
        they are forgotten so that the next sync rewrites them in full. What differed
        is logged and kept in `last_differences`."""
        drifted = []
        self.last_differences = {}
        for namespace in sorted(namespaces if namespaces is not None else self.applied):
            program = self.applied.get(namespace)
            if program is None:
                continue
            found = self.differences(namespace, program)
            if found:
                drifted.append(namespace)
                self.last_differences[namespace] = found
        for namespace in drifted:
            found = self.last_differences[namespace]
            more = len(found) - _DIFFERENCES_LOGGED
            log.warning(
                "kernel table in %s differs from the applied program, rewriting it: %s%s",
                namespace,
                "; ".join(found[:_DIFFERENCES_LOGGED]),
                f"; and {more} more" if more > 0 else "",
            )
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
