#!/usr/bin/env bash
# Scenario 5 on one machine: a distributed confab deployment on 127.0.0.1 (a directory Redis,
# a cell-store Redis, one cell, two gateways), then confab-load's fanout through both gateways.
# Subscribers are spread over the gateways; CPU and peak RSS are summed over the two gateways,
# the cell and both Redis servers.
#
# Usage: load/run-distributed.sh PATH/TO/confab PATH/TO/confab-load [fanout options...]
#   e.g. load/run-distributed.sh target/release/confab target/release/confab-load \
#          --subscribers 1000 --rates 0 --duration 10
# Environment:
#   ACTOR_THREADS="1 2 1 2"  one fresh deployment per value, its cell with --actor-threads N,
#                            in this order ("default": the cell's default; unset: one such)
#   PIN=0:1                  every server process on CPUs 0 (taskset), confab-load on CPUs 1
#                            (--pin), as SERVER:CLIENT
#   CELL_CPUS=2,3            the cell alone on these CPUs (taskset), whatever PIN says: for
#                            showing a cell's growth with ACTOR_THREADS on a machine with
#                            cores to spare
#   DEV_TOO=1                after each distributed run, the same fanout options against a
#                            fresh `confab dev` (pinned like the servers), for the ratio
# Everything it starts is stopped on exit; nothing listens beyond 127.0.0.1.
set -euo pipefail

confab=$(realpath "$1")
load=$(realpath "$2")
shift 2
pids=()
work=
cleanup() {
    for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
    for pid in "${pids[@]}"; do wait "$pid" 2>/dev/null || true; done
    pids=()
    if [ -n "$work" ]; then rm -rf "$work"; fi
    work=
}
trap cleanup EXIT

server_cpus=
pin_args=()
# The prefix that starts a server on the servers' CPUs (taskset execs the server, so $! is
# the server's own PID).
on_server_cpus=()
if [ -n "${PIN:-}" ]; then
    server_cpus=${PIN%%:*}
    pin_args=(--pin "$PIN")
    on_server_cpus=(taskset -c "$server_cpus")
fi

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
# CPU seconds per thread of a process, busiest first: "name seconds".
thread_cpu() { # pid
    for t in /proc/"$1"/task/*; do
        name=$(cat "$t/comm" 2>/dev/null) || continue
        # Fields after the ")" that ends the command name: utime and stime are 12th and 13th.
        ticks=$(sed 's/.*) //' "$t/stat" 2>/dev/null | awk '{print $12 + $13}') || continue
        echo "$name $ticks"
    done | awk '{cpu[$1] += $2} END {for (n in cpu) printf "%s %.2f\n", n, cpu[n] / 100}' |
        sort -k2 -nr | head -n 6 | tr '\n' ';'
}

# CPU seconds a process has used since it started.
proc_cpu() { # pid
    sed 's/.*) //' "/proc/$1/stat" 2>/dev/null | awk '{printf "%.2f", ($12 + $13) / 100}'
}

# One deployment: start it, run the fanout through it, stop it. $1: the cell's actor threads
# (empty: the cell's default).
deployment() {
    local actor_threads=$1
    shift
    work=$(mktemp -d)
    local dir_port store_port cell_port g1_port g2_port
    dir_port=$(free_port)
    store_port=$(free_port)
    cell_port=$(free_port)
    g1_port=$(free_port)
    g2_port=$(free_port)
    local secret=bench-jwt-secret admin=bench-admin cluster=bench-cluster-secret

    "${on_server_cpus[@]}" redis-server --bind 127.0.0.1 --port "$dir_port" --save '' --appendonly no \
        --dir "$work" >"$work/redis-directory.log" 2>&1 &
    pids+=($!)
    local redis_dir_pid=$!
    # The cell store as production runs it: append-only, fsync every second.
    "${on_server_cpus[@]}" redis-server --bind 127.0.0.1 --port "$store_port" --save '' --appendonly yes \
        --appendfsync everysec --dir "$work" --appendfilename store.aof >"$work/redis-store.log" 2>&1 &
    pids+=($!)
    local redis_store_pid=$!
    for port in "$dir_port" "$store_port"; do
        for _ in $(seq 1 100); do
            redis-cli -p "$port" ping >/dev/null 2>&1 && break
            sleep 0.1
        done
    done

    local threads_args=()
    if [ -n "$actor_threads" ]; then threads_args=(--actor-threads "$actor_threads"); fi
    export CONFAB_CLIENT_RATE=${CONFAB_CLIENT_RATE:-1000000}
    local on_cell_cpus=("${on_server_cpus[@]}")
    if [ -n "${CELL_CPUS:-}" ]; then on_cell_cpus=(taskset -c "$CELL_CPUS"); fi
    "${on_cell_cpus[@]}" "$confab" cell --id c1 --region local --listen "127.0.0.1:$cell_port" \
        --advertise "http://127.0.0.1:$cell_port" --redis "redis://127.0.0.1:$store_port" \
        --directory "redis://127.0.0.1:$dir_port" --cluster-secret "$cluster" \
        --store-fsync everysec "${threads_args[@]}" >"$work/cell.log" 2>&1 &
    pids+=($!)
    local cell_pid=$!
    local gateway_pids=()
    for port in "$g1_port" "$g2_port"; do
        "${on_server_cpus[@]}" "$confab" gateway --listen "127.0.0.1:$port" --redis "redis://127.0.0.1:$dir_port" \
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

    echo "run-distributed: cell actor threads: ${actor_threads:-default}${server_cpus:+, servers on CPUs $server_cpus}${CELL_CPUS:+, the cell on CPUs $CELL_CPUS}"
    local status=0
    "$load" run distributed \
        --target "http://127.0.0.1:$g1_port" --target "http://127.0.0.1:$g2_port" \
        --workspace bench --jwt-secret "$secret" \
        --server-pid "${gateway_pids[0]}" --server-pid "${gateway_pids[1]}" --server-pid "$cell_pid" \
        --server-pid "$redis_dir_pid" --server-pid "$redis_store_pid" \
        "${pin_args[@]}" "$@" || status=$?
    echo "run-distributed: CPU s by process (life so far): gateways $(proc_cpu "${gateway_pids[0]}") $(proc_cpu "${gateway_pids[1]}"), cell $(proc_cpu "$cell_pid"), directory Redis $(proc_cpu "$redis_dir_pid"), store Redis $(proc_cpu "$redis_store_pid")"
    echo "run-distributed: cell CPU s by thread (actor threads: ${actor_threads:-default}): $(thread_cpu "$cell_pid")"
    cleanup
    return $status
}

status=0
# "default": the cell's own default (one actor thread per core it may use).
for threads in ${ACTOR_THREADS:-default}; do
    if [ "$threads" = default ]; then threads=""; fi
    deployment "$threads" "$@" || status=$?
    if [ -n "${DEV_TOO:-}" ]; then
        "$load" run fanout --spawn-dev "$confab" "${pin_args[@]}" "$@" || status=$?
    fi
done
exit $status
