"""The agent: watches the state store and keeps every VPC router's table in force.

Loop: when the stored revision changes, rebuild the network and sync (diffs
only); every `verify_every` seconds, check the kernel still holds what was
applied and rewrite whatever drifted. Any failure keeps the last good rules
(nft transactions are atomic), is logged with context, and forces a full
resync on the next round. Stopping the agent (SIGTERM, SIGINT) leaves the
rules in place; only `nftsg lab down` removes them.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from collections.abc import Callable

from nftsg.translators.errors import EcsError
from nftsg.translators.model import topology_from_data
from nftsg.translators.network import Network
from nftsg.translators.validate import build_network

from . import netns
from .conntrack import prune_flows
from .lab import Lab
from .nft_backend import Backend, NftBackend, NftError
from .reconcile import Reconciler
from .settings import Settings
from .store import Store

log = logging.getLogger(__name__)


class Agent:
    def __init__(
        self,
        settings: Settings,
        *,
        backend: Backend | None = None,
        poll_interval: float = 0.05,
        verify_every: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.settings = settings
        self.store = Store(settings.db_path)
        self.backend = backend or NftBackend()
        self.lab = Lab(settings.prefix)
        self.poll_interval = poll_interval
        self.verify_every = verify_every
        self.clock = clock
        self.stop_event = threading.Event()
        self.reconciler = Reconciler(
            self.backend,
            self.lab.router_ns,
            table=settings.table,
            prune_flows=prune_flows,
            namespace_exists=netns.exists,
            ct_mark_bit=settings.ct_mark_bit,
        )
        self.revision: int | None = None
        self.network: Network | None = None

    def load(self) -> tuple[int, Network] | None:
        state = self.store.load()
        if state is None:
            return None
        return state.revision, build_network(topology_from_data(state.topology))

    def step(self) -> bool:
        """One round: sync if the store moved on. Returns True when in force at the revision."""
        loaded = self.load()
        if loaded is None:
            return False
        revision, network = loaded
        if revision == self.revision:
            return True
        report = self.reconciler.sync(network)
        for namespace, digest in report.digests.items():
            self.store.record_applied(namespace, revision, digest)
        log.info(
            "revision %s in force: %s",
            revision,
            ", ".join(
                f"{ns}: {'full' if report.full[ns] else 'diff'} {n} cmds, "
                f"{report.flows_cut.get(ns, 0)} flows cut"
                for ns, n in sorted(report.commands.items())
            )
            or "no VPC",
        )
        self.revision, self.network = revision, network
        return True

    def verify(self) -> None:
        if self.reconciler.verify():
            self.revision = None  # rewrite the drifted namespaces in full on the next step

    def run(self) -> None:
        self.store.set_setting("agent_pid", str(os.getpid()))
        next_verify = self.clock() + self.verify_every
        while not self.stop_event.is_set():
            try:
                self.step()
                if self.clock() >= next_verify:
                    next_verify = self.clock() + self.verify_every
                    self.verify()
            except (NftError, EcsError) as exc:
                log.error("sync failed, last good rules stay in force: %s", exc)
                self.reconciler.forget()
                self.revision = None
                self.stop_event.wait(0.5)
            self.stop_event.wait(self.poll_interval)
        log.info("agent stopping; rules stay in place")

    def close(self) -> None:
        self.backend.close()
        self.store.close()


def run_forever(settings: Settings) -> int:
    agent = Agent(settings)

    agent_pid = os.getpid()

    def _stop(signum: int, _frame: object) -> None:
        # pyroute2 forks netns helpers that inherit this handler; only the agent
        # itself stops (and logs) on a signal.
        if os.getpid() != agent_pid:
            os._exit(0)
        log.info("signal %s received", signum)
        agent.stop_event.set()

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    try:
        agent.run()
    finally:
        agent.close()
    return 0
