"""The agent's control plane: ECS calls -> the model, the store and the kernel.

One `ControlPlane.call` at a time (the agent's lock, which every round of the
agent loop holds too, so the two never program a router at once):

1. the model (`translators.actions.Model`, in memory) performs the action:
   only what the call touches is validated; a rejected call raises `EcsError`
   having changed nothing (no store write, no kernel command);
2. the accepted call is appended to the store's journal (agent/datastore.py),
   one transaction on top of the revision it was performed on; from here a
   restart replays it (committed to the WAL file at once; its fsync runs in a
   helper thread during steps 3 and 4 and is waited for in step 5, so an
   answered call is on disk as with synchronous=FULL);
3. each VPC router the change touches is recompiled, reusing the compiled
   form of every group and ENI the call did not touch
   (translators/incremental.py), and gets the difference in one nft
   transaction; the other routers' programs did not change and are marked as
   in force at the new revision;
4. the tracked flows that involve an ENI the change can affect are judged
   (docs/semantics.md "State"): revoked ones cut, restored ones revived; the
   other flows are not looked at;
5. only then, once the store's write is on disk, the response is returned.

If step 3 or 4 fails, the router keeps its last good rules (nft transactions
are atomic: nothing opens), the agent's next rounds retry as for any failure,
and the call answers `ServiceUnavailable` saying that the change is stored
and not yet in force. The agent loop asks the control plane for the model
(`Agent.model_source`), so a document saved by `lab up` or `nftsg apply`
(revision moved under us) is loaded here once and enforced by the loop.

Read actions the model does not answer (DescribeNetworkInterfaces,
DescribeInstances) are answered here from the model's network.
"""

from __future__ import annotations

import gc
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from nftsg.translators.actions import Change, Model
from nftsg.translators.compiler import DeniedLog
from nftsg.translators.diff import diff_programs
from nftsg.translators.errors import EcsError
from nftsg.translators.incremental import CompileCache, compile_vpc_cached
from nftsg.translators.model import Topology
from nftsg.translators.network import GroupPeer, Network
from nftsg.translators.nft import Program
from nftsg.translators.quotas import Quotas

from .conntrack import Conntracker, as_evaluator_flow
from .datastore import Conflict, Datastore, SqliteDatastore, replay
from .reconcile import SyncFailed, still_allowed

log = logging.getLogger(__name__)

DEFAULT_CHECKPOINT_EVERY = 1000


class CachedCompile:
    """The reconciler's compile function, keeping one `CompileCache` per VPC."""

    def __init__(
        self, layout: Any, counters: bool = False, denied_log: DeniedLog | None = None
    ) -> None:
        self.layout = layout
        self.counters = counters
        self.denied_log = denied_log
        self.caches: dict[str, CompileCache] = {}

    def __call__(self, network: Network, vpc_id: str, table: str, ct_mark_bit: int) -> Program:
        cache = self.caches.setdefault(vpc_id, CompileCache())
        try:
            return compile_vpc_cached(
                network,
                vpc_id,
                cache,
                table,
                ct_mark_bit,
                layout=self.layout,
                counters=self.counters,
                denied_log=self.denied_log,
            )
        except BaseException:
            self.caches.pop(vpc_id, None)
            raise


@dataclass
class CallStats:
    """What the last accepted mutation cost (for the benchmark and the logs)."""

    action: str = ""
    revision: int = 0
    perform_ms: float = 0.0
    persist_ms: float = 0.0
    enforce_ms: float = 0.0
    commands: dict[str, int] = field(default_factory=dict)
    flows_judged: int = 0
    flows_changed: int = 0
    # Waiting for the store's fsync after enforcing (the part it did not overlap).
    sync_wait_ms: float = 0.0


def _stored() -> None:
    """A store whose append is durable when it returns: nothing to wait for."""


