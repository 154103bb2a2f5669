#!/usr/bin/env bash
# Scenario 5 on one machine: a distributed confab deployment on 127.0.0.1 (a directory Redis,
# a cell-store Redis, one cell, two gateways), then confab-load's fanout through both gateways.
# Subscribers are spread over the gateways; CPU and peak RSS are summed over the two gateways,
# the cell and both Redis servers.
#
# Usage: load/run-distributed.sh PATH/TO/confab PATH/TO/confab-load [fanout options...]
#   e.g. load/run-distributed.sh target/release/confab target/release/confab-load \
#          --subscribers 1000 --rates 0 --duration 10
# Everything it starts is stopped on exit; nothing listens beyond 127.0.0.1.
set -euo pipefail

confab=$(realpath "$1")
load=$(realpath "$2")
shift 2
work=$(mktemp -d)
pids=()
cleanup() {
    for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
    for pid in "${pids[@]}"; do wait "$pid" 2>/dev/null || true; done
    rm -rf "$work"
}
trap cleanup EXIT

free_port() {
    python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}
wait_for() { # url, what
    for _ in $(seq 1 100); do
        if curl -fsS "$1" >/dev/null 2>&1; then return 0; fi
        sleep 0.1
    done
    echo "run-distributed: $2 did not come up ($1); logs in $work" >&2
    tail -n 20 "$work"/*.log >&2 || true
    return 1
}

dir_port=$(free_port)
store_port=$(free_port)
cell_port=$(free_port)
g1_port=$(free_port)
g2_port=$(free_port)
secret=bench-jwt-secret
admin=bench-admin
cluster=bench-cluster-secret

redis-server --bind 127.0.0.1 --port "$dir_port" --save '' --appendonly no \
    --dir "$work" >"$work/redis-directory.log" 2>&1 &
pids+=($!)
redis_dir_pid=$!
# The cell store as production runs it: append-only, fsync every second.
redis-server --bind 127.0.0.1 --port "$store_port" --save '' --appendonly yes \
    --appendfsync everysec --dir "$work" --appendfilename store.aof >"$work/redis-store.log" 2>&1 &
pids+=($!)
redis_store_pid=$!
for port in "$dir_port" "$store_port"; do
    for _ in $(seq 1 100); do
        redis-cli -p "$port" ping >/dev/null 2>&1 && break
        sleep 0.1
    done
done

export CONFAB_CLIENT_RATE=${CONFAB_CLIENT_RATE:-1000000}
"$confab" cell --id c1 --region local --listen "127.0.0.1:$cell_port" \
    --advertise "http://127.0.0.1:$cell_port" --redis "redis://127.0.0.1:$store_port" \
    --directory "redis://127.0.0.1:$dir_port" --cluster-secret "$cluster" \
    --store-fsync everysec >"$work/cell.log" 2>&1 &
pids+=($!)
cell_pid=$!
gateway_pids=()
for port in "$g1_port" "$g2_port"; do
    "$confab" gateway --listen "127.0.0.1:$port" --redis "redis://127.0.0.1:$dir_port" \
        --jwt-secret "$secret" --admin-token "$admin" --cluster-secret "$cluster" \
        >"$work/gateway-$port.log" 2>&1 &
    pids+=($!)
    gateway_pids+=($!)
done
wait_for "http://127.0.0.1:$cell_port/healthz" "the cell"
for port in "$g1_port" "$g2_port"; do
    wait_for "http://127.0.0.1:$port/readyz" "the gateway on port $port"
done

curl -fsS -X POST "http://127.0.0.1:$g1_port/admin/v1/workspaces" \
    -H "Authorization: Bearer $admin" -H 'Content-Type: application/json' \
    -d '{"region":"local","id":"bench"}' >/dev/null

"$load" run distributed \
    --target "http://127.0.0.1:$g1_port" --target "http://127.0.0.1:$g2_port" \
    --workspace bench --jwt-secret "$secret" \
    --server-pid "${gateway_pids[0]}" --server-pid "${gateway_pids[1]}" --server-pid "$cell_pid" \
    --server-pid "$redis_dir_pid" --server-pid "$redis_store_pid" \
    "$@"
