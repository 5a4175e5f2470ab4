#!/usr/bin/env python3
"""Checks the promises of paystream's Kubernetes manifests on their rendered form (scripts/check-k8s.sh renders them).

    python3 scripts/k8s_promises.py .run/k8s/dev.yaml .run/k8s/prod.yaml .run/k8s/observability.yaml \
        k8s/observability/prometheus-adapter-values.yaml k8s/postgres/cluster.yaml k8s/nats/values.yaml

A file holding Deployments is an overlay, named by its file name without extension (`prod` gets the production
rules). Other files contribute monitors, rules, dashboards, the CloudNativePG cluster, the prometheus-adapter values
and the NATS chart values.
Every failure is printed as `FAIL <where>: <what>`; the exit status is 1 if there is any.

The binary (`$PAYSTREAM_BIN`, default target/debug/paystream, under $CARGO_TARGET_DIR when set) names the roles (`paystream --help`) and judges each
overlay's paystream.toml together with each role's environment (`paystream config`); without it those two checks are
skipped with a warning (the rest still runs). Needs PyYAML; Python >= 3.11 (tomllib).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
import tempfile
import tomllib
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(os.environ.get("PAYSTREAM_BIN", Path(os.environ.get("CARGO_TARGET_DIR", ROOT / "target")) / "debug/paystream"))
CONFIG_PATH = "/etc/paystream/paystream.toml"
ADMIN_PORT = 9090

# Commands of `paystream --help` that are tools or development aids, not long-running production roles.
# Subcommands that are tools, not roles to deploy.
TOOLS = {"all", "config", "demo", "dlq", "outbox", "attention", "bench"}
NOT_ROLES = TOOLS | {"sandbox", "help", "migrate"}
# Where the roles come from when the binary is missing (kept equal to `paystream --help`; checked when it is there).
KNOWN_ROLES = [["ingress"], ["notifier"], ["relay"], ["processor", "payment"], ["processor", "order"],
               ["processor", "lifecycle"]]
PUBLIC_PATHS = ["/payment/v1/thirdPayment/thirdPaymentWxPayCallback", "/usercenter/v1/", "/order/v1/", "/payment/v1/"]
PRIVATE_PATHS = ["/metrics", "/readyz", "/healthz", "/openapi.json"]
SECRET_NAME = re.compile(r"SECRET|KEY|PASSWORD|PASSWD|TOKEN|CREDENTIAL", re.I)
URL_WITH_PASSWORD = re.compile(r"[a-z][a-z0-9+.-]*://[^/\s:@]+:[^@\s/]+@", re.I)
# Secret keys that must never be written into paystream.toml (they come from Secrets through the environment).
TOML_SECRETS = [("database", "url"), ("http", "jwt_secret"), ("wechat", "apiv3_key"),
                ("wechat", "miniprogram_secret"), ("sms", "secret_key"), ("sms", "secret_id")]
POD_KINDS = {"Deployment", "StatefulSet", "DaemonSet", "Job", "ReplicaSet"}

failures: list[str] = []
passes: list[str] = []


def fail(where: str, what: str) -> None:
    failures.append(f"FAIL {where}: {what}")


def ok(what: str) -> None:
    passes.append(what)


def warn(what: str) -> None:
    print(f"WARNING: {what}", file=sys.stderr)


# ---------------------------------------------------------------------------------------------------------------
# helpers

Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # libyaml when present: ten times faster


def load(path: Path) -> list[dict]:
    return [d for d in yaml.load_all(path.read_text(), Loader=Loader) if isinstance(d, dict)]


def ident(obj: dict) -> str:
    md = obj.get("metadata", {})
    ns = md.get("namespace")
    return f"{obj.get('kind')}/{(ns + '/') if ns else ''}{md.get('name')}"


def pod_template(obj: dict) -> dict | None:
    if obj.get("kind") in POD_KINDS:
        return obj.get("spec", {}).get("template")
    if obj.get("kind") == "CronJob":
        return obj.get("spec", {}).get("jobTemplate", {}).get("spec", {}).get("template")
    if obj.get("kind") == "Pod":
        return obj
    return None


def selector_matches(selector: dict | None, labels: dict) -> bool:
    """A LabelSelector (matchLabels and matchExpressions) against labels. An empty selector matches everything."""
    if selector is None:
        return False
    for k, v in (selector.get("matchLabels") or {}).items():
        if labels.get(k) != v:
            return False
    for e in selector.get("matchExpressions") or []:
        key, op, values = e["key"], e["operator"], e.get("values") or []
        if op == "In" and labels.get(key) not in values:
            return False
        if op == "NotIn" and key in labels and labels[key] in values:
            return False
        if op == "Exists" and key not in labels:
            return False
        if op == "DoesNotExist" and key in labels:
            return False
    return True


def role_args(container: dict) -> list[str]:
    """A paystream container's command words, without global options (`--config FILE`)."""
    args = list(container.get("args") or []) or list(container.get("command") or [])[1:]
    out, skip = [], False
    for a in args:
        if skip:
            skip = False
            continue
        if a == "--config":
            skip = True
            continue
        if a.startswith("--config="):
            continue
        out.append(a)
    return out


def is_paystream(container: dict, images: set[str]) -> bool:
    return container.get("image") in images or container.get("name") == "paystream"


