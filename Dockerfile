# syntax=docker/dockerfile:1
# paystream: one image, every role (the container's args pick it: `ingress`, `processor payment`, `relay`, …).
#
#   docker build -t registry.example.com/paystream:0.1.0 .
#
# Three stages: cargo-chef computes the dependency "recipe" from the manifests, the builder compiles the
# dependencies from that recipe alone (a layer reused until Cargo.toml/Cargo.lock change) and then paystream, and the
# runtime is distroless (glibc, CA certificates, no shell, no package manager) running as uid 65532.
# The project's build machines have no container engine: `make image-rehearsal` (scripts/image-rehearsal.sh) runs
# these stages' steps without one, and k8s/README.md says what that does and does not show.

ARG RUST_VERSION=1.95

FROM rust:${RUST_VERSION}-bookworm AS chef
# Same glibc as the runtime (Debian 12). Pin cargo-chef to the version you tested.
RUN cargo install cargo-chef --locked --version ^0.1
WORKDIR /src

FROM chef AS planner
COPY . .
RUN cargo chef prepare --recipe-path recipe.json

FROM chef AS builder
# Without the debug line tables of the release profile: a 30 MB binary instead of 140 MB (measured by
# scripts/image-rehearsal.sh); panics still name file and line, backtraces still name functions. Set before the
# cook so the dependency layer is built with the same profile.
ENV CARGO_PROFILE_RELEASE_STRIP=debuginfo
COPY --from=planner /src/recipe.json recipe.json
# Dependencies only: cached until the recipe (manifests and lock file) changes. The recipe carries Cargo.lock, so
# these are the locked versions (not every cargo-chef release takes --locked; the build below does).
RUN cargo chef cook --release -p paystream --recipe-path recipe.json
COPY . .
RUN cargo build --release --locked -p paystream \
 && cp target/release/paystream /paystream

# cc: glibc and libgcc (aws-lc-rs, the Rust runtime), CA certificates for WeChat's HTTPS; :nonroot = uid/gid 65532.
FROM gcr.io/distroless/cc-debian12:nonroot AS runtime
COPY --from=builder /paystream /paystream
USER 65532:65532
# 8080: the HTTP API (ingress role). 9090: /healthz, /readyz, /metrics of every role (admin.listen must be set to
# 0.0.0.0:9090 in a container: its default is 127.0.0.1:9090).
EXPOSE 8080 9090
ENTRYPOINT ["/paystream"]
CMD ["--help"]
