#!/usr/bin/env bash
# A local two-region confab cluster on loopback, for trying distributed mode on one machine:
#   one shared presence+directory Redis, cell c1 (us-east) and cell c2 (eu-west) each with its
#   own Redis store, and two gateways. Workspaces `acme` (us-east) and `globex` (eu-west).
#
#   infra/local/cluster.sh start    start everything, print URLs and tokens
#   infra/local/cluster.sh status   show the cells as the directory sees them
#   infra/local/cluster.sh roll     restart the gateways, then the cells, one at a time, with
#                                   SIGTERM (a rolling restart; clients resume, nothing is lost)
#   infra/local/cluster.sh stop     stop everything this script started
#
# Ports and paths can be changed with environment variables (see the defaults below).
# CONFAB_BIN selects the binary (default: target/release/confab, built when missing).
set -euo pipefail
root="$(cd "$(dirname "$0")/../.." && pwd)"
state="${CONFAB_CLUSTER_DIR:-$root/target/local-cluster}"
bin="${CONFAB_BIN:-$root/target/release/confab}"
redis_dir_port="${REDIS_DIRECTORY_PORT:-6390}"
redis_c1_port="${REDIS_C1_PORT:-6391}"
redis_c2_port="${REDIS_C2_PORT:-6392}"
c1_port="${CELL_C1_PORT:-7001}"
c2_port="${CELL_C2_PORT:-7002}"
gw1_port="${GATEWAY_1_PORT:-8081}"
gw2_port="${GATEWAY_2_PORT:-8082}"
jwt_secret="${CONFAB_JWT_SECRET:-dev-secret}"
admin_token="${CONFAB_ADMIN_TOKEN:-dev-admin}"
cluster_secret="${CONFAB_CLUSTER_SECRET:-local-cluster-secret}"

wait_http() { # url
  for _ in $(seq 1 200); do
    curl -fsS "$1" >/dev/null 2>&1 && return 0
    sleep 0.1
  done
  echo "timed out waiting for $1" >&2
  return 1
}

spawn() { # name command...
  local name=$1
  shift
  "$@" >"$state/$name.log" 2>&1 &
  echo $! >"$state/$name.pid"
}

start_redis() { # name port
  mkdir -p "$state/$1"
  spawn "$1" redis-server --port "$2" --bind 127.0.0.1 --dir "$state/$1" \
    --appendonly yes --appendfsync always --save ""
  for _ in $(seq 1 100); do
    redis-cli -p "$2" ping >/dev/null 2>&1 && return 0
    sleep 0.1
  done
  echo "redis $1 did not start" >&2
  return 1
}

directory_url() { echo "redis://127.0.0.1:$redis_dir_port"; }

start_cell() { # id region port store-port
  spawn "cell-$1" "$bin" cell --id "$1" --region "$2" --listen "127.0.0.1:$3" \
    --advertise "http://127.0.0.1:$3" --redis "redis://127.0.0.1:$4" \
    --directory "$(directory_url)" --cluster-secret "$cluster_secret"
}

start_gateway() { # index port
  spawn "gateway-$1" "$bin" gateway --listen "127.0.0.1:$2" --redis "$(directory_url)" \
    --jwt-secret "$jwt_secret" --admin-token "$admin_token" --cluster-secret "$cluster_secret"
}

