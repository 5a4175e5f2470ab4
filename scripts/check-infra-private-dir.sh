#!/usr/bin/env bash
# Part of `make test`: the infrastructure script works from a clone in a directory the `postgres` user cannot enter
# (a 0700 `mktemp -d`, like /root), as root, which is how CI runs. It once failed there with "initdb: could not
# access directory … Permission denied". Clones this repository (its committed state) into such a directory, runs
# `scripts/infra.sh up` there with no DATABASE_URL, checks PostgreSQL and NATS answer, and takes it all down again.
# The clone borrows this checkout's .run/tools (nats-server, cryptography) instead of installing them again.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
log() { echo "[check-infra] $*"; }
if [[ $(id -u) != 0 ]]; then
  log "not root: the private-directory case is root's, skipped"
  exit 0
fi
dir=$(mktemp -d)
[[ $(stat -c %a "$dir") == 700 ]] || { log "mktemp -d did not make a 0700 directory"; exit 1; }
clone="$dir/clone"
cleanup() {
  if [[ -x $clone/scripts/infra.sh ]]; then (cd "$clone" && env -u DATABASE_URL scripts/infra.sh down >/dev/null 2>&1) || true; fi
  local pg; pg=$(readlink -f "$clone/.run/pg" 2>/dev/null || true)
  [[ $pg == /var/tmp/paystream-pg-* ]] && rm -rf "$pg"
  rm -rf "$dir"
}
trap cleanup EXIT
git clone -q "$root" "$clone"
mkdir -p "$clone/.run"
[[ -d $root/.run/tools ]] && ln -s "$root/.run/tools" "$clone/.run/tools"
(cd "$clone" && env -u DATABASE_URL -u PAYSTREAM__DATABASE__URL scripts/infra.sh up >"$dir/infra.log" 2>&1) \
  || { cat "$dir/infra.log"; log "FAIL: scripts/infra.sh up from a clone under a 0700 directory"; exit 1; }
# shellcheck disable=SC1091
source "$clone/.run/infra.env"
[[ $(psql "$DATABASE_URL" -Atqc 'SELECT 1') == 1 ]] || { log "FAIL: the clone's PostgreSQL does not answer"; exit 1; }
nats_port=${NATS_URL##*:}
exec 3<>"/dev/tcp/127.0.0.1/$nats_port" && read -r -t 5 info <&3 && [[ $info == INFO* ]] \
  || { log "FAIL: the clone's nats-server does not answer"; exit 1; }
exec 3<&-
log "infra.sh up works from a clone under a 0700 directory as root (postgres at $(readlink -f "$clone/.run/pg"))"
