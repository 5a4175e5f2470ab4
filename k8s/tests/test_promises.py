#!/usr/bin/env python3
"""Seeded faults that scripts/k8s_promises.py must catch: each case breaks one promise in a copy of the rendered
manifests (.run/k8s/{dev,prod,observability}.yaml, written by scripts/check-k8s.sh), of k8s/nats/values.yaml or of
k8s/observability/prometheus-adapter-values.yaml and expects the checker to exit non-zero with a message naming the fault. Run by scripts/check-k8s.sh after the real check passed:

    python3 k8s/tests/test_promises.py .run/k8s
"""

import copy
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
CHECKER = ROOT / "scripts/k8s_promises.py"
Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
Dumper = getattr(yaml, "CSafeDumper", yaml.SafeDumper)


def find(docs, kind, name):
    return next(d for d in docs if d["kind"] == kind and d["metadata"]["name"].startswith(name))


def pod(docs, kind, name):
    return find(docs, kind, name)["spec"]["template"]["spec"]


def main_container(docs, name):
    return pod(docs, "Deployment", name)["containers"][0]


def edit_toml(docs, old, new):
    cm = find(docs, "ConfigMap", "paystream-config")
    assert old in cm["data"]["paystream.toml"], old
    cm["data"]["paystream.toml"] = cm["data"]["paystream.toml"].replace(old, new, 1)


def drop_env(docs, name, var):
    c = main_container(docs, name)
    c["env"] = [e for e in c["env"] if e["name"] != var]