def duration_seconds(text: str) -> float:
    units = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, "days": 86400, "min": 60}
    total, matched = 0.0, False
    for num, unit in re.findall(r"(\d+(?:\.\d+)?)\s*([a-z]+)", text):
        total += float(num) * units.get(unit, 1)
        matched = True
    if not matched:
        raise ValueError(f"not a duration: {text!r}")
    return total


# ---------------------------------------------------------------------------------------------------------------
# roles from the binary

def roles_from_binary() -> list[list[str]] | None:
    if not BIN.exists():
        return None
    top = subprocess.run([str(BIN), "--help"], capture_output=True, text=True, check=True).stdout
    section = top.split("Commands:", 1)[1].split("Options:", 1)[0]
    commands = [line.split()[0] for line in section.splitlines() if line.strip()]
    roles: list[list[str]] = []
    for cmd in commands:
        if cmd in NOT_ROLES:
            continue
        if cmd == "processor":
            sub = subprocess.run([str(BIN), "processor", "--help"], capture_output=True, text=True,
                                 check=True).stdout
            names = re.findall(r"^\s+- ([a-z][a-z0-9-]*):", sub, re.M)
            if not names:
                fail("paystream processor --help", "no processor names found in its help")
            roles += [["processor", n] for n in names]
        else:
            roles.append([cmd])
    return roles


# ---------------------------------------------------------------------------------------------------------------
# per-container and per-pod checks

def effective_security(pod_spec: dict, container: dict) -> dict:
    pod_sc = pod_spec.get("securityContext") or {}
    c_sc = container.get("securityContext") or {}
    eff = {k: pod_sc.get(k) for k in ("runAsNonRoot", "runAsUser", "seccompProfile")}
    eff.update({k: v for k, v in c_sc.items() if v is not None})
    return eff


def check_container(where: str, pod_spec: dict, c: dict, need_probes: bool) -> None:
    w = f"{where} container {c.get('name')}"
    sc = effective_security(pod_spec, c)
    if sc.get("runAsNonRoot") is not True:
        fail(w, "runAsNonRoot is not true")
    if sc.get("runAsUser") in (None, 0):
        fail(w, "runAsUser is unset or 0")
    if sc.get("readOnlyRootFilesystem") is not True:
        fail(w, "readOnlyRootFilesystem is not true")
    if sc.get("allowPrivilegeEscalation") is not False:
        fail(w, "allowPrivilegeEscalation is not false")
    if "ALL" not in ((sc.get("capabilities") or {}).get("drop") or []):
        fail(w, "capabilities do not drop ALL")
    if (sc.get("capabilities") or {}).get("add"):
        fail(w, "capabilities are added")
    if sc.get("privileged"):
        fail(w, "privileged")
    if (sc.get("seccompProfile") or {}).get("type") not in ("RuntimeDefault", "Localhost"):
        fail(w, "seccompProfile is not RuntimeDefault")
    res = c.get("resources") or {}
    for kind in ("requests", "limits"):
        for r in ("cpu", "memory"):
            if not (res.get(kind) or {}).get(r):
                fail(w, f"no {r} {kind[:-1]}")
    if need_probes:
        for p in ("livenessProbe", "readinessProbe"):
            if not c.get(p):
                fail(w, f"no {p}")
    for e in c.get("env") or []:
        name, value = e.get("name", ""), e.get("value")
        if value is None:
            continue
        if SECRET_NAME.search(name):
            fail(w, f"env {name} has a literal value: secrets must come from a secretKeyRef")
        if URL_WITH_PASSWORD.search(str(value)):
            fail(w, f"env {name} holds a URL with a password")


def check_pod_common(where: str, pod_spec: dict, is_deployment: bool) -> None:
    if pod_spec.get("automountServiceAccountToken") is not False:
        fail(where, "pod does not set automountServiceAccountToken: false")
    if pod_spec.get("hostNetwork") or pod_spec.get("hostPID") or pod_spec.get("hostIPC"):
        fail(where, "uses the host's network, PID or IPC namespace")
    for c in pod_spec.get("containers") or []:
        check_container(where, pod_spec, c, need_probes=is_deployment)
    # Init containers, native sidecars included: same security and resources; probes only on regular containers.
    for c in pod_spec.get("initContainers") or []:
        check_container(where, pod_spec, c, need_probes=False)


# ---------------------------------------------------------------------------------------------------------------
# the binary's judgement of the configuration

def dummy_secret(name: str) -> str:
    upper = name.upper()
    if upper.endswith("DATABASE__URL"):
        return "postgres://paystream@localhost:5432/paystream"
    if upper.endswith("APIV3_KEY"):
        return "k" * 32  # exactly 32 bytes, as WeChat's APIv3 key
    # Token keys must look random to the binary (it refuses placeholders and low-entropy keys): fixed hex strings.
    if upper.endswith("JWT_SECRET"):
        return hashlib.sha256(b"dummy jwt secret").hexdigest()
    if upper.endswith("JWT_PREVIOUS_SECRETS"):
        # a list, as the Secret key must hold it during a rotation
        return '["' + hashlib.sha256(b"dummy previous jwt secret").hexdigest() + '"]'
    if upper.endswith("SECRET_ID"):
        return "AKIDdummydummydummy"
    return "dummy-secret-value"