def affected_enis(old: Network, new: Network, change: Change) -> set[str]:
    """ENIs whose flows the change can give another verdict: the ENIs it names, the
    members (before and after) of the groups it changed, and, where a group's
    members changed, the members of the groups whose rules reference it."""
    enis = set(change.enis)
    for gid in change.groups | change.members_changed:
        enis.update(old.members(gid))
        enis.update(new.members(gid))
    if change.members_changed:
        for group in new.groups.values():
            if any(
                isinstance(r.peer, GroupPeer) and r.peer.group_id in change.members_changed
                for r in group.rules
            ):
                enis.update(new.members(group.group_id))
    return enis


def _collect_frozen() -> None:
    """One full collection of everything, frozen or not (garbage cycles frozen by
    `gc.freeze` are only found so), then all of it frozen again."""
    gc.unfreeze()
    gc.collect()
    gc.freeze()


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class ControlPlane:
    """`api_seam.ControlPlane` over the agent (agent/daemon.py) and a `Datastore`."""

    def __init__(
        self,
        agent: Any,
        datastore: Datastore,
        *,
        checkpoint_every: int = DEFAULT_CHECKPOINT_EVERY,
        clock: Callable[[], str] = _now,
        conntracker: Callable[[], Conntracker] | None = Conntracker,
        quotas: Quotas | None = None,
    ) -> None:
        self.agent = agent
        self.datastore = datastore
        self.checkpoint_every = checkpoint_every
        self.quotas = quotas  # None: ECS's defaults (translators/quotas.py)
        self.clock = clock
        self.model: Model | None = None
        self.revision = 0
        self.digest = ""
        self.journal_length = 0
        self.last = CallStats()
        self._ct_factory = conntracker
        self._ct: Conntracker | None = None
        self.compile = CachedCompile(
            agent.reconciler.layout, agent.reconciler.counters, agent.reconciler.denied_log
        )
        agent.reconciler.compile_program = self.compile
        agent.model_source = self.current

    # -- the model -----------------------------------------------------------------

    def current(self) -> tuple[int, Network, str, Topology] | None:
        """The agent loop's model source: (revision, network, digest, topology) or None."""
        with self.agent.lock:
            self._refresh()
            if self.model is None:
                return None
            return self.revision, self.model.network, self.digest, self.model.topology

    def _refresh(self) -> None:
        """Load the stored model if the store moved past ours (a saved document)."""
        if self.model is not None and self.datastore.revision() == self.revision:
            return
        snapshot = self.datastore.load()
        if snapshot is None:
            self.model = None
            return
        model = replay(snapshot, self.quotas, consume=True)  # the document is not kept
        self.model, self.revision, self.digest = model, snapshot.head, snapshot.head_digest
        self.journal_length = len(snapshot.journal)
        log.info(
            "model of revision %d loaded (document %d + %d calls)",
            self.revision,
            snapshot.revision,
            len(snapshot.journal),
        )
        if snapshot.journal:
            self.checkpoint()
        gc.freeze()

    def checkpoint(self) -> None:
        """Fold the journal into a document of the current revision."""
        if self.model is None or not self.journal_length:
            return
        started = time.perf_counter()
        if self.datastore.checkpoint(self.revision, self.model):
            log.info(
                "checkpoint: revision %d stored as a document (%d calls folded, %.0f ms)",
                self.revision,
                self.journal_length,
                (time.perf_counter() - started) * 1000,
            )
        self.journal_length = 0
        _collect_frozen()  # rare and slow already: the one full walk of the heap

    # -- one call --------------------------------------------------------------------

    def call(self, action: str, params: dict[str, Any], request_id: str) -> dict[str, Any]:
        with self.agent.lock:
            self._refresh()
            model = self.model
            if model is None:
                raise EcsError(
                    "ServiceUnavailable",
                    "The agent has no model yet: start a lab (nftsg lab up FILE) or apply one.",
                )
            local = _LOCAL_READS.get(action)
            if local is not None:
                return local(model.network, params)
            t0 = time.perf_counter()
            now = self.clock()  # stored with the call: a replay performs it at the same time
            new, outcome = model.perform(action, params, now=now)
            if new is model:  # a read, or a call that changes nothing
                return outcome.response
            t1 = time.perf_counter()
            previous = self.revision
            # Stored at once; the fsync (when the store can defer it) overlaps the
            # kernel commit and is waited for before the answer.
            durable: Callable[[], None] = _stored
            try:
                deferred = getattr(self.datastore, "append_deferred", None)
                if deferred is not None:
                    mutation, durable = deferred(previous, action, params, now)
                else:
                    mutation = self.datastore.append(previous, action, params, now)
            except Conflict as exc:
                log.warning("call %s (RequestId %s) not stored: %s", action, request_id, exc)
                self.model = None  # reload on the next call
                raise EcsError(
                    "ServiceUnavailable",
                    "The stored model changed during the call; nothing was changed, retry.",
                ) from None
            t2 = time.perf_counter()
            self.model, self.revision, self.digest = new, mutation.revision, mutation.digest
            self.journal_length += 1
            stats = CallStats(action, mutation.revision, (t1 - t0) * 1e3, (t2 - t1) * 1e3)
            failures = self._enforce(model.network, new.network, outcome.change, previous, stats)
            if new.topology.bindings != model.topology.bindings:
                self._rebind(new)
            stats.enforce_ms = (time.perf_counter() - t2) * 1e3
            t3 = time.perf_counter()
            try:
                durable()
            except OSError as exc:
                log.error("call %s (RequestId %s) not made durable: %s", action, request_id, exc)
                self.last = stats
                raise EcsError(
                    "ServiceUnavailable",
                    f"The change (revision {mutation.revision}) is in force but the state "
                    f"store could not write it to disk: {exc}",
                ) from None
            stats.sync_wait_ms = (time.perf_counter() - t3) * 1e3
            self.last = stats
            if self.journal_length >= self.checkpoint_every:
                self.checkpoint()
            # What the call left alive (the new model, the compile cache, the program
            # in force) joins the permanent generation: no later collection walks it.
            # O(1); a call leaves no cyclic garbage to lose (docs/dataplane.md
            # "Per-change cost"), and each checkpoint collects the frozen heap once.
            gc.freeze()
        if failures:
            raise EcsError(
                "ServiceUnavailable",
                f"The change is stored (revision {mutation.revision}) but not yet in force in "
                f"{', '.join(sorted(failures))}: the rules in force before it stay and the "
                "agent retries. " + "; ".join(failures[ns] for ns in sorted(failures)),
            )
        return outcome.response

    def _rebind(self, model: Any) -> None:
        """Attach/DetachNetworkInterface: host mode plugs or gives back the interfaces
        in the loop's next round (fail closed: a port is plugged only into a router in
        force for its ENI)."""
        host_ports = self.agent.host_ports
        if host_ports is not None:
            host_ports.set_model(model.network, model.topology)

    # -- the kernel --------------------------------------------------------------------

    def _enforce(
        self,
        old: Network,
        network: Network,
        change: Change | None,
        previous: int,
        stats: CallStats,
    ) -> dict[str, str]:
        """Bring the touched routers to the new model; the others just move to the new
        revision. Returns namespace -> why it is not in force."""
        agent = self.agent
        if agent.network is None or agent.revision != previous:
            # The loop has not loaded the previous model yet; it loads this one.
            return {}
        agent.revision, agent.network = self.revision, network
        agent._document_digest = self.digest
        vpcs = change.vpcs if change is not None else frozenset()
        failures: dict[str, str] = {}
        for namespace, router in sorted(agent.routers.items()):
            if router.vpc_id not in vpcs:
                if router.revision == previous:
                    router.revision = self.revision  # its program is unchanged
                    router.recorded = False
                continue
            if (
                router.revision != previous
                or router.unjudged
                or namespace not in agent.reconciler.applied
            ):
                # Failing or not yet built: the loop's retry syncs it to this model.
                failures[namespace] = router.last_error or "the router is not in force yet"
                continue
            try:
                cut = self._apply(namespace, router.vpc_id, old, network, change, stats)
            except SyncFailed as exc:
                agent._router_failed(namespace, router, exc, agent.clock())
                failures[namespace] = str(exc)
                continue
            router.revision = self.revision
            router.generation = None
            router.recorded = False
            agent.counters["syncs"] += 1
            if cut is not None:
                agent._after_judging(namespace, router, {namespace: cut}, agent.clock())
                failures[namespace] = f"tracked flows not judged yet: {cut}"
        return failures

    def _apply(
        self,
        namespace: str,
        vpc_id: str,
        old: Network,
        network: Network,
        change: Change | None,
        stats: CallStats,
    ) -> str | None:
        """Compile, diff and apply one router; judge the affected flows. Returns None,
        or the error of judging the flows (the commit stays)."""
        rec = self.agent.reconciler
        try:
            program = rec.compile_program(network, vpc_id, rec.table, rec.ct_mark_bit)
        except Exception as exc:
            rec.applied.pop(namespace, None)
            raise SyncFailed(namespace, "compile", exc) from exc
        try:
            commands = diff_programs(rec.applied[namespace], program)
            if commands:
                if rec.hits is not None:
                    rec.read_counters_before_diff(
                        namespace, rec.applied[namespace], program, commands
                    )
                rec.backend.apply(namespace, commands)
        except Exception as exc:
            rec.applied.pop(namespace, None)
            raise SyncFailed(namespace, "apply", exc) from exc
        rec.applied[namespace] = program
        stats.commands[namespace] = len(commands)
        if not commands or change is None or rec.prune_flows is None:
            return None
        try:
            self._judge(namespace, vpc_id, old, network, change, stats)
        except Exception as exc:
            self._close_ct()
            log.error("judging the tracked flows of %s failed, will retry: %s", namespace, exc)
            return f"{type(exc).__name__}: {exc}"
        return None

    def _judge(
        self,
        namespace: str,
        vpc_id: str,
        old: Network,
        network: Network,
        change: Change,
        stats: CallStats,
    ) -> None:
        enis = affected_enis(old, network, change)
        if not enis or self._ct_factory is None:
            return
        addresses = {
            str(a)
            for e in enis
            for net in (old, network)
            if e in net.enis
            for a in net.enis[e].addresses
        }
        if self._ct is None:
            self._ct = self._ct_factory()
        ct = self._ct
        bit = self.agent.reconciler.ct_mark_bit
        changes = []
        for entry in ct.list_flows(namespace):
            if entry.src not in addresses and entry.dst not in addresses:
                continue
            stats.flows_judged += 1
            revoked = bool(entry.mark & bit)
            if still_allowed(network, vpc_id, as_evaluator_flow(entry)) == revoked:
                changes.append((entry, not revoked))
        if changes:
            ct.set_mark_bit(namespace, changes, bit)
            stats.flows_changed += len(changes)
            log.info(
                "%d flow(s) cut, %d revived in %s",
                sum(on for _, on in changes),
                sum(not on for _, on in changes),
                namespace,
            )

    def _close_ct(self) -> None:
        if self._ct is not None:
            try:
                self._ct.close()
            finally:
                self._ct = None

    def close(self) -> None:
        with self.agent.lock:
            self._close_ct()
            try:
                self.checkpoint()
            except Exception as exc:  # the journal is durable: the next start folds it
                log.warning("checkpoint at stop failed: %s", exc)