# (description, what to break: dev | prod | observability | nats (the chart values) | adapter (prometheus-adapter's
# values), expected words in a FAIL line, needs the binary, edit)
CASES = [
    ("the ingress's HPA without request rate", "prod", "does not scale on request rate", False,
     lambda d: find(d, "HorizontalPodAutoscaler", "paystream-ingress")["spec"].__setitem__(
         "metrics", [m for m in find(d, "HorizontalPodAutoscaler", "paystream-ingress")["spec"]["metrics"]
                     if m["type"] != "Pods"])),
    ("an HPA metric no adapter rule serves", "adapter", "served by no prometheus-adapter rule", False,
     lambda v: v["rules"]["custom"][0]["name"].__setitem__("as", "paystream_http_rps")),
    ("an adapter rule on a metric paystream does not export", "adapter", "not a metric paystream exports", False,
     lambda v: v["rules"]["custom"][0].__setitem__("seriesQuery", 'http_requests_total{namespace!="",pod!=""}')),
    ("NATS without client authentication", "nats", "authorization.users expected", False,
     lambda v: v["config"]["merge"].pop("authorization")),
    ("a NATS password written in the values", "nats", "never written in the values", False,
     lambda v: v["config"]["merge"]["authorization"]["users"][0].__setitem__("password", "hunter2")),
    ("the NATS password variable not from a Secret", "nats", "must come from a secretKeyRef", False,
     lambda v: v["container"]["env"].__setitem__("PAYSTREAM_NATS_PASSWORD", "hunter2")),
    ("PostgreSQL without TLS", "prod", "database.tls is 'disable'", False,
     lambda d: edit_toml(d, 'tls = "verify-full"\n', "")),
    ("the database CA not mounted", "prod", "database.ca_file (/etc/paystream/db-ca/ca.crt) is not mounted", False,
     lambda d: main_container(d, "paystream-relay").__setitem__(
         "volumeMounts", [m for m in main_container(d, "paystream-relay")["volumeMounts"] if m["name"] != "db-ca"])),
    ("the database CA's private key mounted", "dev", "mounts a CA's private key", False,
     lambda d: pod(d, "Deployment", "paystream-notifier")["volumes"][-1]["secret"]["items"].append(
         {"key": "ca.key", "path": "ca.key"})),
    ("a role without the NATS password", "prod", "`paystream config` refuses", True,
     lambda d: drop_env(d, "paystream-relay", "PAYSTREAM__NATS__PASSWORD")),
    ("a writable root filesystem", "prod", "readOnlyRootFilesystem", False,
     lambda d: main_container(d, "paystream-relay")["securityContext"].pop("readOnlyRootFilesystem")),
    ("a container that may run as root", "prod", "runAsNonRoot", False,
     lambda d: [pod(d, "Job", "paystream-migrate")["securityContext"].pop("runAsNonRoot"),
                pod(d, "Job", "paystream-migrate")["containers"][0]["securityContext"].pop("runAsNonRoot")]),
    ("privilege escalation in the dev sandbox", "dev", "allowPrivilegeEscalation", False,
     lambda d: main_container(d, "wechat-sandbox")["securityContext"].pop("allowPrivilegeEscalation")),
    ("capabilities kept", "prod", "drop ALL", False,
     lambda d: main_container(d, "paystream-notifier")["securityContext"]["capabilities"].pop("drop")),
    ("no memory limit", "prod", "no memory limit", False,
     lambda d: main_container(d, "paystream-notifier")["resources"]["limits"].pop("memory")),
    ("no readiness probe", "prod", "no readinessProbe", False,
     lambda d: main_container(d, "paystream-processor-order").pop("readinessProbe")),
    ("a Secret object shipped", "prod", "a Secret object", False,
     lambda d: d.append({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "leak"},
                         "stringData": {"jwt_secret": "x"}})),
    ("the payment processor given the APIv3 key it does not use", "prod", "which its role does not need", True,
     lambda d: main_container(d, "paystream-processor-payment")["env"].append(
         {"name": "PAYSTREAM__WECHAT__APIV3_KEY",
          "valueFrom": {"secretKeyRef": {"name": "paystream-wechat", "key": "apiv3_key"}}})),
    ("a literal secret in env", "prod", "has a literal value", False,
     lambda d: main_container(d, "paystream-relay")["env"].append(
         {"name": "PAYSTREAM__HTTP__JWT_SECRET", "value": "x" * 40})),
    ("a database URL with its password in env", "prod", "URL with a password", False,
     lambda d: main_container(d, "paystream-relay")["env"].append(
         {"name": "PAYSTREAM__DATABASE__URL", "value": "postgres://paystream:hunter2@db/paystream"})),
    ("a secret written into paystream.toml", "prod", "sets the secret http.jwt_secret", False,
     lambda d: edit_toml(d, "\n[http]\n", "\n[http]\njwt_secret = \"" + "z" * 40 + "\"\n")),
    ("a role missing", "prod", "`paystream relay` is not deployed", False,
     lambda d: d.remove(find(d, "Deployment", "paystream-relay"))),
    ("no migration Job", "dev", "no migration Job", False,
     lambda d: d.remove(find(d, "Job", "paystream-migrate"))),
    ("the sandbox in prod", "prod", "sandbox is deployed in prod", False,
     lambda d: d.append(dict(copy.deepcopy(find(DEV, "Deployment", "wechat-sandbox")),
                             metadata={"name": "wechat-sandbox", "namespace": "paystream"}))),
    ("`paystream all` deployed", "prod", "not a production role", False,
     lambda d: main_container(d, "paystream-relay").__setitem__(
         "args", ["--config", "/etc/paystream/paystream.toml", "all"])),
    ("a PDB missing", "prod", "no PodDisruptionBudget", False,
     lambda d: d.remove(find(d, "PodDisruptionBudget", "paystream-relay"))),
    ("no spread in prod", "prod", "no topologySpreadConstraints", False,
     lambda d: pod(d, "Deployment", "paystream-relay").pop("topologySpreadConstraints")),
    ("one replica in prod", "prod", "replica(s) in prod", False,
     lambda d: find(d, "Deployment", "paystream-relay")["spec"].__setitem__("replicas", 1)),
    ("two replicas in dev", "dev", "replicas in dev", False,
     lambda d: find(d, "Deployment", "paystream-relay")["spec"].__setitem__("replicas", 2)),
    ("/ routed by the Ingress", "prod", "exposes /metrics", False,
     lambda d: find(d, "Ingress", "paystream")["spec"]["rules"][0]["http"]["paths"].append(
         {"path": "/", "pathType": "Prefix",
          "backend": {"service": {"name": "paystream-ingress", "port": {"name": "http"}}}})),
    ("/readyz routed by the Ingress", "dev", "exposes /readyz", False,
     lambda d: find(d, "Ingress", "paystream")["spec"]["rules"][0]["http"]["paths"].append(
         {"path": "/readyz", "pathType": "Exact",
          "backend": {"service": {"name": "paystream-ingress", "port": {"name": "http"}}}})),
    ("a ServiceAccount token mounted", "prod", "automountServiceAccountToken", False,
     lambda d: find(d, "ServiceAccount", "paystream").__setitem__("automountServiceAccountToken", True)),
    ("metrics not scraped", "observability", "selected by no ServiceMonitor", False,
     lambda d: find(d, "ServiceMonitor", "paystream")["spec"]["endpoints"][0].__setitem__("port", "http")),
    ("admin port on loopback", "prod", "admin.listen is 127.0.0.1", False,
     lambda d: find(d, "ConfigMap", "paystream-env")["data"].__setitem__(
         "PAYSTREAM__ADMIN__LISTEN", "127.0.0.1:9090")),
    ("a grace period shorter than the drain", "prod", "terminationGracePeriodSeconds", False,
     lambda d: pod(d, "Deployment", "paystream-notifier").__setitem__("terminationGracePeriodSeconds", 20)),
    ("WeChat keys not mounted", "prod", "wechat.merchant_private_key_path", False,
     lambda d: main_container(d, "paystream-processor-lifecycle")["volumeMounts"].pop()),
    ("no network policy", "prod", "NetworkPolicies restrict only", False,
     lambda d: [d.remove(x) for x in [x for x in d if x["kind"] == "NetworkPolicy"]]),
    ("an unpinned image", "prod", "not pinned", False,
     lambda d: [c.__setitem__("image", "registry.example.com/paystream:latest")
                for w in d if w["kind"] in ("Deployment", "Job")
                for c in w["spec"]["template"]["spec"]["containers"]]),
    ("prod in trial state", "prod", "prod sends as formal", False,
     lambda d: edit_toml(d, '\nminiprogram_state = "formal"', '\nminiprogram_state = "trial"\nallow_openids = []')),
    ("plain http to a named host in prod", "prod", "wechat.insecure_http_hosts is set in prod", False,
     lambda d: edit_toml(d, "\n[wechat]\n", '\n[wechat]\ninsecure_http_hosts = ["wechat-sandbox"]\n')),
    ("prod streams with one replica", "prod", "stream_replicas is 1", False,
     lambda d: edit_toml(d, "\nstream_replicas = 3", "\nstream_replicas = 1")),
    ("an unknown configuration key", "prod", "`paystream config` refuses", True,
     lambda d: edit_toml(d, "\n[outbox]\n", "\n[outbox]\nbatch_size = 5\n")),
    ("the ingress without the JWT secret it signs tokens with", "dev", "`paystream config` refuses", True,
     lambda d: drop_env(d, "paystream-ingress", "PAYSTREAM__HTTP__JWT_SECRET")),
]


