"""The Helm chart, rendered by the real (pinned) helm binary: lint, strict Kubernetes schemas,
the values schema refusing bad values, and what the objects say (probes, secrets, security,
checksums, replicas). The chart's values come from the daemon's settings: the files generated
from them are checked to be up to date, and the ConfigMap's variables read back by the
daemon's own settings model."""

from __future__ import annotations

import base64
import json
import os
import subprocess
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from manager_daemon import chart_values
from manager_daemon.chart_values import CHART_DIR, CHART_MANAGED, ChartValues
from manager_daemon.policies.rules import RulesConfig
from manager_daemon.settings import DaemonSettings
from tests import tools

SCENARIOS = sorted(p.name for p in (CHART_DIR / "ci").glob("*-values.yaml"))
KUBE_VERSION = "1.30.0"


@pytest.fixture(scope="session")
def helm() -> Path:
    try:
        return tools.helm()
    except tools.ToolMissing as exc:
        if os.environ.get("CI"):
            raise
        pytest.skip(str(exc))


def render(helm: Path, *values: str | Path, **sets: Any) -> list[dict[str, Any]]:
    """The chart's objects for these values files and ``--set`` pairs (``a__b`` is ``a.b``)."""
    args = [str(helm), "template", "atm", str(CHART_DIR), "--kube-version", KUBE_VERSION]
    for file in values:
        args += ["-f", str(CHART_DIR / "ci" / file) if isinstance(file, str) else str(file)]
    for key, value in sets.items():
        args += ["--set-json", f"{key.replace('__', '.')}={json.dumps(value)}"]
    done = subprocess.run(args, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return [doc for doc in yaml.safe_load_all(done.stdout) if doc]


def refused(helm: Path, *sets: str) -> str:
    args = [
        str(helm),
        "template",
        "atm",
        str(CHART_DIR),
        "-f",
        str(CHART_DIR / "ci" / SCENARIOS[0]),
    ]
    for item in sets:
        args += ["--set-json", item]
    done = subprocess.run(args, capture_output=True, text=True, timeout=60)
    assert done.returncode != 0, f"helm accepted {sets}"
    return done.stderr


def one(objects: list[dict[str, Any]], kind: str, suffix: str = "") -> dict[str, Any]:
    (found,) = [
        o
        for o in objects
        if o["kind"] == kind and o["metadata"]["name"].endswith(f"manager{suffix}")
    ]
    return found


def container(objects: list[dict[str, Any]]) -> dict[str, Any]:
    (daemon,) = one(objects, "StatefulSet")["spec"]["template"]["spec"]["containers"]
    return daemon


def env_of(objects: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {e["name"]: e for e in container(objects)["env"]}


# ---- the files generated from the settings ----------------------------------------------


def test_values_schema_and_readme_are_generated_from_the_settings() -> None:
    assert chart_values.main(["--check"]) == 0, "run python -m manager_daemon.chart_values"


def test_every_daemon_setting_is_a_chart_value_or_set_by_the_chart() -> None:
    daemon = ChartValues.model_fields["daemon"].annotation.model_fields
    assert set(DaemonSettings.model_fields) == set(daemon) | set(CHART_MANAGED)
    assert not set(daemon) & set(CHART_MANAGED)
    secrets = {n for n, f in DaemonSettings.model_fields.items() if "Secret" in str(f.annotation)}
    assert secrets <= set(CHART_MANAGED), "secrets come from a Secret, never from values"


def test_values_file_is_the_models_defaults() -> None:
    committed = yaml.safe_load((CHART_DIR / "values.yaml").read_text())
    assert ChartValues.model_validate(committed) == ChartValues()


# ---- helm lint and Kubernetes' schemas --------------------------------------------------


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_lint_strict(helm: Path, scenario: str) -> None:
    done = subprocess.run(
        [str(helm), "lint", "--strict", str(CHART_DIR), "-f", str(CHART_DIR / "ci" / scenario)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_every_object_is_valid_kubernetes(helm: Path, scenario: str) -> None:
    objects = render(helm, scenario)
    assert {o["kind"] for o in objects} >= {"StatefulSet", "ConfigMap", "Service"}
    for obj in objects:
        if obj["kind"] == "ServiceMonitor":
            continue  # a CRD: checked by hand below
        kubernetes_validate.validate(obj, KUBE_VERSION, strict=True)


def test_install_dry_run_prints_the_notes(helm: Path) -> None:
    done = subprocess.run(
        [
            str(helm),
            "install",
            "atm",
            str(CHART_DIR),
            "--dry-run=client",
            "-f",
            str(CHART_DIR / "ci" / "replicas-values.yaml"),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    notes = done.stdout.split("NOTES:", 1)[1]
    assert "3 daemon replica(s)" in notes and "/metrics" in notes
    assert "No Secret: params versions carry an integrity digest only" in notes


@pytest.mark.parametrize(
    ("setting", "complaint"),
    [
        ("replicas=0", "minimum"),
        ('replicas="3"', "replicas"),
        ("daemon.interval=0", "exclusiveMinimum"),
        ('daemon.policy="gpt"', "policy"),
        ("daemon.unknownKnob=1", "additional properties 'unknownKnob'"),
        ("rules.lrCut=2", "lrCut"),
        ('service.type="Ingress"', "type"),
        ("secrets.signingKey=5", "signingKey"),
        ('imagePullPolicy="Always"', "additional properties 'imagePullPolicy'"),
    ],
)
def test_bad_values_are_refused_by_the_schema(helm: Path, setting: str, complaint: str) -> None:
    assert complaint in refused(helm, setting)


def test_a_missing_tracker_or_two_llms_are_refused(helm: Path) -> None:
    assert "daemon.trackingUri is required" in refused(helm, "daemon.trackingUri=null")
    both = refused(helm, 'daemon.llmBaseUrl="http://x/v1"', "embeddedModel.enabled=true")
    assert "choose one LLM" in both


# ---- what the objects say ----------------------------------------------------------------


def test_probes_watch_the_ops_endpoints(helm: Path) -> None:
    objects = render(helm, "defaults-values.yaml", opsPort=9100)
    daemon = container(objects)
    assert daemon["ports"] == [{"name": "http-ops", "containerPort": 9100, "protocol": "TCP"}]
    assert daemon["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "http-ops"}
    assert daemon["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http-ops"}
    assert daemon["livenessProbe"]["failureThreshold"] == 4
    assert env_of(objects)["ATM_OPS_PORT"]["value"] == "9100"
    assert env_of(objects)["ATM_OPS_HOST"]["value"] == "0.0.0.0"
    off = container(render(helm, "defaults-values.yaml", livenessProbe__enabled=False))
    assert "livenessProbe" not in off and "readinessProbe" in off


def test_secrets_come_only_from_a_secret(helm: Path) -> None:
    objects = render(helm, "llm-endpoint-values.yaml")
    secret = one(objects, "Secret")
    data = {k: base64.b64decode(v).decode() for k, v in secret["data"].items()}
    assert data == {
        "ATM_SIGNING_KEY": "test-signing-key",
        "OPENAI_API_KEY": "sk-test-not-a-real-key",
        "MLFLOW_TRACKING_USERNAME": "atm-tracker-user",
        "MLFLOW_TRACKING_PASSWORD": "test-password",
    }
    env = env_of(objects)
    for name in data:
        ref = env[name]["valueFrom"]["secretKeyRef"]
        assert ref == {"name": secret["metadata"]["name"], "key": name, "optional": False}
    assert "WANDB_API_KEY" not in env
    rendered = yaml.safe_dump_all([o for o in objects if o["kind"] != "Secret"])
    for value in data.values():
        assert value not in rendered


def test_an_existing_secret_is_referenced_not_made(helm: Path) -> None:
    objects = render(helm, "existing-secret-values.yaml")
    assert not [o for o in objects if o["kind"] == "Secret"]
    refs = {
        e["name"]: e["valueFrom"]["secretKeyRef"]
        for e in container(objects)["env"]
        if "secretKeyRef" in e.get("valueFrom", {})
    }
    assert set(refs) == {
        "ATM_SIGNING_KEY",
        "OPENAI_API_KEY",
        "MLFLOW_TRACKING_USERNAME",
        "MLFLOW_TRACKING_PASSWORD",
        "MLFLOW_TRACKING_TOKEN",
        "WANDB_API_KEY",
    }
    assert all(
        r == {"name": "atm-credentials", "key": n, "optional": True} for n, r in refs.items()
    )


def test_hardened_security_context(helm: Path) -> None:
    objects = render(helm, "defaults-values.yaml")
    pod = one(objects, "StatefulSet")["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert pod["automountServiceAccountToken"] is False
    ctx = container(objects)["securityContext"]
    assert ctx["readOnlyRootFilesystem"] is True
    assert ctx["allowPrivilegeEscalation"] is False
    assert ctx["capabilities"] == {"drop": ["ALL"]}
    assert ctx["seccompProfile"] == {"type": "RuntimeDefault"}
    # A read-only root needs somewhere to write temporary files.
    assert {"name": "tmp", "mountPath": "/tmp"} in container(objects)["volumeMounts"]
    assert container(objects)["resources"]["limits"]["memory"] == "1Gi"


def test_config_and_secret_changes_roll_the_pods(helm: Path) -> None:
    def checksums(**sets: Any) -> dict[str, str]:
        pod = one(render(helm, "llm-endpoint-values.yaml", **sets), "StatefulSet")
        annotations = pod["spec"]["template"]["metadata"]["annotations"]
        return {k: v for k, v in annotations.items() if k.startswith("checksum/")}

    base = checksums()
    assert set(base) == {"checksum/config", "checksum/secret"}
    interval = checksums(daemon__interval=30)
    assert interval["checksum/config"] != base["checksum/config"]
    assert interval["checksum/secret"] == base["checksum/secret"]
    rules = checksums(rules__lrCut=0.4)
    assert rules["checksum/config"] != base["checksum/config"]
    key = checksums(secrets__signingKey="another-key")
    assert key["checksum/secret"] != base["checksum/secret"]
    assert key["checksum/config"] == base["checksum/config"]


def test_replicas_share_the_runs(helm: Path) -> None:
    objects = render(helm, "replicas-values.yaml")
    statefulset = one(objects, "StatefulSet")
    assert statefulset["spec"]["replicas"] == 3
    assert statefulset["spec"]["podManagementPolicy"] == "Parallel"
    env = env_of(objects)
    assert env["ATM_REPLICAS"]["value"] == "3"
    # The ordinal comes from the pod's name (atm-ai-training-manager-N).
    assert env["ATM_REPLICA_NAME"]["valueFrom"] == {"fieldRef": {"fieldPath": "metadata.name"}}
    assert statefulset["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] == 90 + 30
    pdb = one(objects, "PodDisruptionBudget")
    assert pdb["spec"]["maxUnavailable"] == 1
    assert pdb["spec"]["selector"]["matchLabels"] == statefulset["spec"]["selector"]["matchLabels"]


def test_the_service_monitor_scrapes_the_metrics_service_once(helm: Path) -> None:
    objects = render(helm, "replicas-values.yaml")
    monitor = one(objects, "ServiceMonitor")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert monitor["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    (endpoint,) = monitor["spec"]["endpoints"]
    assert endpoint == {
        "port": "http-ops",
        "path": "/metrics",
        "interval": "30s",
        "scrapeTimeout": "10s",
    }
    selector = monitor["spec"]["selector"]["matchLabels"]
    services = [o for o in objects if o["kind"] == "Service"]
    matched = [s for s in services if selector.items() <= s["metadata"]["labels"].items()]
    assert [s["metadata"]["name"] for s in matched] == ["atm-ai-training-manager"]
    assert "http-ops" in [p["name"] for p in matched[0]["spec"]["ports"]]
    assert not [o for o in render(helm, "defaults-values.yaml") if o["kind"] == "ServiceMonitor"]


def test_the_embedded_model_mode(helm: Path) -> None:
    objects = render(helm, "embedded-model-values.yaml")
    daemon = container(objects)
    assert daemon["image"] == "ai-training-manager:0.1.0-local"
    assert daemon["resources"]["requests"]["memory"] == "2Gi"
    assert one(objects, "ConfigMap")["data"]["ATM_LLM_THREADS"] == "2"
    endpoint = one(render(helm, "llm-endpoint-values.yaml"), "ConfigMap")["data"]
    assert endpoint["ATM_LLM_BASE_URL"] == "http://vllm.llm.svc.cluster.local:8000/v1"
    assert (
        container(render(helm, "llm-endpoint-values.yaml"))["image"] == "ai-training-manager:0.1.0"
    )


def test_the_daemon_reads_the_chart_s_configuration(
    helm: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    objects = render(helm, "replicas-values.yaml", rules__lrCut=0.3, rules__exploreKnobs=["a"])
    config = one(objects, "ConfigMap")["data"]
    plain_env = {e["name"]: e["value"] for e in container(objects)["env"] if "value" in e}
    for name in list(os.environ):
        if name.startswith(("ATM_", "MLFLOW_", "OPENAI_")):
            monkeypatch.delenv(name)
    for name, value in {**config, **plain_env}.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("ATM_REPLICA_NAME", "atm-ai-training-manager-2")
    rules_file = tmp_path / "rules.yaml"
    rules_file.write_text(one(objects, "ConfigMap", "-rules")["data"]["rules.yaml"])
    monkeypatch.setenv("ATM_RULES_CONFIG", str(rules_file))
    settings = DaemonSettings()
    assert settings.tracking_uri == "http://mlflow.mlflow.svc.cluster.local:5000"
    assert (settings.interval, settings.lease_ttl, settings.replicas) == (5, 45, 3)
    assert settings.experiments == ["llm-pretraining", "rl"]
    assert settings.ops_port == 8080
    assert settings.rules() == RulesConfig(lr_cut=0.3, explore_knobs=["a"])
    # Every variable the ConfigMap sets is one the daemon reads.
    known = {f"ATM_{name.upper()}" for name in DaemonSettings.model_fields}
    assert set(config) <= known
