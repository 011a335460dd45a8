#!/usr/bin/env bash
# Runs every check and test of nftsg: lint, types, unit tests, real-kernel tests.
# Installs what it needs first. Run as root on Debian 12.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh

echo "==> ruff"
.venv/bin/ruff check translators agent tests netns-tests docker-tests deploy/docker
echo "==> mypy (strict on translators/)"
# mypy cannot follow the editable install's folder mapping (translators/ ->
# nftsg.translators), so give it the installed names through symlinks; then the
# strict override for nftsg.translators.* applies and agent/ is checked
# against the real types of the core.
mkdir -p .venv/typecheck/nftsg
ln -sfn "$PWD/translators" .venv/typecheck/nftsg/translators
ln -sfn "$PWD/agent" .venv/typecheck/nftsg/agent
MYPYPATH=.venv/typecheck .venv/bin/mypy -p nftsg.translators -p nftsg.agent
echo "==> pytest"
.venv/bin/pytest -q -p no:cacheprovider tests netns-tests docker-tests "$@"
