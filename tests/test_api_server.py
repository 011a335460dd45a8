"""The server's lifecycle as the daemon uses it: listen addresses, bind errors, stop."""

from __future__ import annotations

import socket
import stat
import threading
from pathlib import Path

import pytest
from alibabacloud_ecs20140526 import models as m
from alibabacloud_ecs20140526.client import Client
from alibabacloud_tea_openapi import models as openapi_models
from api_fake import FakeControlPlane
from nftsg.agent.api_keys import KeyStore
from nftsg.agent.api_paths import DEFAULT_LISTEN
from nftsg.agent.api_server import ApiServer, api_server_for, parse_listen
from nftsg.agent.settings import Settings


def test_default_listen_is_loopback_7380() -> None:
    assert DEFAULT_LISTEN == "127.0.0.1:7380"
    assert parse_listen("[::1]:7380") == ("::1", 7380)
    with pytest.raises(ValueError):
        parse_listen("7380")


def test_api_server_for_settings_serves_tcp_and_the_state_dir_socket(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("NFTSG_API_SOCKET", raising=False)
    settings = Settings(state_dir=tmp_path, prefix="t", table="t")
    server = api_server_for(settings, FakeControlPlane(), listen="[::1]:0")
    key = server.keystore.create()
    with server:
        assert server.address is not None
        host, port = server.address
        assert host == "::1"
        sock = tmp_path / "api.sock"
        assert stat.S_ISSOCK(sock.stat().st_mode) and stat.S_IMODE(sock.stat().st_mode) == 0o600
        client = Client(
            openapi_models.Config(
                access_key_id=key.access_key_id,
                access_key_secret=key.access_key_secret,
                endpoint=f"[::1]:{port}",
                protocol="http",
                region_id="r",
            )
        )
        body = client.describe_security_groups(m.DescribeSecurityGroupsRequest(region_id="r")).body
        assert body.total_count == 2
    assert not (tmp_path / "api.sock").exists()


def test_a_taken_port_fails_start_and_leaves_nothing_running(tmp_path: Path) -> None:
    taken = socket.create_server(("127.0.0.1", 0))
    try:
        port = taken.getsockname()[1]
        before = threading.active_count()
        server = ApiServer(
            FakeControlPlane(),
            KeyStore(tmp_path / "k.json"),
            listen=f"127.0.0.1:{port}",
            unix_socket=tmp_path / "api.sock",
        )
        with pytest.raises(OSError):
            server.start()
        assert threading.active_count() == before
        assert not (tmp_path / "api.sock").exists()
        server.stop()  # harmless
    finally:
        taken.close()