def load(path):
    return [d for d in yaml.load_all(path.read_text(), Loader=Loader) if d]


def main():
    global DEV
    rendered = Path(sys.argv[1] if len(sys.argv) > 1 else ROOT / ".run/k8s")
    base = {name: load(rendered / f"{name}.yaml") for name in ("dev", "prod", "observability")}
    base["nats"] = yaml.load((ROOT / "k8s/nats/values.yaml").read_text(), Loader=Loader)
    base["adapter"] = yaml.load((ROOT / "k8s/observability/prometheus-adapter-values.yaml").read_text(), Loader=Loader)
    DEV = base["dev"]
    have_binary = Path(os.environ.get("PAYSTREAM_BIN", ROOT / "target/debug/paystream")).exists()
    missed = skipped = 0
    with tempfile.TemporaryDirectory(prefix="k8s-faults-") as tmp:
        for what, target, expect, needs_binary, edit in CASES:
            if needs_binary and not have_binary:
                print(f"skip  {what} (needs the paystream binary)")
                skipped += 1
                continue
            docs = {k: copy.deepcopy(v) for k, v in base.items()}
            edit(docs[target])
            paths = []
            for name, content in docs.items():
                if name == "nats":  # the checker knows the chart values by their path: nats/values.yaml
                    p = Path(tmp) / "nats" / "values.yaml"
                    p.parent.mkdir(exist_ok=True)
                    p.write_text(yaml.dump(content, Dumper=Dumper))
                elif name == "adapter":
                    p = Path(tmp) / "prometheus-adapter-values.yaml"
                    p.write_text(yaml.dump(content, Dumper=Dumper))
                else:
                    p = Path(tmp) / f"{name}.yaml"
                    p.write_text(yaml.dump_all(content, Dumper=Dumper))
                paths.append(str(p))
            env = dict(os.environ)
            if not needs_binary:
                env["PAYSTREAM_BIN"] = str(Path(tmp) / "no-binary")  # faster; the binary is not what is tested
            run = subprocess.run([sys.executable, str(CHECKER), *paths], capture_output=True, text=True, env=env)
            fails = [line for line in run.stderr.splitlines() if line.startswith("FAIL")]
            if run.returncode != 0 and any(expect in line for line in fails):
                print(f"ok    caught: {what}")
            else:
                missed += 1
                print(f"MISSED {what}: expected a FAIL line with {expect!r}; got exit {run.returncode}, "
                      f"{fails[:3] or 'no FAIL line'}", file=sys.stderr)
    ran = len(CASES) - skipped
    note = f" ({skipped} skipped: no paystream binary)" if skipped else ""
    print(f"{ran - missed}/{ran} seeded faults caught{note}", file=sys.stderr if missed else sys.stdout)
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main())
