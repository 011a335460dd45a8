# Sourced by the install scripts: installs the Debian packages given that are
# not installed yet, quietly; sets DEBIAN_PACKAGES_INSTALLED=1 when it installed any.
# Needs root and `set -euo pipefail` in the caller.
DEBIAN_PACKAGES_INSTALLED=0
ensure_debian_packages() {
  local pkg missing=()
  for pkg in "$@"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
  done
  if [ "${#missing[@]}" -gt 0 ]; then
    echo "==> installing Debian packages: ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
    DEBIAN_PACKAGES_INSTALLED=1
  fi
}
