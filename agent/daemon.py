"""The agent: watches the state store and keeps every VPC router's table in force.

Each round of the loop:
1. asks the store for the revision only (one indexed read): an idle agent loads,
   validates and compiles nothing;
2. when the revision moved, loads and validates the model; a model that cannot
   be loaded keeps the last good one in force and is retried with backoff;
3. syncs every router that is not at the loaded revision, each on its own: a
   failure in one router (compile, nft, anything) is logged with its context,
   leaves that router's last good rules in force, and is retried with backoff
   as a full resync, while the other routers go on being enforced; then, with
   `host_ports` (agent/host_mode.py, on in `run_forever`), plugs the existing
   interfaces of bound ENIs into the routers that enforce them;
4. every `verify_every` seconds, checks each router's table against the applied
   program by content (skipped when the namespace's nftables generation has not
   moved since the last check) and rewrites a drifted table in full at once;
   with `table_events` (agent/events.py, on in `run_forever`), a router whose
   table another process committed to is checked at the start of the next
   round, so a tamper is repaired within a round; the periodic check stays as
   the backstop;
5. every `selfcheck_every` seconds, compares the evaluator's verdict with the
   packet tracer's over the kernel's listing for a sample of tracked flows
   (`selfcheck.py`), logging and counting disagreements.

After a restart a router whose kernel table already holds the program (by
content) is adopted without a rewrite. Stopping the agent (SIGTERM, SIGINT)
leaves the rules in place; only `nftsg lab down` or `nftsg cleanup` removes them. Nothing a round
raises stops the loop: the last resort logs and backs off.
"""

from __future__ import annotations

import logging
import os
import random
import signal
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from nftsg.translators.compiler import DeniedLog
from nftsg.translators.evaluator import Flow
from nftsg.translators.model import Topology, topology_from_data
from nftsg.translators.network import Network
from nftsg.translators.tracer import Ruleset
from nftsg.translators.validate import build_network

from . import netns
from .conntrack import Conntracker, as_evaluator_flow, prune_flows
from .events import TableEvents
from .hits import RuleHits, hits_path
from .host_mode import HostPorts, LinkEvents
from .lab import Lab
from .nflog import RECORDS_FILE, DeniedFlowLog
from .nft_backend import Backend, NftBackend
from .reconcile import Compile, FlowJudge, Reconciler, SyncFailed
from .selfcheck import DEFAULT_SAMPLE, SelfCheck, check_flows, sample
from .settings import Settings
from .store import Store

log = logging.getLogger(__name__)

FlowLister = Callable[[str], list[Flow]]
# (revision, model, digest) of the current model, or None while there is none: the
# control plane's, when one is attached (agent/control.py); else the store's document.
ModelSource = Callable[[], "tuple[int, Network, str, Topology] | None"]
# Sends one sd_notify(3) message ("READY=1", "WATCHDOG=1", "STATUS=..."); a no-op
# when not run by systemd.
Notify = Callable[[str], None]


def systemd_notifier() -> Notify:
    """sd_notify over $NOTIFY_SOCKET when systemd started us, else a no-op."""
    if not os.environ.get("NOTIFY_SOCKET"):
        return lambda _state: None
    import sdnotify

    notifier = sdnotify.SystemdNotifier()
    return lambda state: notifier.notify(state)


def watchdog_interval() -> float | None:
    """How often to feed systemd's watchdog (half of WatchdogSec), or None without one."""
    usec = os.environ.get("WATCHDOG_USEC")
    pid = os.environ.get("WATCHDOG_PID")
    if not usec or (pid and pid != str(os.getpid())):
        return None
    try:
        return max(0.05, int(usec) / 2e6)
    except ValueError:
        return None


def list_tracked_flows(namespace: str) -> list[Flow]:
    """The original tuples of the flows conntrack tracks in `namespace`."""
    with Conntracker() as ct:
        return [as_evaluator_flow(entry) for entry in ct.list_flows(namespace)]


@dataclass(frozen=True)
class Backoff:
    """Delay before retry n (1, 2, ...): doubling from `first` up to `cap`, with jitter so
    that routers failing together do not retry in lockstep."""

    first: float = 0.5
    cap: float = 30.0

    def delay(self, failures: int, rng: random.Random) -> float:
        base = min(self.cap, self.first * (2 ** max(0, failures - 1)))
        return float(base * rng.uniform(0.8, 1.2))