def role_environment(where: str, c: dict, configmaps: dict) -> dict[str, str]:
    """The environment the container would get, with dummy values for Secret references."""
    env: dict[str, str] = {}
    for src in c.get("envFrom") or []:
        if "configMapRef" in src:
            ref = src["configMapRef"]["name"]
            if ref not in configmaps:
                if not src["configMapRef"].get("optional"):
                    fail(f"{where} container {c.get('name')}", f"envFrom ConfigMap {ref} is not in the overlay")
                continue
            env.update({k: str(v) for k, v in (configmaps[ref].get("data") or {}).items()})
    for e in c.get("env") or []:
        name = e["name"]
        if "value" in e:
            env[name] = str(e["value"])
            continue
        vf = e.get("valueFrom") or {}
        if "secretKeyRef" in vf:
            env[name] = dummy_secret(name)
        elif "configMapKeyRef" in vf:
            ref = vf["configMapKeyRef"]
            cm = configmaps.get(ref["name"])
            if cm is not None and ref["key"] in (cm.get("data") or {}):
                env[name] = str(cm["data"][ref["key"]])
            elif not ref.get("optional"):
                fail(f"{where} container {c.get('name')}", f"env {name}: ConfigMap {ref['name']} key {ref['key']} "
                                                          "is not in the overlay")
    return env


def run_config(cfg: Path, env: dict, role: list[str]) -> tuple[bool, str]:
    """`paystream config --role …` on the file `cfg` with exactly `env` (of the caller's environment, nothing that
    configures paystream)."""
    clean = {k: v for k, v in os.environ.items()
             if not k.startswith("PAYSTREAM") and not k.startswith("OTEL_") and k != "RUST_LOG"}
    clean.update(env)
    clean["PAYSTREAM_CONFIG"] = str(cfg)
    clean["PAYSTREAM__TELEMETRY__LOG_FILTER"] = "warn"
    # As the role reads it: only the sections it uses, so only their secrets are needed.
    p = subprocess.run([str(BIN), "--config", str(cfg), "config", "--role", *role], capture_output=True, text=True,
                       env=clean, timeout=60)
    return p.returncode == 0, (p.stderr.strip() or p.stdout.strip())[-2000:]


# ---------------------------------------------------------------------------------------------------------------
# overlays

