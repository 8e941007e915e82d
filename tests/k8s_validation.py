"""Offline validation of Kubernetes manifests, for the tests of ``cluster/kuberay/``.

Three layers, each what a real cluster would apply:

1. Core kinds (PersistentVolumeClaim, Secret, ...) against the Kubernetes OpenAPI schemas bundled
   with ``kubernetes-validate`` (strict: unknown fields are errors, as with ``kubectl apply``'s
   default server-side field validation).
2. RayJob / RayCluster against the ``openAPIV3Schema`` of KubeRay's CRDs shipped in
   ``cluster/crds/`` (their README names the KubeRay version), turned into JSON Schema the way the
   API server reads a structural schema: objects with ``properties`` reject unknown fields,
   ``x-kubernetes-int-or-string`` takes an integer or a string, ``format: int32/int64`` are
   range-checked, ``x-kubernetes-list-type: map/set`` lists must not repeat keys. CEL rules
   (``x-kubernetes-validations``) cannot be evaluated offline: a manifest that sets a field
   carrying one is reported instead of passed unchecked. Every pod template inside them
   (head, worker groups, submitter) is also checked against the core ``PodTemplateSpec`` schema,
   and ``metadata`` against ``ObjectMeta``.
3. The admission rules of the KubeRay operator that no schema states
   (``ray-operator/controllers/ray/utils/validation.go``): name length and DNS-1035 form, a
   RayJob needs ``rayClusterSpec`` or ``clusterSelector``, ``ttlSecondsAfterFinished`` needs
   ``shutdownAfterJobFinishes``, ``runtimeEnvYAML`` must be a YAML mapping, every group has a
   container, and resources are not given both in ``rayStartParams`` and in ``resources``.
"""

from __future__ import annotations

import importlib.resources
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import yaml
from referencing import Registry, Resource

REPO = Path(__file__).resolve().parents[1]
CRD_DIR = REPO / "cluster" / "crds"
CRD_FILES = {"RayJob": "ray.io_rayjobs.yaml", "RayCluster": "ray.io_rayclusters.yaml"}
RAY_API_VERSION = "ray.io/v1"
KUBERNETES_VERSION = "1.33.0"
"""Kubernetes version whose schemas check core kinds and pod templates."""
MAX_NAME_LENGTH = {"RayCluster": 53, "RayJob": 47}
"""validation.go: MaxRayClusterNameLength = 63 - len("-serve-svc"); a RayJob's cluster name
appends 6 characters to the RayJob name."""
_DNS_1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
_INT_RANGES = {"int32": (-(2**31), 2**31 - 1), "int64": (-(2**63), 2**63 - 1)}
_RAY_START_RESOURCES = ("num-cpus", "num-gpus", "memory", "resources")


@dataclass(frozen=True)
class Problem:
    """One reason a manifest would be refused."""

    document: int
    """Index of the YAML document in its file (0-based)."""
    kind: str
    path: str
    """Dotted path of the offending field, e.g. ``spec.rayClusterSpec.headGroupSpec``."""
    message: str

    def __str__(self) -> str:
        return f"document {self.document} ({self.kind}) {self.path or '<root>'}: {self.message}"


def load_documents(path: Path) -> list[dict[str, Any]]:
    """The non-empty YAML documents of a (multi-document) manifest file."""
    with open(path) as stream:
        return [doc for doc in yaml.safe_load_all(stream) if doc is not None]


def validate_file(path: Path) -> list[Problem]:
    """Every problem of every document in ``path``."""
    problems: list[Problem] = []
    for index, document in enumerate(load_documents(path)):
        problems.extend(validate_document(document, index))
    return problems


def validate_document(document: dict[str, Any], index: int = 0) -> list[Problem]:
    """Every problem of one manifest document (see the module docstring)."""
    kind = str(document.get("kind", "<no kind>"))
    if kind not in CRD_FILES:
        return _core_problems(document, index, kind)
    problems: list[Problem] = []
    if document.get("apiVersion") != RAY_API_VERSION:
        found = document.get("apiVersion")
        problems.append(Problem(index, kind, "apiVersion", f"{found!r} is not {RAY_API_VERSION}"))
    problems += _schema_problems(crd_validator(kind), document, index, kind, "")
    metadata = document.get("metadata")
    problems += _schema_problems(core_validator("ObjectMeta"), metadata, index, kind, "metadata")
    for path, template in pod_templates(document):
        problems += _schema_problems(core_validator("PodTemplateSpec"), template, index, kind, path)
    if not problems:  # the operator only ever sees objects the API server accepted
        problems += [Problem(index, kind, p, m) for p, m in operator_rule_violations(document)]
    return problems


