#!/usr/bin/env bash
# Partitions between hosts, the long run: confab/tests/partition.rs (a gateway, a cell, the
# cell's store and the directory Redis, each in its own network namespace) with every cut
# repeated and held longer than in CI. Needs root and iproute2 (ip netns, tc); without them
# the tests pass after saying so on stderr.
#
#   infra/partition.sh                 10 rounds, each cut held 20 s after every client saw it
#   infra/partition.sh --short         what CI runs: 1 round, 1 s holds
#   CONFAB_PARTITION_ROUNDS=N CONFAB_PARTITION_HOLD_S=S infra/partition.sh   any other length
#
# The tests print what each client saw (time to `unavailable`, time to served again, messages
# acked and found in the log) with --nocapture.
set -euo pipefail
cd "$(dirname "$0")/.."
command -v redis-server >/dev/null || { echo "redis-server is missing: apt-get install redis-server" >&2; exit 1; }
command -v ip >/dev/null && command -v tc >/dev/null || { echo "ip/tc are missing: apt-get install iproute2" >&2; exit 1; }
if [ "${1:-}" = "--short" ]; then
  export CONFAB_PARTITION_ROUNDS=1 CONFAB_PARTITION_HOLD_S=1
else
  export CONFAB_PARTITION_ROUNDS="${CONFAB_PARTITION_ROUNDS:-10}"
  export CONFAB_PARTITION_HOLD_S="${CONFAB_PARTITION_HOLD_S:-20}"
fi
echo "==> partition test: ${CONFAB_PARTITION_ROUNDS} round(s), cuts held ${CONFAB_PARTITION_HOLD_S} s"
# One test at a time: each one builds its own namespaces and addresses.
cargo test -p confab --locked --test partition -- --nocapture --test-threads=1
