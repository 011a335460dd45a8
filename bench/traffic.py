"""Traffic between two ENI namespaces through the router: new TCP connections/s
(the C load generator in loadgen.c, built here with the system cc) and TCP
throughput (iperf3)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import tempfile
import time
from pathlib import Path

SOURCE = Path(__file__).with_name("loadgen.c")
CLIENT_PROCS = 2
SERVER_WORKERS = 2


def build_loadgen(workdir: str) -> str:
    binary = os.path.join(workdir, "loadgen")
    cc = os.environ.get("CC", "cc")
    subprocess.run([cc, "-O2", "-o", binary, str(SOURCE)], check=True, capture_output=True)
    return binary


def _in_ns(ns: str, *argv: str) -> list[str]:
    return ["ip", "netns", "exec", ns, *argv]


def _stop(proc: subprocess.Popen[str]) -> None:
    # The server runs in its own session: its group holds every worker it forked.
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def conn_rate(loadgen: str, server_ns: str, client_ns: str, addr: str, port: int,
              seconds: float) -> float:
    server = subprocess.Popen(_in_ns(server_ns, loadgen, "server", addr, str(port),
                                     str(SERVER_WORKERS)),
                              stdout=subprocess.PIPE, text=True, start_new_session=True)
    try:
        assert server.stdout is not None
        if server.stdout.readline().strip() != "ready":
            raise RuntimeError("load generator server did not start")
        out = subprocess.run(_in_ns(client_ns, loadgen, "client", addr, str(port), str(seconds),
                                    str(CLIENT_PROCS)),
                             capture_output=True, text=True, check=True, timeout=seconds + 30)
        return float(out.stdout.strip())
    finally:
        _stop(server)


def throughput(server_ns: str, client_ns: str, addr: str, port: int, seconds: int) -> float:
    """iperf3 TCP throughput in bit/s of one established flow (receiver side).
    iperf3 takes whole seconds; 0 would mean "forever"."""
    seconds = max(1, int(seconds))
    server = subprocess.Popen(_in_ns(server_ns, "iperf3", "-s", "-1", "-B", addr, "-p", str(port)),
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, text=True,
                              start_new_session=True)
    try:
        for _ in range(100):  # until it listens
            probe = subprocess.run(_in_ns(server_ns, "ss", "-Hltn", f"sport = :{port}"),
                                   capture_output=True, text=True)
            if probe.stdout.strip():
                break
            time.sleep(0.02)
        out = subprocess.run(_in_ns(client_ns, "iperf3", "-c", addr, "-p", str(port), "-J",
                                    "-t", str(seconds), "-O", "0"),
                             capture_output=True, text=True, timeout=seconds + 30)
        data = json.loads(out.stdout)
        if "error" in data:
            raise RuntimeError(f"iperf3: {data['error']}")
        return float(data["end"]["sum_received"]["bits_per_second"])
    finally:
        _stop(server)


def loopback_rate(loadgen: str, ns: str, seconds: float) -> float:
    """The generator against itself on loopback in one namespace: an upper bound that
    shows what the generator can do when no router is in the way."""
    return conn_rate(loadgen, ns, ns, "127.0.0.1", 5999, seconds)


def scratch_dir() -> tempfile.TemporaryDirectory[str]:
    return tempfile.TemporaryDirectory(prefix="nftsg-bench-")