def check_overlay(name: str, docs: list[dict], roles: list[list[str]], monitors: list[dict],
                  adapter_metrics: set[str] | None) -> None:
    prod = "prod" in name
    by_kind: dict[str, list[dict]] = {}
    for d in docs:
        by_kind.setdefault(d["kind"], []).append(d)
    configmaps = {d["metadata"]["name"]: d for d in by_kind.get("ConfigMap", [])}

    if by_kind.get("Secret"):
        for s in by_kind["Secret"]:
            fail(name, f"{ident(s)}: a Secret object in the manifests (reference Secrets, never ship them)")

    # ConfigMaps: no secrets, no URLs with passwords.
    for cm in configmaps.values():
        for key, value in (cm.get("data") or {}).items():
            if URL_WITH_PASSWORD.search(str(value)):
                fail(name, f"{ident(cm)} key {key} holds a URL with a password")
            if SECRET_NAME.search(key) and not key.endswith(".toml"):
                fail(name, f"{ident(cm)} key {key} looks like a secret")

    workloads = [d for d in docs if pod_template(d) is not None]
    images = {"paystream"}
    paystream_images: set[str] = set()
    for w in workloads:
        for c in pod_template(w)["spec"].get("containers") or []:
            if c.get("name") == "paystream":
                paystream_images.add(c.get("image"))
    images |= paystream_images
    if len(paystream_images) > 1:
        fail(name, f"the roles run different images: {sorted(paystream_images)}")
    for img in paystream_images:
        if img is None or img.endswith(":latest") or ":" not in img.rsplit("/", 1)[-1]:
            fail(name, f"paystream image {img!r} is not pinned to a version")

    # Every paystream role container (the sandbox is WeChat, not paystream) with the environment it would get.
    runs = [(w, pod_template(w)["spec"], c, role_environment(f"{name} {ident(w)}", c, configmaps))
            for w in workloads for c in pod_template(w)["spec"].get("containers") or []
            if is_paystream(c, images) and role_args(c)[:1] != ["sandbox"]]

    # Which workload plays which role.
    deployed: dict[tuple, list[str]] = {}
    toml_text: str | None = None
    toml_cm: dict | None = None
    for w in workloads:
        spec = pod_template(w)["spec"]
        is_dep = w["kind"] == "Deployment"
        check_pod_common(f"{name} {ident(w)}", spec, is_dep)
        for c in spec.get("containers") or []:
            if not is_paystream(c, images):
                continue
            words = role_args(c)
            if not words:
                fail(f"{name} {ident(w)}", "paystream container without a command")
                continue
            deployed.setdefault(tuple(words[:2] if words[0] == "processor" else words[:1]), []).append(
                f"{w['kind']}/{w['metadata']['name']}")
            if words[0] in TOOLS:
                fail(f"{name} {ident(w)}", f"`paystream {words[0]}` is not a production role")
            if words[0] == "sandbox":
                if prod:
                    fail(f"{name} {ident(w)}", "the WeChat sandbox is deployed in prod")
                continue
            if words[0] == "migrate":
                if w["kind"] != "Job":
                    fail(f"{name} {ident(w)}", "`paystream migrate` must run as a Job")
                if spec.get("restartPolicy") not in ("Never", "OnFailure"):
                    fail(f"{name} {ident(w)}", "the migration Job's restartPolicy must be Never or OnFailure")
            elif w["kind"] != "Deployment":
                fail(f"{name} {ident(w)}", f"role {' '.join(words)} should be a Deployment")
            # The configuration file: mounted at CONFIG_PATH from the overlay's ConfigMap and named by --config.
            args = c.get("args") or []
            if CONFIG_PATH not in args:
                fail(f"{name} {ident(w)}", f"not started with --config {CONFIG_PATH}")
            mount = next((m for m in c.get("volumeMounts") or []
                          if m.get("mountPath") in (CONFIG_PATH, str(Path(CONFIG_PATH).parent))), None)
            if mount is None:
                fail(f"{name} {ident(w)}", f"nothing mounted at {CONFIG_PATH}")
                continue
            vol = next((v for v in spec.get("volumes") or [] if v["name"] == mount["name"]), {})
            cm_name = (vol.get("configMap") or {}).get("name")
            if cm_name not in configmaps or "paystream.toml" not in (configmaps[cm_name].get("data") or {}):
                fail(f"{name} {ident(w)}", f"{CONFIG_PATH} does not come from a ConfigMap of this overlay "
                                           "holding paystream.toml")
                continue
            if toml_cm is not None and toml_cm["metadata"]["name"] != cm_name:
                fail(name, "roles mount different configuration ConfigMaps")
            toml_cm = configmaps[cm_name]
            toml_text = toml_cm["data"]["paystream.toml"]

    for r in roles:
        if tuple(r) not in deployed:
            fail(name, f"role `paystream {' '.join(r)}` is not deployed")
        elif len(deployed[tuple(r)]) > 1:
            fail(name, f"role `paystream {' '.join(r)}` is deployed twice: {deployed[tuple(r)]}")
    if ("migrate",) not in deployed:
        fail(name, "no migration Job (`paystream migrate`)")
    if ("sandbox",) in deployed:
        ok(f"{name}: the WeChat sandbox runs ({deployed[('sandbox',)][0]})")
    elif not prod:
        fail(name, "the dev overlay has no WeChat sandbox (`paystream sandbox`)")
    ok(f"{name}: every role deployed ({len(roles)} roles + migrate Job)")

    if toml_text is None:
        fail(name, "no paystream.toml found")
        return
    try:
        cfg = tomllib.loads(toml_text)
    except tomllib.TOMLDecodeError as e:
        fail(name, f"paystream.toml does not parse: {e}")
        return
    for section, key in TOML_SECRETS:
        if key in (cfg.get(section) or {}):
            fail(name, f"paystream.toml sets the secret {section}.{key}: it must come from a Secret (environment)")
    if URL_WITH_PASSWORD.search(toml_text):
        fail(name, "paystream.toml holds a URL with a password")

    # Overlay-specific settings.
    state = (cfg.get("notifier") or {}).get("miniprogram_state")
    replicas_streams = (cfg.get("nats") or {}).get("stream_replicas", 1)
    wechat = cfg.get("wechat") or {}
    if prod:
        if state != "formal":
            fail(name, f"notifier.miniprogram_state is {state!r}, prod sends as formal")
        if replicas_streams != 3:
            fail(name, f"nats.stream_replicas is {replicas_streams}, prod runs a 3-node JetStream cluster")
        if wechat.get("pay_base_url", "https://api.mch.weixin.qq.com") != "https://api.mch.weixin.qq.com":
            fail(name, "wechat.pay_base_url is not https://api.mch.weixin.qq.com")
        if wechat.get("miniprogram_base_url", "https://api.weixin.qq.com") != "https://api.weixin.qq.com":
            fail(name, "wechat.miniprogram_base_url is not https://api.weixin.qq.com")
        if wechat.get("allow_insecure_loopback"):
            fail(name, "wechat.allow_insecure_loopback is on in prod")
        for section in ("wechat", "sms"):
            if (cfg.get(section) or {}).get("insecure_http_hosts"):
                fail(name, f"{section}.insecure_http_hosts is set in prod: WeChat and Tencent Cloud only over https")
    else:
        if state != "developer":
            fail(name, f"notifier.miniprogram_state is {state!r}, dev sends as developer")
        if "allow_openids" not in (cfg.get("notifier") or {}):
            fail(name, "dev has no notifier.allow_openids")
        if replicas_streams != 1:
            fail(name, f"nats.stream_replicas is {replicas_streams} in dev")
    ok(f"{name}: notifier {state}, stream_replicas {replicas_streams}")

    ack_wait = duration_seconds((cfg.get("consumer") or {}).get("ack_wait", "30s"))
    handler_timeout = duration_seconds((cfg.get("consumer") or {}).get("handler_timeout", "10s"))

    # Per Deployment: probes on the admin port, the admin listener reachable, grace, PDB, spread, replicas.
    deployments = by_kind.get("Deployment", [])
    pdbs = by_kind.get("PodDisruptionBudget", [])
    hpas = by_kind.get("HorizontalPodAutoscaler", [])
    for d in deployments:
        where = f"{name} {ident(d)}"
        tmpl = d["spec"]["template"]
        spec, labels = tmpl["spec"], tmpl.get("metadata", {}).get("labels", {})
        if not selector_matches(d["spec"].get("selector"), labels):
            fail(where, "selector does not match its pod template")
        if not any(selector_matches(p["spec"].get("selector"), labels) for p in pdbs):
            fail(where, "no PodDisruptionBudget selects its pods")
        tsc = spec.get("topologySpreadConstraints") or []
        if not tsc:
            if prod:
                fail(where, "no topologySpreadConstraints")
            else:
                warn(f"{where}: no topologySpreadConstraints")
        for t in tsc:
            if not selector_matches(t.get("labelSelector"), labels):
                fail(where, f"topologySpreadConstraint on {t.get('topologyKey')} does not select its own pods")
        hpa = next((h for h in hpas if h["spec"]["scaleTargetRef"].get("kind") == "Deployment"
                    and h["spec"]["scaleTargetRef"].get("name") == d["metadata"]["name"]), None)
        count = d["spec"].get("replicas", 1 if hpa is None else None)
        if prod:
            low = hpa["spec"].get("minReplicas", 1) if hpa else count
            if low is None or low < 2:
                fail(where, f"runs {low} replica(s) in prod (at least 2)")
            if hpa and "replicas" in d["spec"]:
                fail(where, "has spec.replicas and an HPA: every apply would reset the HPA's choice")
        elif count != 1:
            fail(where, f"runs {count} replicas in dev (1 each)")
        if prod and hpa and d["metadata"]["name"].endswith("ingress"):
            kinds = {(m.get("type"), ((m.get("resource") or {}).get("name")
                                      or (((m.get("pods") or {}).get("metric") or {}).get("name"))))
                     for m in hpa["spec"].get("metrics") or []}
            if ("Resource", "cpu") not in kinds:
                fail(where, "the ingress's HPA does not scale on CPU")
            rate = [n for t, n in kinds if t == "Pods"]
            if not rate:
                fail(where, "the ingress's HPA does not scale on request rate (a Pods metric)")
            for metric in rate:
                if adapter_metrics is None:
                    fail(where, "no prometheus-adapter values were given to check the HPA's Pods metric against")
                elif metric not in adapter_metrics:
                    fail(where, f"the HPA's Pods metric {metric} is served by no prometheus-adapter rule "
                                f"(k8s/observability/prometheus-adapter-values.yaml serves {sorted(adapter_metrics)})")
        for c, env in ((c, env) for w, _, c, env in runs if w is d):
            listen = env.get("PAYSTREAM__ADMIN__LISTEN") or (cfg.get("admin") or {}).get("listen", "127.0.0.1:9090")
            host, _, port = listen.rpartition(":")
            if host not in ("0.0.0.0", "[::]", "::"):
                fail(where, f"admin.listen is {listen}: probes and Prometheus cannot reach a loopback address")
            ports = {p.get("name"): p.get("containerPort") for p in c.get("ports") or []}
            for probe, path in (("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")):
                http = (c.get(probe) or {}).get("httpGet") or {}
                port_ref = http.get("port")
                number = ports.get(port_ref, port_ref)
                if http.get("path") != path or str(number) != port:
                    fail(where, f"{probe} should GET {path} on the admin port {port}, has {http}")
            grace = spec.get("terminationGracePeriodSeconds", 30)
            if grace <= max(ack_wait, handler_timeout):
                fail(where, f"terminationGracePeriodSeconds {grace} is not longer than consumer.ack_wait "
                            f"({ack_wait:g}s)")
    ok(f"{name}: {len(deployments)} Deployments with probes, PDBs and spread constraints checked")

    # Services: every port named metrics is scraped.
    for s in by_kind.get("Service", []):
        for p in s["spec"].get("ports") or []:
            if p.get("name") != "metrics":
                continue
            if not scraped(s, p, docs, monitors):
                fail(f"{name} {ident(s)}", "port `metrics` is selected by no ServiceMonitor or PodMonitor")
    ok(f"{name}: every `metrics` Service port is scraped")

    # Ingress: only the public paths.
    for ing in by_kind.get("Ingress", []):
        paths = []
        for rule in ing["spec"].get("rules") or []:
            for p in (rule.get("http") or {}).get("paths") or []:
                paths.append((p.get("path", "/"), p.get("pathType", "Prefix")))
        if ing["spec"].get("defaultBackend"):
            fail(f"{name} {ident(ing)}", "has a defaultBackend: everything would be public")
        for private in PRIVATE_PATHS:
            for path, ptype in paths:
                if path_matches(path, ptype, private):
                    fail(f"{name} {ident(ing)}", f"path {path} ({ptype}) exposes {private}")
        for public in PUBLIC_PATHS:
            if not any(path_matches(path, ptype, public.rstrip("/") + ("/x" if public.endswith("/") else ""))
                       for path, ptype in paths):
                fail(f"{name} {ident(ing)}", f"does not route {public}")
        ok(f"{name}: Ingress routes {', '.join(p for p, _ in paths)} and none of {', '.join(PRIVATE_PATHS)}")

    for sa in by_kind.get("ServiceAccount", []):
        if sa.get("automountServiceAccountToken") is not False:
            fail(f"{name} {ident(sa)}", "automountServiceAccountToken is not false")

    # Network policies: every pod selected by a policy restricting both directions.
    policies = by_kind.get("NetworkPolicy", [])
    for w in workloads:
        labels = pod_template(w).get("metadata", {}).get("labels", {})
        types = set()
        for np in policies:
            if selector_matches(np["spec"].get("podSelector"), labels):
                types |= set(np["spec"].get("policyTypes") or ["Ingress"])
        if not {"Ingress", "Egress"} <= types:
            fail(f"{name} {ident(w)}", f"NetworkPolicies restrict only {sorted(types) or 'nothing'}")

    # WeChat key files: where [wechat] says, from a Secret, in the pods that sign or verify (ingress, lifecycle).
    for d in deployments:
        for c in d["spec"]["template"]["spec"].get("containers") or []:
            words = role_args(c) if is_paystream(c, images) else []
            if words[:1] == ["ingress"] or words[:2] == ["processor", "lifecycle"]:
                check_key_files(f"{name} {ident(d)}", d["spec"]["template"]["spec"], c,
                                {f"wechat.{k}": wechat.get(k)
                                 for k in ("merchant_private_key_path", "platform_public_key_path")})

    # PostgreSQL over verified TLS, its CA mounted (from a Secret, the CA's key left out) wherever paystream runs.
    database = cfg.get("database") or {}
    if database.get("tls", "disable") != "verify-full":
        fail(name, f"database.tls is {database.get('tls', 'disable')!r}: PostgreSQL traffic must be verified TLS")
    for w, spec, c, _ in runs:
        check_key_files(f"{name} {ident(w)}", spec, c, {"database.ca_file": database.get("ca_file")})
    for w in workloads:
        for v in pod_template(w)["spec"].get("volumes") or []:
            for item in (v.get("secret") or {}).get("items") or []:
                if item.get("key") == "ca.key":
                    fail(f"{name} {ident(w)}", f"volume {v['name']} mounts a CA's private key (ca.key)")

    # The binary's verdict on this overlay's paystream.toml with each role's environment.
    if not BIN.exists():
        warn(f"{BIN} not found: the {name} configuration was NOT checked by `paystream config` (build it first)")
        return
    checked = secrets_checked = 0
    with tempfile.TemporaryDirectory(prefix="k8s-promises-") as tmp:
        cfg_file = Path(tmp) / "paystream.toml"
        cfg_file.write_text(toml_text)
        for w, _, c, env in runs:
            good, out = run_config(cfg_file, env, role_args(c)[:2])
            if not good:
                fail(f"{name} {ident(w)}", f"`paystream config` refuses the configuration with this role's "
                                           f"environment: {out}")
            checked += 1
            # Least privilege: every Secret the role is given (optional rotation keys aside) is one it needs, i.e.
            # the binary refuses the configuration without it.
            for e in c.get("env") or []:
                ref = (e.get("valueFrom") or {}).get("secretKeyRef")
                if not ref or ref.get("optional"):
                    continue
                needed, _ = run_config(cfg_file, {k: v for k, v in env.items() if k != e["name"]}, role_args(c)[:2])
                if needed:
                    fail(f"{name} {ident(w)}", f"is given Secret {ref.get('name')} key {ref.get('key')} "
                                               f"({e['name']}) which its role does not need")
                secrets_checked += 1
    ok(f"{name}: `paystream config` accepts paystream.toml with the environment of each of {checked} workloads, "
       f"and each of their {secrets_checked} Secret references is needed")


