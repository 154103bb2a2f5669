#!/usr/bin/env bash
# Checks the systemd units with `systemd-analyze verify` (every directive known and
# well-formed, referenced units and the executable present) and `systemd-analyze security
# --offline` (the hardening keeps the exposure score at or below 2.0, "OK"; the threshold is in tenths).
#
# verify runs without a running systemd (it loads the unit files only), so it works in a
# container. It insists that ExecStart's binary exists, so the check verifies copies of the
# units whose ExecStart points at the confab binary built here (CONFAB_BIN), and the template
# through an instance (confab-cell@c1.service) so %i is resolved. verify only warns, with exit
# status 0, on an unknown or misspelt directive: any output at all fails this check.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
bin="$(realpath "${CONFAB_BIN:-$here/../../target/debug/confab}")"
[ -x "$bin" ] || { echo "no confab binary at $bin (cargo build -p confab)" >&2; exit 1; }
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

sed "s|^ExecStart=/usr/local/bin/confab|ExecStart=$bin|" "$here/confab-gateway.service" >"$work/confab-gateway.service"
sed "s|^ExecStart=/usr/local/bin/confab|ExecStart=$bin|" "$here/confab-cell@.service" >"$work/confab-cell@.service"
ln -s "confab-cell@.service" "$work/confab-cell@c1.service"
grep -q "^ExecStart=$bin " "$work/confab-gateway.service" "$work/confab-cell@.service"

status=0
for unit in confab-gateway.service confab-cell@c1.service; do
  out="$(cd "$work" && systemd-analyze verify "./$unit" 2>&1)" || status=1
  if [ -n "$out" ]; then
    echo "systemd-analyze verify $unit:" >&2
    echo "$out" >&2
    status=1
  fi
  if ! score="$(systemd-analyze security --offline=yes --threshold=20 "$work/$unit" 2>&1)"; then
    echo "$score" | tail -n 5 >&2
    echo "systemd-analyze security: $unit is exposed above 2.0" >&2
    status=1
  else
    echo "$unit: $(echo "$score" | grep -o 'Overall exposure level.*')"
  fi
done

# The stop timeout must outlast the gateway's shutdown window (--shutdown-timeout-ms, 30 s).
for unit in confab-gateway.service confab-cell@.service; do
  secs="$(sed -n 's/^TimeoutStopSec=\([0-9]*\)s$/\1/p' "$here/$unit")"
  if [ -z "$secs" ] || [ "$secs" -le 30 ]; then
    echo "$unit: TimeoutStopSec must be above the 30 s shutdown window (found '${secs}')" >&2
    status=1
  fi
done
[ "$status" = 0 ] && echo "systemd units OK"
exit "$status"
