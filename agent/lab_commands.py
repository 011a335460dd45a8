"""`nftsg lab up|down|exec` and `nftsg agent`: the lab's life cycle from the command line.

`lab up` creates the VPC router namespaces first, has the agent put the rules
in force there, and only then plugs instances in: no port ever exists in an
unfiltered router. It exits 0 only once every router holds the stored revision.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from nftsg.translators.bindings import bound_eni_ids
from nftsg.translators.errors import EcsError
from nftsg.translators.model import Topology, parse_topology_text, topology_from_data
from nftsg.translators.network import Network
from nftsg.translators.validate import build_network
from pyroute2.netlink.exceptions import NetlinkError

from . import agent_settings, netns
from .documents import read_document_file
from .lab import Lab
from .labplan import LabError
from .netns import NetnsError
from .nft_backend import NftError
from .preflight import PreflightError
from .settings import METRICS_ADDR_FILE, Settings, SettingsError, settings_from_env
from .store import Store, StoreError

log = logging.getLogger(__name__)


class LabCommandError(Exception):
    """A lab command that cannot go on; the message says what to do."""


# Errors that reach the operator as one clear line (exit 2), never a traceback.
OPERATOR_ERRORS: tuple[type[Exception], ...] = (
    LabCommandError,
    LabError,
    NetnsError,
    StoreError,
    NftError,
    SettingsError,
    PreflightError,
)


def require_root() -> None:
    if os.geteuid() != 0:
        raise LabCommandError("needs root (network namespaces and nftables need CAP_NET_ADMIN)")


def require_kernel_features() -> None:
    if not Path("/proc/self/ns/net").exists():
        raise LabCommandError("this kernel has no network namespaces")
    try:
        import nftables  # noqa: F401  (Debian's bindings; see README)
    except ImportError as exc:
        raise LabCommandError(
            "the nftables Python bindings are missing: install Debian's python3-nftables "
            "and link it into the venv (scripts/install.sh does both)"
        ) from exc


def read_topology(path: str) -> tuple[Topology, Network]:
    topology = parse_topology_text(read_document_file(path), source=path)
    return topology, build_network(topology)


def stored_network(store: Store) -> tuple[int, Network] | None:
    from nftsg.translators.model import topology_from_data

    from .datastore import SqliteDatastore, replay

    snapshot = SqliteDatastore(store).load()
    if snapshot is None:
        return None
    if snapshot.journal:  # API calls after the document: the control plane's model
        return snapshot.head, replay(snapshot).network
    return snapshot.revision, build_network(topology_from_data(snapshot.topology))


def running_lab(settings: Settings) -> tuple[Lab, Network]:
    """The lab that `lab up` left, with its stored model (names resolve against it)."""
    loaded = None
    prefix = settings.prefix
    if settings.db_path.exists():
        store = Store(settings.db_path)
        try:
            prefix = store.get_setting("prefix") or settings.prefix
            loaded = stored_network(store)
        finally:
            store.close()
    if loaded is None:
        raise LabCommandError("no lab is up (run `nftsg lab up FILE` first)")
    lab = Lab(prefix)
    lab.set_model(loaded[1])
    return lab, loaded[1]


# -- the background agent --------------------------------------------------
def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False
    if not cmdline:
        # Empty for a zombie, but also for a moment right after Popen() returns,
        # while the new agent is still being exec'd.
        return _running(pid)
    return b"nftsg" in cmdline and b"agent" in cmdline


def agent_pid(settings: Settings) -> int | None:
    try:
        pid = int(settings.pid_path.read_text().strip())
    except (OSError, ValueError):
        return None
    return pid if _pid_alive(pid) else None


def lab_metrics_listen() -> list[str]:
    """The metrics option of a lab's agent: an ephemeral loopback port (the bound address
    is written to the state dir's `metrics.addr`), so that labs running side by side
    each get metrics instead of the second one losing the default port; none when
    the environment or the settings file asks for an address of its own."""
    if agent_settings.env_name("metrics_listen") in os.environ:
        return []
    try:
        if "metrics_listen" in agent_settings._read_file(agent_settings.sources_from(None, {})):
            return []
    except Exception:  # a bad settings file: the agent reports it itself
        return []
    return ["--metrics-listen", "127.0.0.1:0"]


def start_agent(settings: Settings, api_listen: str | None = None) -> int:
    pid = agent_pid(settings)
    if pid is not None:
        return pid
    settings.state_dir.mkdir(parents=True, exist_ok=True)
    with open(settings.log_path, "ab") as logfile:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "nftsg.agent.cli",
                "agent",
                "--state-dir",
                str(settings.state_dir),
                "--prefix",
                settings.prefix,
                "--table",
                settings.table,
                *(["--api-listen", api_listen] if api_listen else []),
                *lab_metrics_listen(),
            ],
            stdin=subprocess.DEVNULL,
            stdout=logfile,
            stderr=logfile,
            start_new_session=True,  # outlives `lab up` and its terminal
            close_fds=True,
        )
    settings.pid_path.write_text(f"{proc.pid}\n")
    return proc.pid


def stop_agent(settings: Settings, timeout: float = 5.0) -> bool:
    pid = agent_pid(settings)
    if pid is None:
        return False
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and _pid_alive(pid):
        time.sleep(0.05)
    if _pid_alive(pid):
        os.kill(pid, signal.SIGKILL)
    try:
        settings.pid_path.unlink()
    except FileNotFoundError:
        pass
    return True


def _running(pid: int) -> bool:
    """The process exists and is not a zombie (no look at its command line: right after
    fork, before exec, a new agent still shows the command line of `lab up`)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    return "\nState:\tZ" not in status