def path_matches(path: str, ptype: str, request: str) -> bool:
    """Whether an Ingress path of this type would route `request`."""
    if ptype == "Exact":
        return path == request
    p = path.rstrip("/")
    if p == "":
        return True
    return request == p or request.startswith(p + "/")


def scraped(service: dict, port: dict, docs: list[dict], monitors: list[dict]) -> bool:
    labels = service.get("metadata", {}).get("labels", {})
    ns = service.get("metadata", {}).get("namespace")
    for m in monitors:
        mns = m.get("metadata", {}).get("namespace")
        nsel = m["spec"].get("namespaceSelector") or {}
        # A monitor without a namespaceSelector watches its own namespace; ours is applied with -n <namespace>.
        if nsel.get("matchNames") and ns not in nsel["matchNames"] and not nsel.get("any"):
            continue
        if mns and ns and mns != ns and not nsel:
            continue
        if m["kind"] == "ServiceMonitor":
            if selector_matches(m["spec"].get("selector"), labels) and any(
                    e.get("port") == port["name"] for e in m["spec"].get("endpoints") or []):
                return True
        elif m["kind"] == "PodMonitor":
            sel = service["spec"].get("selector") or {}
            target = port.get("targetPort")
            for w in docs:
                tmpl = pod_template(w)
                if not tmpl:
                    continue
                plabels = tmpl.get("metadata", {}).get("labels", {})
                if not sel or any(plabels.get(k) != v for k, v in sel.items()):
                    continue
                if selector_matches(m["spec"].get("selector"), plabels) and any(
                        e.get("port") == target for e in m["spec"].get("podMetricsEndpoints") or []):
                    return True
    return False


