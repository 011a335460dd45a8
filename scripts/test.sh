#!/usr/bin/env bash
# Runs every check and test of nftsg: lint, types, unit tests, real-kernel tests.
# Installs what it needs first. Run as root on Debian 12.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh

echo "==> ruff"
.venv/bin/ruff check translators agent tests netns-tests
echo "==> mypy (strict on translators/)"
.venv/bin/mypy translators agent
echo "==> pytest"
.venv/bin/pytest -q -p no:cacheprovider tests netns-tests "$@"
