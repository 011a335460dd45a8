"""deploy/install-host.sh and uninstall-host.sh on this machine, into private
directories (the NFTSG_*_DIR variables) so the host's own /opt, /etc and units are
not touched: a venv with nftsg, the unit pointing at it, the settings file and
the state directory; a second run changes nothing; the installed unit passes
`systemd-analyze verify` with its real ExecStart; uninstall removes it all."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
from e2e import describe

pytestmark = [pytest.mark.netns, pytest.mark.slow]

REPO = Path(__file__).resolve().parent.parent


def run(script: str, env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", str(REPO / "deploy" / script), *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


def test_install_twice_then_uninstall(tmp_path: Path, lab_prefix: str) -> None:
    dirs = {
        "NFTSG_OPT_DIR": tmp_path / "opt",
        "NFTSG_ETC_DIR": tmp_path / "etc",
        "NFTSG_UNIT_DIR": tmp_path / "units",
        "NFTSG_STATE_DIR": tmp_path / "state",
        "NFTSG_BIN_DIR": tmp_path / "bin",
    }
    env = {**os.environ, **{k: str(v) for k, v in dirs.items()}}
    # Debian's packages come from scripts/install.sh; cleanup on uninstall only
    # ever sees this test's prefix.
    env.update(NFTSG_SKIP_APT="1", NFTSG_PREFIX=lab_prefix)
    try:
        first = run("install-host.sh", env)
        assert first.returncode == 0, describe(first)
        assert "nftsg installed in" in first.stdout
        nftsg = dirs["NFTSG_OPT_DIR"] / "venv" / "bin" / "nftsg"
        unit = dirs["NFTSG_UNIT_DIR"] / "nftsg-agent.service"
        settings = dirs["NFTSG_ETC_DIR"] / "agent.yaml"
        assert (dirs["NFTSG_BIN_DIR"] / "nftsg").resolve() == nftsg.resolve()
        assert f"ExecStart={nftsg} agent --config {settings}" in unit.read_text()
        assert settings.read_text() == (REPO / "deploy" / "agent.yaml").read_text()
        assert dirs["NFTSG_STATE_DIR"].is_dir()
        assert oct(dirs["NFTSG_STATE_DIR"].stat().st_mode & 0o777) == "0o700"
        probe = subprocess.run(
            [str(nftsg), "agent", "--help"], capture_output=True, text=True, timeout=60
        )
        assert probe.returncode == 0 and "--metrics-listen" in probe.stdout, describe(probe)
        loads = subprocess.run(
            [str(nftsg.with_name("python")), "-c", "import nftables, systemd.journal"],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert loads.returncode == 0, describe(loads)
        if shutil.which("systemd-analyze"):
            verify = subprocess.run(
                ["systemd-analyze", "verify", str(unit)], capture_output=True, text=True
            )
            assert verify.returncode == 0 and not verify.stderr.strip(), describe(verify)

        # An operator's edit of the settings survives a reinstall.
        settings.write_text(settings.read_text().replace("log_level: info", "log_level: debug"))
        before = {p: p.stat().st_mtime_ns for p in (unit, nftsg.resolve())}
        second = run("install-host.sh", env)
        assert second.returncode == 0, describe(second)
        assert "nothing to do" in second.stdout, describe(second)
        assert {p: p.stat().st_mtime_ns for p in before} == before
        assert "log_level: debug" in settings.read_text()

        gone = run("uninstall-host.sh", env, "--purge")
        assert gone.returncode == 0, describe(gone)
        for key in ("NFTSG_OPT_DIR", "NFTSG_ETC_DIR", "NFTSG_STATE_DIR"):
            assert not dirs[key].exists(), key
        assert not unit.exists()
        assert not (dirs["NFTSG_BIN_DIR"] / "nftsg").exists()
        again = run("uninstall-host.sh", env)
        assert again.returncode == 0, describe(again)
    finally:
        shutil.rmtree(tmp_path / "opt", ignore_errors=True)
