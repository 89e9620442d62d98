"""The Helm chart's values, as pydantic models: the single source of the chart's
``values.yaml``, ``values.schema.json`` and the value table in its README.

The ``daemon`` section is built from ``DaemonSettings`` field by field (same types, bounds,
defaults and descriptions), so a daemon option and its chart value cannot drift apart; the
``rules`` section likewise from ``RulesConfig``. Settings the chart sets itself (the replica's
identity, the operations port, secrets) are listed in ``CHART_MANAGED`` with the value that
sets them. Regenerate the files after changing a setting:

    python -m manager_daemon.chart_values          # write them
    python -m manager_daemon.chart_values --check  # exit 1 if the committed files differ
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import textwrap
from enum import Enum
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, create_model
from pydantic.alias_generators import to_camel

from manager_daemon.policies.rules import RulesConfig
from manager_daemon.settings import DaemonSettings

CHART_DIR = Path(__file__).resolve().parents[1] / "helm" / "ai-training-manager"

# DaemonSettings fields the chart sets itself, and from which value.
CHART_MANAGED = {
    "signing_key": "secrets.signingKey (a Secret)",
    "llm_api_key": "secrets.openaiApiKey (a Secret)",
    "rules_config": "rules (a ConfigMap, mounted)",
    "ops_port": "opsPort",
    "ops_host": "all addresses of the pod",
    "replica_name": "the pod's name",
    "replica": "the ordinal in the pod's name",
    "replicas": "replicas",
}

_FORBID = ConfigDict(extra="forbid", populate_by_name=True, alias_generator=to_camel)


def _plain_default(value: Any) -> Any:
    return value.value if isinstance(value, Enum) else value


def _section(source: type[BaseModel], name: str, *, optional: bool, skip: set[str]) -> type:
    """A values section with ``source``'s fields (camelCase keys). With ``optional`` every
    field defaults to null, meaning the daemon's own default."""
    fields: dict[str, Any] = {}
    for field_name, info in source.model_fields.items():
        if field_name in skip:
            continue
        info = copy.copy(info)
        info.validation_alias = None
        info.alias = None
        annotation = info.annotation
        if optional:
            default = info.get_default(call_default_factory=True)
            info.description = f"{info.description} (default {_plain_default(default)!r})"
            info.default, info.default_factory = None, None
            annotation = annotation | None
        fields[field_name] = (annotation, info)
    return create_model(name, __config__=_FORBID, **fields)


DaemonValues = _section(DaemonSettings, "DaemonValues", optional=False, skip=set(CHART_MANAGED))
RulesValues = _section(RulesConfig, "RulesValues", optional=True, skip=set())


class Image(BaseModel):
    model_config = _FORBID
    repository: str = Field("ai-training-manager", description="Image repository")
    tag: str = Field("", description="Image tag (default: the chart's appVersion)")
    digest: str = Field(
        "", description="Image digest (sha256:…); when set, used instead of the tag"
    )
    pull_policy: Literal["IfNotPresent", "Always", "Never"] = Field(
        "IfNotPresent", description="Image pull policy"
    )


class EmbeddedModel(BaseModel):
    model_config = _FORBID
    enabled: bool = Field(
        False,
        description="Decide with the embedded model (Gemma 3 270M via llama.cpp, in the "
        "process; with daemon.policy auto or llm and no endpoint); needs the image built with "
        "the local extra (see the Dockerfile); its threads: daemon.llmThreads",
    )
    image_tag_suffix: str = Field(
        "-local", description="Appended to the image tag when the embedded model is enabled"
    )
    resources: dict[str, Any] = Field(
        default_factory=lambda: {
            "requests": {"cpu": "2", "memory": "2Gi"},
            "limits": {"memory": "3Gi"},
        },
        description="Resources of the daemon container in this mode (replaces resources)",
    )


