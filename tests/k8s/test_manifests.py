"""The Kubernetes manifests, checked offline.

Built-in kinds are validated against the OpenAPI schemas of a pinned Kubernetes version with
kubernetes-validate; CRDs (PodMonitor, PrometheusRule, ScaledObject) are checked for the fields
their operators need. The StatefulSet, Service, hostfile script and recovery set-up must agree,
and every variable in the ConfigMap and Secret must be a Settings field.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from dataflows.config import Settings

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "k8s"
K8S_VERSION = "1.31"
BUILT_IN = {"StatefulSet", "Service", "ConfigMap", "Secret", "PodDisruptionBudget"}
# Read by boto3 from the environment, not by Settings (connectors/s3.py).
LIBRARY_ENV = {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"}


def manifest_files() -> list[Path]:
    return sorted(p for p in K8S.rglob("*.yaml") if p.name != "kustomization.yaml")


def documents() -> list[tuple[Path, dict]]:
    docs = []
    for path in manifest_files():
        docs.extend((path, doc) for doc in yaml.safe_load_all(path.read_text()) if doc)
    return docs


def one(kind: str, name: str | None = None) -> dict:
    found = [
        doc
        for _, doc in documents()
        if doc["kind"] == kind and (name is None or doc["metadata"]["name"] == name)
    ]
    assert len(found) == 1, (kind, name, len(found))
    return found[0]


def env_of(container: dict) -> dict[str, dict]:
    return {item["name"]: item for item in container.get("env", [])}


def containers(kind: str = "StatefulSet") -> dict[str, dict]:
    spec = one(kind)["spec"]["template"]["spec"]
    return {c["name"]: c for c in spec.get("initContainers", []) + spec["containers"]}


# --- schema -----------------------------------------------------------------------------------


def test_every_manifest_is_yaml_with_kind_and_name() -> None:
    docs = documents()
    assert {doc["kind"] for _, doc in docs} >= BUILT_IN | {
        "PodMonitor",
        "PrometheusRule",
        "ScaledObject",
    }
    for path, doc in docs:
        assert doc.get("apiVersion") and doc.get("kind"), path
        assert doc["metadata"].get("name"), path


@pytest.mark.parametrize(
    ("path", "doc"),
    [(p, d) for p, d in documents() if d["kind"] in BUILT_IN],
    ids=lambda value: value.name if isinstance(value, Path) else value["metadata"]["name"],
)
def test_built_in_kinds_validate_against_the_kubernetes_schema(path: Path, doc: dict) -> None:
    try:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
    except kubernetes_validate.ValidationError as exc:
        pytest.fail(f"{path.relative_to(ROOT)}: {'.'.join(map(str, exc.path))}: {exc.message}")


def test_the_validator_rejects_a_broken_manifest() -> None:
    broken = json.loads(json.dumps(one("StatefulSet")))
    broken["spec"]["replicas"] = "three"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, K8S_VERSION, strict=True)
    unknown_field = json.loads(json.dumps(one("Service")))
    unknown_field["spec"]["clusterIp"] = "None"  # misspelt: strict mode catches it
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(unknown_field, K8S_VERSION, strict=True)


def test_pod_monitor_structure() -> None:
    monitor = one("PodMonitor")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    spec = monitor["spec"]
    pod_labels = one("StatefulSet")["spec"]["template"]["metadata"]["labels"]
    assert spec["selector"]["matchLabels"].items() <= pod_labels.items()
    ports = {p["name"] for p in containers()["pipeline"]["ports"]}
    for endpoint in spec["podMetricsEndpoints"]:
        assert endpoint["port"] in ports
        assert endpoint["path"] == "/metrics"
    # The alerts' up{job="event-pipeline"} depends on the job label this produces.
    assert pod_labels[spec["jobLabel"]] == "event-pipeline"


def test_prometheus_rule_structure() -> None:
    rule = one("PrometheusRule")
    assert rule["apiVersion"] == "monitoring.coreos.com/v1"
    for group in rule["spec"]["groups"]:
        assert group["name"] and group["rules"]
        for item in group["rules"]:
            assert set(item) <= {"alert", "record", "expr", "for", "labels", "annotations"}
            assert ("alert" in item) != ("record" in item)
            assert isinstance(item["expr"], str) and item["expr"].strip()
            if "for" in item:
                assert re.fullmatch(r"\d+[smh]", item["for"])


def test_scaled_object_structure() -> None:
    scaled = one("ScaledObject")
    assert scaled["apiVersion"] == "keda.sh/v1alpha1"
    spec = scaled["spec"]
    statefulset = one("StatefulSet")
    target = spec["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("StatefulSet", statefulset["metadata"]["name"])
    assert 1 <= spec["minReplicaCount"] <= spec["maxReplicaCount"]
    partitions = int(env_of(containers()["init-recovery"])["RECOVERY_PARTITIONS"]["value"])
    assert spec["maxReplicaCount"] <= partitions
    (trigger,) = spec["triggers"]
    assert trigger["type"] == "kafka"
    config = one("ConfigMap", "event-pipeline-config")["data"]
    assert trigger["metadata"]["consumerGroup"] == config["KAFKA_CONSUMER_GROUP"]
    assert trigger["metadata"]["topic"] == config["KAFKA_TOPIC_RAW"]
    assert trigger["metadata"]["bootstrapServers"] == config["KAFKA_BOOTSTRAP_SERVERS"]
    assert int(trigger["metadata"]["lagThreshold"]) > 0


# --- the StatefulSet, its Service and its init containers agree -------------------------------


def test_hostfile_lists_every_process_of_the_statefulset() -> None:
    statefulset = one("StatefulSet")
    service = one("Service")
    init = env_of(containers()["init-hostfile"])
    main = env_of(containers()["pipeline"])
    name = statefulset["metadata"]["name"]

    assert service["spec"]["clusterIP"] == "None"
    assert service["spec"]["publishNotReadyAddresses"] is True
    assert statefulset["spec"]["serviceName"] == service["metadata"]["name"]
    assert (
        service["spec"]["selector"].items()
        <= statefulset["spec"]["template"]["metadata"]["labels"].items()
    )
    assert statefulset["spec"]["podManagementPolicy"] == "Parallel"

    assert init["BYTEWAX_REPLICAS"]["value"] == str(statefulset["spec"]["replicas"])
    assert init["BYTEWAX_STATEFULSET_NAME"]["value"] == name
    assert main["BYTEWAX_STATEFULSET_NAME"]["value"] == name
    assert init["SERVICE_NAME"]["value"] == service["metadata"]["name"]
    assert init["BYTEWAX_POD_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
    assert main["BYTEWAX_POD_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
    assert init["POD_NAMESPACE"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.namespace"
    assert main["BYTEWAX_WORKERS_PER_PROCESS"]["value"] == "1"

    service_ports = {p["name"]: p for p in service["spec"]["ports"]}
    container_ports = {p["name"]: p["containerPort"] for p in containers()["pipeline"]["ports"]}
    assert container_ports == {"process": 9999, "metrics": Settings().metrics_port}
    assert int(init["PROCESS_PORT"]["value"]) == container_ports["process"]
    for port_name, container_port in container_ports.items():
        assert service_ports[port_name]["port"] == container_port
        assert service_ports[port_name]["targetPort"] == port_name


def test_hostfile_and_main_container_share_the_hostfile_volume() -> None:
    main = containers()["pipeline"]
    hostfile = Path(env_of(main)["BYTEWAX_HOSTFILE_PATH"]["value"])
    for container in (containers()["init-hostfile"], main):
        mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
        assert mounts[str(hostfile.parent)] == "hostfile"
    assert str(hostfile) in containers()["init-hostfile"]["args"][0]


@pytest.mark.skipif(shutil.which("sh") is None, reason="no POSIX shell")
def test_hostfile_script_writes_the_addresses(tmp_path: Path) -> None:
    init = containers()["init-hostfile"]
    script = init["args"][0].replace("/etc/bytewax", str(tmp_path))
    env = {k: v["value"] for k, v in env_of(init).items() if "value" in v}
    env |= {
        "BYTEWAX_POD_NAME": "event-pipeline-1",
        "POD_NAMESPACE": "prod",
        "PATH": os.environ["PATH"],
    }
    subprocess.run(["sh", "-c", script], env=env, check=True, capture_output=True)
    replicas = int(env["BYTEWAX_REPLICAS"])
    assert (tmp_path / "hostfile.txt").read_text().splitlines() == [
        f"event-pipeline-{i}.event-pipeline.prod.svc.cluster.local:9999" for i in range(replicas)
    ]
    # A pod beyond the hostfile (replicas changed without BYTEWAX_REPLICAS) refuses to start.
    env["BYTEWAX_POD_NAME"] = f"event-pipeline-{replicas}"
    result = subprocess.run(
        ["sh", "-c", script], env=env, capture_output=True, text=True, check=False
    )
    assert result.returncode == 1 and "BYTEWAX_REPLICAS" in result.stderr


def test_recovery_store_is_a_volume_claim_per_pod_initialised_on_pod_zero() -> None:
    statefulset = one("StatefulSet")
    (claim,) = statefulset["spec"]["volumeClaimTemplates"]
    assert claim["metadata"]["name"] == "recovery"
    init = containers()["init-recovery"]
    main = containers()["pipeline"]
    directory = env_of(main)["BYTEWAX_RECOVERY_DIRECTORY"]["value"]
    assert directory == "/var/lib/pipeline/recovery"
    assert env_of(init)["BYTEWAX_RECOVERY_DIRECTORY"]["value"] == directory
    for container in (init, main):
        mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
        assert mounts[directory] == "recovery"
    script = init["args"][0]
    assert 'python -m bytewax.recovery "$dir" "$RECOVERY_PARTITIONS"' in script
    for name in ("BYTEWAX_SNAPSHOT_INTERVAL", "BYTEWAX_RECOVERY_BACKUP_INTERVAL"):
        assert int(env_of(main)[name]["value"]) >= 0


@pytest.mark.skipif(shutil.which("sh") is None, reason="no POSIX shell")
def test_recovery_init_script_only_initialises_an_empty_directory(tmp_path: Path) -> None:
    init = containers()["init-recovery"]
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    # Stands in for `python -m bytewax.recovery DIR N`: creates part-0..N-1.
    (fake_bin / "python").write_text(
        '#!/bin/sh\ni=0; while [ "$i" -lt "$4" ]; do : > "$3/part-$i.sqlite3"; i=$((i+1)); done\n'
    )
    (fake_bin / "python").chmod(0o755)

    def run(pod: str, directory: Path) -> subprocess.CompletedProcess[str]:
        env = {
            "PATH": f"{fake_bin}:{os.environ['PATH']}",
            "BYTEWAX_POD_NAME": pod,
            "BYTEWAX_RECOVERY_DIRECTORY": str(directory),
            "RECOVERY_PARTITIONS": env_of(init)["RECOVERY_PARTITIONS"]["value"],
        }
        return subprocess.run(
            ["sh", "-c", init["args"][0]], env=env, capture_output=True, text=True, check=False
        )

    partitions = int(env_of(init)["RECOVERY_PARTITIONS"]["value"])
    fresh = tmp_path / "fresh"
    (fresh / "lost+found").mkdir(parents=True)
    assert run("event-pipeline-0", fresh).returncode == 0
    assert len(list(fresh.glob("part-*.sqlite3"))) == partitions

    (fresh / "part-0.sqlite3").write_text("state")
    assert run("event-pipeline-0", fresh).returncode == 0  # present: left alone
    assert (fresh / "part-0.sqlite3").read_text() == "state"

    other = tmp_path / "other"
    other.mkdir()
    assert run("event-pipeline-2", other).returncode == 0
    assert list(other.iterdir()) == []  # partitions live on pod 0 only

    junk = tmp_path / "junk"
    junk.mkdir()
    (junk / "notes.txt").write_text("x")
    result = run("event-pipeline-0", junk)
    assert result.returncode == 1 and "refusing" in result.stderr


def test_main_container_runs_the_dataflow_with_config_and_secret() -> None:
    main = containers()["pipeline"]
    assert main["args"] == ["dataflows.main"]
    sources = {
        ("configMapRef" if "configMapRef" in s else "secretRef"): s.get("configMapRef")
        or s.get("secretRef")
        for s in main["envFrom"]
    }
    assert sources["configMapRef"]["name"] == "event-pipeline-config"
    assert sources["secretRef"]["name"] == "event-pipeline-secrets"
    assert not sources["secretRef"].get("optional", False)
    for container in containers().values():
        assert container["resources"]["requests"] and container["resources"]["limits"], container
        assert container["securityContext"]["allowPrivilegeEscalation"] is False
    pod = one("StatefulSet")["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True


def test_pdb_selects_the_statefulset_pods() -> None:
    pdb = one("PodDisruptionBudget")
    labels = one("StatefulSet")["spec"]["template"]["metadata"]["labels"]
    assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()


# --- settings ---------------------------------------------------------------------------------


def test_configmap_and_secret_hold_only_settings_fields(monkeypatch: pytest.MonkeyPatch) -> None:
    fields = {name.upper() for name in Settings.model_fields}
    config = one("ConfigMap", "event-pipeline-config")["data"]
    secret = one("Secret", "event-pipeline-secrets")["stringData"]
    assert set(config) - fields == set()
    assert set(secret) - fields - LIBRARY_ENV == set()
    assert set(config) & set(secret) == set()
    assert {"POSTGRES_DSN", "REDIS_URL", "AWS_SECRET_ACCESS_KEY"} <= set(secret)
    assert config["METRICS_HOST"] == "0.0.0.0"

    # The values are valid settings too.
    for key in list(os.environ):
        if key.lower() in Settings.model_fields:
            monkeypatch.delenv(key)
    for key, value in {**config, **secret}.items():
        monkeypatch.setenv(key, value)
    settings = Settings()
    assert settings.pipeline_input == "kafka"
    assert str(settings.geoip_city_db) == "/data/geoip/GeoLite2-City.mmdb"


def test_no_settings_variable_is_set_directly_on_the_container() -> None:
    """Settings come from the ConfigMap/Secret only, so there is one place to change them."""
    fields = {name.upper() for name in Settings.model_fields}
    assert set(env_of(containers()["pipeline"])) & fields == set()


def test_geoip_secret_is_only_used_by_the_geoip_init_container() -> None:
    geoip = one("Secret", "event-pipeline-geoip")["stringData"]
    assert set(geoip) == {"GEOIPUPDATE_ACCOUNT_ID", "GEOIPUPDATE_LICENSE_KEY"}
    for name, container in containers().items():
        refs = {s["secretRef"]["name"] for s in container.get("envFrom", []) if "secretRef" in s}
        assert ("event-pipeline-geoip" in refs) == (name == "init-geoip")
    config = one("ConfigMap", "event-pipeline-config")["data"]
    db_dir = env_of(containers()["init-geoip"])["GEOIPUPDATE_DB_DIR"]["value"]
    assert str(Path(config["GEOIP_CITY_DB"]).parent) == db_dir


# --- kustomize --------------------------------------------------------------------------------


def kustomize_resources(directory: Path) -> set[Path]:
    kustomization = yaml.safe_load((directory / "kustomization.yaml").read_text())
    found: set[Path] = set()
    for entry in kustomization.get("resources", []):
        path = directory / entry
        assert path.exists(), path
        found |= kustomize_resources(path) if path.is_dir() else {path}
    return found


def test_kustomization_lists_every_manifest_but_the_examples() -> None:
    listed = kustomize_resources(K8S)
    expected = {
        p for p in manifest_files() if p.parent.name != "examples" and ".example." not in p.name
    }
    assert listed == expected


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl not installed")
def test_kustomize_build_renders_valid_manifests() -> None:
    result = subprocess.run(
        ["kubectl", "kustomize", str(K8S)], capture_output=True, text=True, timeout=120, check=False
    )
    assert result.returncode == 0, result.stderr
    rendered = [doc for doc in yaml.safe_load_all(result.stdout) if doc]
    kinds = sorted(doc["kind"] for doc in rendered)
    assert kinds == sorted(
        ["ConfigMap", "ConfigMap", "Service", "StatefulSet", "PodDisruptionBudget"]
        + ["PodMonitor", "PrometheusRule"]
    )
    for doc in rendered:
        assert doc["metadata"]["namespace"] == "event-pipeline"
        if doc["kind"] in BUILT_IN:
            kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
    dashboard = next(d for d in rendered if d["metadata"]["name"] == "event-pipeline-dashboard")
    assert json.loads(dashboard["data"]["dashboard.json"])["uid"] == "event-pipeline"
    images = {
        c["image"]
        for d in rendered
        if d["kind"] == "StatefulSet"
        for c in d["spec"]["template"]["spec"]["initContainers"]
        + d["spec"]["template"]["spec"]["containers"]
    }
    assert "event-pipeline:0.1.0" in images