@dataclass
class RouterState:
    """What the agent knows of one router namespace."""

    vpc_id: str
    revision: int | None = None  # the model revision in force there; None: unknown
    failures: int = 0  # consecutive failures of the current attempt
    retry_at: float = 0.0
    last_error: str = ""
    drifted: bool = False  # found different by content: rewrite, do not adopt
    unjudged: bool = False  # committed, but the tracked flows still wait to be judged
    recorded: bool = True  # the store knows the revision in force
    generation: int | None = None  # nft generation when last found equal by content
    # Its namespace did not exist at the last attempt: no port can be plugged into
    # it, so it has nothing to enforce yet and does not hold back READY.
    absent: bool = False


class Agent:
    def __init__(
        self,
        settings: Settings,
        *,
        backend: Backend | None = None,
        store: Store | None = None,
        namespace_exists: Callable[[str], bool] = netns.exists,
        judge_flows: FlowJudge | None = prune_flows,
        list_flows: FlowLister | None = list_tracked_flows,
        compile_program: Compile | None = None,
        poll_interval: float = 0.05,
        verify_every: float = 5.0,
        selfcheck_every: float = 60.0,
        selfcheck_sample: int = DEFAULT_SAMPLE,
        backoff: Backoff | None = None,
        clock: Callable[[], float] = time.monotonic,
        notify: Notify | None = None,
        watchdog_every: float | None = None,
        table_events: TableEvents | None = None,
        host_ports: HostPorts | None = None,
    ) -> None:
        self.settings = settings
        self.store = store if store is not None else Store(settings.db_path)
        self.backend = backend or NftBackend()
        self.lab = Lab(settings.prefix)
        self.poll_interval = poll_interval
        self.verify_every = verify_every
        self.selfcheck_every = selfcheck_every
        self.selfcheck_sample = selfcheck_sample
        self.backoff = backoff or Backoff()
        self.clock = clock
        self.list_flows = list_flows
        self.stop_event = threading.Event()
        # Set by SIGHUP: re-read settings (`on_reload`) and rewrite every router.
        self.reload_event = threading.Event()
        self.on_reload: Callable[[], None] | None = None
        self.notify: Notify = notify or (lambda _state: None)
        self.watchdog_every = watchdog_every
        self.ready = False
        # Commits by other processes in the routers' namespaces (agent/events.py):
        # those routers are checked by content at the start of the next round.
        self.table_events = table_events
        # Host mode (agent/host_mode.py): bound ENIs' existing interfaces, plugged
        # into a router only once its rules for them are in force.
        self.host_ports = host_ports
        # Called after each router sync with its kind (full, diff, adopted,
        # failed) and seconds: the metrics' latency histogram (metrics.py).
        self.on_sync: Callable[[str, float], None] | None = None
        # Held for each round; the control plane (agent/control.py) holds it for
        # each API call, so that the two never touch the kernel at once.
        self.lock = threading.RLock()
        self.model_source: ModelSource | None = None
        self.reconciler = Reconciler(
            self.backend,
            self.lab.router_ns,
            table=settings.table,
            prune_flows=judge_flows,
            namespace_exists=namespace_exists,
            compile_program=compile_program,
            ct_mark_bit=settings.ct_mark_bit,
            layout=settings.layout,
            counters=settings.rule_counters,
            hits=RuleHits(hits_path(settings.state_dir)) if settings.rule_counters else None,
            denied_log=_denied_log(settings),
        )
        # Denied-flow logs (agent/nflog.py): a reader per router namespace, started
        # once the router's rules are in force; None when no group is logged.
        self.denied: DeniedFlowLog | None = None
        self._denied_retry: dict[str, float] = {}
        if settings.log_denied_groups:
            self.denied = DeniedFlowLog(
                settings.log_denied_nflog_group,
                settings.log_denied_records_rate,
                settings.state_dir / RECORDS_FILE if settings.log_denied_file else None,
                lambda ns: (self.network, self.reconciler.applied.get(ns)),
            )
        self.revision: int | None = None  # the loaded model's revision
        self.network: Network | None = None
        self.routers: dict[str, RouterState] = {}
        # Counts of what happened (syncs, failures by step, drift repairs,
        # self-check disagreements...): logged now, metrics later.
        self.counters: Counter[str] = Counter()
        self.last_selfcheck: dict[str, SelfCheck] = {}
        self._rng = random.Random()
        self._load_failures = 0
        self._load_retry_at = 0.0
        self._failed_revision: int | None = None
        self._document_digest = ""
        self._store_empty = False  # nothing stored yet: nothing to enforce
        self._next_verify = clock() + verify_every
        self._next_selfcheck = clock() + selfcheck_every
        self._next_counters = clock()
        # Ruleset objects of kernel listings, by namespace and generation: the
        # tracer's parse of a large table is reused while the table is unchanged.
        self._rulesets: dict[str, tuple[int, Ruleset]] = {}

    # -- one round -----------------------------------------------------------------

    def step(self) -> bool:
        """One round. Returns True when every router is in force at the stored revision."""
        now = self.clock()
        self._load(now)
        if self.network is None:
            return self._store_empty
        network = self.network
        self._check_changed_tables()
        in_force = self._sync_routers(network, now)
        self._plug_ports()
        self._watch_denied()
        if now >= self._next_verify:
            self._next_verify = now + self.verify_every
            self.verify()
        if now >= self._next_selfcheck:
            self._next_selfcheck = now + self.selfcheck_every
            self.selfcheck()
        if self.reconciler.hits is not None and now >= self._next_counters:
            self._next_counters = now + self.settings.rule_counters_interval
            self.read_counters()
        return in_force

    def _watch_denied(self) -> None:
        """Bind the denied-flow reader in every router namespace that holds our rules."""
        if self.denied is None:
            return
        for namespace in set(self.denied.sockets) - set(self.routers):
            self.denied.forget(namespace)
        for namespace in sorted(self.routers):
            if namespace in self.denied.sockets or namespace not in self.reconciler.applied:
                continue
            if self.clock() < self._denied_retry.get(namespace, 0.0):
                continue
            try:
                self.denied.watch(namespace)
            except OSError as exc:
                # Logging is an extra; enforcement goes on without it. Retried at the
                # verify interval, not every round (EBUSY: another reader has the group).
                self._denied_retry[namespace] = self.clock() + self.verify_every
                self._count_failure("denied_log", f"cannot read NFLOG in {namespace}: {exc}")

    def read_counters(self) -> None:
        """Read every router's hit counters into the per-rule totals (agent/hits.py).
        A listing of the whole table: with counting on, one every
        `rule_counters_interval` seconds."""
        hits = self.reconciler.hits
        if hits is None:
            return
        for namespace in sorted(self.reconciler.applied):
            program = self.reconciler.applied[namespace]
            try:
                listing = self.reconciler.counter_listing(namespace)
                if listing is not None:
                    hits.observe(namespace, program, listing)
            except Exception as exc:  # counting never stands in the way of enforcing
                self._count_failure("counters", f"cannot read the counters of {namespace}: {exc}")

    def _load(self, now: float) -> None:
        """Load the stored model if its revision moved (and no earlier failure of that
        revision is still backing off)."""
        try:
            revision = self.store.revision()
        except Exception as exc:
            self._count_failure("store", f"cannot read the stored revision: {exc}")
            return
        self._store_empty = revision == 0
        if revision == 0 or revision == self.revision:
            return
        if revision == self._failed_revision and now < self._load_retry_at:
            return
        try:
            if self.model_source is not None:
                loaded = self.model_source()
            else:
                state = self.store.load()
                loaded = (
                    None
                    if state is None
                    else _built(state.revision, topology_from_data(state.topology), state.digest)
                )
            if loaded is None:
                return
            loaded_revision, network, loaded_digest, topology = loaded
        except Exception as exc:
            self._load_failures += 1
            self._failed_revision = revision
            delay = self.backoff.delay(self._load_failures, self._rng)
            self._load_retry_at = now + delay
            self._count_failure(
                "load",
                f"revision {revision} cannot be loaded, revision {self.revision} stays "
                f"in force; retry in {delay:.1f} s: {type(exc).__name__}: {exc}",
            )
            return
        self._load_failures = 0
        self._failed_revision = None
        self.revision, self.network = loaded_revision, network
        self._document_digest = loaded_digest
        if self.host_ports is not None:
            self.host_ports.set_model(network, topology)
        wanted = {self.lab.router_ns(v): v for v in network.vpcs}
        for namespace in set(self.routers) - set(wanted):
            del self.routers[namespace]
            self.reconciler.forget(namespace)
        for namespace, vpc_id in wanted.items():
            router = self.routers.setdefault(namespace, RouterState(vpc_id))
            if router.failures:
                router.retry_at = now  # a new model is a new attempt
        log.info("revision %s loaded", loaded_revision)

    def _check_changed_tables(self) -> None:
        """Routers whose table another process committed to since the last round are
        checked by content now; a drifted one is rewritten in this same round."""
        if self.table_events is None:
            return
        self.table_events.watch(self.routers)
        changed = self.table_events.changed() & set(self.routers)
        if changed:
            self.counters["drift_checks.event"] += 1
            self.verify(sorted(changed))

    def _plug_ports(self) -> None:
        if self.host_ports is None:
            return
        in_force = {r.vpc_id for r in self.routers.values() if r.revision == self.revision}
        try:
            self.host_ports.converge(in_force)
        except Exception as exc:
            self._count_failure("host_ports", f"host mode: {type(exc).__name__}: {exc}")

    def _sync_routers(self, network: Network, now: float) -> bool:
        in_force = True
        for namespace, router in sorted(self.routers.items()):
            if router.revision == self.revision and not router.unjudged:
                if not router.recorded:
                    self._record(namespace, router)
                continue
            if now < router.retry_at:
                in_force = in_force and router.revision == self.revision
                continue
            if router.revision == self.revision:  # only the flows are left to judge
                report = self.reconciler.judge_flows(network, router.vpc_id)
                self.counters["flows_cut"] += report.flows_cut.get(namespace, 0)
                self._after_judging(namespace, router, report.unjudged, now)
                continue
            started = time.perf_counter()
            try:
                report = self.reconciler.sync_namespace(
                    network, router.vpc_id, adopt=not router.drifted
                )
            except SyncFailed as exc:
                self._observe_sync("failed", started)
                self._router_failed(namespace, router, exc, now)
                in_force = False
                continue
            if namespace not in report.commands:  # the namespace does not exist (yet)
                router.absent = True
                continue
            router.absent = False
            kind = (
                "adopted"
                if report.adopted.get(namespace)
                else "full"
                if report.full[namespace]
                else "diff"
            )
            self._observe_sync(kind, started)
            self.counters["syncs"] += 1
            self.counters["flows_cut"] += report.flows_cut.get(namespace, 0)
            router.revision = self.revision
            router.failures = 0
            router.drifted = False
            router.last_error = ""
            router.generation = None  # our commit moved it: check content next time
            router.recorded = False
            log.info(
                "revision %s in force in %s: %s, %d commands, %d flows cut",
                self.revision,
                namespace,
                kind,
                report.commands[namespace],
                report.flows_cut.get(namespace, 0),
            )
            self._after_judging(namespace, router, report.unjudged, now)
            self._record(namespace, router)
        return in_force and all(
            r.revision == self.revision or r.absent for r in self.routers.values()
        )

    def _observe_sync(self, kind: str, started: float) -> None:
        if self.on_sync is not None:
            self.on_sync(kind, time.perf_counter() - started)

    def _after_judging(
        self, namespace: str, router: RouterState, unjudged: dict[str, str], now: float
    ) -> None:
        if namespace in unjudged:
            router.unjudged = True
            router.failures += 1
            router.retry_at = now + self.backoff.delay(router.failures, self._rng)
            router.last_error = unjudged[namespace]
            self.counters["failures.flows"] += 1
        else:
            if router.unjudged:
                log.info("tracked flows of %s judged after %d retries", namespace, router.failures)
            router.unjudged = False
            router.failures = 0

    def _router_failed(
        self, namespace: str, router: RouterState, exc: SyncFailed, now: float
    ) -> None:
        router.failures += 1
        router.revision = None  # forgotten by the reconciler: a full resync follows
        delay = self.backoff.delay(router.failures, self._rng)
        router.retry_at = now + delay
        router.last_error = str(exc)
        self.counters[f"failures.{exc.step}"] += 1
        log.error(
            "router %s (%s): %s; its last good rules stay in force; failure %d, "
            "full resync in %.1f s",
            namespace,
            router.vpc_id,
            exc,
            router.failures,
            delay,
        )

    def _record(self, namespace: str, router: RouterState) -> None:
        """Tell the store which revision is in force (what `lab up` waits for)."""
        try:
            self.store.record_applied(namespace, router.revision or 0, self._document_digest)
            router.recorded = True
        except Exception as exc:
            self._count_failure("store", f"cannot record revision in force for {namespace}: {exc}")

    def _count_failure(self, step: str, message: str) -> None:
        self.counters[f"failures.{step}"] += 1
        log.error("%s", message)

    # -- checks ----------------------------------------------------------------------

    def _generation(self, namespace: str) -> int | None:
        probe = getattr(self.backend, "generation", None)
        if probe is None:
            return None
        try:
            value = probe(namespace)
        except Exception as exc:
            log.debug("no nftables generation for %s: %s", namespace, exc)
            return None
        return value if isinstance(value, int) else None

    def verify(self, namespaces: list[str] | None = None) -> list[str]:
        """Check every router in force (or those in `namespaces`) by content; drifted ones
        are rewritten in full by the next sync (at once: drift is not a failure to back
        off from)."""
        drifted = []
        for namespace, router in sorted(self.routers.items()):
            if namespaces is not None and namespace not in namespaces:
                continue
            if router.revision is None or namespace not in self.reconciler.applied:
                continue
            generation = self._generation(namespace)
            if generation is not None and generation == router.generation:
                continue
            try:
                found = self.reconciler.verify([namespace])
            except Exception as exc:
                self._count_failure("verify", f"cannot verify {namespace}: {exc}")
                found = []
                generation = None
            if found:
                drifted.append(namespace)
                self.counters["drift_repairs"] += 1
                router.revision = None
                router.drifted = True
                router.generation = None
            else:
                router.generation = generation
        return drifted

    def selfcheck(self, namespaces: list[str] | None = None) -> list[SelfCheck]:
        """Evaluator vs tracer over each router's kernel listing, on a sample of its
        tracked flows. Disagreements are logged and counted, never acted on."""
        if self.network is None or self.list_flows is None:
            return []
        results = []
        for namespace, router in sorted(self.routers.items()):
            if namespaces is not None and namespace not in namespaces:
                continue
            if router.revision is None:
                continue
            try:
                flows = self.list_flows(namespace)
                if not flows:
                    continue
                ruleset = self._ruleset(namespace)
            except Exception as exc:
                self._count_failure("selfcheck", f"self-check of {namespace} failed: {exc}")
                continue
            if ruleset is None:
                continue
            result = check_flows(
                self.network,
                router.vpc_id,
                namespace,
                ruleset,
                sample(flows, self.selfcheck_sample, self._rng),
            )
            self.counters["selfcheck.flows"] += result.checked
            self.counters["selfcheck.disagreements"] += len(result.disagreements)
            for line in result.disagreements:
                log.error(
                    "self-check %s: evaluator and kernel program disagree: %s", namespace, line
                )
            self.last_selfcheck[namespace] = result
            results.append(result)
        return results

    def _ruleset(self, namespace: str) -> Ruleset | None:
        generation = self._generation(namespace)
        cached = self._rulesets.get(namespace)
        if generation is not None and cached is not None and cached[0] == generation:
            return cached[1]
        listing: dict[str, Any] | None = self.reconciler.listing(namespace)
        if listing is None:
            return None
        ruleset = Ruleset(listing)
        if generation is not None:
            self._rulesets[namespace] = (generation, ruleset)
        return ruleset

    # -- the loop ---------------------------------------------------------------------

    def resync_all(self) -> None:
        """Forget what every router holds: each is rewritten in full on the next round."""
        self.reconciler.forget()
        for router in self.routers.values():
            router.revision = None
            router.drifted = True  # rewrite, do not adopt
            router.generation = None
            router.retry_at = 0.0

    def _reload(self) -> None:
        self.reload_event.clear()
        self.notify("RELOADING=1")
        log.info("reload: re-reading settings, rewriting every router")
        if self.on_reload is not None:
            try:
                self.on_reload()
            except Exception as exc:  # keep the old settings
                self._count_failure("reload", f"cannot reload settings, keeping them: {exc}")
        self.resync_all()
        self.ready = False

    def _status(self) -> str:
        failing = sorted(ns for ns, r in self.routers.items() if r.failures)
        text = f"revision {self.revision}: {len(self.routers)} routers"
        return text + (f", failing: {', '.join(failing)}" if failing else ", all in force")

    def run(self) -> None:
        failures = 0
        next_watchdog = self.clock()
        while not self.stop_event.is_set():
            if self.reload_event.is_set():
                self._reload()
            try:
                with self.lock:
                    in_force = self.step()
                failures = 0
                if in_force and not self.ready:
                    # READY only once every router enforces the stored model.
                    self.ready = True
                    self.notify(f"READY=1\nSTATUS={self._status()}")
                if self.watchdog_every is not None and self.clock() >= next_watchdog:
                    # Fed only by a round that finished: a hung loop gets restarted.
                    next_watchdog = self.clock() + self.watchdog_every
                    self.notify(f"WATCHDOG=1\nSTATUS={self._status()}")
            except Exception:
                # Everything expected is handled inside step(); this is the last
                # resort, so that nothing stops enforcement of committed rules.
                failures += 1
                self.counters["failures.unexpected"] += 1
                log.exception("agent round failed unexpectedly; the rules in force stay")
                self.stop_event.wait(self.backoff.delay(failures, self._rng))
            self.stop_event.wait(self.poll_interval)
        self.notify("STOPPING=1")
        log.info("agent stopping; rules stay in place")

    def close(self) -> None:
        if self.denied is not None:
            self.denied.close()
        if self.table_events is not None:
            self.table_events.close()
        if self.host_ports is not None:
            self.host_ports.close()
        self.backend.close()
        self.store.close()