def wait_in_force(
    settings: Settings,
    store: Store,
    lab: Lab,
    network: Network,
    revision: int,
    timeout: float,
    agent: int,
) -> None:
    """Until every VPC router reports `revision` applied, or the agent (pid `agent`)
    dies, or time runs out."""
    namespaces = [lab.router_ns(vpc_id) for vpc_id in network.vpcs]
    deadline = time.monotonic() + timeout
    while True:
        pending = [
            ns for ns in namespaces if (rec := store.applied(ns)) is None or rec.revision < revision
        ]
        if not pending:
            return
        if not _running(agent):
            raise LabCommandError(
                f"the agent exited before enforcing; see {settings.log_path}:\n"
                + _tail(settings.log_path)
            )
        if time.monotonic() > deadline:
            raise LabCommandError(
                f"rules not in force after {timeout:.0f} s in {', '.join(pending)}; "
                f"see {settings.log_path}"
            )
        time.sleep(0.05)


def _tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


# -- commands ----------------------------------------------------------------
def lab_up(args: argparse.Namespace) -> int:
    settings = settings_from_env(args.state_dir, args.prefix)
    topology, network = read_topology(args.file)  # bad input: error before any change
    require_root()
    require_kernel_features()
    settings.state_dir.mkdir(parents=True, exist_ok=True)
    store = Store(settings.db_path)
    try:
        other = store.get_setting("prefix")
        if other and other != settings.prefix:
            raise LabCommandError(
                f"a lab with prefix {other!r} uses {settings.state_dir}; "
                "run `nftsg lab down` first or use another --state-dir"
            )
        lab = Lab(settings.prefix)
        started = time.monotonic()
        lab.ensure_routers(network)
        revision = store.save_topology(topology.model_dump(mode="json"))
        store.set_setting("prefix", settings.prefix)
        agent = start_agent(settings, getattr(args, "api_listen", None))
        wait_in_force(settings, store, lab, network, revision, args.timeout, agent)
        lab.apply(network, bound_eni_ids(topology))
        elapsed = time.monotonic() - started
    finally:
        store.close()
    names = [*network.instances, *network.externals]
    print(f"lab {settings.prefix!r} is up: revision {revision} in force ({elapsed:.2f} s)")
    print(f"  VPC routers: {', '.join(lab.router_ns(v) for v in network.vpcs)}")
    print(f"  hosts: {', '.join(names)}")
    print("  try:  nftsg lab exec NAME -- ping -c1 -W1 ADDRESS")
    print("        nftsg explain --from SRC --to DST --protocol tcp --port 22")
    metrics = metrics_address(settings.state_dir)
    if metrics:
        print(f"  metrics: http://{metrics}/metrics")
    print("  stop: nftsg lab down")
    return 0


def metrics_address(state_dir: Path) -> str | None:
    """HOST:PORT the agent's metrics are served on (its `metrics.addr`), if any."""
    try:
        return (state_dir / METRICS_ADDR_FILE).read_text().strip() or None
    except OSError:
        return None