start() {
  command -v redis-server >/dev/null || { echo "redis-server is missing: apt-get install redis-server" >&2; exit 1; }
  if [ ! -x "$bin" ]; then
    (cd "$root" && cargo build --release -p confab)
  fi
  if [ -n "$(ls "$state"/*.pid 2>/dev/null)" ]; then
    echo "a cluster is already running from $state; run: $0 stop" >&2
    exit 1
  fi
  mkdir -p "$state"
  start_redis redis-directory "$redis_dir_port"
  start_redis redis-c1 "$redis_c1_port"
  start_redis redis-c2 "$redis_c2_port"
  start_cell c1 us-east "$c1_port" "$redis_c1_port"
  start_cell c2 eu-west "$c2_port" "$redis_c2_port"
  wait_http "http://127.0.0.1:$c1_port/readyz"
  wait_http "http://127.0.0.1:$c2_port/readyz"
  for i in 1 2; do
    local port_var="gw${i}_port"
    start_gateway "$i" "${!port_var}"
    wait_http "http://127.0.0.1:${!port_var}/readyz"
  done
  local ctl=("$bin" ctl --gateway "http://127.0.0.1:$gw1_port" --admin-token "$admin_token")
  "${ctl[@]}" workspace create --region us-east --id acme --name Acme >/dev/null 2>&1 || true
  "${ctl[@]}" workspace create --region eu-west --id globex --name Globex >/dev/null 2>&1 || true
  echo "confab local cluster is up (logs and pids in $state)"
  echo
  echo "gateways:  http://127.0.0.1:$gw1_port  http://127.0.0.1:$gw2_port   (WebSocket: ws://127.0.0.1:$gw1_port/v1/ws)"
  echo "cells:     c1 us-east http://127.0.0.1:$c1_port   c2 eu-west http://127.0.0.1:$c2_port"
  echo "admin token: $admin_token"
  echo
  "${ctl[@]}" cells
  echo
  for ws in acme globex; do
    for user in alice bob; do
      echo "token $ws/$user: $("${ctl[@]}" token --workspace "$ws" --user "$user")"
    done
  done
  echo
  echo "stop with: $0 stop"
}

stop() {
  local any=0
  for pidfile in "$state"/gateway-*.pid "$state"/cell-*.pid "$state"/redis-*.pid; do
    [ -e "$pidfile" ] || continue
    any=1
    local pid
    pid=$(cat "$pidfile")
    kill "$pid" 2>/dev/null || true
    for _ in $(seq 1 50); do
      kill -0 "$pid" 2>/dev/null || break
      sleep 0.1
    done
    kill -9 "$pid" 2>/dev/null || true
    rm -f "$pidfile"
  done
  [ "$any" = 1 ] && echo "stopped the local cluster" || echo "no local cluster is running"
}

# Sends SIGTERM to one process and waits for it to exit (a gateway takes up to its
# --shutdown-spread-ms to close its sessions, a cell a moment to drain).
terminate() { # name
  local pidfile="$state/$1.pid" pid
  pid=$(cat "$pidfile")
  kill -TERM "$pid" 2>/dev/null || true
  for _ in $(seq 1 400); do
    kill -0 "$pid" 2>/dev/null || { rm -f "$pidfile"; return 0; }
    sleep 0.1
  done
  echo "$1 (pid $pid) did not exit within 40 s of SIGTERM" >&2
  return 1
}

roll() {
  [ -e "$state/gateway-1.pid" ] || { echo "no local cluster is running; run: $0 start" >&2; exit 1; }
  for i in 1 2; do
    local port_var="gw${i}_port"
    echo "restarting gateway-$i"
    terminate "gateway-$i"
    start_gateway "$i" "${!port_var}"
    wait_http "http://127.0.0.1:${!port_var}/readyz"
  done
  echo "restarting cell-c1"
  terminate cell-c1
  start_cell c1 us-east "$c1_port" "$redis_c1_port"
  wait_http "http://127.0.0.1:$c1_port/readyz"
  echo "restarting cell-c2"
  terminate cell-c2
  start_cell c2 eu-west "$c2_port" "$redis_c2_port"
  wait_http "http://127.0.0.1:$c2_port/readyz"
  echo "every process restarted"
  status
}

status() {
  "$bin" ctl --gateway "http://127.0.0.1:$gw1_port" --admin-token "$admin_token" cells
}

case "${1:-}" in
  start) start ;;
  stop) stop ;;
  status) status ;;
  roll) roll ;;
  *) echo "usage: $0 start|status|roll|stop" >&2; exit 2 ;;
esac