class Secrets(BaseModel):
    model_config = _FORBID
    create: bool = Field(
        True, description="Make a Secret from the values below (ignored with existingSecret)"
    )
    existing_secret: str = Field(
        "",
        description="Name of an existing Secret to read instead; its keys are the variable "
        "names: ATM_SIGNING_KEY, OPENAI_API_KEY, MLFLOW_TRACKING_USERNAME, "
        "MLFLOW_TRACKING_PASSWORD, MLFLOW_TRACKING_TOKEN, WANDB_API_KEY (each optional)",
    )
    signing_key: str = Field(
        "", description="ATM_SIGNING_KEY: signs params versions; every client must hold it too"
    )
    openai_api_key: str = Field("", description="OPENAI_API_KEY: the LLM endpoint's key")
    mlflow_tracking_username: str = Field("", description="MLFLOW_TRACKING_USERNAME")
    mlflow_tracking_password: str = Field("", description="MLFLOW_TRACKING_PASSWORD")
    mlflow_tracking_token: str = Field("", description="MLFLOW_TRACKING_TOKEN")
    wandb_api_key: str = Field("", description="WANDB_API_KEY")


class ProbeValues(BaseModel):
    model_config = _FORBID
    enabled: bool = Field(True, description="Whether the probe is set")
    probe: dict[str, Any] = Field(
        description="Probe timing (initialDelaySeconds, periodSeconds, timeoutSeconds, "
        "failureThreshold…); the HTTP path and port are the chart's"
    )


class Service(BaseModel):
    model_config = _FORBID
    type: Literal["ClusterIP", "NodePort", "LoadBalancer"] = Field(
        "ClusterIP", description="Service type of the operations endpoints"
    )
    port: int = Field(8080, ge=1, le=65535, description="Service port of the endpoints")
    annotations: dict[str, str] = Field(default_factory=dict, description="Service annotations")


class ServiceMonitor(BaseModel):
    model_config = _FORBID
    enabled: bool = Field(
        False, description="Make a prometheus-operator ServiceMonitor for /metrics"
    )
    interval: str = Field("30s", description="Scrape interval")
    scrape_timeout: str = Field("10s", description="Scrape timeout")
    labels: dict[str, str] = Field(
        default_factory=dict, description="Labels the Prometheus instance selects monitors by"
    )
    relabelings: list[dict[str, Any]] = Field(
        default_factory=list, description="Relabelings before the scrape"
    )
    metric_relabelings: list[dict[str, Any]] = Field(
        default_factory=list, description="Relabelings of the scraped samples"
    )


class PodDisruptionBudget(BaseModel):
    model_config = _FORBID
    enabled: bool = Field(False, description="Make a PodDisruptionBudget")
    max_unavailable: int | str | None = Field(
        1, description="At most this many replicas evicted at once (or a percentage)"
    )
    min_available: int | str | None = Field(
        None, description="At least this many replicas kept (instead of maxUnavailable)"
    )


class ServiceAccount(BaseModel):
    model_config = _FORBID
    create: bool = Field(True, description="Make a ServiceAccount")
    name: str = Field("", description="Its name (default: the release's full name)")
    annotations: dict[str, str] = Field(default_factory=dict, description="Its annotations")
    automount_service_account_token: bool = Field(
        False, description="Mount its API token (the daemon does not call the Kubernetes API)"
    )


def _k8s(description: str, default: Any) -> Any:
    factory = (lambda: copy.deepcopy(default)) if isinstance(default, dict | list) else None
    if factory is not None:
        return Field(default_factory=factory, description=f"{description} (Kubernetes' own)")
    return Field(default, description=f"{description} (Kubernetes' own)")


