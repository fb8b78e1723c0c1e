#!/usr/bin/env python3
"""Offline checks of the rendered manifests (called by k8s/validate.sh).

usage: check.py RENDERED_DIR KEDA_JSON_OUT

RENDERED_DIR holds <overlay>.yaml from `kubectl kustomize` plus jobs.yaml (the coordinator Job
templates) and secrets.yaml (the Secret templates). Validates every core object against the
Kubernetes schemas of kubernetes-validate (strict: unknown fields fail), writes the KEDA objects
to KEDA_JSON_OUT for validate-keda.mjs, and asserts the invariants docs/deploy.md relies on.
"""
import json
import pathlib
import re
import sys

import kubernetes_validate
import yaml

K8S_VERSION = "1.30.0"  # oldest minor still supported by the managed clouds we target
ROOT = pathlib.Path(__file__).resolve().parent.parent
errors = []


def fail(where, msg):
    errors.append(f"{where}: {msg}")


def docs(path):
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def flag_envs():
    """Every env twin the binaries accept (clap `env = "..."`)."""
    names = set()
    for src in list((ROOT / "workers/src").glob("*.rs")) + list((ROOT / "coordinator/src").glob("*.rs")):
        names.update(re.findall(r'env\s*=\s*"([A-Z0-9_]+)"', src.read_text()))
    return names | {"RUST_LOG", "AWS_REGION", "AWS_DEFAULT_REGION"}


def strings(node, path=""):
    if isinstance(node, dict):
        for k, v in node.items():
            yield from strings(v, f"{path}.{k}")
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from strings(v, f"{path}[{i}]")
    elif isinstance(node, str):
        yield path, node


SECRETISH = re.compile(r"PASS|SECRET|TOKEN|ACCESS_KEY|CREDENTIAL", re.I)
URL_WITH_PASSWORD = re.compile(r"[a-z]+://[^/\s:@]+:[^@\s/]+@", re.I)


def check_no_secret_values(where, objs):
    for o in objs:
        name = f"{where} {o.get('kind')}/{o['metadata'].get('name') or o['metadata'].get('generateName')}"
        if o.get("kind") == "Secret":
            for field in ("data", "stringData"):
                for k, v in (o.get(field) or {}).items():
                    if v not in ("", None):
                        fail(name, f"Secret key {k} has a value in the repository")
        for p, s in strings(o):
            if URL_WITH_PASSWORD.search(s):
                fail(name, f"{p} holds a URL with a password")
        for c in pod_containers(o):
            for e in c.get("env") or []:
                if SECRETISH.search(e["name"]) and "value" in e:
                    fail(name, f"env {e['name']} has a literal value; use valueFrom.secretKeyRef")
        if o.get("kind") == "ConfigMap":
            for k in (o.get("data") or {}):
                if SECRETISH.search(k):
                    fail(name, f"ConfigMap key {k} looks like a credential; put it in a Secret")


def pod_spec(o):
    k = o.get("kind")
    if k in ("Deployment", "StatefulSet", "Job"):
        return o["spec"]["template"]["spec"]
    return None


def pod_containers(o):
    s = pod_spec(o)
    return (s or {}).get("containers", []) + (s or {}).get("initContainers", [])


def find(objs, kind, name=None):
    return [o for o in objs if o.get("kind") == kind and (name is None or o["metadata"].get("name") == name)]


