"""The demo lab through the real command line: `nftsg lab up|check|exec|down` and `explain`.

One lab per module (bringing it up is the expensive part), driven only through
the `nftsg` console script with a unique prefix and a private state dir, so
what is checked is what a user sees: exit codes, output, namespaces, the
kernel's table, and real traffic. Tests that change the lab come last.
"""

from __future__ import annotations

import copy
import json
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from e2e import (
    EXAMPLES,
    CliLab,
    agent_alive,
    cli_lab,
    describe,
    expected_check_count,
    listening,
    load_yaml,
    write_yaml,
)
from probes import tcp_connect, udp_request

DEMO = EXAMPLES / "three-tier.yaml"
VPC = "vpc-demo"


def stored_revision(lab: CliLab) -> int:
    db = sqlite3.connect(lab.state_dir / "state.db")
    try:
        row = db.execute("SELECT revision FROM topology").fetchone()
    finally:
        db.close()
    return int(row[0]) if row else 0


def applied_revision(lab: CliLab, namespace: str) -> int | None:
    db = sqlite3.connect(lab.state_dir / "state.db")
    try:
        row = db.execute(
            "SELECT revision FROM applied WHERE namespace = ?", (namespace,)
        ).fetchone()
    finally:
        db.close()
    return int(row[0]) if row else None


def forward_chain(listing: str) -> str:
    """The `forward` base chain's text (with rule handles) out of a table listing."""
    lines = listing.splitlines()
    start = next(i for i, line in enumerate(lines) if line.strip().startswith("chain forward"))
    end = next(i for i in range(start, len(lines)) if lines[i].strip() == "}")
    return "\n".join(lines[start : end + 1])


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory, run_prefix: str) -> Iterator[CliLab]:
    state_dir = tmp_path_factory.mktemp("cli-state")
    with cli_lab(f"{run_prefix}c", state_dir) as lab:
        proc = lab.up(DEMO)
        assert "is up" in proc.stdout
        yield lab
    assert not lab.namespaces()


def test_lab_up_enforces_and_leaves_the_agent_running(demo: CliLab) -> None:
    expected = {demo.router_ns(VPC)}
    expected |= {demo.instance_ns(i) for i in ("i-web1", "i-web2", "i-app1", "i-db1", "i-bastion")}
    expected |= {demo.external_ns(x) for x in ("office", "internet")}
    assert set(demo.namespaces()) == expected
    pid = demo.agent_pid()
    assert pid is not None and agent_alive(pid), demo.log_tail()
    table = demo.table(VPC)
    assert table is not None and "hook forward" in table and "policy drop" in table


def test_verify_finds_the_kernel_in_sync_and_both_policies_agreeing(demo: CliLab) -> None:
    proc = demo.run("verify")
    assert proc.returncode == 0, describe(proc)
    report = json.loads(proc.stdout)
    assert report["ok"] is True
    (router,) = report["routers"]
    assert router["in_sync"] and router["differences"] == []
    assert router["planned_flows"]["checked"] > 100
    assert router["planned_flows"]["disagreements"] == []


def test_lab_check_agrees_everywhere(demo: CliLab) -> None:
    proc, summary = demo.check()
    assert proc.returncode == 0, "\n".join(summary.mismatches) or describe(proc)
    assert summary.total == expected_check_count(load_yaml(DEMO))
    assert summary.agree == summary.total
    assert summary.allowed > 0 and summary.dropped > 0
    assert summary.allowed + summary.dropped == summary.total


def test_lab_exec_runs_inside_the_instance(demo: CliLab) -> None:
    proc = demo.run("lab", "exec", "i-web1", "--", "ip", "-o", "addr")
    assert proc.returncode == 0, describe(proc)
    assert "10.0.1.10/24" in proc.stdout
    assert "2001:db8:10:1::10/64" in proc.stdout
    assert "10.0.2.10" not in proc.stdout  # i-app1's address lives elsewhere
    external = demo.run("lab", "exec", "office", "--", "ip", "-o", "addr")
    assert "198.51.100.7" in external.stdout, describe(external)


