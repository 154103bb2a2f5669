#!/usr/bin/env bash
# Chaos under load: the chat mix through a local cluster (the layout of infra/local/cluster.sh:
# a directory Redis, cell c1 with its own Redis, two gateways; every Redis with
# --appendonly yes --appendfsync always) while a gateway, the cell, the cell's Redis and the
# directory Redis are killed with SIGKILL in turn and restarted. Fails unless every acked
# message reached every member exactly once, in seq order, none lost (see docs/chaos.md).
#
#   infra/chaos.sh                 full run: 10 minutes of traffic, a kill every 20 s
#   infra/chaos.sh --short         CI: 75 s of traffic, one kill of each every 15 s
#   infra/chaos.sh [confab-load chaos flags...]   e.g. --duration-s 120 --kill-every-s 10
#
# CONFAB_BIN selects the confab binary (default: target/debug/confab, built when missing);
# results go to target/chaos/<time>/ (process logs, one JSON-lines log per client,
# report.json).
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
command -v redis-server >/dev/null || { echo "redis-server is missing: apt-get install redis-server" >&2; exit 1; }
bin="${CONFAB_BIN:-$root/target/debug/confab}"
if [ ! -x "$bin" ]; then
  cargo build -q -p confab --locked
fi
args=()
if [ "${1:-}" = "--short" ]; then
  shift
  args=(--duration-s 75 --kill-every-s 15 --down-s 2)
fi
out="$root/target/chaos/$(date -u +%Y%m%dT%H%M%SZ)"
cargo run -q -p confab-load --locked -- chaos --confab "$bin" --out "$out" "${args[@]}" "$@"