class ChartValues(BaseModel):
    """Every value of the ai-training-manager chart."""

    model_config = _FORBID

    name_override: str = Field("", description="Replaces the chart's name in object names")
    fullname_override: str = Field("", description="Replaces the release's full name")
    image: Image = Field(default_factory=Image, description="The daemon's image")
    image_pull_secrets: list[dict[str, str]] = _k8s("Secrets to pull the image with", [])
    replicas: int = Field(
        1,
        ge=1,
        description="Daemon replicas; they share the managed runs (a lease per run), each "
        "run supervised by one",
    )
    daemon: DaemonValues = Field(  # type: ignore[valid-type]
        default_factory=DaemonValues,
        description="The daemon's settings (atm daemon --help), set as ATM_* variables by a "
        "ConfigMap",
    )
    rules: RulesValues = Field(  # type: ignore[valid-type]
        default_factory=RulesValues,
        description="Thresholds of the rules policy (null: the default), a rules.yaml in the "
        "ConfigMap",
    )
    embedded_model: EmbeddedModel = Field(
        default_factory=EmbeddedModel, description="The embedded-model mode"
    )
    secrets: Secrets = Field(default_factory=Secrets, description="Keys and credentials")
    ops_port: int = Field(
        8080, ge=1, le=65535, description="Container port of /healthz, /readyz and /metrics"
    )
    liveness_probe: ProbeValues = Field(
        default_factory=lambda: ProbeValues(
            probe={
                "initialDelaySeconds": 10,
                "periodSeconds": 15,
                "timeoutSeconds": 5,
                "failureThreshold": 4,
            }
        ),
        description="Liveness: GET /healthz (the scheduler ticks)",
    )
    readiness_probe: ProbeValues = Field(
        default_factory=lambda: ProbeValues(
            probe={
                "initialDelaySeconds": 5,
                "periodSeconds": 10,
                "timeoutSeconds": 5,
                "failureThreshold": 3,
            }
        ),
        description="Readiness: GET /readyz (the tracker answered the last tick)",
    )
    service: Service = Field(default_factory=Service, description="The endpoints' Service")
    service_monitor: ServiceMonitor = Field(
        default_factory=ServiceMonitor, description="Prometheus scraping via prometheus-operator"
    )
    pod_disruption_budget: PodDisruptionBudget = Field(
        default_factory=PodDisruptionBudget, description="Voluntary evictions"
    )
    service_account: ServiceAccount = Field(
        default_factory=ServiceAccount, description="The pods' ServiceAccount"
    )
    resources: dict[str, Any] = _k8s(
        "Resources of the daemon container",
        {"requests": {"cpu": "100m", "memory": "384Mi"}, "limits": {"memory": "1Gi"}},
    )
    pod_security_context: dict[str, Any] = _k8s(
        "Pod security context",
        {
            "runAsNonRoot": True,
            "runAsUser": 10001,
            "runAsGroup": 10001,
            "fsGroup": 10001,
            "seccompProfile": {"type": "RuntimeDefault"},
        },
    )
    security_context: dict[str, Any] = _k8s(
        "Container security context",
        {
            "allowPrivilegeEscalation": False,
            "readOnlyRootFilesystem": True,
            "runAsNonRoot": True,
            "privileged": False,
            "capabilities": {"drop": ["ALL"]},
            "seccompProfile": {"type": "RuntimeDefault"},
        },
    )
    pod_annotations: dict[str, str] = _k8s("Pod annotations", {})
    pod_labels: dict[str, str] = _k8s("Pod labels", {})
    node_selector: dict[str, str] = _k8s("Node selector", {})
    tolerations: list[dict[str, Any]] = _k8s("Tolerations", [])
    affinity: dict[str, Any] = _k8s("Affinity", {})
    topology_spread_constraints: list[dict[str, Any]] = _k8s("Topology spread constraints", [])
    priority_class_name: str = _k8s("Priority class", "")
    extra_env: list[dict[str, Any]] = _k8s("More environment variables of the container", [])


# ---- generation -------------------------------------------------------------------------


def values_schema() -> dict[str, Any]:
    """``values.schema.json``: draft-07, every object closed, every field described, no
    ``$ref`` (helm 3 and 4 read references differently)."""
    raw = ChartValues.model_json_schema(by_alias=True)
    defs = raw.pop("$defs", {})
    schema = _inline(raw, defs)
    schema = {"$schema": "http://json-schema.org/draft-07/schema#", **schema}
    _check_described(schema, "")
    return schema


def _inline(node: Any, defs: dict[str, Any]) -> Any:
    if isinstance(node, list):
        return [_inline(n, defs) for n in node]
    if not isinstance(node, dict):
        return node
    node = dict(node)
    if "$ref" in node:
        target = defs[node.pop("$ref").rsplit("/", 1)[-1]]
        node = {**target, **node}
    if "allOf" in node and len(node["allOf"]) == 1:
        node = {**_inline(node.pop("allOf")[0], defs), **node}
    node.pop("title", None)
    out = {k: _inline(v, defs) if k != "default" else v for k, v in node.items()}
    if out.get("type") == "object" and "properties" in out:
        out.setdefault("additionalProperties", False)
    return out


