#!/usr/bin/env python3
"""Validates infra/k8s offline: every manifest against the Kubernetes JSON schemas that the
pinned kubernetes-validate package ships (strict: an unknown or misspelt field fails), for the
oldest and the newest Kubernetes version we support, plus the deployment rules that a schema
cannot express (shutdown windows, probes, durable Redis, scrape annotations, secrets).

Each overlay is rendered with `kubectl kustomize` when kubectl is on PATH (it renders offline:
kustomize needs no cluster) and the rendered output is validated and checked as a whole.
Without kubectl, every file is validated on its own: the overlays are written so that each of
their files is a complete object (cells.yaml) or a ConfigMap patch that is itself a valid
ConfigMap, and each kustomization's references are checked to exist; what is then not checked
is the merge itself. Usage: check.py [K8S_DIR]  (run with the venv that has
kubernetes-validate)."""

import os
import shutil
import subprocess
import sys

import kubernetes_validate
import yaml

VERSIONS = ["1.29.0", "1.37.0"]
SHUTDOWN_WINDOW_S = 30  # the gateway's --shutdown-timeout-ms default, 30000
failures = []


def fail(where, message):
    failures.append(f"{where}: {message}")


def load_all(text, where):
    try:
        return [d for d in yaml.safe_load_all(text) if d is not None]
    except yaml.YAMLError as e:
        fail(where, f"not YAML: {e}")
        return []


def validate_schema(doc, where):
    name = f"{doc.get('kind')}/{doc.get('metadata', {}).get('name')}"
    for version in VERSIONS:
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as e:
            path = ".".join(str(p) for p in e.path)
            fail(where, f"{name} invalid for Kubernetes {version} at {path}: {e.message}")
        except (kubernetes_validate.SchemaNotFoundError, KeyError) as e:
            fail(where, f"{name}: no schema for it ({e})")
    return name


def pod_template(doc):
    if doc.get("kind") in ("Deployment", "StatefulSet"):
        return doc["spec"]["template"]
    return None


def check_workload(doc, where):
    """The rules of issue 11 that schemas cannot express."""
    template = pod_template(doc)
    if template is None:
        return
    name = f"{doc['kind']}/{doc['metadata']['name']}"
    spec = template["spec"]
    containers = spec["containers"]
    confab = [c for c in containers if c.get("image", "").startswith("confab/")]
    for c in confab:
        role = c["args"][0]
        grace = spec.get("terminationGracePeriodSeconds", 30)
        if grace <= SHUTDOWN_WINDOW_S:
            fail(where, f"{name}: terminationGracePeriodSeconds {grace} is not above the {SHUTDOWN_WINDOW_S} s shutdown window")
        ready = c.get("readinessProbe", {}).get("httpGet", {}).get("path")
        alive = c.get("livenessProbe", {}).get("httpGet", {}).get("path")
        if (ready, alive) != ("/readyz", "/healthz"):
            fail(where, f"{name}: probes must be readiness /readyz and liveness /healthz, found {ready}, {alive}")
        notes = template.get("metadata", {}).get("annotations", {})
        if notes.get("prometheus.io/scrape") != "true" or not notes.get("prometheus.io/port"):
            fail(where, f"{name}: no prometheus.io scrape annotations")
        env = {e["name"]: e for e in c.get("env", [])}
        for secret in ("CONFAB_CLUSTER_SECRET",) + (("CONFAB_JWT_SECRET", "CONFAB_ADMIN_TOKEN") if role == "gateway" else ()):
            if "secretKeyRef" not in env.get(secret, {}).get("valueFrom", {}):
                fail(where, f"{name}: {secret} must come from a Secret")
        if role == "cell":
            if doc["kind"] != "StatefulSet" or doc["spec"].get("replicas") != 1:
                fail(where, f"{name}: a cell is a StatefulSet of exactly one pod")
            for var in ("CONFAB_ID", "CONFAB_ADVERTISE", "CONFAB_REGION"):
                if "value" not in env.get(var, {}):
                    fail(where, f"{name}: {var} must be a fixed value (a stable id and advertise URL)")
    for c in containers:
        if c.get("image", "").startswith("redis:"):
            mounts = {m["mountPath"]: m["name"] for m in c.get("volumeMounts", [])}
            claims = {t["metadata"]["name"] for t in doc["spec"].get("volumeClaimTemplates", [])}
            if mounts.get("/data") not in claims:
                fail(where, f"{name}: Redis container {c['name']} keeps /data off a persistent volume")


def check_redis_config(doc, where):
    if doc.get("kind") == "ConfigMap" and "redis.conf" in doc.get("data", {}):
        lines = {tuple(l.split()[:2]) for l in doc["data"]["redis.conf"].splitlines() if l.strip()}
        for need in (("appendonly", "yes"), ("appendfsync", "always"), ("dir", "/data")):
            if need not in lines:
                fail(where, f"redis.conf lacks '{' '.join(need)}'")


def check_docs(docs, where, whole):
    kinds = {}
    for doc in docs:
        name = validate_schema(doc, where)
        check_workload(doc, where)
        check_redis_config(doc, where)
        kinds.setdefault(doc.get("kind"), []).append(name)
    if whole:
        for kind in ("Deployment", "Service", "PodDisruptionBudget", "StatefulSet", "Secret"):
            if kind not in kinds:
                fail(where, f"the rendered overlay has no {kind}")
    return sum(len(v) for v in kinds.values())


def check_kustomization(path):
    with open(path) as f:
        k = yaml.safe_load(f)
    base = os.path.dirname(path)
    refs = list(k.get("resources", [])) + [p["path"] for p in k.get("patches", []) if "path" in p]
    for ref in refs:
        if not os.path.exists(os.path.join(base, ref)):
            fail(path, f"references {ref}, which does not exist")


def main():
    root = os.path.abspath(sys.argv[1] if len(sys.argv) > 1 else os.path.dirname(__file__))
    objects = 0
    overlays = []
    for dirpath, _, files in sorted(os.walk(root)):
        for file in sorted(files):
            path = os.path.join(dirpath, file)
            if not file.endswith(".yaml"):
                continue
            if file == "kustomization.yaml":
                check_kustomization(path)
                if os.path.basename(os.path.dirname(dirpath)) == "overlays":
                    overlays.append(dirpath)
                continue
            with open(path) as f:
                objects += check_docs(load_all(f.read(), path), os.path.relpath(path, root), whole=False)
    print(f"{objects} objects in {root} validated file by file against Kubernetes {', '.join(VERSIONS)}")
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        print("kubectl is not installed: overlays checked file by file only (their merge is not rendered)")
    for overlay in overlays:
        if kubectl is None:
            continue
        out = subprocess.run([kubectl, "kustomize", overlay], capture_output=True, text=True)
        where = f"overlay {os.path.relpath(overlay, root)}"
        if out.returncode != 0:
            fail(where, f"kubectl kustomize failed: {out.stderr.strip()}")
            continue
        count = check_docs(load_all(out.stdout, where), where, whole=True)
        print(f"{where}: rendered with kubectl kustomize, {count} objects valid")
    for f in failures:
        print(f"FAIL {f}", file=sys.stderr)
    if failures:
        sys.exit(1)
    print("kubernetes manifests OK")


if __name__ == "__main__":
    main()