def lab_down(args: argparse.Namespace) -> int:
    settings = settings_from_env(args.state_dir, args.prefix)
    require_root()
    stop_agent(settings)
    prefixes = {settings.prefix}
    if settings.db_path.exists():
        store = Store(settings.db_path)
        try:
            stored = store.get_setting("prefix")
            state = store.load()
        finally:
            store.close()
        if stored:
            prefixes.add(stored)
        if state is not None:
            give_back_bound_interfaces(Lab(stored or settings.prefix), state.topology)
    removed = 0
    for prefix in sorted(prefixes):
        lab = Lab(prefix)
        removed += len(lab.existing())
        lab.destroy()
    for path in (
        settings.db_path,
        Path(f"{settings.db_path}-wal"),
        Path(f"{settings.db_path}-shm"),
    ):
        try:
            path.unlink()
        except FileNotFoundError:
            pass
    print(f"lab down: {removed} namespaces removed")
    return 0


def give_back_bound_interfaces(lab: Lab, document: dict[str, Any]) -> None:
    """Host mode: bound interfaces leave the routers before the routers go."""
    from .host_mode import HostPorts

    try:
        topology = topology_from_data(document)
        if not topology.bindings:
            return
        ports = HostPorts(lab)
        ports.set_model(build_network(topology), topology)
        released = ports.release_all()
    except (EcsError, NetlinkError, NetnsError, OSError) as exc:
        print(f"lab down: cannot give bound interfaces back: {exc}", file=sys.stderr)
        return
    if released:
        print(f"lab down: {released} bound interfaces given back")


def lab_exec(args: argparse.Namespace) -> int:
    settings = settings_from_env(args.state_dir, args.prefix)
    require_root()
    command = list(args.command)
    if command and command[0] == "--":
        command = command[1:]
    if not command:
        raise LabCommandError("usage: nftsg lab exec NAME -- CMD [ARGS...]")
    lab, _ = running_lab(settings)
    namespace = lab.host_ns(args.name)
    netns.enter_for_exec(namespace)  # this process only; it is replaced by CMD next
    try:
        os.execvp(command[0], command)
    except OSError as exc:
        raise LabCommandError(f"cannot run {command[0]}: {exc.strerror}") from None
    return 127  # not reached


def lab_check(args: argparse.Namespace) -> int:
    from . import matrix

    settings = settings_from_env(args.state_dir, args.prefix)
    require_root()
    lab, network = running_lab(settings)
    hosts = matrix.lab_hosts(network, lab.host_ns)
    probes = matrix.plan(network, hosts, args.tcp, args.udp)
    outcomes = matrix.run(network, probes, timeout=args.timeout)
    print(matrix.render(outcomes))
    return 0 if all(o.agrees for o in outcomes) else 1


def agent_command(args: argparse.Namespace) -> int:
    from . import agent_run

    return agent_run.run(args)


_API_LISTEN_HELP = (
    "TCP address of the agent's ECS API (default NFTSG_API_LISTEN or 127.0.0.1:7380); "
    "the unix socket api.sock in the state directory is served too"
)


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add `lab` and `agent` to the top-level command line."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--state-dir", help="state directory (default /var/lib/nftsg)")
    common.add_argument("--prefix", help="name prefix of the lab's namespaces (default nftsg)")

    lab = sub.add_parser("lab", help="build, use and remove a namespace lab")
    lab_sub = lab.add_subparsers(dest="lab_command", required=True)
    up = lab_sub.add_parser("up", parents=[common], help="build (or converge) and enforce FILE")
    up.add_argument("file")
    up.add_argument("--api-listen", metavar="HOST:PORT", help=_API_LISTEN_HELP)
    up.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for enforcement")
    up.set_defaults(handler=lab_up)
    down = lab_sub.add_parser("down", parents=[common], help="stop the agent, remove the lab")
    down.set_defaults(handler=lab_down)
    exe = lab_sub.add_parser("exec", parents=[common], help="run CMD inside a lab host")
    exe.add_argument("name", help="instance id, ENI id or external host name")
    exe.add_argument("command", nargs=argparse.REMAINDER)
    exe.set_defaults(handler=lab_exec)

    check = lab_sub.add_parser(
        "check", parents=[common], help="real traffic between every pair of hosts vs the evaluator"
    )
    check.add_argument("--tcp", type=int, nargs="*", default=[22, 80, 443, 5432, 8080])
    check.add_argument("--udp", type=int, nargs="*", default=[5353])
    check.add_argument("--timeout", type=float, default=0.4, help="seconds per probe")
    check.set_defaults(handler=lab_check)

    agent = sub.add_parser("agent", parents=[common], help="run the agent in the foreground")
    agent.add_argument("--table", help="nftables table name (default nftsg)")
    agent_settings.add_arguments(agent)
    agent.set_defaults(handler=agent_command)
