"""ECS API latency through Alibaba's SDK (HTTP + ACS3 signing) against the real
server with the in-memory fake control plane of the unit tests, at 500 ENIs.

What it shows: the API layer's share of a call (SDK signing, HTTP on loopback,
verification, parameter parsing, JSON both ways, the SDK's response model), so
that the 50 ms p99 target of the whole path is left to the control plane.
Two calls: AuthorizeSecurityGroup (small request, empty answer) and
DescribeNetworkInterfaces answering with all 500 ENIs (the largest body).

The server runs in a process of its own, as the agent does: the agent never
imports the SDK. The client side is measured twice. The SDK's thousands of
model classes make every full garbage collection in the *caller's* process
cost ~30 ms, and a 500-ENI answer builds enough objects to trigger one every
few calls: that, not the server, is the p99 of a plain client. `gc.freeze()`
after importing the SDK (one line in the caller) moves those classes out of
the collector's way; both figures are printed.

Run: `.venv/bin/python bench/api_latency.py [--calls N] [--enis N]`. No root.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

TESTS = Path(__file__).resolve().parent.parent / "tests"


def serve(enis: int) -> None:
    """Child: the server and the fake control plane, nothing of the SDK."""
    sys.path.insert(0, str(TESTS))
    from api_fake import FakeControlPlane
    from nftsg.agent.api_keys import KeyStore
    from nftsg.agent.api_server import ApiServer

    with tempfile.TemporaryDirectory() as tmp:
        keystore = KeyStore(Path(tmp) / "api-keys.json")
        key = keystore.create()
        with ApiServer(FakeControlPlane(enis=enis), keystore, listen="127.0.0.1:0") as server:
            assert server.address is not None
            host, port = server.address
            print(
                json.dumps(
                    {
                        "endpoint": f"{host}:{port}",
                        "id": key.access_key_id,
                        "secret": key.access_key_secret,
                    }
                ),
                flush=True,
            )
            sys.stdin.read()  # until the parent closes our stdin


def percentiles(samples: list[float]) -> tuple[float, float]:
    ordered = sorted(samples)
    return statistics.median(ordered), ordered[
        min(len(ordered) - 1, round(0.99 * (len(ordered) - 1)))
    ]


def measure(calls: int, enis: int, freeze_gc: bool) -> dict[str, tuple[float, float]]:
    from alibabacloud_ecs20140526 import models as m
    from alibabacloud_ecs20140526.client import Client
    from alibabacloud_tea_openapi import models as openapi_models

    child = subprocess.Popen(
        [sys.executable, __file__, "--serve", "--enis", str(enis)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert child.stdout is not None and child.stdin is not None
        info = json.loads(child.stdout.readline())
        client = Client(
            openapi_models.Config(
                access_key_id=info["id"],
                access_key_secret=info["secret"],
                endpoint=info["endpoint"],
                protocol="http",
                region_id="r",
            )
        )
        requests: dict[str, Any] = {
            "AuthorizeSecurityGroup": lambda i: client.authorize_security_group(
                m.AuthorizeSecurityGroupRequest(
                    region_id="r",
                    security_group_id="sg-web",
                    permissions=[
                        m.AuthorizeSecurityGroupRequestPermissions(
                            ip_protocol="TCP",
                            port_range=f"{i % 65535 + 1}/{i % 65535 + 1}",
                            source_cidr_ip="198.51.100.0/24",
                        )
                    ],
                )
            ),
            f"DescribeNetworkInterfaces ({enis} ENIs)": lambda i: (
                client.describe_network_interfaces(
                    m.DescribeNetworkInterfacesRequest(region_id="r")
                )
            ),
        }
        if freeze_gc:
            gc.collect()
            gc.freeze()
        results = {}
        for name, call in requests.items():
            for i in range(10):  # warm the connection pool
                call(i)
            samples = []
            for i in range(calls):
                started = time.perf_counter()
                call(i)
                samples.append((time.perf_counter() - started) * 1000)
            results[name] = percentiles(samples)
        return results
    finally:
        if freeze_gc:
            gc.unfreeze()
        if child.stdin:
            child.stdin.close()
        child.wait(timeout=30)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=500)
    parser.add_argument("--enis", type=int, default=500)
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        serve(args.enis)
        return 0
    for freeze in (False, True):
        label = "client gc.freeze()" if freeze else "plain client"
        for name, (p50, p99) in measure(args.calls, args.enis, freeze).items():
            print(
                f"{label:20s} {name:38s} p50 {p50:6.2f} ms  p99 {p99:6.2f} ms  ({args.calls} calls)"
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
