#!/usr/bin/env bash
# What the Docker lab needs on the host besides scripts/install.sh, as root on
# Debian 12: Debian's docker.io (dockerd, containerd, runc) and debootstrap for
# the base image. Idempotent: a second run installs nothing.
set -euo pipefail
if [ "$(id -u)" -ne 0 ]; then
  echo "nftsg docker lab: run as root" >&2
  exit 1
fi
. "$(dirname "$0")/../../scripts/debian-packages.sh"
ensure_debian_packages docker.io debootstrap
