#!/usr/bin/env bash
# Where PostgreSQL's time goes during `paystream bench e2e`: loads pg_stat_statements (with planning times) into the
# private cluster of scripts/infra.sh (one restart on the same port, the first time), resets it when the bench's
# first counted window starts, and prints the statements by total time once that window ends.
#
#   scripts/bench-statements.sh [bench e2e options]      e.g. --rates 1000 --duration 20s --warmup 5s
#   (make bench-statements ARGS="--rates 500")
#
# Only for the private cluster (.run/pg): a server named by DATABASE_URL is not restarted. The bench's own output
# goes to .run/bench-statements.log.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
log() { echo "[bench-statements] $*" >&2; }
set -a; source .run/infra.env; set +a
bin=${PAYSTREAM_BIN:-${CARGO_TARGET_DIR:-target}/release/paystream}
pgdata=$(readlink -f .run/pg)/data
[[ -f $pgdata/PG_VERSION ]] || { log "no private cluster at .run/pg (run scripts/infra.sh up)"; exit 1; }
as_pg() { if [[ $(id -u) == 0 ]]; then runuser -u postgres -- "$@"; else "$@"; fi; }
if [[ $(psql "$DATABASE_URL" -Atqc "SHOW shared_preload_libraries") != *pg_stat_statements* ]]; then
  log "loading pg_stat_statements into the private cluster (one restart)"
  psql "$DATABASE_URL" -qc "ALTER SYSTEM SET shared_preload_libraries = 'pg_stat_statements'" \
    -c "ALTER SYSTEM SET pg_stat_statements.track_planning = on" >/dev/null
  port=${DATABASE_URL##*:}; port=${port%%/*}
  as_pg "$PG_BIN/pg_ctl" -D "$pgdata" -m fast -w restart -o "-p $port -k $(dirname "$pgdata")" \
    -l "$(dirname "$pgdata")/server.log" >/dev/null
fi
psql "$DATABASE_URL" -qc "CREATE EXTENSION IF NOT EXISTS pg_stat_statements" >/dev/null
out=.run/bench-statements.log
PAYSTREAM__TELEMETRY__LOG_FILTER=warn "$bin" bench e2e "$@" >"$out" 2>&1 &
bench=$!
# The counted window of the first rate starts after its callbacks are signed and ends when they are all sent.
until grep -q "signed" "$out" 2>/dev/null; do sleep 0.2; kill -0 $bench 2>/dev/null || break; done
psql "$DATABASE_URL" -Atqc "SELECT pg_stat_statements_reset()" >/dev/null
until grep -q "callbacks: offered" "$out" 2>/dev/null; do sleep 0.2; kill -0 $bench 2>/dev/null || break; done
psql "$DATABASE_URL" -P pager=off -c "
  SELECT calls, round(total_plan_time::numeric) AS plan_ms, round(total_exec_time::numeric) AS exec_ms,
         round((total_plan_time / calls)::numeric, 3) AS plan_per_call, round((total_exec_time / calls)::numeric, 3) AS exec_per_call,
         rows, round(shared_blks_hit::numeric / calls) AS pages_per_call, left(regexp_replace(query, '\s+', ' ', 'g'), 90) AS query
  FROM pg_stat_statements WHERE calls > 10 ORDER BY total_plan_time + total_exec_time DESC LIMIT 15" \
  -c "SELECT round(sum(total_plan_time)::numeric) AS planning_ms, round(sum(total_exec_time)::numeric) AS executing_ms FROM pg_stat_statements"
wait $bench || true
grep -A3 "^summary" "$out" >&2 || tail -5 "$out" >&2
