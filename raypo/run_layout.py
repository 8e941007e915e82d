"""The run directory: every file and directory a raypo run (or sweep) holds, named once.

``RunLayout(config.run_path)`` gives their paths; writers and readers both take them from here,
so ``raypo train``, ``raypo eval``, ``raypo report`` and ``raypo tune`` agree on where things are
without importing each other. A run directory holds, when the stage that writes each has run::

    .raypo.lock          held by the run writing the directory (host and pid inside)
    config.yaml          the resolved configuration (what --resume and raypo report read)
    data_summary.json    rows read, accepted, rejected per reason and per source; split sizes
    rejects.jsonl        every rejected row with its source, reason and detail
    prepared/            tokenised pairs as Parquet, split=train|eval|rejected
    reference/           the reference pass cache (default reference.cache_dir)
    tiny-fit/            the embedded tiny model's fit: a raypo sft run directory of its own,
                         whose final/ is the run's model (tiny_fit.json when finished)
    metrics.jsonl        training and held-out metrics, one JSON object per logged step
    tensorboard/         TensorBoard events (trainer.report_to tensorboard)
    generations.jsonl    completions sampled during training
    heldout_pairs.jsonl  each held-out pair's implicit rewards and entropies at every evaluation
    ray/                 Ray Train's checkpoints (default trainer.storage_path), each laid out as
                         CheckpointLayout says
    final/               the exported policy; mixdpo_strength.json beside its weights
    eval/                raypo eval's results.json, samples.jsonl, config.yaml, report.md, plots/

and a sweep's directory (``raypo tune``) also ``tune/``, ``trials/<trial id>/`` (each a run
directory), ``trials.csv``, ``trials.md``, ``best_config.yaml`` and ``metric_vs_<key>.png``.

Importing this module does no work and imports nothing from raypo.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

SPLIT_COLUMN = "split"
"""Partition column of the prepared Parquet (``train``, ``eval`` or ``rejected``); Ray Data writes
each split to ``prepared/split=<name>``."""


@dataclass(frozen=True)
class ExportLayout:
    """An exported policy directory (``RUN_DIR/final``, or a copy of it that ``eval.policy``
    names): Hugging Face ``save_pretrained`` files plus raypo's own."""

    root: Path
    """The directory."""

    @property
    def hf_config(self) -> Path:
        """``config.json``: Hugging Face's model config, present once the weights are saved."""
        return self.root / "config.json"

    @property
    def strength(self) -> Path:
        """``mixdpo_strength.json``: the learned MixDPO strength distribution (family, a, b,
        moments), written only by objectives that learn one."""
        return self.root / "mixdpo_strength.json"

    @property
    def adapter(self) -> Path:
        """``adapter/``: the trained LoRA adapter in PEFT format (``adapter_config.json``,
        ``adapter_model.safetensors``) and the tokenizer, written only by ``model.lora`` runs,
        whose weights in the directory itself are the merged model (with
        ``model.lora.merge_on_export`` false the directory itself is the adapter instead)."""
        return self.root / "adapter"


@dataclass(frozen=True)
class CheckpointLayout:
    """One training checkpoint directory (``ray/<name>/checkpoint_*``): every rank's files, which
    Ray Train gathers from the ranks into one directory."""

    root: Path
    """The checkpoint directory."""

    ENGINE_TAG = "engine"
    """DeepSpeed's tag: the engine state (model, optimizer, LR scheduler) is under ``engine/``."""

    @property
    def engine(self) -> Path:
        """``engine/``: DeepSpeed's files, one optimizer shard per rank under ZeRO."""
        return self.root / self.ENGINE_TAG

    def train_state(self, rank: int) -> Path:
        """``train_state_rank<r>.pt``: rank r's counters, trained pair ids and RNG states (plain
        tensors and Python values: loads with ``torch.load(weights_only=True)``)."""
        return self.root / f"train_state_rank{rank}.pt"

    def manifest(self, rank: int) -> Path:
        """``manifest_rank<r>.json``: written last by rank r: the world size, step, pairs
        consumed, and the size and SHA-256 of every file rank r wrote."""
        return self.root / f"manifest_rank{rank}.json"