def check_key_files(where: str, spec: dict, c: dict, files: dict) -> None:
    """Each file the configuration names (`{"wechat.merchant_private_key_path": path, …}`) is mounted from a Secret
    volume that carries it."""
    for key, path in files.items():
        if not path:
            continue
        found = False
        for m in c.get("volumeMounts") or []:
            mp = m["mountPath"].rstrip("/")
            if path == mp or path.startswith(mp + "/"):
                vol = next((v for v in spec.get("volumes") or [] if v["name"] == m["name"]), {})
                if "secret" not in vol:
                    fail(where, f"{key} ({path}) is mounted from a volume that is not a Secret")
                else:
                    rel = m.get("subPath") or path[len(mp) + 1:]
                    items = vol["secret"].get("items")
                    if items is not None and rel not in {i["path"] for i in items}:
                        fail(where, f"{key} ({path}): Secret volume {vol['name']} has no item {rel}")
                found = True
        if not found:
            fail(where, f"{key} ({path}) is not mounted")


# ---------------------------------------------------------------------------------------------------------------
# custom resources: no schema here, so their required fields by hand

def check_custom(obj: dict, where: str) -> None:
    kind, spec = obj.get("kind"), obj.get("spec") or {}
    if kind == "ServiceMonitor":
        if not spec.get("selector"):
            fail(where, "ServiceMonitor without spec.selector")
        eps = spec.get("endpoints") or []
        if not eps or any(not (e.get("port") or e.get("targetPort")) for e in eps):
            fail(where, "ServiceMonitor endpoints need a port")
    elif kind == "PodMonitor":
        if not spec.get("selector"):
            fail(where, "PodMonitor without spec.selector")
        if not spec.get("podMetricsEndpoints"):
            fail(where, "PodMonitor without podMetricsEndpoints")
    elif kind == "PrometheusRule":
        groups = spec.get("groups") or []
        if not groups:
            fail(where, "PrometheusRule without groups")
        for g in groups:
            if not g.get("name") or not g.get("rules"):
                fail(where, f"rule group {g.get('name')!r} needs a name and rules")
            for r in g.get("rules") or []:
                if not (r.get("alert") or r.get("record")) or not r.get("expr"):
                    fail(where, f"rule {r.get('alert') or r.get('record')!r} needs alert/record and expr")
    elif kind == "Cluster" and obj.get("apiVersion", "").startswith("postgresql.cnpg.io/"):
        if not isinstance(spec.get("instances"), int) or spec["instances"] < 3:
            fail(where, "CloudNativePG cluster needs 3 instances")
        if not (spec.get("storage") or {}).get("size"):
            fail(where, "CloudNativePG cluster needs storage.size")
        initdb = (spec.get("bootstrap") or {}).get("initdb") or {}
        if initdb.get("database") != "paystream" or initdb.get("owner") != "paystream":
            fail(where, "bootstrap.initdb must create database paystream owned by paystream (Secret paystream-db-app)")
        if obj["metadata"].get("name") != "paystream-db":
            fail(where, "the cluster must be named paystream-db (its Secret paystream-db-app is referenced)")
        sync = (spec.get("minSyncReplicas", 0) >= 1) or bool((spec.get("postgresql") or {}).get("synchronous"))
        if not sync:
            fail(where, "no synchronous replica")
        if not (spec.get("monitoring") or {}).get("enablePodMonitor"):
            fail(where, "monitoring.enablePodMonitor is not on")
    ok(f"{where}: required fields present")


