"""The KubeRay manifests and container images of ``cluster/``, checked offline.

Schemas: every manifest against Kubernetes' and KubeRay's (``tests/k8s_validation.py``), and broken
copies of them must fail. Entrypoints: each RayJob runs a ``raypo`` command line that raypo's own
parser and config loader accept, for a config the image ships. Deployment rules of the issue:
requests = limits, tokens only from Secrets, run directories on the shared volume, GPU pods with
shared memory, non-root pods, images and Ray version matching the Dockerfiles.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path
from typing import Any

import pytest
import yaml
from k8s_validation import (
    REPO,
    containers,
    load_documents,
    pod_templates,
    validate_file,
)
from packaging.requirements import Requirement

import raypo
from raypo import cli
from raypo.config import RaypoConfig, load_config

KUBERAY = REPO / "cluster" / "kuberay"
MANIFESTS = sorted(KUBERAY.glob("*.yaml"))
RAYJOBS = [p for p in MANIFESTS if any(d["kind"] == "RayJob" for d in load_documents(p))]
DOCKERFILES = {"gpu": REPO / "cluster" / "Dockerfile", "cpu": REPO / "cluster" / "Dockerfile.cpu"}
IMAGE_HOME = "/home/ray/raypo"
"""Where the images put configs/ (their WORKDIR); entrypoints name configs under it."""
SHARED_MOUNT = "/mnt/shared"
"""Where every pod mounts the shared volume of storage.yaml."""
SHELL_SYNTAX = re.compile(r"[;&|<>()$`\\\n]")
"""KubeRay splices the entrypoint into the submitter's shell command (``ray job submit ... --
ENTRYPOINT ; fi``): any of these would run in the submitter pod, not in the Ray job."""
SECRET_NAME = re.compile(r"(^|_)(TOKEN|KEY|SECRET|PASSWORD|CREDENTIALS?)(_|$)", re.IGNORECASE)
"""Environment variable names that hold credentials (HF_TOKEN, WANDB_API_KEY, ...)."""


def _ray_documents() -> list[tuple[str, dict[str, Any]]]:
    return [
        (f"{path.name}#{index}", document)
        for path in MANIFESTS
        for index, document in enumerate(load_documents(path))
        if document["kind"] in ("RayJob", "RayCluster")
    ]


def _rayjob(path: Path) -> dict[str, Any]:
    (job,) = [d for d in load_documents(path) if d["kind"] == "RayJob"]
    return job


def _cluster_spec(document: dict[str, Any]) -> dict[str, Any]:
    return document["spec"]["rayClusterSpec"] if document["kind"] == "RayJob" else document["spec"]


def test_the_manifests_cover_the_issue_s_deliverables() -> None:
    names = {p.name for p in MANIFESTS}
    assert {
        "rayjob-quickstart.yaml",
        "rayjob-pythia-2.8b.yaml",
        "raycluster.yaml",
        "rayjob-sweep.yaml",
        "storage.yaml",
    } <= names
    crds = REPO / "cluster" / "crds"
    assert (crds / "LICENSE").read_text().startswith(" " * 33 + "Apache License")
    assert "v1.7.0" in (crds / "README.md").read_text()


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_manifest_validates_against_kubernetes_and_kuberay_schemas(path: Path) -> None:
    documents = load_documents(path)
    assert documents and all(d.get("kind") for d in documents)
    problems = validate_file(path)
    assert not problems, "\n".join(map(str, problems))


_HEAD_CONTAINER = "spec.rayClusterSpec.headGroupSpec.template.spec.containers.0"
_WORKER = "spec.rayClusterSpec.workerGroupSpecs.0"
_DELETE = object()
BREAKAGES = {
    # name: (file, edits as (dotted path, new value or _DELETE), expected problem path, message)
    "misspelled RayJob field": (
        "rayjob-quickstart.yaml",
        [("spec.shutdownAfterJobFinishes", _DELETE), ("spec.shutdownAfterJobFinish", True)],
        "spec",
        "'shutdownAfterJobFinish' was unexpected",
    ),
    "string for an integer": (
        "rayjob-quickstart.yaml",
        [("spec.ttlSecondsAfterFinished", "600")],
        "spec.ttlSecondsAfterFinished",
        "is not of type 'integer'",
    ),
    "missing required groupName": (
        "rayjob-pythia-2.8b.yaml",
        [(f"{_WORKER}.groupName", _DELETE)],
        _WORKER,
        "'groupName' is a required property",
    ),
    "misspelled container field": (
        "rayjob-pythia-2.8b.yaml",
        [(f"{_WORKER}.template.spec.containers.0.volumeMount", [])],
        f"{_WORKER}.template.spec.containers.0",
        "'volumeMount' was unexpected",
    ),
    "string container port": (
        "rayjob-quickstart.yaml",
        [(f"{_HEAD_CONTAINER}.ports.1.containerPort", "8265")],
        f"{_HEAD_CONTAINER}.ports.1.containerPort",
        "is not of type 'integer'",
    ),
    "malformed memory quantity": (
        "rayjob-sweep.yaml",
        [(f"{_HEAD_CONTAINER}.resources.limits.memory", "32 GB")],
        f"{_HEAD_CONTAINER}.resources.limits.memory",
        "does not match",
    ),
    "replicas beyond int32": (
        "rayjob-sweep.yaml",
        [(f"{_WORKER}.replicas", 2**31)],
        f"{_WORKER}.replicas",
        "is not a 'int32'",
    ),
    "misspelled RayCluster field": (
        "raycluster.yaml",
        [("spec.enableInTreeAutoscaler", True)],
        "spec",
        "'enableInTreeAutoscaler' was unexpected",
    ),
    "PVC access modes not a list": (
        "storage.yaml",
        [("spec.accessModes", "ReadWriteMany")],
        "spec.accessModes",
        "is not of type 'array'",
    ),
    "RayJob name not a DNS-1035 label": (
        "rayjob-pythia-2.8b.yaml",
        [("metadata.name", "raypo-pythia-2.8b")],
        "metadata.name",
        "DNS-1035 label",
    ),
    "TTL without shutdown": (
        "rayjob-quickstart.yaml",
        [("spec.shutdownAfterJobFinishes", False)],
        "spec.ttlSecondsAfterFinished",
        "needs shutdownAfterJobFinishes",
    ),
    "field with CEL rules": (
        "rayjob-quickstart.yaml",
        [("spec.managedBy", "someone")],
        "spec.managedBy",
        "CEL rules",
    ),
}


def _edit(document: Any, dotted: str, value: Any) -> None:
    *parents, last = dotted.split(".")
    for part in parents:
        document = document[int(part)] if isinstance(document, list) else document[part]
    key: Any = int(last) if isinstance(document, list) else last
    if value is _DELETE:
        del document[key]
    else:
        document[key] = value


@pytest.mark.parametrize("breakage", list(BREAKAGES))
def test_a_broken_copy_of_a_manifest_is_refused(breakage: str, tmp_path: Path) -> None:
    name, edits, expected_path, expected_message = BREAKAGES[breakage]
    documents = load_documents(KUBERAY / name)
    for dotted, value in edits:
        _edit(documents[0], dotted, value)
    broken = tmp_path / name
    broken.write_text(yaml.safe_dump_all(documents, sort_keys=False))
    problems = validate_file(broken)
    assert any(p.path == expected_path and expected_message in p.message for p in problems), (
        "\n".join(map(str, problems)) or "no problem found"
    )


def test_every_container_requests_exactly_its_limits() -> None:
    checked = 0
    for name, document in _ray_documents():
        found = list(containers(document))
        autoscaler = document["spec"].get("autoscalerOptions")
        if autoscaler:
            found.append(("spec.autoscalerOptions", autoscaler))
        for path, container in found:
            resources = container.get("resources") or {}
            requests, limits = resources.get("requests"), resources.get("limits")
            assert requests == limits, f"{name} {path}: requests {requests} != limits {limits}"
            assert {"cpu", "memory"} <= set(limits or {}), f"{name} {path}: no cpu/memory limits"
            checked += 1
    assert checked >= 15  # 5 files, each a head, >= 1 worker group and a submitter or autoscaler


def test_tokens_come_from_kubernetes_secrets_only() -> None:
    for path in MANIFESTS:
        assert all(d["kind"] != "Secret" for d in load_documents(path)), f"{path.name}: a Secret"
    secret_refs = 0
    for name, document in _ray_documents():
        for path, container in containers(document):
            for variable in container.get("env") or []:
                if SECRET_NAME.search(variable["name"]):
                    assert "value" not in variable, f"{name} {path}: {variable['name']} inline"
                    assert variable["valueFrom"]["secretKeyRef"]["name"] == "raypo-tokens"
                    secret_refs += 1
        runtime_env = yaml.safe_load(document["spec"].get("runtimeEnvYAML", "{}"))
        inline = [key for key in runtime_env.get("env_vars", {}) if SECRET_NAME.search(key)]
        assert not inline, f"{name}: {inline} set inline in runtimeEnvYAML"
    assert secret_refs > 0


def _shared_claim() -> str:
    (claim,) = load_documents(KUBERAY / "storage.yaml")
    assert claim["kind"] == "PersistentVolumeClaim"
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"]
    return claim["metadata"]["name"]


def test_every_ray_pod_mounts_the_shared_volume() -> None:
    claim = _shared_claim()
    for name, document in _ray_documents():
        for path, template in pod_templates(document):
            if path.endswith("submitterPodTemplate"):
                continue  # the submitter only runs `ray job submit`
            pod = template["spec"]
            volumes = {
                v["name"]: v["persistentVolumeClaim"]["claimName"]
                for v in pod.get("volumes", [])
                if "persistentVolumeClaim" in v
            }
            for container in pod["containers"]:
                mounts = {m["mountPath"]: m["name"] for m in container.get("volumeMounts", [])}
                assert volumes.get(mounts.get(SHARED_MOUNT)) == claim, f"{name} {path}"


@pytest.mark.parametrize("path", RAYJOBS, ids=lambda p: p.name)
def test_rayjob_cleans_up_after_itself(path: Path) -> None:
    spec = _rayjob(path)["spec"]
    assert spec["shutdownAfterJobFinishes"] is True
    assert isinstance(spec["ttlSecondsAfterFinished"], int) and spec["ttlSecondsAfterFinished"] > 0
    assert spec["backoffLimit"] >= 0


def test_gpu_pods_have_shared_memory_and_tolerate_gpu_taints() -> None:
    gpu_pods = 0
    for name, document in _ray_documents():
        for path, template in pod_templates(document):
            pod = template["spec"]
            for container in pod["containers"]:
                if "nvidia.com/gpu" not in container["resources"]["limits"]:
                    continue
                gpu_pods += 1
                mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
                (shm,) = [v for v in pod["volumes"] if v["name"] == mounts.get("/dev/shm")]
                assert shm["emptyDir"]["medium"] == "Memory", f"{name} {path}"
                tolerations = {t["key"] for t in pod.get("tolerations", [])}
                assert "nvidia.com/gpu" in tolerations, f"{name} {path}"
    assert gpu_pods >= 3  # pythia, sweep and the interactive cluster's GPU group


def test_pods_run_as_non_root() -> None:
    for name, document in _ray_documents():
        for path, template in pod_templates(document):
            context = template["spec"].get("securityContext") or {}
            assert context.get("runAsNonRoot") is True, f"{name} {path}"
            assert context.get("runAsUser", 0) != 0, f"{name} {path}"


def _dockerfile(kind: str) -> list[tuple[str, str]]:
    """(instruction, arguments) of a Dockerfile, continuation lines joined, comments dropped."""
    lines = [
        line
        for line in DOCKERFILES[kind].read_text().splitlines()
        if not line.lstrip().startswith("#")
    ]
    joined = re.sub(r"\\\n\s*", " ", "\n".join(lines))
    return [
        (line.split(None, 1)[0].upper(), line.split(None, 1)[1])
        for line in joined.splitlines()
        if line.strip()
    ]


def _base_ray_version(kind: str) -> str:
    (base,) = [arguments for instruction, arguments in _dockerfile(kind) if instruction == "FROM"]
    suffix = {"gpu": r"-py311-cu\d+", "cpu": "-py311-cpu"}[kind]
    match = re.fullmatch(rf"rayproject/ray:(\d+\.\d+\.\d+){suffix}", base)
    assert match, f"{kind} base image {base!r} is not a version-pinned rayproject/ray image"
    return match.group(1)


def _pins() -> dict[str, str]:
    text = (REPO / "cluster" / "constraints.txt").read_text()
    pins = {}
    for line in text.splitlines():
        if line.strip() and not line.startswith("#"):
            name, _, version = line.partition("==")
            pins[name.strip().lower()] = version.strip()
    return pins


def test_images_and_manifests_agree_on_versions() -> None:
    pins = _pins()
    ray_version = pins["ray"]
    assert _base_ray_version("gpu") == _base_ray_version("cpu") == ray_version
    images = {f"raypo:{raypo.__version__}-cpu", f"raypo:{raypo.__version__}-gpu"}
    for name, document in _ray_documents():
        assert _cluster_spec(document)["rayVersion"] == ray_version, name
        for path, container in containers(document):
            assert container["image"] in images, f"{name} {path}: {container['image']}"


@pytest.mark.parametrize("kind", list(DOCKERFILES))
def test_dockerfile_installs_raypo_pinned_as_non_root(kind: str) -> None:
    steps = _dockerfile(kind)
    users = [arguments for instruction, arguments in steps if instruction == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0")
    ci_torch = re.search(r"torch==([\w.]+)", (REPO / ".ci" / "run").read_text()).group(1)
    runs = " ".join(arguments for instruction, arguments in steps if instruction == "RUN")
    index = {"gpu": r"/whl/cu\d+ ", "cpu": "/whl/cpu "}[kind]
    assert re.search(rf"--index-url https://download\.pytorch\.org{index}torch=={ci_torch}\b", runs)
    assert _pins()["torch"] == ci_torch
    assert "--constraint /tmp/raypo-src/cluster/constraints.txt" in runs
    copies = [arguments.split() for instruction, arguments in steps if instruction == "COPY"]
    sources = {source for arguments in copies for source in arguments[1:-1]}
    assert {"pyproject.toml", "raypo", "configs", "cluster/constraints.txt"} <= sources
    workdirs = [arguments for instruction, arguments in steps if instruction == "WORKDIR"]
    assert workdirs[-1] == IMAGE_HOME and ["--chown=1000:100", "configs", "configs"] in copies
    allowed = (REPO / ".dockerignore").read_text().splitlines()
    for source in sources:
        assert f"!{source}" in allowed or f"!{source}/" in allowed, f"{source} not in context"


def test_constraints_pin_every_dependency_within_its_range() -> None:
    tomllib = pytest.importorskip("tomllib")
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    pins = _pins()
    declared = project["dependencies"] + project["optional-dependencies"]["tune"]
    for requirement in map(Requirement, declared):
        name = requirement.name.lower()
        assert name in pins, f"{name} is not pinned in cluster/constraints.txt"
        assert requirement.specifier.contains(pins[name]), f"{name}=={pins[name]} vs {requirement}"


def _raypo_command(entrypoint: str) -> list[str]:
    assert not SHELL_SYNTAX.search(entrypoint), f"shell syntax in entrypoint {entrypoint!r}"
    argv = shlex.split(entrypoint)
    assert argv[:1] == ["raypo"] and argv[1] in cli.COMMANDS, argv
    return argv[1:]


def _capacity(document: dict[str, Any]) -> tuple[float, int, float]:
    """(CPUs Ray may schedule on, GPUs, CPUs of the largest worker pod) of a RayJob's cluster."""
    cluster = _cluster_spec(document)
    head = cluster["headGroupSpec"]
    head_cpus = head["rayStartParams"].get("num-cpus")
    limits = head["template"]["spec"]["containers"][0]["resources"]["limits"]
    cpus = float(head_cpus if head_cpus is not None else _cpus(limits["cpu"]))
    gpus, largest = 0, 0.0
    for group in cluster.get("workerGroupSpecs", []):
        limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
        cpus += group["replicas"] * _cpus(limits["cpu"])
        gpus += group["replicas"] * int(limits.get("nvidia.com/gpu", 0))
        largest = max(largest, _cpus(limits["cpu"]))
    return cpus, gpus, largest