# -- reads the model does not answer ------------------------------------------------


def _ids(params: dict[str, Any], name: str) -> set[str]:
    value = params.get(name)
    if value is None:
        return set()
    if isinstance(value, str):
        value = value.strip()
        if value.startswith("["):
            import json

            try:
                return {str(x) for x in json.loads(value)}
            except ValueError:
                raise EcsError("InvalidParameter", f"{name} is not a JSON list") from None
        return {value} if value else set()
    return {str(x) for x in value}


def describe_network_interfaces(network: Network, params: dict[str, Any]) -> dict[str, Any]:
    wanted = _ids(params, "NetworkInterfaceId")
    group = params.get("SecurityGroupId")
    instance = params.get("InstanceId")
    vpc = params.get("VpcId")
    rows = []
    for eni in sorted(network.enis.values(), key=lambda e: e.eni_id):
        if wanted and eni.eni_id not in wanted:
            continue
        if group and group not in eni.group_ids:
            continue
        if instance and eni.instance_id != instance:
            continue
        if vpc and eni.vpc_id != vpc:
            continue
        v4 = [str(a) for a in eni.addresses if a.version == 4]
        v6 = [str(a) for a in eni.addresses if a.version == 6]
        rows.append(
            {
                "NetworkInterfaceId": eni.eni_id,
                "InstanceId": eni.instance_id or "",
                "VpcId": eni.vpc_id,
                "Status": "InUse",
                "Type": "Primary" if getattr(eni, "primary", False) else "Secondary",
                "PrivateIpAddress": v4[0] if v4 else "",
                "PrivateIpSets": {
                    "PrivateIpSet": [
                        {"PrivateIpAddress": a, "Primary": i == 0} for i, a in enumerate(v4)
                    ]
                },
                "Ipv6Sets": {"Ipv6Set": [{"Ipv6Address": a} for a in v6]},
                "SecurityGroupIds": {"SecurityGroupId": list(eni.group_ids)},
            }
        )
    return {
        "TotalCount": len(rows),
        "PageNumber": 1,
        "PageSize": len(rows),
        "NetworkInterfaceSets": {"NetworkInterfaceSet": rows},
    }


