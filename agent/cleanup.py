"""`nftsg cleanup`: remove every namespace and table nftsg made, and nothing else.

Stopping the agent leaves the rules in force (a crash never opens the
firewall); this is the one command that takes them away, for uninstalling or
starting over. What it removes:

1. the agent of the state directory (its pid file names it), so that nothing
   writes the tables again;
2. every named namespace of the lab prefixes (``<prefix>-r-*``, ``-i-*``,
   ``-x-*``; the configured prefix and the one the store recorded) and so every
   link and table in them;
3. the nftsg table (``inet <table>``) in any other namespace the store
   recorded as enforced by this agent;
4. the stored model and the pid file (API keys stay).

Namespaces of other prefixes, other tables, and namespaces the store does not
name are left alone: another nftsg with its own state directory, or anyone
else's tables, are not ours to remove. Checks first (root, nftables, a
writable state directory), then changes.
"""

from __future__ import annotations

import argparse
import json
import logging
import sqlite3
from dataclasses import asdict, dataclass, field
from pathlib import Path

from . import agent_settings, netns, preflight
from .labplan import check_prefix, lab_name_pattern
from .settings import Settings

log = logging.getLogger(__name__)


@dataclass
class CleanupReport:
    agent_stopped: bool = False
    namespaces_removed: list[str] = field(default_factory=list)
    tables_removed: list[str] = field(default_factory=list)  # "<namespace>: inet <table>"
    state_removed: list[str] = field(default_factory=list)


def _stored(settings: Settings) -> tuple[str | None, list[str]]:
    """The lab prefix and the namespaces with an applied revision, from the store.
    Read with sqlite directly: the store must not be created (or migrated) here."""
    if not settings.db_path.exists():
        return None, []
    try:
        db = sqlite3.connect(f"file:{settings.db_path}?mode=ro", uri=True)
    except sqlite3.Error:
        return None, []
    try:
        row = db.execute("SELECT value FROM settings WHERE key = 'prefix'").fetchone()
        namespaces = [r[0] for r in db.execute("SELECT namespace FROM applied")]
    except sqlite3.Error as exc:
        log.warning("cannot read %s: %s; removing by prefix only", settings.db_path, exc)
        return None, []
    finally:
        db.close()
    return (str(row[0]) if row else None), sorted(str(n) for n in namespaces)


def cleanup(settings: Settings, prefixes: list[str] | None = None) -> CleanupReport:
    """Remove what nftsg made for `settings` (see the module docstring)."""
    from .lab_commands import stop_agent
    from .nft_backend import NftBackend

    preflight.require_root()
    preflight.require_nftables()
    if settings.state_dir.exists():
        preflight.require_writable_state_dir(settings.state_dir)

    report = CleanupReport()
    stored_prefix, recorded = _stored(settings)
    wanted = {settings.prefix, *(prefixes or [])}
    if stored_prefix:
        wanted.add(stored_prefix)
    for prefix in wanted:
        check_prefix(prefix)
    report.agent_stopped = stop_agent(settings)

    patterns = [lab_name_pattern(p) for p in sorted(wanted)]
    present = netns.list_namespaces()
    for name in present:
        if any(p.match(name) for p in patterns):
            netns.delete(name)
            report.namespaces_removed.append(name)

    others = [n for n in recorded if n in present and n not in report.namespaces_removed]
    if others:
        backend = NftBackend()
        try:
            for namespace in others:
                if backend.list_table(namespace, "inet", settings.table) is None:
                    continue
                backend.delete_table(namespace, "inet", settings.table)
                report.tables_removed.append(f"{namespace}: inet {settings.table}")
        finally:
            backend.close()

    for path in (
        settings.db_path,
        Path(f"{settings.db_path}-wal"),
        Path(f"{settings.db_path}-shm"),
        settings.pid_path,
    ):
        try:
            path.unlink()
            report.state_removed.append(str(path))
        except FileNotFoundError:
            pass
    return report


def run(args: argparse.Namespace) -> int:
    # The same settings as the agent's (file, environment, options), so that a
    # prefix or table set in /etc/nftsg/agent.yaml is the one cleaned up.
    overrides = {"state_dir": args.state_dir, "prefix": args.prefix, "table": args.table}
    settings = agent_settings.load(agent_settings.sources_from(args.config, overrides))
    report = cleanup(settings, list(args.also_prefix or []))
    if args.json:
        print(json.dumps(asdict(report), indent=2))
    else:
        print(
            f"cleanup: {len(report.namespaces_removed)} namespaces and "
            f"{len(report.tables_removed)} tables removed"
            + (", agent stopped" if report.agent_stopped else "")
            + "; other namespaces and tables untouched"
        )
    return 0


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = sub.add_parser(
        "cleanup",
        help="remove every namespace and table nftsg made (rules stop being enforced)",
        description=(
            "Stop the agent of the state directory and remove every namespace of its lab "
            "prefixes and its table in any other namespace it enforced; other namespaces and "
            "tables stay. Needs root."
        ),
    )
    parser.add_argument(
        "--config", metavar="FILE", help="the agent's settings file (default /etc/nftsg/agent.yaml)"
    )
    parser.add_argument("--state-dir", help="state directory (default /var/lib/nftsg)")
    parser.add_argument("--prefix", help="lab prefix (default nftsg, and the stored one)")
    parser.add_argument(
        "--also-prefix", action="append", metavar="PREFIX", help="another lab prefix to remove"
    )
    parser.add_argument("--table", help="nftables table name (default nftsg)")
    parser.add_argument("--json", action="store_true", help="print what was removed as JSON")
    parser.set_defaults(handler=run)
