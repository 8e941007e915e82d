"""Training throughput of raypo on 1 vs 2 Ray Train workers, same global batch, same steps.

Each run is a whole ``raypo.train.run.train`` job (prepare, precomputed reference pass, Ray Train
with DeepSpeed ZeRO-2 and torch Adam, ``logging_steps: 1``); its steady-state pairs/s and
tokens/s come from ``metrics.jsonl`` (the first ``--warmup`` steps are skipped). On CPU, 1 worker
gets ``--cpus`` CPUs (its torch threads) and 2 workers get half each, so both use the same cores.
With a GPU (``--gpu``) the runs are 1 GPU under ZeRO 0, 2 and 3 instead.

    python benchmarks/scaling.py --out benchmarks/results/scaling
"""

from __future__ import annotations

import argparse
import dataclasses
import gzip
import json
import os
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from common import REPO_ROOT, Column, Table, add_output_argument, new_figure, write_results

HH_PATH = REPO_ROOT / "tests" / "data" / "hh_harmless_1800.jsonl.gz"
"""The 1,800 HH-RLHF harmless pairs (MIT; tests/data/hh_LICENSE); never data outside the repo."""
RAY_ENV = {
    "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.1",
    "RAY_AUTH_MODE": "disabled",
    "RAY_DATA_DISABLE_PROGRESS_BARS": "1",
    "RAY_ENABLE_UV_RUN_RUNTIME_ENV": "0",
    "TOKENIZERS_PARALLELISM": "false",
}


@dataclass(frozen=True)
class ModelShape:
    """The Llama of the project's standard CPU benchmark, or a smaller one for ``--quick``."""

    hidden: int = 256
    layers: int = 4
    heads: int = 4
    ffn: int = 688
    vocab: int = 8192

    def spec(self, seed: int = 0, max_positions: int = 1024) -> Any:
        """The :class:`raypo.models.TinyModelSpec` of this shape (weights seeded by ``seed``)."""
        from raypo.models import TinyModelSpec

        return TinyModelSpec(
            hidden_size=self.hidden,
            num_layers=self.layers,
            num_heads=self.heads,
            head_dim=self.hidden // self.heads,
            intermediate_size=self.ffn,
            vocab_size=self.vocab,
            max_position_embeddings=max_positions,
            seed=seed,
        )


STANDARD = ModelShape()
QUICK = ModelShape(hidden=64, layers=2, heads=2, ffn=172, vocab=1024)


@dataclass(frozen=True)
class RunThroughput:
    """Steady-state throughput of one training job, from its metrics.jsonl."""

    label: str
    workers: int
    cpus_per_worker: float
    zero_stage: int
    pairs_per_s: float
    tokens_per_s: float
    step_s_median: float
    steps_measured: int
    first_loss: float
    wall_s: float


def hh_records(count: int | None = None) -> list[dict[str, str]]:
    """The first ``count`` raw HH pairs (``chosen``/``rejected`` dialogues) of the packaged file."""
    lines = gzip.decompress(HH_PATH.read_bytes()).decode("utf-8").splitlines()
    return [json.loads(line) for line in lines[:count] if line.strip()]


def build_models(shape: ModelShape, directory: Path, reference_seed: int = 1) -> tuple[Path, Path]:
    """A BPE tokenizer of ``shape.vocab`` tokens trained on the 1,800 HH pairs, and two models of
    ``shape`` saved with it: the policy (seed 0) and a reference (``reference_seed``; a distinct
    reference makes the first DPO loss depend on both models, not ln 2)."""
    from raypo.models import save_tiny_model

    texts = [text for record in hh_records() for text in (record["chosen"], record["rejected"])]
    policy = save_tiny_model(directory / "policy", shape.spec(0), texts)
    reference = save_tiny_model(directory / "reference", shape.spec(reference_seed), texts)
    return policy, reference