def describe_instances(network: Network, params: dict[str, Any]) -> dict[str, Any]:
    wanted = _ids(params, "InstanceIds")
    group = params.get("SecurityGroupId")
    vpc = params.get("VpcId")
    rows = []
    for inst in sorted(network.instances.values(), key=lambda i: i.instance_id):
        enis = [network.enis[e] for e in inst.eni_ids]
        primary = enis[0]
        if wanted and inst.instance_id not in wanted:
            continue
        if group and group not in primary.group_ids:
            continue
        if vpc and primary.vpc_id != vpc:
            continue
        v4 = [str(a) for a in primary.addresses if a.version == 4]
        rows.append(
            {
                "InstanceId": inst.instance_id,
                "InstanceName": inst.instance_id,
                "Status": "Running",
                "RegionId": network.region_id,
                "VpcAttributes": {
                    "VpcId": primary.vpc_id,
                    "PrivateIpAddress": {"IpAddress": v4},
                },
                "SecurityGroupIds": {"SecurityGroupId": list(primary.group_ids)},
                "NetworkInterfaces": {
                    "NetworkInterface": [
                        {
                            "NetworkInterfaceId": e.eni_id,
                            "Type": "Primary" if k == 0 else "Secondary",
                            "PrimaryIpAddress": next(
                                (str(a) for a in e.addresses if a.version == 4), ""
                            ),
                        }
                        for k, e in enumerate(enis)
                    ]
                },
            }
        )
    return {
        "TotalCount": len(rows),
        "PageNumber": 1,
        "PageSize": len(rows),
        "Instances": {"Instance": rows},
    }


_LOCAL_READS: dict[str, Callable[[Network, dict[str, Any]], dict[str, Any]]] = {
    "DescribeNetworkInterfaces": describe_network_interfaces,
    "DescribeInstances": describe_instances,
}


def serve_api(agent: Any, settings: Any, listen: str | None = None) -> Callable[[], None]:
    """Attach a control plane to `agent` and serve the ECS API (TCP and the unix
    socket); returns the function that stops both. A TCP address that cannot be
    bound is logged and the unix socket is served alone: enforcement goes on."""
    from .api_server import api_server_for

    control = ControlPlane(agent, SqliteDatastore(agent.store))
    server = api_server_for(settings, control, listen)
    try:
        server.start()
    except OSError as exc:
        log.error("cannot listen on %s (%s): serving the unix socket only", server.listen, exc)
        server.listen = None
        server.start()

    def stop() -> None:
        server.stop()
        control.close()

    return stop
