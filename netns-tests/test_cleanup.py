"""`nftsg cleanup` removes what nftsg made and nothing else; it refuses, with one clear
line and no change, when it cannot work (not root, no nftables, a state directory
it cannot write). The agent refuses the same way."""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import EXAMPLES
from e2e import NFTSG, CliLab, agent_alive, cli_lab, describe, ns_run
from nftsg.agent import netns
from nftsg.agent.store import Store

pytestmark = pytest.mark.netns

NOBODY = 65534


def add_table(namespace: str, family: str, name: str) -> None:
    proc = ns_run(namespace, ["nft", f"add table {family} {name}; add chain {family} {name} c"])
    assert proc.returncode == 0, describe(proc)


def tables(namespace: str) -> set[str]:
    proc = ns_run(namespace, ["nft", "-j", "list", "tables"])
    assert proc.returncode == 0, describe(proc)
    return {
        f"{t['table']['family']} {t['table']['name']}"
        for t in json.loads(proc.stdout)["nftables"]
        if "table" in t
    }


@contextlib.contextmanager
def namespaces(*names: str) -> Iterator[None]:
    try:
        for name in names:
            netns.create(name)
        yield
    finally:
        for name in names:
            with contextlib.suppress(netns.NetnsError, OSError):
                netns.delete(name)


@pytest.fixture
def lab(tmp_path: Path, lab_prefix: str) -> Iterator[CliLab]:
    with cli_lab(lab_prefix, tmp_path / "state") as lab:
        yield lab


def test_cleanup_removes_ours_and_leaves_the_rest(lab: CliLab) -> None:
    lab.up(EXAMPLES / "three-tier.yaml")
    ours = lab.namespaces()
    assert len(ours) == 8
    agent = lab.agent_pid()
    assert agent is not None
    # Another lab whose prefix starts like ours, with its own nftsg table: not ours.
    foreign = f"{lab.prefix}z-r-vpc-demo"
    # A namespace nftsg did not create but enforced (recorded in the store), with
    # someone else's table beside ours: only our table goes.
    host = f"{lab.prefix}h-host"
    with namespaces(foreign, host):
        add_table(foreign, "inet", "nftsg")
        add_table(host, "inet", "nftsg")
        add_table(host, "inet", "keep")
        with contextlib.closing(Store(lab.state_dir / "state.db")) as store:
            store.record_applied(host, 1, "x")

        proc = lab.run("cleanup", "--json")
        assert proc.returncode == 0, describe(proc)
        report = json.loads(proc.stdout)

        assert sorted(report["namespaces_removed"]) == sorted(ours)
        assert report["tables_removed"] == [f"{host}: inet nftsg"]
        assert report["agent_stopped"] is True
        assert not agent_alive(agent)
        assert lab.namespaces() == []
        present = set(netns.list_namespaces())
        assert {foreign, host} <= present
        assert tables(foreign) == {"inet nftsg"}
        assert tables(host) == {"inet keep"}
        assert not (lab.state_dir / "state.db").exists()

        # Idempotent.
        again = lab.run("cleanup")
        assert again.returncode == 0, describe(again)
        assert again.stdout.startswith("cleanup: 0 namespaces and 0 tables removed")


def one_line_error(proc: subprocess.CompletedProcess[str], code: str) -> str:
    assert proc.returncode == 2, describe(proc)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, describe(proc)
    assert lines[0].startswith(f"nftsg: {code}: "), describe(proc)
    return lines[0]


def read_only(state_dir: Path, argv: list[str]) -> list[str]:
    """`argv` with `state_dir` mounted read-only, in a mount namespace of its own (root
    passes every permission check, a read-only mount it does not)."""
    script = 'mount --bind "$1" "$1" && mount -o remount,bind,ro "$1" && shift && exec "$@"'
    unshare = ["unshare", "--mount", "--propagation", "private"]
    return [*unshare, "sh", "-c", script, "sh", str(state_dir), *argv]


@pytest.mark.parametrize("command", ["cleanup", "agent"])
def test_a_state_dir_it_cannot_write(lab: CliLab, command: str) -> None:
    lab.state_dir.mkdir(parents=True)
    with namespaces(f"{lab.prefix}-r-vpc-x"):
        argv = read_only(lab.state_dir, [str(NFTSG), command])
        proc = subprocess.run(argv, env=lab.env(), capture_output=True, text=True, timeout=60)
        line = one_line_error(proc, "StateDirNotWritable")
        assert str(lab.state_dir) in line and "Read-only file system" in line
        assert lab.namespaces() == [f"{lab.prefix}-r-vpc-x"]  # nothing removed


@pytest.mark.parametrize("command", ["cleanup", "agent"])
def test_without_nftables(lab: CliLab, command: str) -> None:
    # The bindings cannot be imported: what a host without python3-nftables sees.
    code = (
        "import sys; sys.modules['nftables'] = None; "
        "from nftsg.agent.cli import main; sys.exit(main(sys.argv[1:]))"
    )
    with namespaces(f"{lab.prefix}-r-vpc-x"):
        proc = subprocess.run(
            [sys.executable, "-c", code, command],
            env=lab.env(),
            capture_output=True,
            text=True,
            timeout=60,
        )
        line = one_line_error(proc, "NftablesMissing")
        assert "python3-nftables" in line
        assert lab.namespaces() == [f"{lab.prefix}-r-vpc-x"]


@pytest.mark.parametrize("command", ["cleanup", "agent"])
def test_without_root(lab: CliLab, command: str) -> None:
    probe = lab.run("--help", user=NOBODY)
    if probe.returncode != 0:
        pytest.skip(f"user {NOBODY} cannot run this checkout's nftsg: {probe.stderr.strip()}")
    proc = lab.run(command, user=NOBODY)
    one_line_error(proc, "NotRoot")
