#!/usr/bin/env bash
# Runs every check and test of confab on a fresh Debian machine with Rust.
# Installs what the tests need (redis-server, chromium, chromium-driver) when it is missing;
# tests start their own servers on free ports.
set -euo pipefail
cd "$(dirname "$0")/.."

need=()
command -v redis-server >/dev/null 2>&1 || need+=(redis-server)
command -v chromium >/dev/null 2>&1 || need+=(chromium)
command -v chromedriver >/dev/null 2>&1 || need+=(chromium-driver)
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

echo "==> cargo test"
cargo test --workspace --locked -- --test-threads="${CONFAB_TEST_THREADS:-4}"

# SPEC §4–5 behave the same in dev and distributed mode: the same end-to-end suite runs again
# against a `confab cell` + `confab gateway` with real Redis servers (see confab/tests/common).
echo "==> cargo test, the end-to-end suite against a distributed deployment"
CONFAB_TEST_TARGET=cluster cargo test -p confab --locked \
  --test handshake --test ops --test errors_and_limits --test close_codes --test http_api \
  --test admin_api --test isolation --test hostile_input --test health --test upgrade \
  --test workspace_limits \
  -- --test-threads="${CONFAB_TEST_THREADS:-4}"

echo "==> load smoke run (a few seconds per scenario)"
cargo run -q -p confab-load --locked -- smoke --confab target/debug/confab