def test_lab_exec_passes_the_exit_code_through(demo: CliLab) -> None:
    assert demo.run("lab", "exec", "i-web1", "--", "sh", "-c", "exit 7").returncode == 7
    assert demo.run("lab", "exec", "i-web1", "--", "true").returncode == 0
    # Real traffic from inside the namespaces, with the shell's /dev/tcp.
    with (
        listening(demo.instance_ns("i-web2"), "10.0.1.11", 22),
        listening(demo.instance_ns("i-db1"), "10.0.3.10", 5432),
    ):
        ssh = demo.run(
            "lab",
            "exec",
            "i-bastion",
            "--",
            "timeout",
            "2",
            "bash",
            "-c",
            "exec 3<>/dev/tcp/10.0.1.11/22",
        )
        assert ssh.returncode == 0, describe(ssh)  # sg-web: 22 from sg-bastion
        db = demo.run(
            "lab",
            "exec",
            "i-web1",
            "--",
            "timeout",
            "1",
            "bash",
            "-c",
            "exec 3<>/dev/tcp/10.0.3.10/5432",
        )
        assert db.returncode == 124, describe(db)  # dropped silently: the connect hangs


def test_lab_exec_unknown_host_fails_clearly(demo: CliLab) -> None:
    proc = demo.run("lab", "exec", "i-nope", "--", "true")
    assert proc.returncode != 0
    assert "i-nope" in proc.stderr


def test_explain_without_file_answers_from_the_running_state(demo: CliLab) -> None:
    flows = [
        ("i-app1", "i-db1", "tcp", "5432", "accept"),
        ("i-web1", "i-db1", "tcp", "5432", "drop"),
        ("office", "i-bastion", "tcp", "22", "accept"),
        ("internet", "i-bastion", "tcp", "22", "drop"),
    ]
    for src, dst, proto, port, verdict in flows:
        args = ("--from", src, "--to", dst, "--protocol", proto, "--port", port)
        running = demo.explain(*args)
        assert running["verdict"] == verdict, (src, dst, running)
        assert running == demo.explain(str(DEMO), *args)


def test_invalid_file_is_rejected_and_changes_nothing(demo: CliLab, tmp_path: Path) -> None:
    doc = load_yaml(DEMO)
    malformed = copy.deepcopy(doc)
    malformed["security_groups"][2]["permissions"][0]["port_range"] = "5432"
    dangling = copy.deepcopy(doc)
    dangling["security_groups"][0]["permissions"][0] = {
        "direction": "ingress",
        "ip_protocol": "TCP",
        "port_range": "22/22",
        "source_group_id": "sg-nope",
    }
    dangling["instances"].append(
        {"instance_id": "i-new", "vswitch_id": "vsw-web", "private_ip_address": "10.0.1.50"}
    )
    before = (demo.namespaces(), demo.table(VPC), demo.links(demo.router_ns(VPC)))
    revision = stored_revision(demo)
    for name, bad, code in (
        ("malformed.yaml", malformed, "InvalidPortRange.Malformed"),
        ("dangling.yaml", dangling, "InvalidSecurityGroupId.NotFound"),
    ):
        proc = demo.run("lab", "up", str(write_yaml(tmp_path / name, bad)))
        assert proc.returncode != 0, describe(proc)
        assert code in proc.stderr, describe(proc)
        assert "security_groups[" in proc.stderr  # names the field
    assert (demo.namespaces(), demo.table(VPC), demo.links(demo.router_ns(VPC))) == before
    assert stored_revision(demo) == revision
    app_db = ("--from", "i-app1", "--to", "i-db1", "--protocol", "tcp", "--port", "5432")
    assert demo.explain(*app_db)["verdict"] == "accept"
    assert tcp_connect(demo.instance_ns("i-app1"), demo.instance_ns("i-db1"), "10.0.3.10", 5432)


def test_lab_up_again_with_the_same_file_changes_nothing(demo: CliLab) -> None:
    router = demo.router_ns(VPC)
    before_table = demo.table(VPC)
    before_links = {ns: demo.links(ns) for ns in demo.namespaces()}
    revision = stored_revision(demo)
    demo.up(DEMO)
    # The agent did process the new revision (lab up waits for it) ...
    assert stored_revision(demo) == revision + 1
    assert applied_revision(demo, router) == revision + 1
    # ... and the kernel holds exactly what it held: same objects, same rule handles,
    # the same links (a recreated veth gets a new ifindex).
    assert demo.table(VPC) == before_table
    assert {ns: demo.links(ns) for ns in demo.namespaces()} == before_links
    web1, db1, app1 = (demo.instance_ns(i) for i in ("i-web1", "i-db1", "i-app1"))
    assert tcp_connect(app1, db1, "10.0.3.10", 5432, timeout=0.5)
    assert not tcp_connect(web1, db1, "10.0.3.10", 5432, timeout=0.3)
    assert udp_request(web1, app1, "10.0.2.10", 5353, timeout=0.5)