def check_adapter_values(path: Path) -> set[str]:
    """prometheus-adapter's rules: each serves a metric paystream exports (observability/metrics.txt). Returns the
    names of the metrics they serve."""
    v = yaml.safe_load(path.read_text()) or {}
    where = str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)
    exported = set((ROOT / "k8s/observability/metrics.txt").read_text().split())
    served_metrics: set[str] = set()
    for rule in (v.get("rules") or {}).get("custom") or []:
        series = re.match(r"\s*'?([a-zA-Z_:][a-zA-Z0-9_:]*)", str(rule.get("seriesQuery", "")))
        if not series or series.group(1) not in exported:
            fail(where, f"rule on {rule.get('seriesQuery')!r}: not a metric paystream exports (metrics.txt)")
        served = (rule.get("name") or {}).get("as")
        if not served or "<<.Series>>" not in str(rule.get("metricsQuery", "")):
            fail(where, f"rule on {rule.get('seriesQuery')!r} needs name.as and a metricsQuery over <<.Series>>")
        else:
            served_metrics.add(served)
    if not served_metrics:
        fail(where, "no custom rule: the ingress's request-rate HPA would have no metric")
    ok(f"{where}: prometheus-adapter serves {', '.join(sorted(served_metrics))} from exported metrics")
    return served_metrics