def ray_train_config(
    run_dir: Path,
    policy: Path,
    reference: Path,
    *,
    workers: int,
    cpus_per_worker: float,
    global_batch: int,
    steps: int,
    max_length: int,
    **overrides: Any,
) -> dict[str, Any]:
    """The config dict (for :func:`raypo.config.config_from_dict`) of a DPO run on the HH file:
    ZeRO-2, torch Adam, precomputed reference, constant learning rate, a log line every step, no
    held-out split. ``overrides`` are dotted keys (``loss.type``, ``trainer.zero_stage``, ...)."""
    if global_batch % workers:
        raise ValueError(f"global batch {global_batch} does not split over {workers} workers")
    data: dict[str, Any] = {
        "name": run_dir.name,
        "run_dir": str(run_dir),
        "model": {"name_or_path": str(policy), "dtype": "fp32"},
        "data": {
            "path": str(HH_PATH),
            "schema": "hh",
            "eval_fraction": 0.0,
            "max_rows": global_batch * (steps + 4),
            "max_length": max_length,
            "max_prompt_length": max_length // 2,
            "num_cpus_per_op": 0.25,
        },
        "loss": {"type": "dpo", "beta": 0.1},
        "reference": {"mode": "precomputed", "model_name_or_path": str(reference)},
        "trainer": {
            "num_workers": workers,
            "cpus_per_worker": cpus_per_worker,
            "zero_stage": 2,
            "torch_adam": True,
            "per_device_batch_size": global_batch // workers,
            "learning_rate": 1e-5,
            "lr_scheduler": "constant",
            "warmup_ratio": 0.0,
            "max_steps": steps,
            "logging_steps": 1,
            "save_steps": 0,
        },
    }
    for key, value in overrides.items():
        section, name = key.split(".")
        data.setdefault(section, {})[name] = value
    return data


def steady_throughput(label: str, config: Any, warmup: int, wall_s: float) -> RunThroughput:
    # config: a RaypoConfig whose run has finished
    """Pairs/s and tokens/s over the logged steps after the first ``warmup`` of a finished run."""
    from raypo.train.metrics import read_metrics

    logged = [r for r in read_metrics(config.run_path) if "step_time_s" in r]
    steady = [r for r in logged if r["step"] > warmup]
    if not steady:
        raise RuntimeError(f"{label}: no logged step after warm-up in {config.run_path}")
    seconds = sum(r["step_time_s"] for r in steady)
    pairs = sum(r["samples_per_s"] * r["step_time_s"] for r in steady)
    tokens = sum(r["tokens_per_s"] * r["step_time_s"] for r in steady)
    trainer = config.trainer
    return RunThroughput(
        label=label,
        workers=trainer.num_workers,
        cpus_per_worker=trainer.cpus_per_worker,
        zero_stage=trainer.zero_stage,
        pairs_per_s=round(pairs / seconds, 3),
        tokens_per_s=round(tokens / seconds, 1),
        step_s_median=round(statistics.median(r["step_time_s"] for r in steady), 3),
        steps_measured=len(steady),
        first_loss=round(logged[0]["loss"], 6),
        wall_s=round(wall_s, 1),
    )


def run_training(label: str, config_dict: dict[str, Any], warmup: int) -> RunThroughput:
    """Train one job in this process's Ray session (started by the caller) and read its
    steady-state throughput."""
    from raypo.config import config_from_dict
    from raypo.train.run import train

    config = config_from_dict(config_dict)
    started = time.perf_counter()
    train(config)
    return steady_throughput(label, config, warmup, time.perf_counter() - started)


def start_ray(num_cpus: int) -> None:
    """A local Ray of ``num_cpus`` logical CPUs: Ray Data's fractional tasks need room beside
    workers that take the physical cores."""
    os.environ.update({key: os.environ.get(key, value) for key, value in RAY_ENV.items()})
    import ray

    from raypo.ray_runtime import disable_data_progress_bars

    if not ray.is_initialized():
        ray.init(num_cpus=num_cpus, include_dashboard=False, configure_logging=False)
    disable_data_progress_bars()


def _cases(args: argparse.Namespace) -> list[tuple[str, dict[str, Any]]]:
    if args.gpu:
        return [
            (f"1 GPU, ZeRO-{stage}", {"workers": 1, "cpus_per_worker": 1.0, "zero": stage})
            for stage in (0, 2, 3)
        ]
    half = args.cpus / 2
    return [
        (f"1 worker x {args.cpus:g} CPU", {"workers": 1, "cpus_per_worker": float(args.cpus)}),
        (f"2 workers x {half:g} CPU", {"workers": 2, "cpus_per_worker": half}),
    ]