def _cpus(quantity: str | int) -> float:
    text = str(quantity)
    return float(text[:-1]) / 1000 if text.endswith("m") else float(text)


def _check_fits(config: RaypoConfig, command: str, document: dict[str, Any]) -> None:
    trainer = config.trainer
    concurrent = config.tune.max_concurrent_trials if command == "tune" else 1
    cpus, gpus, largest = _capacity(document)
    assert trainer.num_workers * trainer.cpus_per_worker * concurrent <= cpus
    assert trainer.cpus_per_worker <= largest
    if trainer.use_gpu:
        # every GPU busy, none oversubscribed; raypo's README: num_workers = the number of GPUs
        assert trainer.num_workers * concurrent == gpus
        assert config.model.dtype == "bf16" and trainer.zero_stage == 3
    else:
        assert gpus == 0


@pytest.mark.parametrize("path", RAYJOBS, ids=lambda p: p.name)
def test_entrypoint_is_a_raypo_command_for_a_shipped_config(
    path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    document = _rayjob(path)
    argv = _raypo_command(document["spec"]["entrypoint"])
    rest, overrides = cli.split_overrides(argv)
    args = cli.build_parser().parse_args(rest)
    assert args.config_file and args.config_file.startswith(f"{IMAGE_HOME}/configs/")
    config_file = REPO / Path(args.config_file).relative_to(IMAGE_HOME)
    assert config_file.is_file(), f"{config_file} does not exist in the repository"
    assert cli.main(["config", "show", str(config_file), *overrides]) == 0
    assert f"name: {load_config(config_file).name}" in capsys.readouterr().out
    config = load_config(config_file, overrides)
    assert config.run_path.is_relative_to(f"{SHARED_MOUNT}/raypo")
    if args.command == "train":
        assert config.trainer.storage_path.startswith(f"{SHARED_MOUNT}/raypo/")
        # a retried job (a new cluster) continues the run: --resume names this run's directory
        assert args.resume == str(config.run_path)
    _check_fits(config, args.command, document)


def test_entrypoint_checks_refuse_broken_command_lines() -> None:
    good = "raypo train /home/ray/raypo/configs/quickstart.yaml --seed 3"
    assert _raypo_command(good) == shlex.split(good)[1:]
    for bad in (
        "python -m raypo train x.yaml",
        "raypo fly x.yaml",
        "cd /tmp && raypo train x.yaml",
        "raypo train x.yaml; echo done",
        "raypo train $CONFIG",
    ):
        with pytest.raises(AssertionError):
            _raypo_command(bad)


def test_a_misspelled_override_in_an_entrypoint_would_be_refused(
    capsys: pytest.CaptureFixture[str],
) -> None:
    quickstart = str(REPO / "configs" / "quickstart.yaml")
    assert cli.main(["config", "show", quickstart, "--trainer.num_worker", "2"]) == 2
    assert "trainer.num_worker" in capsys.readouterr().err
