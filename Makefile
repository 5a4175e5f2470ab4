# The two commands of the README:
#   make demo   bring up NATS, PostgreSQL and the WeChat sandbox, start `paystream all`, and walk one payment
#   make test   everything CI checks: formatting, clippy with warnings as errors, the alert rules (promtool),
#               every test, and the Kubernetes manifests
SHELL := /bin/bash
.SHELLFLAGS := -euo pipefail -c
CARGO ?= cargo
# Tests and tools read the infrastructure's addresses from here (written by scripts/infra.sh up).
WITH_INFRA := set -a; source .run/infra.env; set +a;
# Where cargo builds (a CARGO_TARGET_DIR of the environment is honoured, as cargo does).
TARGET := $(or $(CARGO_TARGET_DIR),target)

.PHONY: demo test lint rules k8s infra infra-down bench bench-pipeline bench-e2e bench-statements bench-prepay bench-ingest toolchain image-rehearsal

toolchain:
	@command -v $(CARGO) >/dev/null || { echo "cargo not found: install Rust (https://rustup.rs) and retry" >&2; exit 1; }

infra:
	@scripts/infra.sh up

demo: toolchain infra
	@$(CARGO) build -q -p paystream
	@scripts/demo.sh

lint: toolchain
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings

# Alert rules and dashboard: promtool check + unit tests, every metric name known (installs promtool if missing).
rules:
	@scripts/check-rules.sh

# Kubernetes manifests: both overlays render, validate against the Kubernetes schemas, and keep their promises.
k8s:
	@scripts/check-k8s.sh

# k8s runs after the tests: it loads each overlay's configuration with the binary they built.
test: lint rules infra
	$(WITH_INFRA) $(CARGO) test --workspace --no-fail-fast
	@$(MAKE) --no-print-directory k8s
	@scripts/check-infra-private-dir.sh

bench: toolchain infra
	$(CARGO) build -q --release -p paystream
	$(WITH_INFRA) PAYSTREAM__TELEMETRY__LOG_FILTER=warn $(TARGET)/release/paystream bench bus

bench-pipeline: toolchain infra
	$(CARGO) build -q --release -p paystream
	PAYSTREAM_BIN=$(TARGET)/release/paystream scripts/demo.sh bench

# Open loop, end to end (callback → order paid → notifications) at fixed offered rates, on a system it starts itself;
# options pass through ARGS, e.g. make bench-e2e ARGS="--rates 500 --duration 10s" (paystream bench e2e --help);
# --fsync both adds a run with PostgreSQL's production durability, --roles-bin PATH runs the roles from another build.
bench-e2e: toolchain infra
	$(CARGO) build -q --release -p paystream
	$(WITH_INFRA) PAYSTREAM__TELEMETRY__LOG_FILTER=warn $(TARGET)/release/paystream bench e2e $(ARGS)

# bench-e2e with PostgreSQL's statements by planning and execution time over the first counted window
# (pg_stat_statements loaded into the private cluster; scripts/bench-statements.sh).
bench-statements: toolchain infra
	$(CARGO) build -q --release -p paystream
	scripts/bench-statements.sh $(ARGS)

# Prepay (two RSA signatures) per ingress CPU-second beside one thread's RSA-2048 signing rate ÷ 2, on a sandbox and
# an ingress it starts itself; e.g. make bench-prepay ARGS="--prepays 1000 --concurrency 8" (paystream bench prepay --help).
bench-prepay: toolchain infra
	$(CARGO) build -q --release -p paystream
	$(WITH_INFRA) PAYSTREAM__TELEMETRY__LOG_FILTER=warn $(TARGET)/release/paystream bench prepay $(ARGS)

# Callback ingest (verify, decrypt, publish, PubAck) beside RSA-2048 verification and JetStream publish+PubAck;
# e.g. make bench-ingest ARGS="--callbacks 10000 --in-flight 64" (paystream bench ingest --help).
bench-ingest: toolchain infra
	$(CARGO) build -q --release -p paystream
	$(WITH_INFRA) PAYSTREAM__TELEMETRY__LOG_FILTER=warn $(TARGET)/release/paystream bench ingest $(ARGS)

# The Dockerfile's build and runtime stages without a container engine (slow: a release build; needs root).
image-rehearsal: toolchain
	@scripts/image-rehearsal.sh

infra-down:
	@scripts/infra.sh down
