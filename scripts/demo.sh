#!/usr/bin/env bash
# The main job: install, bring up the three-tier demo lab with its security
# groups enforced, and show real traffic allowed and dropped as the rules say.
# Leaves the lab up for exploring; `nftsg lab down` removes it.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
nftsg=.venv/bin/nftsg
topology=examples/three-tier.yaml

echo "==> nftsg lab up $topology"
$nftsg lab up "$topology"

echo
echo "==> a few flows, with the evaluator's reason"
explain() {
  $nftsg explain "$topology" "$@" \
    | .venv/bin/python -c 'import json, sys; d = json.load(sys.stdin); print("  %-6s  %s" % (d["verdict"], d["summary"]))'
}
explain --from office --to i-bastion --protocol tcp --port 22
explain --from internet --to i-bastion --protocol tcp --port 22
explain --from i-web1 --to i-app1 --protocol tcp --port 8080
explain --from i-web1 --to i-db1 --protocol tcp --port 5432
explain --from i-app1 --to i-db1 --protocol tcp --port 5432
explain --from i-web1 --to i-web2 --protocol tcp --port 9999
explain --from internet --to i-web1 --protocol tcp --port 80 --family ipv6

echo
echo "==> real traffic between every pair of hosts, compared with the evaluator"
$nftsg lab check

cat <<'MSG'

The lab is up. Explore it:
  . .venv/bin/activate
  nftsg lab exec i-web1 -- ping -c1 -W1 10.0.3.10      # web -> db: dropped
  nftsg lab exec office -- ping -c1 -W1 10.0.1.10      # office -> web: allowed (prefix list)
  nftsg explain --from i-app1 --to i-db1 --protocol tcp --port 5432
  nftsg lab exec i-bastion -- nft list ruleset          # (empty: rules live in the VPC router)
  ip netns exec nftsg-r-vpc-demo nft list table inet nftsg
Tear it down:
  nftsg lab down
MSG
