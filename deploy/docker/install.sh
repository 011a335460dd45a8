#!/usr/bin/env bash
# What the Docker lab needs on the host besides scripts/install.sh, as root on
# Debian 12: Debian's docker.io (dockerd, containerd, runc) and debootstrap for
# the base image. Idempotent: a second run installs nothing.
set -euo pipefail
if [ "$(id -u)" -ne 0 ]; then
  echo "nftsg docker lab: run as root" >&2
  exit 1
fi
missing=()
for pkg in docker.io debootstrap; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if [ "${#missing[@]}" -gt 0 ]; then
  echo "==> installing Debian packages: ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
