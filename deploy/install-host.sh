#!/usr/bin/env bash
# Installs nftsg as a daemon on a Debian 12 host, as root: Debian's nftables and
# bindings, a venv under /opt/nftsg with nftsg in it, the systemd unit, the
# settings file (/etc/nftsg/agent.yaml, never overwritten) and the state
# directory; then enables and starts the agent when systemd runs the host.
# Idempotent: a second run changes nothing. Undo with deploy/uninstall-host.sh.
#
#   --no-start   install and enable, do not start (or restart) the agent
#
# The locations can be moved (for tests, or another layout) with
# NFTSG_OPT_DIR (/opt/nftsg), NFTSG_ETC_DIR (/etc/nftsg), NFTSG_UNIT_DIR
# (/etc/systemd/system), NFTSG_STATE_DIR (/var/lib/nftsg), NFTSG_BIN_DIR
# (/usr/local/bin) and NFTSG_SKIP_APT=1.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
opt=${NFTSG_OPT_DIR:-/opt/nftsg}
etc=${NFTSG_ETC_DIR:-/etc/nftsg}
unit_dir=${NFTSG_UNIT_DIR:-/etc/systemd/system}
state=${NFTSG_STATE_DIR:-/var/lib/nftsg}
bin_dir=${NFTSG_BIN_DIR:-/usr/local/bin}
start=1
for arg in "$@"; do
  case "$arg" in
    --no-start) start=0 ;;
    *) echo "install-host.sh: unknown option $arg (known: --no-start)" >&2; exit 2 ;;
  esac
done

if [ "$(id -u)" -ne 0 ]; then
  echo "install-host.sh: run as root (it installs packages, a unit and /opt/nftsg)" >&2
  exit 1
fi

say() { echo "==> $*"; }
changed=0

if [ "${NFTSG_SKIP_APT:-0}" != 1 ]; then
  apt_packages=(nftables python3-nftables python3-systemd conntrack iproute2 python3-venv)
  . "$repo/scripts/debian-packages.sh"
  ensure_debian_packages "${apt_packages[@]}"
  if [ "$DEBIAN_PACKAGES_INSTALLED" = 1 ]; then changed=1; fi
fi

# Debian's interpreter, so the nftables bindings' ctypes loader and libnftables agree.
if [ ! -x "$opt/venv/bin/python" ]; then
  say "creating $opt/venv"
  mkdir -p "$opt"
  /usr/bin/python3 -m venv "$opt/venv"
  changed=1
fi
site=$("$opt/venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
for pkg in nftables systemd; do
  if [ "$(readlink "$site/$pkg" 2>/dev/null)" != "/usr/lib/python3/dist-packages/$pkg" ]; then
    ln -sfn "/usr/lib/python3/dist-packages/$pkg" "$site/$pkg"
    changed=1
  fi
done

# Reinstall only when the sources changed (a digest of what goes into the wheel).
digest=$(cd "$repo" && find pyproject.toml agent translators -type f -name '*.py' -o -type f -name '*.toml' -o -type f -name 'py.typed' | LC_ALL=C sort | xargs sha256sum | sha256sum | cut -d' ' -f1)
if [ "$(cat "$opt/.installed" 2>/dev/null)" != "$digest" ]; then
  say "installing nftsg into $opt/venv"
  build=$(mktemp -d)
  trap 'rm -rf "$build"' EXIT
  # Build from a copy: the checkout stays as it was (no build/ or egg-info).
  (cd "$repo" && tar -cf - pyproject.toml README.md agent translators) | tar -xf - -C "$build"
  "$opt/venv/bin/python" -m pip install -q --disable-pip-version-check --no-cache-dir "$build"
  echo "$digest" > "$opt/.installed"
  changed=1
fi
"$opt/venv/bin/python" -c 'import nftables; nftables.Nftables()' \
  || { echo "install-host.sh: Debian's nftables bindings do not load in $opt/venv" >&2; exit 1; }

install_file() {  # mode source target: copy when different
  if ! cmp -s "$2" "$3"; then
    install -D -m "$1" "$2" "$3"
    say "installed $3"
    changed=1
  fi
}
install_file 0644 "$repo/README.md" "$opt/README.md"
unit=$(sed "s#/opt/nftsg/venv/bin/nftsg#$opt/venv/bin/nftsg#; s#/etc/nftsg/agent.yaml#$etc/agent.yaml#" \
  "$repo/deploy/systemd/nftsg-agent.service")
if [ "$(cat "$unit_dir/nftsg-agent.service" 2>/dev/null)" != "$unit" ]; then
  mkdir -p "$unit_dir"
  printf '%s\n' "$unit" > "$unit_dir/nftsg-agent.service"
  chmod 0644 "$unit_dir/nftsg-agent.service"
  say "installed $unit_dir/nftsg-agent.service"
  changed=1
fi
# The operator's settings are never overwritten; the shipped defaults sit beside them.
if [ ! -e "$etc/agent.yaml" ]; then
  install -D -m 0644 "$repo/deploy/agent.yaml" "$etc/agent.yaml"
  say "installed $etc/agent.yaml"
  changed=1
fi
install_file 0644 "$repo/deploy/agent.yaml" "$etc/agent.yaml.default"
if [ ! -d "$state" ]; then
  install -d -m 0700 "$state"
  say "created $state"
  changed=1
fi
if [ "$(readlink "$bin_dir/nftsg" 2>/dev/null)" != "$opt/venv/bin/nftsg" ]; then
  mkdir -p "$bin_dir"
  ln -sfn "$opt/venv/bin/nftsg" "$bin_dir/nftsg"
  changed=1
fi

if [ -d /run/systemd/system ] && [ "$unit_dir" = /etc/systemd/system ]; then
  systemctl daemon-reload
  systemctl enable -q nftsg-agent.service
  if [ "$start" = 1 ]; then
    if [ "$changed" = 1 ]; then systemctl restart nftsg-agent.service; else systemctl start nftsg-agent.service; fi
    say "nftsg-agent is $(systemctl is-active nftsg-agent.service)"
  fi
else
  say "systemd is not running this host: start the agent with '$bin_dir/nftsg agent --config $etc/agent.yaml'"
fi
[ "$changed" = 1 ] && say "nftsg installed in $opt" || say "nftsg already installed in $opt: nothing to do"
