#!/usr/bin/env bash
# What `docker build` and `docker run` of the Dockerfile would show, on a machine without a container engine (the
# project's build machines have none, and no registry to pull the base images from). `make image-rehearsal`.
#
#   1. The build context as .dockerignore leaves it (rsync with the same patterns).
#   2. The builder stages, step for step: cargo-chef (the Dockerfile's version range) prepares the recipe from the
#      context, cooks the dependencies from the recipe alone in an empty directory, then `cargo build --release
#      --locked -p paystream` on the full context over the cooked target directory.
#   3. The runtime stage: a root filesystem holding what gcr.io/distroless/cc-debian12 holds and paystream uses (glibc,
#      libgcc_s, CA certificates, /etc/passwd with nonroot = 65532, /tmp) plus /paystream, owned by root and not
#      writable by the process. The binary may need no other shared library.
#   4. `docker run` as USER 65532 without a shell, by chroot: `--help`, `config --role relay`, then `migrate` and
#      `relay` against this machine's NATS and PostgreSQL (scripts/infra.sh), until /readyz answers 200, then SIGTERM
#      and a clean exit.
#
# Needs root (chroot). Slow (a release build from nothing: about 6 minutes on 2 cores, plus 3 to install cargo-chef
# the first time), so not part of `make test`.
# What it cannot show: the base images themselves (rust:1.95-bookworm, distroless) and the engine's layer caching.
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
run="$root/.run"
work="$run/image"
log() { echo "[image] $*" >&2; }
die() { echo "[image] FAIL: $*" >&2; exit 1; }

[[ $(id -u) == 0 ]] || die "needs root (chroot into the runtime filesystem)"
mkdir -p "$work"

# --- 1. build context ---------------------------------------------------------------------------------------------
ctx="$work/context"
rm -rf "$ctx"
rsync -a --exclude-from="$root/.dockerignore" "$root/" "$ctx/"
log "build context: $(du -sh "$ctx" | cut -f1) ($(find "$ctx" -type f | wc -l) files; .dockerignore applied)"
[[ ! -e $ctx/.run && ! -e $ctx/target && ! -e $ctx/.git ]] || die ".dockerignore let .run, target or .git in"

# --- 2. builder stages --------------------------------------------------------------------------------------------
chef_version=$(sed -n 's/.*cargo install cargo-chef --locked --version \([^ ]*\).*/\1/p' "$root/Dockerfile")
[[ -n $chef_version ]] || die "the Dockerfile's cargo-chef version was not found"
if [[ ! -x $run/tools/bin/cargo-chef ]]; then
  log "installing cargo-chef $chef_version into .run/tools"
  cargo install -q cargo-chef --locked --version "$chef_version" --root "$run/tools"
fi
export PATH="$run/tools/bin:$PATH"
export CARGO_TARGET_DIR="$work/target"
# The builder stage's ENV lines (cargo profile settings), as the Dockerfile sets them.
while read -r assignment; do
  log "builder ENV $assignment"
  export "${assignment?}"
done < <(sed -n 's/^ENV \(CARGO_[A-Z_]*=[^ ]*\)$/\1/p' "$root/Dockerfile")

log "planner: cargo chef prepare"
(cd "$ctx" && cargo chef prepare --recipe-path "$work/recipe.json")
cook="$work/cook"
rm -rf "$cook" && mkdir -p "$cook" && cp "$work/recipe.json" "$cook/"
log "builder: cargo chef cook --release -p paystream (dependencies from the recipe alone)"
start=$(date +%s)
(cd "$cook" && cargo chef cook --release -p paystream --recipe-path recipe.json 2>"$work/cook.log") \
  || { tail -30 "$work/cook.log" >&2; die "cargo chef cook failed"; }
log "builder: dependencies cooked in $(( $(date +%s) - start ))s"
start=$(date +%s)
(cd "$ctx" && cargo build -q --release --locked -p paystream)
log "builder: paystream built in $(( $(date +%s) - start ))s"
bin="$CARGO_TARGET_DIR/release/paystream"