@dataclass(frozen=True)
class RunLayout:
    """The paths of a run directory (module docstring); nothing is created or read."""

    root: Path
    """The run directory (``config.run_path``)."""

    @property
    def lock(self) -> Path:
        """``.raypo.lock``: the one-writer lock (:mod:`raypo.run_lock`), held by the live run
        writing this directory; its text names that run's host and pid."""
        return self.root / ".raypo.lock"

    # The data stage (raypo.data).

    @property
    def config(self) -> Path:
        """``config.yaml``: the resolved config the run (or sweep) was started with."""
        return self.root / "config.yaml"

    @property
    def data_summary(self) -> Path:
        """``data_summary.json``: rows read, accepted and rejected (per reason and per source)
        and the split sizes."""
        return self.root / "data_summary.json"

    @property
    def rejects(self) -> Path:
        """``rejects.jsonl``: every rejected row with its source, row, reason and detail."""
        return self.root / "rejects.jsonl"

    @property
    def prepared(self) -> Path:
        """``prepared/``: the tokenised pairs as Parquet, one directory per split."""
        return self.root / "prepared"

    def prepared_split(self, split: str) -> Path:
        """``prepared/split=<split>``: the Parquet of one split (``train``, ``eval``,
        ``rejected``), as Ray Data partitions by :data:`SPLIT_COLUMN`."""
        return self.prepared / f"{SPLIT_COLUMN}={split}"

    @property
    def reference(self) -> Path:
        """``reference/``: the default ``reference.cache_dir`` (``{run_dir}/reference``), one
        directory per reference pass fingerprint."""
        return self.root / "reference"

    @property
    def tiny_fit(self) -> Path:
        """``tiny-fit/``: the ``raypo sft`` run that fits the embedded tiny model to the chosen
        completions (``model.tiny_fit_steps``), laid out as a run directory; its ``final/`` is
        the run's policy and reference."""
        return self.root / "tiny-fit"

    # Training (raypo.train).

    @property
    def metrics(self) -> Path:
        """``metrics.jsonl``: one JSON object per logged optimizer step (TRL's metric names)."""
        return self.root / "metrics.jsonl"

    @property
    def console_log(self) -> Path:
        """``console.log``: what a sweep's trial printed (its stage and progress lines)."""
        return self.root / "console.log"

    @property
    def tensorboard(self) -> Path:
        """``tensorboard/``: TensorBoard event files when ``trainer.report_to`` lists it."""
        return self.root / "tensorboard"

    @property
    def generations(self) -> Path:
        """``generations.jsonl``: completions sampled during training, one per line with its
        step (``eval.during_training_num_prompts``)."""
        return self.root / "generations.jsonl"

    @property
    def heldout_pairs(self) -> Path:
        """``heldout_pairs.jsonl``: one line per held-out pair at every held-out evaluation
        during training: ``step``, ``id``, ``reward_chosen``, ``reward_rejected`` and where known
        ``reference_hn``, ``policy_hn`` (:mod:`raypo.train.records`)."""
        return self.root / "heldout_pairs.jsonl"

    @property
    def ray(self) -> Path:
        """``ray/``: Ray Train's storage (checkpoints under ``ray/<name>/checkpoint_*``) when
        ``trainer.storage_path`` is null."""
        return self.root / "ray"

    @property
    def final(self) -> Path:
        """``final/``: the trained policy exported in Hugging Face format (see
        :class:`ExportLayout`)."""
        return self.root / "final"

    @property
    def strength(self) -> Path:
        """``final/mixdpo_strength.json``: the learned MixDPO strength distribution."""
        return ExportLayout(self.final).strength

    # Evaluation (raypo.eval).

    @property
    def eval_dir(self) -> Path:
        """``eval/``: what ``raypo eval`` and ``raypo report`` write."""
        return self.root / "eval"

    @property
    def eval_config(self) -> Path:
        """``eval/config.yaml``: the resolved config of the last evaluation."""
        return self.eval_dir / "config.yaml"

    @property
    def eval_results(self) -> Path:
        """``eval/results.json``: accuracy, KL, win rate, generation statistics per side."""
        return self.eval_dir / "results.json"

    @property
    def eval_samples(self) -> Path:
        """``eval/samples.jsonl``: every sampled completion of policy and baseline, scored."""
        return self.eval_dir / "samples.jsonl"

    @property
    def eval_report(self) -> Path:
        """``eval/report.md``: the run report."""
        return self.eval_dir / "report.md"

    @property
    def eval_plots(self) -> Path:
        """``eval/plots/``: the report's PNG figures."""
        return self.eval_dir / "plots"

    # A sweep (raypo.tune).

    @property
    def tune(self) -> Path:
        """``tune/``: Ray Tune's experiment directory (what ``raypo tune --resume`` restores)."""
        return self.root / "tune"

    @property
    def trials(self) -> Path:
        """``trials/``: one run directory per trial."""
        return self.root / "trials"

    def trial(self, trial_id: str) -> RunLayout:
        """The run directory of one trial, ``trials/<trial_id>``."""
        return RunLayout(self.trials / trial_id)

    @property
    def trial_done(self) -> Path:
        """``trial_done``: in a trial's run directory, written when its training run finished
        (not stopped early)."""
        return self.root / "trial_done"

    @property
    def trials_csv(self) -> Path:
        """``trials.csv``: every trial, its metric, searched values, status (full precision)."""
        return self.root / "trials.csv"

    @property
    def trials_md(self) -> Path:
        """``trials.md``: the same table in Markdown, best first."""
        return self.root / "trials.md"

    @property
    def best_config(self) -> Path:
        """``best_config.yaml``: the sweep's config with the best trial's values."""
        return self.root / "best_config.yaml"

    def metric_plot(self, key: str) -> Path:
        """``metric_vs_<key>.png``: the sweep's metric against one searched key."""
        return self.root / f"metric_vs_{key}.png"
