"""`nftsg ecs` over the agent's unix socket, and `nftsg api-key`."""

from __future__ import annotations

import json
import os
import pwd
import shutil
import stat
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from api_support import running_server
from nftsg.agent.api_keys import KeyStore
from nftsg.agent.cli import main
from nftsg.agent.ecs_cli import call_agent

AUTHORIZE = [
    "AuthorizeSecurityGroup",
    "--RegionId",
    "r",
    "--SecurityGroupId",
    "sg-web",
    "--Permissions.1.IpProtocol",
    "TCP",
    "--Permissions.1.PortRange",
    "22/22",
    "--Permissions.1.SourceCidrIp=198.51.100.0/24",
    "--Permissions.2.IpProtocol",
    "ICMP",
    "--Permissions.2.PortRange",
    "-1/-1",
    "--Permissions.2.SourceCidrIp",
    "0.0.0.0/0",
]


def test_nftsg_ecs_round_trip_over_the_socket(tmp_path: Path) -> None:
    sock = tmp_path / "api.sock"
    with running_server(tmp_path, unix_socket=sock) as api:
        assert stat.S_IMODE(sock.stat().st_mode) == 0o600
        env = {**os.environ, "NFTSG_API_SOCKET": str(sock)}
        done = subprocess.run(
            [sys.executable, "-m", "nftsg.agent.cli", "ecs", *AUTHORIZE],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert done.returncode == 0, done.stderr
        printed = json.loads(done.stdout)
        action, params, request_id = api.control_plane.calls[0]
        assert printed == {"RequestId": request_id}
        assert action == "AuthorizeSecurityGroup"
        assert params["Permissions"] == [
            {"IpProtocol": "TCP", "PortRange": "22/22", "SourceCidrIp": "198.51.100.0/24"},
            {"IpProtocol": "ICMP", "PortRange": "-1/-1", "SourceCidrIp": "0.0.0.0/0"},
        ]
        done = subprocess.run(
            [
                sys.executable,
                "-m",
                "nftsg.agent.cli",
                "ecs",
                "DescribeSecurityGroupAttribute",
                "--SecurityGroupId",
                "sg-web",
            ],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        body = json.loads(done.stdout)
        assert [p["PortRange"] for p in body["Permissions"]["Permission"]] == ["22/22", "-1/-1"]
    assert not sock.exists()  # stop() removes it


def test_nftsg_ecs_error_is_one_line_with_the_code_and_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    sock = tmp_path / "api.sock"
    with running_server(tmp_path, unix_socket=sock):
        code = main(
            [
                "ecs",
                "--api-socket",
                str(sock),
                "DeleteSecurityGroup",
                "--SecurityGroupId",
                "sg-nope",
            ]
        )
        err = capsys.readouterr().err
        assert code == 2
        assert err.count("\n") == 1 and err.startswith("InvalidSecurityGroupId.NotFound: ")
        assert main(["ecs", "--api-socket", str(sock), "NoSuchAction"]) == 2
        assert capsys.readouterr().err.startswith("InvalidAction.NotFound: ")
        assert main(["ecs", "--api-socket", str(sock), "DescribeSecurityGroups", "RegionId"]) == 2
        assert capsys.readouterr().err.startswith("InvalidParameter: ")


def test_nftsg_ecs_without_an_agent_says_so(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["ecs", "--api-socket", str(tmp_path / "none.sock"), "DescribeSecurityGroups"]) == 2
    assert capsys.readouterr().err.startswith("AgentNotRunning: ")


def _as_nobody(fn) -> str:  # type: ignore[no-untyped-def]
    """Run fn() in a forked child as user nobody; return what it reports."""
    nobody = pwd.getpwnam("nobody").pw_uid
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # child
        os.close(read_end)
        try:
            os.setgid(65534)
            os.setuid(nobody)
            result = fn()
        except BaseException as exc:
            result = f"{type(exc).__name__} {getattr(exc, 'code', '')}"
        os.write(write_end, result.encode())
        os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end) as reader:
        result = reader.read()
    os.waitpid(pid, 0)
    return result


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to become another user")
def test_a_non_root_peer_is_refused_and_changes_nothing(tmp_path: Path) -> None:
    # A directory nobody can reach (pytest's tmp_path sits under a 0700 one).
    reachable = Path(tempfile.mkdtemp(prefix="nftsg-api-test-", dir="/tmp"))
    reachable.chmod(0o755)
    sock = reachable / "api.sock"
    try:
        _refused_as_nobody(tmp_path, sock)
    finally:
        shutil.rmtree(reachable)


def _refused_as_nobody(tmp_path: Path, sock: Path) -> None:
    with running_server(tmp_path, unix_socket=sock) as api:

        def call() -> str:
            status, body = call_agent(
                sock,
                "AuthorizeSecurityGroup",
                [("SecurityGroupId", "sg-web"), ("Permissions.1.IpProtocol", "TCP")],
                timeout=10,
            )
            return f"{status} {body['Code']}"

        # The 0600 mode stops the connection itself...
        assert _as_nobody(call) == "EcsError Forbidden"  # EACCES on connect, told client-side
        # ...and were the mode ever wider, the server's SO_PEERCRED check still refuses.
        os.chmod(sock, 0o666)
        assert _as_nobody(call) == "403 Forbidden"
        assert api.control_plane.calls == []


def test_api_key_create_list_delete(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("NFTSG_STATE_DIR", str(tmp_path))
    assert main(["api-key", "create"]) == 0
    created = json.loads(capsys.readouterr().out)
    assert list(created) == ["AccessKeyId", "AccessKeySecret"]
    assert main(["api-key", "create"]) == 0
    second = json.loads(capsys.readouterr().out)
    keys_file = tmp_path / "api-keys.json"
    assert stat.S_IMODE(keys_file.stat().st_mode) == 0o600
    store = KeyStore(keys_file)
    assert store.secret_for(created["AccessKeyId"]) == created["AccessKeySecret"]

    assert main(["api-key", "list"]) == 0
    listed = capsys.readouterr().out
    assert created["AccessKeyId"] in listed and second["AccessKeyId"] in listed
    assert created["AccessKeySecret"] not in listed

    assert main(["api-key", "delete", created["AccessKeyId"]]) == 0
    assert store.secret_for(created["AccessKeyId"]) is None
    assert store.secret_for(second["AccessKeyId"]) == second["AccessKeySecret"]
    assert stat.S_IMODE(keys_file.stat().st_mode) == 0o600
    capsys.readouterr()
    assert main(["api-key", "delete", created["AccessKeyId"]]) == 2
    assert "InvalidAccessKeyId.NotFound" in capsys.readouterr().err
