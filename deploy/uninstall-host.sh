#!/usr/bin/env bash
# Undoes deploy/install-host.sh, as root: stops and disables the agent, removes
# every namespace and table nftsg made (`nftsg cleanup`: until then the rules
# stay in force, even with the agent stopped), the unit, the venv and the
# command. The settings (/etc/nftsg) and the state directory (API keys) stay
# unless --purge. Same NFTSG_*_DIR variables as install-host.sh. Idempotent.
set -euo pipefail
opt=${NFTSG_OPT_DIR:-/opt/nftsg}
etc=${NFTSG_ETC_DIR:-/etc/nftsg}
unit_dir=${NFTSG_UNIT_DIR:-/etc/systemd/system}
state=${NFTSG_STATE_DIR:-/var/lib/nftsg}
bin_dir=${NFTSG_BIN_DIR:-/usr/local/bin}
purge=0
for arg in "$@"; do
  case "$arg" in
    --purge) purge=1 ;;
    *) echo "uninstall-host.sh: unknown option $arg (known: --purge)" >&2; exit 2 ;;
  esac
done
if [ "$(id -u)" -ne 0 ]; then
  echo "uninstall-host.sh: run as root" >&2
  exit 1
fi
say() { echo "==> $*"; }

if [ -d /run/systemd/system ] && [ -e "$unit_dir/nftsg-agent.service" ]; then
  systemctl disable -q --now nftsg-agent.service || true
fi
if [ -x "$opt/venv/bin/nftsg" ] && [ -d "$state" ]; then
  say "removing nftsg's namespaces and tables"
  config=()
  [ -f "$etc/agent.yaml" ] && config=(--config "$etc/agent.yaml")
  "$opt/venv/bin/nftsg" cleanup "${config[@]}" --state-dir "$state"
fi
if [ -e "$unit_dir/nftsg-agent.service" ]; then
  rm -f "$unit_dir/nftsg-agent.service"
  [ -d /run/systemd/system ] && systemctl daemon-reload
  say "removed $unit_dir/nftsg-agent.service"
fi
if [ "$(readlink "$bin_dir/nftsg" 2>/dev/null)" = "$opt/venv/bin/nftsg" ]; then
  rm -f "$bin_dir/nftsg"
fi
if [ -d "$opt" ]; then
  rm -rf "$opt"
  say "removed $opt"
fi
if [ "$purge" = 1 ]; then
  rm -rf "$etc" "$state"
  say "removed $etc and $state"
fi
say "nftsg uninstalled"
