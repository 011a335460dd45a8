"""`nftsg agent`: settings, logs and metrics around the daemon's loop (daemon.py).

Order at start: settings (all sources, so a bad one stops it before anything
changes), logging, root and nftables checks, the state directory, the pid
file, then the loop with the metrics server beside it. SIGHUP reads the
settings again (agent_settings.reload) before the daemon rewrites every
router.
"""

from __future__ import annotations

import argparse
import logging
import os
from collections.abc import Callable

from . import agent_settings, logging_setup, preflight
from .settings import METRICS_ADDR_FILE, SettingsError

log = logging.getLogger(__name__)


def run(args: argparse.Namespace) -> int:
    from .daemon import Agent, run_forever
    from .lab_commands import LabCommandError, agent_pid
    from .metrics import MetricsServer

    sources = agent_settings.sources_from_args(args)
    settings = agent_settings.load(sources)
    kind = logging_setup.configure(settings.log_level)
    preflight.require_root()
    preflight.require_nftables()
    preflight.require_writable_state_dir(settings.state_dir)
    other = agent_pid(settings)
    if other is not None and other != os.getpid():
        # Two agents would fight over the same tables.
        raise LabCommandError(
            f"an agent (pid {other}) already serves {settings.state_dir}; stop it first"
        )
    settings.pid_path.write_text(f"{os.getpid()}\n")
    log.info(
        "agent starting: state %s, prefix %s, table %s, settings %s, logs to %s",
        settings.state_dir,
        settings.prefix,
        settings.table,
        settings.config_path or "defaults",
        kind,
    )

    def reload(agent: Agent) -> None:
        fresh = agent_settings.reload(agent.settings, sources)
        for key in ("api_listen", "metrics_listen"):
            if getattr(fresh, key) != getattr(agent.settings, key):
                log.warning("reload: %s changes on restart (the address is bound)", key)
        logging_setup.set_level(fresh.log_level)
        agent.poll_interval = fresh.poll_interval
        agent.verify_every = fresh.verify_interval
        agent.selfcheck_every = fresh.selfcheck_interval
        if fresh.layout is not None:
            agent.reconciler.layout = fresh.layout  # the full rewrite that follows uses it
        agent.settings = fresh
        log.info("reload: settings read from %s", fresh.config_path or "defaults")

    def attach(agent: Agent) -> Callable[[], None]:
        server = MetricsServer(agent)
        addr_file = settings.state_dir / METRICS_ADDR_FILE
        addr_file.unlink(missing_ok=True)  # a stale one from an agent that died
        if settings.metrics_listen:
            try:
                host, port = server.start(settings.metrics_listen)
                # The bound address (port 0 picks one: labs), for `lab up` and scrapers.
                shown = f"[{host}]" if ":" in host else host
                addr_file.write_text(f"{shown}:{port}\n")
            except OSError as exc:
                # Enforcement matters more than metrics: run on without them.
                agent.counters["failures.metrics"] += 1
                log.error(
                    "metrics: cannot listen on %s: %s; running without metrics",
                    settings.metrics_listen,
                    exc.strerror or exc,
                )

        def stop() -> None:
            server.stop()
            addr_file.unlink(missing_ok=True)

        return stop

    return run_forever(settings, reload_settings=reload, attach=attach)


__all__ = ["SettingsError", "run"]
