"""Prometheus metrics of a running agent, served over HTTP (prometheus-client).

Nothing here changes what the agent does: the daemon keeps its own counters
(`Agent.counters`) and programs (`Reconciler.applied`), and a collector reads
them at scrape time, so a scrape costs the loop nothing. The one thing
measured here is each router sync's latency, by kind (`SyncTimer`, called by
the daemon after each sync).

Served on `metrics_listen` (default 127.0.0.1:9380; "" turns it off). The
names, all prefixed ``nftsg_``:

- ``syncs_total``; ``sync_duration_seconds{kind}`` (histogram; kind is
  ``full``, ``diff``, ``adopted`` or ``failed``)
- ``failures_total{step}`` (store, load, compile, apply, flows, verify,
  selfcheck, reload, metrics, unexpected)
- ``drift_repairs_total``; ``flows_marked_total`` (tracked flows given the
  revocation bit after a change)
- ``selfcheck_flows_total``, ``selfcheck_disagreements_total``
- ``rules_programmed{namespace}``, ``sets_programmed{namespace}``,
  ``set_elements_programmed{namespace}`` (what the agent applied last)
- ``routers{state}`` (in_force, pending, failing), ``revision`` (loaded),
  ``ready`` (1 once every router enforces the stored model)
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from .agent_settings import parse_listen

if TYPE_CHECKING:
    from .daemon import Agent

log = logging.getLogger(__name__)

# Router syncs take from ~1 ms (a set element) to tens of seconds (a cold load of
# 10^4-10^5 rules): buckets span that.
SYNC_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)

# The steps the daemon counts failures of, shown at 0 before the first one.
FAILURE_STEPS = (
    "store",
    "load",
    "compile",
    "apply",
    "flows",
    "verify",
    "selfcheck",
    "reload",
    "metrics",
    "unexpected",
)

# Counters of the daemon exposed one for one (Agent.counters key -> metric).
_PLAIN_COUNTERS = {
    "syncs": ("syncs", "Router syncs that put a revision in force"),
    "drift_repairs": ("drift_repairs", "Router tables found drifted by content and rewritten"),
    "flows_cut": ("flows_marked", "Tracked flows marked revoked after a change"),
    "selfcheck.flows": ("selfcheck_flows", "Tracked flows checked by the self-check"),
    "selfcheck.disagreements": (
        "selfcheck_disagreements",
        "Self-check flows where evaluator and kernel program disagreed",
    ),
}


class AgentCollector(Collector):
    """Reads a live Agent's counters and programs at scrape time."""

    def __init__(self, agent: Agent) -> None:
        self.agent = agent

    def collect(self) -> Iterable[Metric]:
        # dict() of a dict copies under the GIL: no torn reads from the agent's thread.
        counters = dict(self.agent.counters)
        for key, (name, doc) in _PLAIN_COUNTERS.items():
            family = CounterMetricFamily(f"nftsg_{name}", doc)
            family.add_metric([], float(counters.get(key, 0)))
            yield family
        failures = CounterMetricFamily(
            "nftsg_failures", "Failures by the step that failed", labels=["step"]
        )
        by_step = dict.fromkeys(FAILURE_STEPS, 0)
        for key, value in counters.items():
            if key.startswith("failures."):
                by_step[key.removeprefix("failures.")] = value
        for step, value in sorted(by_step.items()):
            failures.add_metric([step], float(value))
        yield failures
        yield from self._programmed()
        yield from self._routers()

    def _programmed(self) -> Iterator[Metric]:
        applied = dict(self.agent.reconciler.applied)
        rules = GaugeMetricFamily(
            "nftsg_rules_programmed", "Rules in the table applied last", labels=["namespace"]
        )
        sets = GaugeMetricFamily(
            "nftsg_sets_programmed", "Sets and maps in the table applied last", labels=["namespace"]
        )
        elements = GaugeMetricFamily(
            "nftsg_set_elements_programmed",
            "Set and map elements in the table applied last",
            labels=["namespace"],
        )
        for namespace, program in sorted(applied.items()):
            rules.add_metric([namespace], float(sum(len(c.rules) for c in program.chains)))
            sets.add_metric([namespace], float(len(program.sets) + len(program.maps)))
            elements.add_metric([namespace], float(program.element_count()))
        yield rules
        yield sets
        yield elements

    def _routers(self) -> Iterator[Metric]:
        agent = self.agent
        states = {"in_force": 0, "pending": 0, "failing": 0}
        for router in list(agent.routers.values()):
            if router.failures:
                states["failing"] += 1
            elif router.revision is not None and router.revision == agent.revision:
                states["in_force"] += 1
            else:
                states["pending"] += 1
        routers = GaugeMetricFamily("nftsg_routers", "VPC routers by state", labels=["state"])
        for state, count in states.items():
            routers.add_metric([state], float(count))
        yield routers
        revision = GaugeMetricFamily("nftsg_revision", "Revision of the loaded model (0: none)")
        revision.add_metric([], float(agent.revision or 0))
        yield revision
        ready = GaugeMetricFamily(
            "nftsg_ready", "1 once every router enforces the stored model (READY=1)"
        )
        ready.add_metric([], 1.0 if agent.ready else 0.0)
        yield ready


class SyncTimer:
    """The sync latency histogram; `observe` is what the daemon calls after a sync."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.histogram = Histogram(
            "nftsg_sync_duration_seconds",
            "Time of one router sync (compile, diff, commit, judge flows) by kind",
            ["kind"],
            registry=registry,
            buckets=SYNC_BUCKETS,
        )

    def observe(self, kind: str, seconds: float) -> None:
        self.histogram.labels(kind=kind).observe(seconds)


class MetricsServer:
    """The registry of one agent and, when an address is given, its HTTP server."""

    def __init__(self, agent: Agent) -> None:
        self.registry = CollectorRegistry()
        self.registry.register(AgentCollector(agent))
        self.timer = SyncTimer(self.registry)
        agent.on_sync = self.timer.observe
        self._server: Any = None
        self._thread: threading.Thread | None = None
        self.address: tuple[str, int] | None = None

    def start(self, listen: str) -> tuple[str, int]:
        """Serve on HOST:PORT (port 0 picks a free one); returns the bound address.
        Raises OSError when the address cannot be bound."""
        host, port = parse_listen(listen)
        server, thread = start_http_server(port, addr=host, registry=self.registry)
        self._server, self._thread = server, thread
        bound = server.server_address
        self.address = (str(bound[0]), int(bound[1]))
        log.info("metrics on http://%s/metrics", listen.rpartition(":")[0] + f":{bound[1]}")
        return self.address

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