def _denied_log(settings: Settings) -> DeniedLog | None:
    if not settings.log_denied_groups:
        return None
    return DeniedLog(
        frozenset(settings.log_denied_groups),
        settings.log_denied_nflog_group,
        settings.log_denied_rate,
    )


def _built(revision: int, topology: Topology, digest: str) -> tuple[int, Network, str, Topology]:
    return revision, build_network(topology), digest, topology


def run_forever(
    settings: Settings,
    reload_settings: Callable[[Agent], None] | None = None,
    attach: Callable[[Agent], Callable[[], None]] | None = None,
) -> int:
    """Run the agent until SIGTERM/SIGINT. `attach` starts what serves beside the loop
    (metrics, API) and returns how to stop it."""
    agent = Agent(
        settings,
        notify=systemd_notifier(),
        watchdog_every=watchdog_interval(),
        table_events=TableEvents(),
        host_ports=HostPorts(Lab(settings.prefix), events=LinkEvents()),
        poll_interval=settings.poll_interval,
        verify_every=settings.verify_interval,
        selfcheck_every=settings.selfcheck_interval,
    )
    if reload_settings is not None:
        agent.on_reload = lambda: reload_settings(agent)
    detach = attach(agent) if attach is not None else None

    agent_pid = os.getpid()
    from .control import serve_api  # the control plane and the ECS API of this agent

    stop_api = serve_api(agent, settings, settings.api_listen)

    def _stop(signum: int, _frame: object) -> None:
        # pyroute2 forks netns helpers that inherit this handler; only the agent
        # itself stops (and logs) on a signal.
        if os.getpid() != agent_pid:
            os._exit(0)
        log.info("signal %s received", signum)
        agent.stop_event.set()

    def _reload(_signum: int, _frame: object) -> None:
        if os.getpid() == agent_pid:
            agent.reload_event.set()

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    signal.signal(signal.SIGHUP, _reload)
    try:
        agent.run()
    finally:
        stop_api()
        if detach is not None:
            detach()
        agent.close()
    return 0