def measure(args: argparse.Namespace, models: tuple[Path, Path], work: Path) -> list[RunThroughput]:
    """Every case of ``args`` (CPU: 1 and 2 workers; GPU: ZeRO 0/2/3), one job each."""
    results = []
    for index, (label, case) in enumerate(_cases(args)):
        extra = {"trainer.use_gpu": True, "trainer.zero_stage": case["zero"]} if args.gpu else {}
        config = ray_train_config(
            work / f"run{index}",
            *models,
            workers=case["workers"],
            cpus_per_worker=case["cpus_per_worker"],
            global_batch=args.pairs,
            steps=args.warmup + args.steps,
            max_length=args.max_length,
            **extra,
        )
        result = run_training(label, config, args.warmup)
        print(json.dumps(dataclasses.asdict(result)), flush=True)
        results.append(result)
    return results


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--pairs", type=int, default=8, help="global batch: pairs per step")
    parser.add_argument("--steps", type=int, default=6, help="measured steps per run")
    parser.add_argument("--warmup", type=int, default=2, help="steps skipped before measuring")
    parser.add_argument("--max-length", type=int, default=512, help="data.max_length")
    parser.add_argument("--cpus", type=int, default=2, help="CPUs shared by the workers")
    parser.add_argument("--gpu", action="store_true", help="1 GPU under ZeRO 0/2/3 instead")
    parser.add_argument("--quick", action="store_true", help="small model and steps (smoke test)")
    parser.add_argument("--work-dir", type=Path, help="keep the runs here (default: a temp dir)")
    add_output_argument(parser, "scaling")
    args = parser.parse_args(argv)
    if args.quick:
        args.steps, args.warmup, args.max_length = 2, 1, 128
    return args


def _figure(results: list[RunThroughput], args: argparse.Namespace) -> Any:
    figure, axes = new_figure(size=(5.5, 3.6))
    axes = axes[0][0]
    bars = axes.bar([r.label for r in results], [r.pairs_per_s for r in results])
    axes.bar_label(bars, fmt="%.2f")
    axes.set_ylabel("pairs/s (steady state)")
    axes.set_title(f"raypo DPO, {args.pairs} pairs/step, max length {args.max_length}")
    return figure


def main(argv: list[str] | None = None) -> None:
    """Run the cases and write ``OUT.json``, ``OUT.md`` and ``OUT.png``."""
    args = _parse_args(argv)
    started = time.perf_counter()
    if args.gpu:
        import torch

        if not torch.cuda.is_available():
            raise SystemExit("scaling.py --gpu: no CUDA device here; run without --gpu on CPU")
    shape = QUICK if args.quick else STANDARD
    start_ray(2 * args.cpus)
    with tempfile.TemporaryDirectory() as scratch:
        work = args.work_dir or Path(scratch)
        models = build_models(shape, work / "models")
        results = measure(args, models, work)
    gpu_note = (
        "GPU: 1 GPU under ZeRO 0/2/3."
        if args.gpu
        else "GPU part not run: no GPU on this machine (`--gpu` runs 1 GPU under ZeRO 0/2/3). "
        f"On CPU both runs share the same {args.cpus} cores: 1 worker with {args.cpus} torch "
        "threads against 2 workers with half as many each, so this measures the cost of data "
        "parallelism (gradient all-reduce, smaller per-worker matmuls), not added hardware."
    )
    write_results(
        "scaling",
        title="raypo training throughput: 1 vs 2 Ray Train workers",
        description=(
            f"Each row is one `raypo.train.run.train` job: DPO on the HH pairs, model "
            f"{dataclasses.asdict(shape)}, fp32, ZeRO-2, torch Adam, precomputed reference, "
            f"{args.pairs} pairs per step in total, max length {args.max_length}, "
            f"{args.warmup} warm-up + {args.steps} measured steps, a metrics line every step; "
            f"pairs/s and tokens/s are totals over the measured steps from metrics.jsonl. "
            + gpu_note
        ),
        tables=[
            Table(
                "Steady-state throughput",
                [dataclasses.asdict(r) for r in results],
                [
                    Column("label", "run"),
                    Column("workers"),
                    Column("cpus_per_worker", "CPUs/worker", "g"),
                    Column("zero_stage", "ZeRO"),
                    Column("pairs_per_s", "pairs/s", ".3f"),
                    Column("tokens_per_s", "tokens/s", ".0f"),
                    Column("step_s_median", "median step s", ".3f"),
                    Column("first_loss", "loss step 1", ".6f"),
                    Column("wall_s", "job wall s", ".0f"),
                ],
            )
        ],
        settings=args,
        figure=_figure(results, args),
        out=args.out,
        started=started,
    )


if __name__ == "__main__":
    main()