def check_nats_values(path: Path) -> None:
    v = yaml.safe_load(path.read_text()) or {}
    where = str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)
    cfg = v.get("config") or {}
    want = [
        ("config.cluster.enabled", (cfg.get("cluster") or {}).get("enabled") is True),
        ("config.cluster.replicas = 3", (cfg.get("cluster") or {}).get("replicas") == 3),
        ("config.jetstream.enabled", (cfg.get("jetstream") or {}).get("enabled") is True),
        ("config.jetstream.fileStore.pvc.enabled",
         (((cfg.get("jetstream") or {}).get("fileStore") or {}).get("pvc") or {}).get("enabled") is True),
        ("promExporter.enabled", (v.get("promExporter") or {}).get("enabled") is True),
        ("promExporter.podMonitor.enabled", ((v.get("promExporter") or {}).get("podMonitor") or {}).get("enabled")
         is True),
        ("podDisruptionBudget.enabled", (v.get("podDisruptionBudget") or {}).get("enabled") is True),
        ("config.merge.lame_duck_duration", bool((cfg.get("merge") or {}).get("lame_duck_duration"))),
        ("natsBox.enabled = false", (v.get("natsBox") or {}).get("enabled") is False),
    ]
    for what, good in want:
        if not good:
            fail(where, f"NATS chart values: {what} expected")
    # Clients authenticate, and no password is written into the values: each user's password is an environment
    # variable of the server (`<< $VAR >>`) filled from a Secret.
    users = (((cfg.get("merge") or {}).get("authorization") or {}).get("users")) or []
    env = (v.get("container") or {}).get("env") or {}
    if not users:
        fail(where, "NATS chart values: config.merge.authorization.users expected (clients must authenticate)")
    for u in users:
        m = re.fullmatch(r"<< \$(\w+) >>", str(u.get("password", "")))
        if not m:
            fail(where, f"NATS user {u.get('user')!r}: the password must be `<< $VAR >>` (from a Secret), "
                        "never written in the values")
        elif not ((env.get(m.group(1)) or {}) if isinstance(env.get(m.group(1)), dict) else {}).get(
                "valueFrom", {}).get("secretKeyRef"):
            fail(where, f"NATS user {u.get('user')!r}: container.env.{m.group(1)} must come from a secretKeyRef")
    grace = (((v.get("podTemplate") or {}).get("merge") or {}).get("spec") or {}).get("terminationGracePeriodSeconds")
    lame = duration_seconds(str((cfg.get("merge") or {}).get("lame_duck_duration", "30s"))) + duration_seconds(
        str((cfg.get("merge") or {}).get("lame_duck_grace_period", "10s")))
    if not grace or grace <= lame:
        fail(where, f"terminationGracePeriodSeconds ({grace}) must exceed lame-duck grace + duration ({lame:g}s)")
    ok(f"{where}: NATS chart values (cluster of 3, JetStream on PVCs, exporter + PodMonitor, PDB, lame duck, "
       "password auth from a Secret)")


def check_dashboards(docs: list[dict]) -> None:
    found = False
    for d in docs:
        if d.get("kind") == "ConfigMap" and (d["metadata"].get("labels") or {}).get("grafana_dashboard") == "1":
            for key, value in (d.get("data") or {}).items():
                try:
                    json.loads(value)
                except json.JSONDecodeError as e:
                    fail(ident(d), f"{key} is not valid JSON: {e}")
            found = True
    if not found:
        fail("observability", "no ConfigMap labelled grafana_dashboard: \"1\"")
    else:
        ok("the dashboard ConfigMap is labelled grafana_dashboard: \"1\"")


# ---------------------------------------------------------------------------------------------------------------

def main(argv: list[str]) -> int:
    if not argv:
        print(__doc__, file=sys.stderr)
        return 2
    roles = roles_from_binary()
    if roles is None:
        warn(f"{BIN} not found: roles taken from the built-in list {KNOWN_ROLES}, not from `paystream --help`")
        roles = KNOWN_ROLES
    else:
        ok(f"roles from `paystream --help`: {', '.join(' '.join(r) for r in roles)}")
        if sorted(roles) != sorted(KNOWN_ROLES):
            warn(f"`paystream --help` lists roles {roles}, the built-in fallback list is {KNOWN_ROLES}: update it")

    overlays: dict[str, list[dict]] = {}
    adapter_metrics: set[str] | None = None
    extra: list[dict] = []
    for arg in argv:
        path = Path(arg)
        if path.name == "values.yaml" and path.parent.name == "nats":
            check_nats_values(path)
            continue
        if path.name == "prometheus-adapter-values.yaml":
            adapter_metrics = check_adapter_values(path)
            continue
        docs = load(path)
        if any(d.get("kind") == "Deployment" for d in docs):
            overlays[path.stem] = docs
        else:
            extra += docs
    for docs in list(overlays.values()) + [extra]:
        for d in docs:
            if d.get("kind") in ("ServiceMonitor", "PodMonitor", "PrometheusRule", "Cluster"):
                check_custom(d, ident(d))
    monitors = [d for d in extra if d.get("kind") in ("ServiceMonitor", "PodMonitor")]
    if not monitors:
        fail("observability", "no ServiceMonitor or PodMonitor among the files")
    if extra and any(d.get("kind") == "Secret" for d in extra):
        fail("observability", "a Secret object among the manifests")
    check_dashboards(extra)
    if not {"dev", "prod"} <= set(overlays):
        fail("overlays", f"expected the dev and prod overlays, got {sorted(overlays)}")
    for name, docs in overlays.items():
        check_overlay(name, docs, roles, monitors, adapter_metrics)

    for p in passes:
        print(f"ok   {p}")
    for f in failures:
        print(f, file=sys.stderr)
    print(f"{len(failures)} failure(s), {len(passes)} check group(s) passed", file=sys.stderr if failures else sys.stdout)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