def check_overlay(name, objs, envs):
    where = f"overlay {name}"
    deps = find(objs, "Deployment", "defectforge-worker")
    if len(deps) != 1:
        fail(where, "no worker Deployment defectforge-worker")
        return
    dep = deps[0]
    spec = pod_spec(dep)
    c = spec["containers"][0]
    ann = dep["metadata"].get("annotations", {})
    limit = int(ann.get("defectforge.io/shard-time-limit-s", "0"))
    if limit < 1:
        fail(where, "worker Deployment lacks annotation defectforge.io/shard-time-limit-s")
    grace = spec.get("terminationGracePeriodSeconds", 30)
    if grace < limit + 60:
        fail(where, f"terminationGracePeriodSeconds {grace} < shard time limit {limit} + 60 s for commit and ack")
    # probes on the worker's endpoint
    cms = {o["metadata"]["name"]: o.get("data", {}) for o in find(objs, "ConfigMap")}
    wcfg = cms.get("defectforge-worker", {})
    # the worker binds loopback by default: the pod must ask for an address probes can reach
    addr = wcfg.get("DEFECTFORGE_HTTP_ADDR", "127.0.0.1:9090")
    if addr.rsplit(":", 1)[0] in ("127.0.0.1", "localhost", "[::1]"):
        fail(where, f"DEFECTFORGE_HTTP_ADDR {addr} is loopback: probes and Prometheus cannot reach it (set 0.0.0.0:9090)")
    port = int(addr.rsplit(":", 1)[1])
    ports = {p["name"]: p["containerPort"] for p in c.get("ports", [])}
    for probe, path in (("readinessProbe", "/readyz"), ("livenessProbe", "/healthz")):
        p = c.get(probe)
        if not p or p.get("httpGet", {}).get("path") != path:
            fail(where, f"worker {probe} must GET {path}")
            continue
        pp = p["httpGet"]["port"]
        if ports.get(pp, pp) != port:
            fail(where, f"worker {probe} port {pp} is not DEFECTFORGE_HTTP_ADDR's port {port}")
    # settings are real flags
    for k in wcfg:
        if k not in envs:
            fail(where, f"ConfigMap defectforge-worker key {k} is no flag's environment twin")
    stores = [x for x in wcfg.get("DEFECTFORGE_STORES", "").split(",") if x.strip()]
    if not stores:
        fail(where, "DEFECTFORGE_STORES is not set: the worker refuses to start without the output stores it serves")
    for st in stores:
        if not st.startswith("s3://"):
            fail(where, f"DEFECTFORGE_STORES entry {st} is not s3://: a pod's local paths are not shared with the coordinator")
    if wcfg.get("DEFECTFORGE_PREFETCH", "1") != "1":
        fail(where, "DEFECTFORGE_PREFETCH must be 1 (KEDA's target is one shard per replica)")
    # GPU
    limits = c.get("resources", {}).get("limits", {})
    tol = [t for t in spec.get("tolerations", []) if t.get("key") == "nvidia.com/gpu"]
    if name != "dev":
        if int(limits.get("nvidia.com/gpu", 0)) < 1:
            fail(where, "worker has no nvidia.com/gpu limit")
        if "nvidia.com/gpu" in c.get("resources", {}).get("requests", {}) and \
                c["resources"]["requests"]["nvidia.com/gpu"] != limits.get("nvidia.com/gpu"):
            fail(where, "nvidia.com/gpu request differs from its limit")
        if not tol:
            fail(where, "worker has no toleration for nvidia.com/gpu")
        if not spec.get("nodeSelector"):
            fail(where, "worker has no nodeSelector for GPU nodes")
    elif "nvidia.com/gpu" in limits or tol:
        fail(where, "dev workers must run on CPU nodes")
    # KEDA
    sos = find(objs, "ScaledObject")
    if len(sos) != 1:
        fail(where, "expected one ScaledObject")
        return
    so = sos[0]
    if so["spec"]["scaleTargetRef"]["name"] != dep["metadata"]["name"]:
        fail(where, "ScaledObject does not target the worker Deployment")
    trig = [t for t in so["spec"].get("triggers", []) if t["type"] == "rabbitmq"]
    if not trig:
        fail(where, "ScaledObject has no rabbitmq trigger")
    for t in trig:
        m = t.get("metadata", {})
        if m.get("protocol") != "http":
            fail(where, "the rabbitmq trigger must use protocol: http (amqp counts ready messages only and scales busy workers away)")
        if m.get("mode") != "QueueLength":
            fail(where, "the rabbitmq trigger must use mode: QueueLength")
        if m.get("queueName") != wcfg.get("DEFECTFORGE_QUEUE", "defectforge.shards"):
            fail(where, "the trigger's queueName differs from DEFECTFORGE_QUEUE")
        if m.get("excludeUnacknowledged", "false") != "false":
            fail(where, "excludeUnacknowledged would scale busy workers away")
        if "host" in m:
            fail(where, "the trigger's host belongs in the TriggerAuthentication's Secret")
        ref = t.get("authenticationRef", {}).get("name")
        if not find(objs, "TriggerAuthentication", ref):
            fail(where, f"TriggerAuthentication {ref} is missing")
    if so["spec"].get("cooldownPeriod", 300) < 60:
        fail(where, "cooldownPeriod too short")
    if dep["spec"].get("strategy", {}).get("rollingUpdate", {}).get("maxUnavailable", 1) not in (0, "0"):
        fail(where, "rolling updates must not take running workers away before new ones are up")


def main():
    rendered, keda_out = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
    envs = flag_envs()
    keda = []
    for f in sorted(rendered.glob("*.yaml")):
        objs = docs(f)
        for o in objs:
            kind = o.get("kind")
            label = f"{f.name} {kind}/{o['metadata'].get('name') or o['metadata'].get('generateName')}"
            if o.get("apiVersion", "").startswith("keda.sh/"):
                keda.append({"where": label, "object": o})
                continue
            try:
                kubernetes_validate.validate(o, K8S_VERSION, strict=True)
            except kubernetes_validate.ValidationError as e:
                fail(label, f"schema: {e.message} at {'/'.join(map(str, e.path))}")
            except Exception as e:  # unknown kind/version
                fail(label, f"schema: {e}")
        check_no_secret_values(f.name, objs)
        if f.stem not in ("jobs", "secrets"):
            check_overlay(f.stem, objs, envs)
        if f.stem == "jobs":
            for o in objs:
                if o["spec"].get("backoffLimit", 6) != 0:
                    fail(f"{f.name} {o['metadata']['generateName']}", "coordinator Jobs must not retry blindly (backoffLimit 0)")
    keda_out.write_text(json.dumps(keda))
    for e in errors:
        print(f"FAIL {e}")
    if errors:
        sys.exit(1)
    print(f"ok: {len(list(rendered.glob('*.yaml')))} files, core objects valid for Kubernetes {K8S_VERSION}, invariants hold")


if __name__ == "__main__":
    main()