def pod_templates(document: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """(dotted path, pod template) of the head, each worker group and the RayJob submitter."""
    spec = document.get("spec") or {}
    found: list[tuple[str, dict[str, Any]]] = []
    cluster, prefix = spec, "spec"
    if document.get("kind") == "RayJob":
        cluster, prefix = spec.get("rayClusterSpec") or {}, "spec.rayClusterSpec"
        if isinstance(spec.get("submitterPodTemplate"), dict):
            found.append(("spec.submitterPodTemplate", spec["submitterPodTemplate"]))
    head = (cluster.get("headGroupSpec") or {}).get("template")
    if isinstance(head, dict):
        found.append((f"{prefix}.headGroupSpec.template", head))
    for number, group in enumerate(cluster.get("workerGroupSpecs") or []):
        if isinstance(group, dict) and isinstance(group.get("template"), dict):
            found.append((f"{prefix}.workerGroupSpecs.{number}.template", group["template"]))
    return found


def containers(document: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    """(dotted path, container) of every container and init container of every pod template."""
    for path, template in pod_templates(document):
        pod = template.get("spec") or {}
        for field in ("initContainers", "containers"):
            for number, container in enumerate(pod.get(field) or []):
                yield f"{path}.spec.{field}.{number}", container


def operator_rule_violations(document: dict[str, Any]) -> list[tuple[str, str]]:
    """(path, message) for each KubeRay admission rule of validation.go the document breaks."""
    kind = document["kind"]
    found: list[tuple[str, str]] = []
    name = str((document.get("metadata") or {}).get("name", ""))
    if not _DNS_1035.match(name) or len(name) > MAX_NAME_LENGTH[kind]:
        found.append(
            (
                "metadata.name",
                f"{name!r} must be a DNS-1035 label of at most {MAX_NAME_LENGTH[kind]} characters",
            )
        )
    spec = document.get("spec") or {}
    if kind == "RayJob":
        found += _rayjob_rules(spec)
        cluster, prefix = spec.get("rayClusterSpec"), "spec.rayClusterSpec"
    else:
        cluster, prefix = spec, "spec"
    if isinstance(cluster, dict):
        found += _cluster_rules(cluster, prefix)
    return found


def _rayjob_rules(spec: dict[str, Any]) -> list[tuple[str, str]]:
    found: list[tuple[str, str]] = []
    if not spec.get("rayClusterSpec") and not spec.get("clusterSelector"):
        found.append(("spec", "one of rayClusterSpec or clusterSelector must be set"))
    if (spec.get("ttlSecondsAfterFinished") or 0) > 0 and not spec.get("shutdownAfterJobFinishes"):
        found.append(("spec.ttlSecondsAfterFinished", "needs shutdownAfterJobFinishes: true"))
    if spec.get("activeDeadlineSeconds") is not None and spec["activeDeadlineSeconds"] <= 0:
        found.append(("spec.activeDeadlineSeconds", "must be a positive integer"))
    if (spec.get("backoffLimit") or 0) < 0:
        found.append(("spec.backoffLimit", "must not be negative"))
    runtime_env = spec.get("runtimeEnvYAML")
    if runtime_env is not None:
        try:
            parsed = yaml.safe_load(runtime_env)
        except yaml.YAMLError as error:
            found.append(("spec.runtimeEnvYAML", f"is not valid YAML: {error}"))
        else:
            if not isinstance(parsed, dict):
                found.append(("spec.runtimeEnvYAML", "must be a YAML mapping"))
    return found


def _cluster_rules(cluster: dict[str, Any], prefix: str) -> list[tuple[str, str]]:
    groups = [(f"{prefix}.headGroupSpec", cluster.get("headGroupSpec") or {})]
    groups += [
        (f"{prefix}.workerGroupSpecs.{n}", group)
        for n, group in enumerate(cluster.get("workerGroupSpecs") or [])
    ]
    found: list[tuple[str, str]] = []
    for path, group in groups:
        if not isinstance(group, dict):
            continue
        if not ((group.get("template") or {}).get("spec") or {}).get("containers"):
            found.append((f"{path}.template.spec.containers", "needs at least one container"))
        params = group.get("rayStartParams") or {}
        if any(params.get(key) for key in _RAY_START_RESOURCES) and group.get("resources"):
            found.append((path, "resources given both in rayStartParams and in resources"))
        if "labels" in params:
            found.append((f"{path}.rayStartParams.labels", "not supported: use the group's labels"))
    return found


def _core_problems(document: dict[str, Any], index: int, kind: str) -> list[Problem]:
    try:
        kubernetes_validate.validate(document, KUBERNETES_VERSION, strict=True)
    except kubernetes_validate.ValidationError as error:
        path = ".".join(str(part) for part in error.absolute_path)
        return [Problem(index, kind, path, error.message)]
    except (kubernetes_validate.SchemaNotFoundError, KeyError) as error:
        return [Problem(index, kind, "", f"no Kubernetes schema for this document: {error}")]
    return []


def _schema_problems(
    validator: jsonschema.protocols.Validator, value: Any, index: int, kind: str, prefix: str
) -> list[Problem]:
    problems = []
    for error in sorted(validator.iter_errors(value), key=lambda e: list(map(str, e.path))):
        parts = [prefix] if prefix else []
        path = ".".join([*parts, *map(str, error.absolute_path)])
        problems.append(Problem(index, kind, path, error.message))
    return problems


@cache
def crd_schema(kind: str) -> dict[str, Any]:
    """The v1 ``openAPIV3Schema`` of KubeRay's CRD for ``kind``, as strict JSON Schema."""
    with open(CRD_DIR / CRD_FILES[kind]) as stream:
        crd = yaml.load(stream, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    schema = _structural_to_json_schema(version["schema"]["openAPIV3Schema"])
    schema["required"] = sorted(
        {*schema.get("required", []), "apiVersion", "kind", "metadata", "spec"}
    )
    return schema


def _structural_to_json_schema(node: Any) -> Any:
    """A Kubernetes structural schema as the JSON Schema the API server effectively applies."""
    if isinstance(node, list):
        return [_structural_to_json_schema(item) for item in node]
    if not isinstance(node, dict):
        return node
    result = {key: _structural_to_json_schema(value) for key, value in node.items()}
    if result.pop("x-kubernetes-int-or-string", False) and "anyOf" not in result:
        result["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    if result.pop("nullable", False) and "type" in result:
        result["type"] = [result["type"], "null"]
    open_object = result.get("x-kubernetes-preserve-unknown-fields", False)
    if "properties" in result and "additionalProperties" not in result and not open_object:
        result["additionalProperties"] = False
    if result.get("x-kubernetes-list-type") == "set":
        result["uniqueItems"] = True
    return result


def _cel_rules(validator, rules, instance, schema) -> Iterator[jsonschema.ValidationError]:
    messages = "; ".join(rule.get("message", rule.get("rule", "")) for rule in rules)
    yield jsonschema.ValidationError(
        f"this field carries CEL rules that cannot be checked offline ({messages}): leave it out "
        "or check the manifest with `kubectl apply --dry-run=server`"
    )


def _list_map_keys(validator, keys, instance, schema) -> Iterator[jsonschema.ValidationError]:
    if not isinstance(instance, list):
        return
    seen: set[str] = set()
    for item in instance:
        if isinstance(item, dict):
            key = json.dumps([item.get(k) for k in keys])
            if key in seen:
                yield jsonschema.ValidationError(f"duplicate entry with {keys} = {key}")
            seen.add(key)


_FORMATS = jsonschema.FormatChecker()
for _name, (_low, _high) in _INT_RANGES.items():
    _FORMATS.checks(_name)(
        lambda value, low=_low, high=_high: not isinstance(value, int) or low <= value <= high
    )
_CrdValidator = jsonschema.validators.extend(
    jsonschema.Draft202012Validator,
    {"x-kubernetes-validations": _cel_rules, "x-kubernetes-list-map-keys": _list_map_keys},
)


@cache
def crd_validator(kind: str) -> jsonschema.protocols.Validator:
    """A validator of RayJob / RayCluster documents against the shipped CRD."""
    return _CrdValidator(crd_schema(kind), format_checker=_FORMATS)


@cache
def core_validator(definition: str) -> jsonschema.protocols.Validator:
    """A strict validator for the core Kubernetes definition ``io.k8s...<definition>``
    (``PodTemplateSpec``, ``ObjectMeta``) of :data:`KUBERNETES_VERSION`."""
    folder = (
        importlib.resources.files("kubernetes_validate")
        / "kubernetes-json-schema"
        / f"v{KUBERNETES_VERSION}-local-strict"
    )
    definitions = json.loads((folder / "_definitions.json").read_text())
    (name,) = [d for d in definitions["$defs"] if d.endswith(f".{definition}")]
    registry = Resource.from_contents(definitions) @ Registry()
    schema = {"$ref": f"{definitions['$id']}#/$defs/{name}"}
    return jsonschema.Draft202012Validator(schema, registry=registry)
