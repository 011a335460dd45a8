"""deploy/: the systemd unit passes `systemd-analyze verify` and has the settings the
agent relies on; the Vagrantfile passes `vagrant validate`. No root, no VM.

Both tools come from Debian (scripts/install.sh installs `systemd` and
`vagrant`); without them these tests are skipped with that reason. PID 1 need
not be systemd: `verify` loads the unit file offline.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
UNIT = REPO / "deploy" / "systemd" / "nftsg-agent.service"
VAGRANTFILE = REPO / "deploy" / "Vagrantfile"
INSTALLED_NFTSG = "/opt/nftsg/venv/bin/nftsg"


def unit_here(tmp_path: Path) -> Path:
    """The unit with ExecStart pointing at this checkout's `nftsg` (verify checks that
    the program exists; /opt/nftsg exists only on an installed host)."""
    here = Path(sys.executable).parent / "nftsg"
    assert here.exists(), f"{here}: nftsg is not installed in this venv"
    text = UNIT.read_text()
    assert INSTALLED_NFTSG in text
    path = tmp_path / UNIT.name
    path.write_text(text.replace(INSTALLED_NFTSG, str(here)))
    return path


def service_section() -> dict[str, list[str]]:
    # Repeated keys (SystemCallFilter=) add up: read line by line, not with configparser.
    values: dict[str, list[str]] = {}
    section = ""
    for line in UNIT.read_text().splitlines():
        line = line.strip()
        if line.startswith("["):
            section = line
        elif section == "[Service]" and "=" in line and not line.startswith("#"):
            key, _, value = line.partition("=")
            values.setdefault(key, []).append(value)
    return values


@pytest.mark.skipif(
    shutil.which("systemd-analyze") is None,
    reason="systemd-analyze is missing: install Debian's systemd package (scripts/install.sh)",
)
def test_unit_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    result = subprocess.run(
        ["systemd-analyze", "verify", str(unit_here(tmp_path))],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert result.stderr.strip() == "", result.stderr  # no warning either


@pytest.mark.skipif(
    shutil.which("systemd-analyze") is None,
    reason="systemd-analyze is missing: install Debian's systemd package (scripts/install.sh)",
)
def test_verify_catches_a_broken_unit(tmp_path: Path) -> None:
    """The check bites: a misspelt directive is reported."""
    path = unit_here(tmp_path)
    path.write_text(path.read_text().replace("WatchdogSec=", "WatchDogSec="))
    result = subprocess.run(
        ["systemd-analyze", "verify", str(path)], capture_output=True, text=True, timeout=60
    )
    assert "WatchDogSec" in result.stderr


def test_unit_settings_the_agent_relies_on() -> None:
    service = service_section()
    assert service["Type"] == ["notify"]
    assert service["ExecReload"] == ["/bin/kill -HUP $MAINPID"]
    assert service["Restart"] == ["on-failure"]
    assert int(service["WatchdogSec"][0]) >= 30  # a cold load of a large model fits a round
    # Measured: nftables/conntrack need CAP_NET_ADMIN, setns(2) needs CAP_SYS_ADMIN.
    for key in ("CapabilityBoundingSet", "AmbientCapabilities"):
        assert set(service[key][0].split()) == {"CAP_NET_ADMIN", "CAP_SYS_ADMIN"}
    for key, value in {
        "NoNewPrivileges": "yes",
        "ProtectSystem": "strict",
        "ProtectHome": "yes",
        "PrivateTmp": "yes",
        "StateDirectory": "nftsg",
        "RuntimeDirectory": "nftsg",
    }.items():
        assert service[key] == [value], key
    assert "AF_NETLINK" in service["RestrictAddressFamilies"][0].split()
    assert "@system-service" in service["SystemCallFilter"]
    # The API socket lives in the runtime directory.
    assert "NFTSG_API_SOCKET=/run/nftsg/api.sock" in service["Environment"]
    assert "RestrictNamespaces" not in service  # joining router namespaces must stay allowed


@pytest.mark.skipif(
    shutil.which("vagrant") is None,
    reason="vagrant is missing: install Debian's vagrant package (scripts/install.sh)",
)
def test_vagrantfile_validates(tmp_path: Path) -> None:
    env = {**os.environ, "VAGRANT_DOTFILE_PATH": str(tmp_path / ".vagrant")}
    # No provider (VirtualBox, libvirt) is installed here: validate the rest.
    result = subprocess.run(
        ["vagrant", "validate", "--ignore-provider"],
        cwd=VAGRANTFILE.parent,
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "validated successfully" in result.stdout
    text = VAGRANTFILE.read_text()
    assert 'config.vm.box = "debian/bookworm64"' in text
    assert "deploy/install-host.sh" in text and "scripts/demo.sh" in text
    assert not (VAGRANTFILE.parent / ".vagrant").exists()


@pytest.mark.skipif(shutil.which("vagrant") is None, reason="vagrant is missing")
def test_vagrant_validate_catches_a_broken_vagrantfile(tmp_path: Path) -> None:
    broken = tmp_path / "Vagrantfile"
    broken.write_text(VAGRANTFILE.read_text().replace("config.vm.hostname", "config.vm.hostnam"))
    env = {**os.environ, "VAGRANT_DOTFILE_PATH": str(tmp_path / ".vagrant")}
    result = subprocess.run(
        ["vagrant", "validate", "--ignore-provider"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert result.returncode != 0
