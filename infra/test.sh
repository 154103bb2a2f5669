#!/usr/bin/env bash
# Runs every check and test of confab on a fresh Debian machine with Rust.
# Installs what the tests need (redis-server, chromium, chromium-driver, python3-venv,
# nats-server, and the pinned npm and PyPI packages of the SDK and API-contract checks) when
# it is missing; tests start their own servers on free ports. Needs Node >= 20 and Python 3.11.
set -euo pipefail
cd "$(dirname "$0")/.."

need=()
command -v redis-server >/dev/null 2>&1 || need+=(redis-server)
command -v chromium >/dev/null 2>&1 || need+=(chromium)
command -v chromedriver >/dev/null 2>&1 || need+=(chromium-driver)
python3 -c "import ensurepip, venv" >/dev/null 2>&1 || need+=(python3-venv)
# prometheus: promtool, and the real Prometheus of confab/tests/monitoring.rs (cargo test);
# systemd: systemd-analyze for the unit checks (verify needs no running systemd).
command -v prometheus >/dev/null 2>&1 && command -v promtool >/dev/null 2>&1 || need+=(prometheus)
command -v systemd-analyze >/dev/null 2>&1 || need+=(systemd)
# iproute2: ip netns and tc for confab/tests/partition.rs (which skips, saying so, without them).
command -v ip >/dev/null 2>&1 && command -v tc >/dev/null 2>&1 || need+=(iproute2)
# nats-server: the NATS arm of `confab-load compare --nats` (load/tests/fanout_nats.rs).
command -v nats-server >/dev/null 2>&1 || [ -x /usr/sbin/nats-server ] || need+=(nats-server)
if [ ${#need[@]} -gt 0 ]; then
  echo "==> installing ${need[*]}"
  sudo_cmd=""
  [ "$(id -u)" -eq 0 ] || sudo_cmd="sudo"
  $sudo_cmd apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo_cmd apt-get install -y -qq "${need[@]}" >/dev/null
fi

echo "==> cargo fmt --check"
cargo fmt --all -- --check

echo "==> cargo clippy"
cargo clippy --workspace --all-targets --locked -- -D warnings

# The partition, blast-radius and monitoring tests run once, in their own steps below (with
# their figures); the workspace run skips them by name rather than running them twice.
run_later=(
  a_cut_gateway_cell_link_answers_unavailable_recovers_and_loses_nothing_acked
  a_cut_cell_store_link_answers_unavailable_recovers_and_loses_nothing_acked
  with_the_directory_cut_off_every_connected_client_keeps_chatting
  killing_one_cell_leaves_the_other_cells_workspaces_working_and_its_own_recover
  every_dashboard_and_rule_query_returns_data_from_a_real_prometheus_scraping_the_local_cluster
)
skips=()
for name in "${run_later[@]}"; do skips+=(--skip "$name"); done

echo "==> cargo test"
cargo test --workspace --locked -- --test-threads="${CONFAB_TEST_THREADS:-4}" "${skips[@]}"

# SPEC §4–5 behave the same in dev and distributed mode: the same end-to-end suite runs again
# against a `confab cell` + `confab gateway` with real Redis servers (see confab/tests/common).
echo "==> cargo test, the end-to-end suite against a distributed deployment"
CONFAB_TEST_TARGET=cluster cargo test -p confab --locked \
  --test handshake --test ops --test errors_and_limits --test close_codes --test http_api \
  --test admin_api --test isolation --test hostile_input --test health --test upgrade \
  --test workspace_limits --test webhooks --test batch --test compression \
  -- --test-threads="${CONFAB_TEST_THREADS:-4}"

# The same suite with the directory and the cell store on one real 3-master Redis Cluster
# (redis+cluster:// URL; docs/operations.md "Running on a Redis Cluster"): the files that
# exercise the directory, presence and the store's channels (the others speak the same wire
# protocol whatever the Redis). Each test starts its own cluster (redis-cli --cluster create):
# about 2 min on the 2-core machine, against 1 min 12 s for all twelve files above on a
# single Redis. confab/tests/redis_cluster.rs (a master
# killed under traffic) ran in the workspace tests.
echo "==> cargo test, the end-to-end suite with the directory and the store on a Redis Cluster"
CONFAB_TEST_TARGET=cluster CONFAB_TEST_REDIS=cluster cargo test -p confab --locked \
  --test handshake --test ops --test http_api --test admin_api --test isolation \
  --test workspace_limits \
  -- --test-threads="${CONFAB_TEST_THREADS:-4}"

# Cells as the unit of operations (docs/operations.md), distributed mode only:
# confab/tests/cell_ops.rs (bounds, metrics) and shutdown.rs (SIGTERM of a gateway and of a
# cell, a rolling restart under traffic) ran in the workspace tests above. The blast-radius
# case runs here, with its output, for the latency figures it measures (the other cell's
# workspace before, during and after a kill -9; never asserted).
echo "==> blast radius: latency figures"
cargo test -q -p confab --locked --test blast_radius -- --nocapture

# docs/bots.md's example bot: a Python process (standard library only) registered as a webhook
# on a live `confab dev`; a user says "ping", the bot answers over HTTP, the user's WebSocket
# sees "pong". Part of the workspace tests above; named here so the step shows in the log.
echo "==> echo bot (docs/examples/echo-bot) against a live confab dev"
cargo test -q -p confab --locked --test echo_bot

echo "==> load smoke run (a few seconds per scenario)"
cargo run -q -p confab-load --locked -- smoke --confab target/debug/confab

# The fuzz targets' short run on stable (docs/fuzzing.md): each check over its committed seeds,
# its kept crashing inputs and 3,000 seeded random inputs. Part of the workspace tests above;
# named here so the step shows in the log.
echo "==> fuzz targets, short run (seed corpus, regressions, seeded random inputs)"
cargo test -q -p confab-fuzz-checks --locked --test corpus

# docs/chaos.md: 75 s of the chat mix while a gateway, the cell, the cell's Redis and the
# directory Redis are killed with SIGKILL in turn; fails on any loss, duplicate or reorder.
# docs/operations.md "What a partition does": gateway, cell, store and directory Redis in
# network namespaces of their own; each link cut and healed under traffic. Skipped by the
# workspace tests above and run here, with its output, for the figures.
echo "==> partition test across hosts (network namespaces), with its figures"
cargo test -q -p confab --locked --test partition -- --nocapture

echo "==> chaos, short run"
CONFAB_BIN="${CONFAB_BIN:-target/debug/confab}" infra/chaos.sh --short

# The JavaScript SDK (clients/js) and the machine-readable API contracts (docs/openapi.yaml,
# docs/asyncapi.yaml). npm packages come from the committed package-lock.json; install scripts
# are not run (none is needed: esbuild's binary is its own optional package).
echo "==> SDK and API contracts: installing pinned tools"
cargo build -q -p confab --locked
(cd clients/js && npm ci --ignore-scripts --no-audit --no-fund --loglevel=error)
[ -x target/ci-venv/bin/python ] || python3 -m venv target/ci-venv
target/ci-venv/bin/pip install -q --disable-pip-version-check \
  openapi-spec-validator==0.7.2 schemathesis==4.32.5

echo "==> openapi-spec-validator docs/openapi.yaml"
target/ci-venv/bin/openapi-spec-validator docs/openapi.yaml

echo "==> node --test clients/js (SDK against confab dev and a cluster; asyncapi and type contract)"
(cd clients/js && CONFAB_BIN="$PWD/../../target/debug/confab" node --test --test-concurrency=1 test/)

echo "==> schemathesis: docs/openapi.yaml against confab dev"
infra/api-contract.sh target/ci-venv/bin/schemathesis

echo "==> npm pack --dry-run, and the SDK's size"
(cd clients/js && npm pack --dry-run 2>&1 | grep -v "^npm notice *$" && echo "minified + gzipped: $(npm run -s size) bytes")

# The production kit (infra/README.md): deploy files and monitoring, each checked offline.
echo "==> systemd units: systemd-analyze verify and security --offline"
cargo build -q -p confab --locked
infra/systemd/verify.sh

echo "==> kubernetes manifests: kubernetes-validate (pinned; ships the schemas), overlays rendered by kubectl kustomize where installed"
[ -x target/ci-venv/bin/python ] || python3 -m venv target/ci-venv
target/ci-venv/bin/pip install -q --disable-pip-version-check kubernetes-validate==1.37.0
target/ci-venv/bin/python infra/k8s/check.py

echo "==> prometheus: promtool check config and rules, promtool test rules"
infra/prometheus/check.sh

# Skipped by the workspace tests above (run_later) and run here, so the step shows in the log.
echo "==> monitoring: every dashboard and rule query returns data from a real Prometheus scraping the local cluster"
cargo test -q -p confab --locked --test monitoring

# docs/capacity.md is regenerated from this command's report; a small run keeps it working.
echo "==> confab-load capacity, small run (the inputs of docs/capacity.md)"
cargo run -q -p confab-load --locked -- capacity --confab target/debug/confab \
  --sessions 200 --members 20 --messages 100 --rate 50 --idle-s 3 --out target/capacity-smoke