# --- 3. runtime filesystem ----------------------------------------------------------------------------------------
# Shared libraries of distroless/cc-debian12 that paystream may use: glibc's and libgcc_s.
allowed="libc.so.6 libm.so.6 libgcc_s.so.1 ld-linux-x86-64.so.2 libpthread.so.0 libdl.so.2 librt.so.1"
needed=$(readelf -d "$bin" | sed -n 's/.*(NEEDED).*\[\(.*\)\]/\1/p')
for lib in $needed; do
  [[ " $allowed " == *" $lib "* ]] || die "paystream needs $lib, which distroless/cc does not ship"
done
log "shared libraries needed: $(echo $needed) (all in distroless/cc)"

rootfs="$work/rootfs"
rm -rf "$rootfs"
mkdir -p "$rootfs"/{etc/ssl/certs,tmp,lib64,lib/x86_64-linux-gnu}
install -m 0755 "$bin" "$rootfs/paystream"
resolved=$(ldd "$bin")
for lib in $needed; do
  src=$(awk -v l="$lib" '$1 == l { print $3 } $1 ~ "ld-linux" && l ~ "ld-linux" { print $1 }' <<<"$resolved" | head -1)
  [[ -n $src && -e $src ]] || die "cannot find $lib on this machine"
  cp -L "$src" "$rootfs/lib/x86_64-linux-gnu/$lib"
done
cp -L /lib64/ld-linux-x86-64.so.2 "$rootfs/lib64/"
cp -L /etc/ssl/certs/ca-certificates.crt "$rootfs/etc/ssl/certs/"
printf 'root:x:0:0:root:/root:/sbin/nologin\nnonroot:x:65532:65532:nonroot:/home/nonroot:/sbin/nologin\n' >"$rootfs/etc/passwd"
printf 'root:x:0:\nnonroot:x:65532:\n' >"$rootfs/etc/group"
chown -R root:root "$rootfs"
chmod -R go-w "$rootfs" && chmod 1777 "$rootfs/tmp"
[[ ! -e $rootfs/bin/sh ]] || die "the runtime filesystem has a shell"
log "runtime filesystem: $(du -sh "$rootfs" | cut -f1), /paystream $(du -h "$rootfs/paystream" | cut -f1)"

# --- 4. run it as the image would --------------------------------------------------------------------------------
"$root/scripts/infra.sh" up >/dev/null
set -a; source "$run/infra.env"; set +a
admin_port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
# The container's environment only (no PATH, no HOME): what the Deployments set.
image_env=(PAYSTREAM__DATABASE__URL="$PAYSTREAM__DATABASE__URL" PAYSTREAM__NATS__URL="$PAYSTREAM__NATS__URL"
           PAYSTREAM__NATS__PREFIX=imagerehearsal PAYSTREAM__ADMIN__LISTEN="127.0.0.1:$admin_port"
           PAYSTREAM__TELEMETRY__LOG_FORMAT=json PAYSTREAM__TELEMETRY__LOG_FILTER=info)
# Call in a subshell: exec makes paystream the subshell's process (env and chroot exec in turn), so a background
# job's pid is paystream's own and SIGTERM reaches it.
run_image() { exec env -i "${image_env[@]}" /usr/sbin/chroot --userspec=65532:65532 "$rootfs" /paystream "$@"; }

(run_image --help) >/dev/null || die "/paystream --help failed as uid 65532"
(run_image config --role relay) >/dev/null || die "paystream config --role relay refused the environment"
(run_image migrate) >/dev/null || die "paystream migrate failed in the runtime filesystem"
log "ran as 65532:65532 without a shell: --help, config --role relay, migrate"

(run_image relay) >"$work/relay.log" 2>&1 &
pid=$!
ready=""
for _ in $(seq 1 150); do
  if curl -fsS "http://127.0.0.1:$admin_port/readyz" >/dev/null 2>&1; then ready=yes; break; fi
  kill -0 "$pid" 2>/dev/null || break
  sleep 0.2
done
[[ -n $ready ]] || { tail -20 "$work/relay.log" >&2; kill "$pid" 2>/dev/null || true; die "relay never became ready"; }
curl -fsS "http://127.0.0.1:$admin_port/metrics" | grep -q '^paystream_' || die "no paystream metrics"
kill -TERM "$pid"
wait "$pid" || die "relay did not exit cleanly on SIGTERM (status $?)"
log "ran: relay on the read-only filesystem: /readyz 200, /metrics served, clean exit on SIGTERM"
log "OK: the Dockerfile's build steps and its runtime stage work (base images and the engine not exercised)"
