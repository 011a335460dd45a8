"""The agent as its own process (`nftsg agent`, as systemd runs it), for real-namespace tests.

proc = start(state_dir, prefix)        # logs to state_dir/agent.log
wait_applied(store, namespace, revision, proc)
stop(proc)                             # SIGTERM, then SIGKILL; by its pid only
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

from nftsg.agent.store import Store

TABLE = "nftsg"


def start(state_dir: Path, prefix: str, table: str = TABLE) -> subprocess.Popen[bytes]:
    with open(state_dir / "agent.log", "ab") as logfile:
        return subprocess.Popen(
            [
                sys.executable,
                "-m",
                "nftsg.agent.cli",
                "agent",
                "--state-dir",
                str(state_dir),
                "--prefix",
                prefix,
                "--table",
                table,
            ],
            stdin=subprocess.DEVNULL,
            stdout=logfile,
            stderr=logfile,
            start_new_session=True,
        )


def log_text(state_dir: Path) -> str:
    try:
        return (state_dir / "agent.log").read_text(errors="replace")
    except FileNotFoundError:
        return ""


def wait_applied(
    store: Store,
    namespace: str,
    revision: int,
    proc: subprocess.Popen[bytes],
    timeout: float = 60.0,
) -> None:
    """Until the agent reports `revision` (or later) in force in `namespace`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        record = store.applied(namespace)
        if record is not None and record.revision >= revision:
            return
        assert proc.poll() is None, "the agent exited"
        time.sleep(0.02)
    raise AssertionError(f"revision {revision} not in force in {namespace} after {timeout} s")


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=10)