def _check_described(node: dict[str, Any], path: str) -> None:
    for name, prop in node.get("properties", {}).items():
        where = f"{path}.{name}".lstrip(".")
        if not prop.get("description"):
            raise ValueError(f"chart value {where} has no description")
        _check_described(prop, where)


def values_yaml() -> str:
    """``values.yaml``: every value at its default, its description as a comment."""
    header = (
        "# Values of the ai-training-manager chart. Generated from the daemon's settings by\n"
        "# `python -m manager_daemon.chart_values`; values.schema.json checks what you set.\n"
    )
    return header + _yaml_block(ChartValues, ChartValues().model_dump(by_alias=True), 0)


def _yaml_block(model: type[BaseModel], data: dict[str, Any], indent: int) -> str:
    pad = " " * indent
    out = []
    for name, info in model.model_fields.items():
        key = info.alias or to_camel(name)
        value = data[key]
        out.append("\n")
        for line in textwrap.wrap(info.description or "", 96 - indent):
            out.append(f"{pad}# {line}\n")
        nested = _model_of(info.annotation)
        if nested is not None:
            out.append(f"{pad}{key}:\n")
            out.append(_yaml_block(nested, value, indent + 2).lstrip("\n"))
        elif isinstance(value, dict | list) and value:
            dumped = yaml.safe_dump({key: _plain(value)}, sort_keys=False, default_flow_style=False)
            out.append(textwrap.indent(dumped, pad))
        else:
            out.append(f"{pad}{key}: {_scalar(value)}\n")
    return "".join(out)


def _model_of(annotation: Any) -> type[BaseModel] | None:
    return (
        annotation if isinstance(annotation, type) and issubclass(annotation, BaseModel) else None
    )


def _plain(value: Any) -> Any:
    return json.loads(json.dumps(value, default=_plain_default))


def _scalar(value: Any) -> str:
    return yaml.safe_dump(_plain(value), default_flow_style=True).strip().removesuffix("\n...")


def values_table() -> str:
    """The README's table of every value: key, type, default, description."""
    rows = ["| value | type | default | description |", "|---|---|---|---|"]
    _table_rows(values_schema(), "", rows)
    return "\n".join(rows) + "\n"


def _table_rows(node: dict[str, Any], prefix: str, rows: list[str]) -> None:
    for name, prop in node.get("properties", {}).items():
        key = f"{prefix}{name}"
        if prop.get("type") == "object" and "properties" in prop:
            rows.append(f"| `{key}` | object | | {prop['description']} |")
            _table_rows(prop, key + ".", rows)
            continue
        kind = prop.get("type") or " or ".join(
            str(o.get("type", "")) for o in prop.get("anyOf", []) if o.get("type")
        )
        if isinstance(kind, list):
            kind = " or ".join(kind)
        if "enum" in prop:
            kind = " \\| ".join(f"`{v}`" for v in prop["enum"])
        default = json.dumps(prop["default"]) if "default" in prop else ""
        text = prop["description"].replace("|", "\\|")
        rows.append(f"| `{key}` | {kind} | `{default}` | {text} |".replace("``", ""))


TABLE_START = "<!-- values table: generated by python -m manager_daemon.chart_values -->"
TABLE_END = "<!-- end of values table -->"


def generated_files() -> dict[Path, str]:
    """Each generated file and its content; the README keeps its text around the table."""
    readme_path = CHART_DIR / "README.md"
    readme = readme_path.read_text() if readme_path.exists() else f"{TABLE_START}\n{TABLE_END}\n"
    before, _, rest = readme.partition(TABLE_START)
    _, _, after = rest.partition(TABLE_END)
    return {
        CHART_DIR / "values.schema.json": json.dumps(values_schema(), indent=2) + "\n",
        CHART_DIR / "values.yaml": values_yaml(),
        readme_path: f"{before}{TABLE_START}\n{values_table()}{TABLE_END}{after}",
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="fail if a file is out of date")
    args = parser.parse_args(argv)
    stale = []
    for path, text in generated_files().items():
        if path.exists() and path.read_text() == text:
            continue
        if args.check:
            stale.append(path.name)
        else:
            path.write_text(text)
            print(f"wrote {path}")
    if stale:
        print(f"out of date: {', '.join(stale)}; run python -m manager_daemon.chart_values")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
