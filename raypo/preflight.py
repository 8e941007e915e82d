"""Checks that fail a run in seconds, before any data work, naming the setting and the cause.

:func:`check_inputs` runs before Ray starts and before torch is imported: the data path exists,
each named model is a directory or a hub id that can be had, a run on the user's own data
names its model (the embedded tiny model is for the bundled sample and for tests), and a QLoRA
run (``model.lora.load_in_4bit``) has bitsandbytes to load its base with.
:func:`check_resources` runs once Ray is up: the workers' and the reference pass's GPUs and CPUs
fit the cluster's totals (``ray.cluster_resources()``), where Ray Train would otherwise wait for
them for as long as one lets it; a QLoRA run (``model.lora.load_in_4bit``, which the config
already ties to ``trainer.use_gpu``) on a cluster without GPUs is named as such. Each returns
or raises one :class:`raypo.config.ConfigError` listing every problem found. Importing this
module imports neither torch nor Ray.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

from raypo.config import RaypoConfig
from raypo.config_base import (
    ConfigError,
    combined,
    parse_overrides,
    read_yaml,
)
from raypo.config_inputs import TINY_MODEL

BUNDLED_DATA_PREFIX = "builtin:"
"""``data.path`` values naming data shipped in the package (the tiny model's own data)."""


def model_named(config_file: Path | None, overrides: Sequence[str]) -> bool:
    """Whether the YAML file or the overrides set ``model.name_or_path`` (the default, the tiny
    model, applies otherwise)."""
    if any(key == "model.name_or_path" for key, _ in parse_overrides(overrides)):
        return True
    if config_file is None:
        return False
    model = read_yaml(Path(config_file)).get("model")
    return isinstance(model, Mapping) and "name_or_path" in model


def check_inputs(config: RaypoConfig, named_model: bool = True) -> None:
    """Raise one ConfigError for every missing input of ``config`` (module docstring);
    ``named_model``: whether the config named its model (:func:`model_named`)."""
    errors = _data_errors(config)
    models = {
        "model.name_or_path": config.model.name_or_path,
        "model.tokenizer_name_or_path": config.model.tokenizer_name_or_path,
        "reference.model_name_or_path": config.reference.model_name_or_path,
    }
    for key, value in models.items():
        problem = None if value is None else model_problem(value)
        if problem is not None:
            errors.append(ConfigError(key, value, problem))
    if config.model.lora.load_in_4bit and importlib.util.find_spec("bitsandbytes") is None:
        # Checked here, not in the config: a QLoRA config is still shown and checked
        # (``raypo config show``) on a machine that does not train it.
        problem = "needs the bitsandbytes package: pip install 'raypo[qlora]'"
        errors.append(ConfigError("model.lora.load_in_4bit", True, problem))
    bundled = config.data.path.startswith(BUNDLED_DATA_PREFIX)
    if not named_model and not bundled:
        errors.append(
            ConfigError(
                "model.name_or_path",
                None,
                f"not set, and data.path ({config.data.path}) is not the bundled sample: name "
                "the policy to train (a hub id or a save_pretrained directory), or ask for the "
                f"embedded test model explicitly with --model.name_or_path {TINY_MODEL}",
            )
        )
    if errors:
        raise combined(errors)


def _data_errors(config: RaypoConfig) -> list[ConfigError]:
    """A local data path (file, glob or directory) that names no readable data; hub datasets
    are checked when they are loaded."""
    from raypo.data.readers import list_sources, looks_local

    data = config.data
    local = Path(data.path).expanduser()
    if data.path.startswith(BUNDLED_DATA_PREFIX) or data.format == "hf":
        return []
    if data.format == "auto" and not local.exists() and not looks_local(data.path):
        return []
    try:
        list_sources(data)
    except ConfigError as error:
        return error.errors
    return []


def model_problem(name_or_path: str) -> str | None:
    """What is wrong with a model name, or None: a path that does not exist, or a hub id that is
    neither in the local hub cache nor (online) on the hub."""
    if name_or_path == TINY_MODEL or Path(name_or_path).expanduser().exists():
        return None
    looks_like_path = name_or_path.startswith(("/", ".", "~")) or name_or_path.count("/") > 1
    if looks_like_path:
        return (
            "no such directory; give a directory written by save_pretrained, a hub id such as "
            f"EleutherAI/pythia-2.8b, or {TINY_MODEL} for the embedded test model"
        )
    return _hub_problem(name_or_path)


def _hub_problem(repo_id: str) -> str | None:
    import huggingface_hub
    from huggingface_hub.errors import HFValidationError, RepositoryNotFoundError

    try:
        cached = huggingface_hub.try_to_load_from_cache(repo_id, "config.json")
    except HFValidationError as error:
        return f"is neither a directory nor a valid hub id ({error})"
    if isinstance(cached, str):
        return None
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() not in ("0", "", "false"):
        return (
            "is not in the local hub cache and HF_HUB_OFFLINE is set: download it first "
            f"(`hf download {repo_id}`) or give a local directory"
        )
    try:
        huggingface_hub.model_info(repo_id, timeout=10)
    except RepositoryNotFoundError:
        return "no such model on the hub (or it is gated and you have no access): check the name"
    except Exception:  # noqa: BLE001 - no network: the download will say what is wrong
        return None
    return None


def check_resources(config: RaypoConfig, cluster: Mapping[str, float]) -> None:
    """Raise one ConfigError for every request of ``config`` beyond the cluster's totals
    ``cluster`` (``ray.cluster_resources()``): the workers' GPUs and CPUs, and the reference
    pass's actors (which run before training, so each is checked on its own)."""
    gpus, cpus = float(cluster.get("GPU", 0.0)), float(cluster.get("CPU", 0.0))
    has = f"the cluster has {gpus:g} GPU(s) and {cpus:g} CPU(s) in all"
    trainer, reference = config.trainer, config.reference
    errors = []
    if config.model.lora.load_in_4bit and not gpus:
        # Where the generic advice (use_gpu false) would only meet the config's QLoRA check.
        problem = (
            f"needs a CUDA GPU per worker (bitsandbytes' 4-bit layers), but {has}: run it where "
            "GPUs are, or train plain LoRA here (--model.lora.load_in_4bit false "
            "--trainer.use_gpu false)"
        )
        errors.append(ConfigError("model.lora.load_in_4bit", True, problem))
    elif trainer.use_gpu and trainer.num_workers > gpus:
        problem = (
            f"asks for {trainer.num_workers} GPU(s), one per worker (trainer.num_workers), but "
            f"{has}; set trainer.use_gpu false or fewer trainer.num_workers"
        )
        errors.append(ConfigError("trainer.use_gpu", True, problem))
    worker_cpus = trainer.num_workers * trainer.cpus_per_worker
    if worker_cpus > cpus:
        problem = (
            f"{trainer.num_workers} workers x {trainer.cpus_per_worker:g} = {worker_cpus:g} CPUs, "
            f"but {has}; lower trainer.cpus_per_worker or trainer.num_workers"
        )
        errors.append(ConfigError("trainer.cpus_per_worker", trainer.cpus_per_worker, problem))
    if reference.mode == "precomputed":
        errors += _reference_errors(config, gpus, cpus, has)
    if errors:
        raise combined(errors)


def _reference_errors(config: RaypoConfig, gpus: float, cpus: float, has: str) -> list:
    reference = config.reference
    errors = []
    for key, each, total in (
        ("gpus_per_actor", reference.gpus_per_actor, gpus),
        ("cpus_per_actor", reference.cpus_per_actor, cpus),
    ):
        if each * reference.num_actors > total:
            problem = (
                f"{reference.num_actors} reference actor(s) x {each:g} = "
                f"{each * reference.num_actors:g}, but {has}; lower reference.{key} or "
                "reference.num_actors"
            )
            errors.append(ConfigError(f"reference.{key}", each, problem))
    return errors


def resource_warnings(config: RaypoConfig) -> list[str]:
    """Settings that work but are likely not what a GPU run meant."""
    reference = config.reference
    if config.trainer.use_gpu and reference.mode == "precomputed" and not reference.gpus_per_actor:
        return [
            "reference.gpus_per_actor is 0 while trainer.use_gpu is true: the reference pass "
            "runs on CPU (set --reference.gpus_per_actor 1 to run it on GPUs)"
        ]
    return []
