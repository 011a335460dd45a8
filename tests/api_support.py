"""Shared by the API layer's tests: a real ApiServer on a loopback port with the
fake control plane, the unmodified SDK pointed at it, and raw requests signed
by the SDK's own signing code (so a test can break one thing at a time)."""

from __future__ import annotations

import hashlib
import http.client
import json
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

from alibabacloud_ecs20140526.client import Client
from alibabacloud_tea_openapi import models as openapi_models
from alibabacloud_tea_openapi.utils import Utils
from api_fake import FakeControlPlane
from darabonba.request import DaraRequest
from nftsg.agent.api_keys import AccessKey, KeyStore
from nftsg.agent.api_server import ApiServer


@dataclass
class Running:
    server: ApiServer
    control_plane: FakeControlPlane
    keystore: KeyStore
    key: AccessKey

    @property
    def endpoint(self) -> str:
        assert self.server.address is not None
        host, port = self.server.address
        return f"{host}:{port}"

    def client(self, key: AccessKey | None = None) -> Client:
        key = key or self.key
        return Client(
            openapi_models.Config(
                access_key_id=key.access_key_id,
                access_key_secret=key.access_key_secret,
                endpoint=self.endpoint,
                protocol="http",
                region_id="cn-hangzhou",
            )
        )


@contextmanager
def running_server(
    tmp_path: Path, enis: int = 2, unix_socket: Path | None = None
) -> Iterator[Running]:
    keystore = KeyStore(tmp_path / "api-keys.json")
    key = keystore.create()
    control_plane = FakeControlPlane(enis=enis)
    server = ApiServer(control_plane, keystore, listen="127.0.0.1:0", unix_socket=unix_socket)
    server.start()
    try:
        yield Running(server, control_plane, keystore, key)
    finally:
        server.stop()


def snake(action: str) -> str:
    return re.sub(r"(?<!^)(?=[A-Z])", "_", action).lower()


def signed_request(
    endpoint: str,
    key: AccessKey,
    action: str,
    query: dict[str, str],
    *,
    method: str = "POST",
    body: bytes = b"",
    content_type: str | None = None,
    date: str | None = None,
    nonce: str | None = None,
) -> tuple[str, dict[str, str], bytes]:
    """(path with query, headers, body) signed exactly as the SDK signs (its own code)."""
    request = DaraRequest()
    request.method = method
    request.pathname = "/"
    request.query = dict(query)
    request.headers = {
        "host": endpoint,
        "x-acs-version": "2014-05-26",
        "x-acs-action": action,
        "x-acs-date": date or Utils.get_timestamp(),
        "x-acs-signature-nonce": nonce or Utils.get_nonce(),
        "accept": "application/json",
        "x-acs-content-sha256": hashlib.sha256(body).hexdigest(),
    }
    if content_type:
        request.headers["content-type"] = content_type
    request.headers["Authorization"] = Utils.get_authorization(
        request,
        "ACS3-HMAC-SHA256",
        request.headers["x-acs-content-sha256"],
        key.access_key_id,
        key.access_key_secret,
    )
    path = "/" + ("?" + urlencode(query) if query else "")
    return path, request.headers, body


def send(
    endpoint: str, method: str, path: str, headers: dict[str, str], body: bytes = b""
) -> tuple[int, dict[str, Any]]:
    host, port = endpoint.rsplit(":", 1)
    connection = http.client.HTTPConnection(host, int(port), timeout=10)
    try:
        connection.putrequest(method, path, skip_host=True, skip_accept_encoding=True)
        for name, value in headers.items():
            connection.putheader(name, value)
        connection.putheader("Content-Length", str(len(body)))
        connection.endheaders(body)
        response = connection.getresponse()
        return response.status, json.loads(response.read())
    finally:
        connection.close()
