"""Concurrent SDK clients: every call arrives, each client's calls in its own order."""

from __future__ import annotations

import threading
from pathlib import Path

from alibabacloud_ecs20140526 import models as m
from api_support import running_server

THREADS, CALLS = 8, 25


def test_concurrent_callers_lose_nothing_and_keep_per_client_order(tmp_path: Path) -> None:
    errors: list[BaseException] = []
    with running_server(tmp_path) as api:

        def caller(n: int) -> None:
            client = api.client()
            try:
                for i in range(CALLS):
                    client.authorize_security_group(
                        m.AuthorizeSecurityGroupRequest(
                            region_id="r",
                            security_group_id="sg-web",
                            permissions=[
                                m.AuthorizeSecurityGroupRequestPermissions(
                                    ip_protocol="TCP",
                                    port_range=f"{i + 1}/{i + 1}",
                                    source_cidr_ip=f"10.{n}.0.0/16",
                                    description=f"{n}:{i}",
                                )
                            ],
                        )
                    )
            except BaseException as exc:  # surfaced below
                errors.append(exc)

        threads = [threading.Thread(target=caller, args=(n,)) for n in range(THREADS)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
        assert not errors
        seen = [p["Permissions"][0]["Description"] for _, p, _ in api.control_plane.calls]
        assert len(seen) == THREADS * CALLS
        for n in range(THREADS):
            assert [s for s in seen if s.startswith(f"{n}:")] == [f"{n}:{i}" for i in range(CALLS)]
        # And the applied state holds every rule once.
        rules = api.control_plane.groups["sg-web"]["Permissions"]
        assert sorted(r["Description"] for r in rules) == sorted(seen)
        assert len(set(seen)) == len(seen)


def test_calls_run_one_at_a_time_off_the_event_loop(tmp_path: Path) -> None:
    """A slow control-plane call neither overlaps another nor blocks the server."""
    import time

    with running_server(tmp_path) as api:
        active, overlaps = [0], [0]
        original = api.control_plane.call

        def slow_call(action, params, request_id):  # type: ignore[no-untyped-def]
            active[0] += 1
            overlaps[0] = max(overlaps[0], active[0])
            time.sleep(0.5)
            active[0] -= 1
            return original(action, params, request_id)

        api.control_plane.call = slow_call  # type: ignore[method-assign]
        threads = [
            threading.Thread(
                target=lambda: api.client().describe_security_groups(
                    m.DescribeSecurityGroupsRequest(region_id="r")
                )
            )
            for _ in range(3)
        ]
        for t in threads:
            t.start()
        time.sleep(0.05)
        # While those queue (1.5 s of calls), an unauthenticated request is answered
        # without waiting for them: well inside the first call's 0.5 s.
        from api_support import send

        started = time.perf_counter()
        status, _ = send(api.endpoint, "POST", "/", {"Host": api.endpoint})
        assert status == 400 and time.perf_counter() - started < 0.45
        for t in threads:
            t.join(timeout=30)
        assert overlaps[0] == 1
        assert len(api.control_plane.calls) == 3
