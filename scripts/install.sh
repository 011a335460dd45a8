#!/usr/bin/env bash
# Installs what nftsg needs on Debian 12, as root: the kernel-facing tools from
# Debian and a project venv that sees Debian's nftables bindings (which must
# match the installed libnftables exactly, so they cannot come from PyPI).
# Idempotent: a second run installs nothing.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "$(id -u)" -ne 0 ]; then
  echo "nftsg: run as root (namespaces and nftables need CAP_NET_ADMIN)" >&2
  exit 1
fi

# python3-systemd: the agent's native journal handler; systemd (systemd-analyze) and
# vagrant (14 MB of Ruby) only check deploy/'s unit and Vagrantfile in the tests.
apt_packages=(nftables python3-nftables conntrack iproute2 python3-venv iputils-ping procps iperf3 gcc
  python3-systemd systemd vagrant)
. scripts/debian-packages.sh
ensure_debian_packages "${apt_packages[@]}"

# Debian's interpreter, so the bindings' ctypes loader and libnftables agree.
if [ ! -x .venv/bin/python ]; then
  echo "==> creating .venv"
  /usr/bin/python3 -m venv .venv
fi
site=$(.venv/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
# Link only the nftables package: a .pth to dist-packages would leak all of
# Debian's Python packages into the venv (seen: protobuf replaced).
ln -sfn /usr/lib/python3/dist-packages/nftables "$site/nftables"
# Debian's journal bindings (a C extension for this interpreter), the same way.
ln -sfn /usr/lib/python3/dist-packages/systemd "$site/systemd"

if ! .venv/bin/python -c 'import nftsg.agent, pytest, hypothesis, ruff, mypy' 2>/dev/null \
   || [ pyproject.toml -nt .venv/.nftsg-installed ]; then
  echo "==> installing nftsg and its Python dependencies into .venv"
  .venv/bin/python -m pip install -q --disable-pip-version-check --upgrade pip setuptools
  .venv/bin/python -m pip install -q --disable-pip-version-check -e '.[test]'
  touch .venv/.nftsg-installed
fi
.venv/bin/python -c 'import nftables; nftables.Nftables()' \
  || { echo "nftsg: Debian's nftables bindings do not load in .venv" >&2; exit 1; }
