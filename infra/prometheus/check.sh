#!/usr/bin/env bash
# Checks infra/prometheus with promtool (Debian package `prometheus`): the scrape config and
# the rule files parse, the alert unit tests pass, and every alert rule has a unit test in
# which it fires.
set -euo pipefail
cd "$(dirname "$0")"
promtool check config prometheus.yml
promtool check rules rules/*.yml
promtool test rules tests/*.yml
missing=0
for alert in $(sed -n 's/^ *- alert: *//p' rules/alerts.yml); do
  # A test of the alert that expects it to fire: its alertname followed by a non-empty exp_alerts.
  if ! grep -A1 "alertname: $alert\$" tests/*.yml | grep -q "exp_alerts:\$"; then
    echo "alert $alert has no promtool test in which it fires" >&2
    missing=1
  fi
done
[ "$missing" = 0 ] && echo "every alert has a firing test"
exit "$missing"