def changed_demo() -> dict[str, Any]:
    """The demo with sg-db's `5432 from sg-app` rule removed and an instance i-app2 added."""
    doc = load_yaml(DEMO)
    db = next(g for g in doc["security_groups"] if g["security_group_id"] == "sg-db")
    removed = [p for p in db["permissions"] if p.get("port_range") == "5432/5432"]
    assert len(removed) == 1
    db["permissions"].remove(removed[0])
    doc["instances"].append(
        {
            "instance_id": "i-app2",
            "vswitch_id": "vsw-app",
            "private_ip_address": "10.0.2.11",
            "ipv6_address": "2001:db8:10:2::11",
            "security_group_ids": ["sg-app"],
        }
    )
    return doc


def test_lab_up_with_a_changed_file_converges(demo: CliLab, tmp_path: Path) -> None:
    router = demo.router_ns(VPC)
    before = demo.table(VPC)
    assert before is not None
    app1, app2, db1, web1 = (demo.instance_ns(i) for i in ("i-app1", "i-app2", "i-db1", "i-web1"))
    router_links = demo.links(router)
    db1_links = demo.links(db1)
    doc = changed_demo()
    demo.up(write_yaml(tmp_path / "changed.yaml", doc))

    assert app2 in demo.namespaces()
    proc = demo.run("lab", "exec", "i-app2", "--", "ip", "-o", "addr")
    assert "10.0.2.11/24" in proc.stdout, describe(proc)
    # Old links untouched (one more port for i-app2), the base chain not rewritten.
    new_links = demo.links(router).splitlines()
    assert set(router_links.splitlines()) <= set(new_links)
    assert len(new_links) == len(router_links.splitlines()) + 1
    assert demo.links(db1) == db1_links
    after = demo.table(VPC)
    assert after is not None and after != before
    assert forward_chain(after) == forward_chain(before)

    app_db = ("--from", "i-app1", "--to", "i-db1", "--protocol", "tcp", "--port", "5432")
    assert demo.explain(*app_db)["verdict"] == "drop"
    assert not tcp_connect(app1, db1, "10.0.3.10", 5432, timeout=0.3)
    assert tcp_connect(web1, app2, "10.0.2.11", 8080, timeout=0.5)  # sg-app: 8080 from sg-web
    assert not tcp_connect(app1, app2, "10.0.2.11", 8080, timeout=0.3)  # sg-app isolates

    proc, summary = demo.check()
    assert proc.returncode == 0, "\n".join(summary.mismatches) or describe(proc)
    assert summary.total == expected_check_count(doc)
    assert summary.agree == summary.total
    assert summary.allowed > 0 and summary.dropped > 0


def test_lab_down_removes_everything_and_is_idempotent(demo: CliLab) -> None:
    pid = demo.agent_pid()
    assert pid is not None
    proc = demo.down()
    assert proc.returncode == 0, describe(proc)
    assert demo.namespaces() == []
    assert not agent_alive(pid)
    again = demo.down()
    assert again.returncode == 0, describe(again)
    assert demo.namespaces() == []
    after = demo.run("lab", "exec", "i-web1", "--", "true")
    assert after.returncode != 0


def test_lab_up_needs_root(tmp_path: Path, run_prefix: str) -> None:
    if subprocess_fails(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "true"]):
        pytest.skip("setpriv cannot drop to uid 65534 here")
    state_dir = tmp_path / "state"
    with cli_lab(f"{run_prefix}u", state_dir) as lab:
        # The topology must be readable by the unprivileged user: the examples are.
        proc = lab.run("lab", "up", str(DEMO), user=65534)
        assert proc.returncode != 0, describe(proc)
        assert "root" in proc.stderr, describe(proc)
        assert "Traceback" not in proc.stderr
        assert lab.namespaces() == []
        assert lab.agent_pid() is None
        down = lab.run("lab", "down", user=65534)
        assert down.returncode != 0 and "root" in down.stderr, describe(down)


def subprocess_fails(argv: list[str]) -> bool:
    import subprocess

    try:
        return subprocess.run(argv, capture_output=True, timeout=10, check=False).returncode != 0
    except OSError:
        return True
