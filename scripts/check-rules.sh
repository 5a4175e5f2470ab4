#!/usr/bin/env bash
# Checks the observability files in k8s/observability:
#   - promtool check rules alerts.yml, and promtool test rules alerts.test.yml (a firing and a quiet case per alert)
#   - dashboard.json is valid JSON
#   - every paystream_* metric name used by dashboard.json and alerts.yml is in metrics.txt (the list a test checks
#     against a running paystream), histogram series (_bucket, _sum, _count) under their family name
#
# promtool: from PATH, else .run/tools/bin, else (as root with apt-get) Debian's `prometheus` package, which ships
# /usr/bin/promtool. The package's prometheus server is kept from starting (policy-rc.d), and any prometheus server
# that was not running before the install is stopped afterwards. There is no download fallback: only package
# registries are reachable from the build machines.
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
dir="$root/k8s/observability"
log() { printf '[check-rules] %s\n' "$*" >&2; }
die() { printf '[check-rules] error: %s\n' "$*" >&2; exit 1; }

# Pids of running processes named exactly `prometheus` (the server, not promtool).
prometheus_pids() { pgrep -x prometheus 2>/dev/null || true; }

install_promtool() {
  if [[ $(id -u) -ne 0 ]] || ! command -v apt-get >/dev/null; then
    die "promtool not found on PATH or in .run/tools/bin, and it cannot be installed here (needs root and apt-get).
  Install it yourself, e.g. 'sudo apt-get install --no-install-recommends prometheus' on Debian/Ubuntu (ships
  /usr/bin/promtool), or put a promtool binary (a Prometheus 2.x release) in $root/.run/tools/bin."
  fi
  log "installing promtool with apt-get (Debian package prometheus; its server is not started)"
  local before policy=/usr/sbin/policy-rc.d own_policy=""
  before=$(prometheus_pids)
  # policy-rc.d exit 101 keeps invoke-rc.d/deb-systemd-invoke from starting the service during the install.
  if [[ ! -e $policy ]]; then
    printf '#!/bin/sh\nexit 101\n' >"$policy"
    chmod 755 "$policy"
    own_policy=1
  fi
  local rc=0
  { DEBIAN_FRONTEND=noninteractive RUNLEVEL=1 apt-get install -y -qq --no-install-recommends prometheus >/dev/null 2>&1 \
      || { apt-get update -qq >/dev/null 2>&1 \
           && DEBIAN_FRONTEND=noninteractive RUNLEVEL=1 apt-get install -y -qq --no-install-recommends prometheus >/dev/null; }
  } || rc=$?
  [[ -n $own_policy ]] && rm -f "$policy"
  # Whatever happened, leave no prometheus server behind that the install started, nor one enabled for the next
  # boot (the package enables its unit; `systemctl disable` also works without a running systemd).
  if command -v systemctl >/dev/null; then
    [[ -d /run/systemd/system ]] && { systemctl stop prometheus >/dev/null 2>&1 || true; }
    systemctl disable prometheus >/dev/null 2>&1 || true
  fi
  local pid
  for pid in $(prometheus_pids); do
    if ! grep -qx "$pid" <<<"$before"; then
      log "stopping prometheus server $pid started by the package install"
      kill "$pid" 2>/dev/null || true
    fi
  done
  ((rc == 0)) || die "apt-get install prometheus failed (exit $rc)"
}

find_promtool() {
  if command -v promtool >/dev/null; then
    command -v promtool
  elif [[ -x $root/.run/tools/bin/promtool ]]; then
    echo "$root/.run/tools/bin/promtool"
  else
    install_promtool
    [[ -x /usr/bin/promtool ]] || die "the prometheus package is installed but /usr/bin/promtool is missing"
    echo /usr/bin/promtool
  fi
}

failed=0

# --- dashboard.json ----------------------------------------------------------------------------------------------
if python3 -m json.tool "$dir/dashboard.json" >/dev/null; then
  log "dashboard.json: valid JSON"
else
  log "dashboard.json: NOT valid JSON"
  failed=1
fi

# --- metric names ------------------------------------------------------------------------------------------------
known=$(sed -E 's/#.*//; s/[[:space:]]+//g; /^$/d' "$dir/metrics.txt" | sort -u)
[[ -n $known ]] || die "metrics.txt lists no metric"
used=$(grep -ohE 'paystream_[a-z_]+' "$dir/dashboard.json" "$dir/alerts.yml" | sed -E 's/_(bucket|sum|count)$//' | sort -u)
unknown=$(comm -23 <(echo "$used") <(echo "$known"))
if [[ -n $unknown ]]; then
  log "metric names used in dashboard.json or alerts.yml but missing from metrics.txt:"
  sed 's/^/  /' <<<"$unknown" >&2
  failed=1
else
  log "metric names: all $(wc -l <<<"$used") used names are in metrics.txt"
fi

# --- promtool ----------------------------------------------------------------------------------------------------
promtool=$(find_promtool)
log "using $promtool ($("$promtool" --version 2>&1 | head -n1))"
"$promtool" check rules "$dir/alerts.yml" || failed=1

# Every dashboard query must parse: with Grafana's variables replaced, they become recording rules of a scratch file.
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
if python3 - "$dir/dashboard.json" >"$tmp/dashboard-queries.yml" <<'PY'
import json, sys
subst = {"$__rate_interval": "5m", "$__interval": "1m", "$__range": "1h", "${datasource}": "", "$namespace": ".*"}
def panels(ps):
    for p in ps:
        yield p
        yield from panels(p.get("panels", []))
rules = []
for p in panels(json.load(open(sys.argv[1]))["panels"]):
    for t in p.get("targets", []):
        expr = t["expr"]
        for k, v in subst.items():
            expr = expr.replace(k, v)
        rules.append({"record": f"dashboard:panel{p['id']}:{t['refId']}", "expr": expr, "title": p["title"]})
print("groups:\n  - name: dashboard-queries\n    rules:")
for r in rules:
    print(f"      # {r['title']}\n      - record: {r['record']}\n        expr: {json.dumps(r['expr'])}")
print(f"[check-rules] dashboard.json: checking that its {len(rules)} queries parse", file=sys.stderr)
PY
then
  "$promtool" check rules "$tmp/dashboard-queries.yml" || { log "dashboard.json: a query does not parse (above)"; failed=1; }
else
  failed=1
fi
(cd "$dir" && "$promtool" test rules alerts.test.yml) || failed=1

((failed == 0)) || die "checks failed"
log "all checks passed"
