"""Training metrics: averaged over workers, appended to RUN_DIR/metrics.jsonl, sent to trackers.

Only the main process (rank 0, or Ray Train's controller) writes. Each ``log`` call appends one
JSON object per line, ``{"step", ["epoch"], "time", <metric>: value, ...}`` with ``time`` in Unix
seconds and non-finite values written as ``null`` (strict JSON), flushed at once so a crashed run
keeps every line logged. The same values go to TensorBoard, Weights & Biases and MLflow when
``trainer.report_to`` lists them.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import math
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from raypo.run_layout import RunLayout

_BACKEND_MODULES = {
    "tensorboard": ("torch.utils.tensorboard", "tensorboard"),
    "wandb": ("wandb", "wandb"),
    "mlflow": ("mlflow", "mlflow"),
}
"""report_to entry -> (module to import, pip package that provides it)."""


def _import_backend(name: str) -> Any:
    """Import the module behind a ``report_to`` entry, or say how to install it."""
    module, package = _BACKEND_MODULES[name]
    try:
        return importlib.import_module(module)
    except ImportError:
        raise RuntimeError(
            f"trainer.report_to lists {name} but {package} is not installed: pip install {package}"
        ) from None


@dataclass(frozen=True)
class TrackerRun:
    """How the run appears in the ``report_to`` trackers."""

    project: str = "raypo"
    """W&B project / MLflow experiment (``trainer.tracker_project``)."""
    name: str | None = None
    """The run's name; None = the run directory's name."""
    tags: tuple[str, ...] = ()
    """W&B tags / MLflow tags (``trainer.tracker_tags``)."""
    config: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    """The resolved config, nested as in YAML, logged as the run's parameters."""


def flat_params(config: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"loss": {"beta": 0.1}}`` -> ``{"loss.beta": 0.1}``; lists and None as text (MLflow
    params and TensorBoard hparams take scalars only)."""
    flat: dict[str, Any] = {}
    for key, value in config.items():
        if isinstance(value, Mapping):
            flat |= flat_params(value, f"{prefix}{key}.")
        elif isinstance(value, bool | int | float | str):
            flat[f"{prefix}{key}"] = value
        else:
            flat[f"{prefix}{key}"] = str(value)
    return flat


class _TensorBoard:
    def __init__(self, module: Any, run_dir: Path, run: TrackerRun) -> None:
        self.writer = module.SummaryWriter(log_dir=str(RunLayout(run_dir).tensorboard))
        self.params = flat_params(run.config)
        self.last: dict[str, float] = {}

    def log(self, step: int, metrics: Mapping[str, float]) -> None:
        for name, value in metrics.items():
            self.writer.add_scalar(name, value, global_step=step)
        self.last |= dict(metrics)
        self.writer.flush()

    def close(self) -> None:
        # TensorBoard's hparams view pairs the config with final metrics; written at the end,
        # when they are known (hparam/ prefix keeps them apart from the scalar series).
        if self.params:
            final = {f"hparam/{name}": value for name, value in self.last.items()}
            self.writer.add_hparams(self.params, final, run_name=".")
        self.writer.close()


class _WandB:
    def __init__(self, module: Any, run_dir: Path, run: TrackerRun) -> None:
        self.module = module
        self.run = module.init(
            project=run.project,
            name=run.name or run_dir.name,
            tags=list(run.tags) or None,
            config=dict(run.config),
            dir=str(run_dir),
        )

    def log(self, step: int, metrics: Mapping[str, float]) -> None:
        self.run.log(dict(metrics), step=step)

    def close(self) -> None:
        self.run.finish()


class _MLflow:
    def __init__(self, module: Any, run_dir: Path, run: TrackerRun) -> None:
        self.module = module
        module.set_experiment(run.project)
        self.run = module.start_run(
            run_name=run.name or run_dir.name, tags={tag: "" for tag in run.tags}
        )
        params = flat_params(run.config)
        if params:
            module.log_params(params)

    def log(self, step: int, metrics: Mapping[str, float]) -> None:
        self.module.log_metrics(dict(metrics), step=step)

    def close(self) -> None:
        self.module.end_run()


_BACKENDS = {"tensorboard": _TensorBoard, "wandb": _WandB, "mlflow": _MLflow}


def _finite_or_none(value: float) -> float | None:
    return value if math.isfinite(value) else None


class MetricsLogger:
    """Writes metrics.jsonl and forwards to the ``report_to`` backends (the driver's
    :class:`raypo.train.progress.ProgressMonitor` shows the file's records on the console).

    Args:
        run_dir: the run directory; ``metrics.jsonl`` (and ``tensorboard/``) go inside.
        report_to: any of ``tensorboard``, ``wandb``, ``mlflow``; each must be installed.
        is_main: only the main process writes; elsewhere every method does nothing.
        tracker: the project, name, tags and config the backends record the run with.
    """

    def __init__(
        self,
        run_dir: Path,
        report_to: list[str],
        is_main: bool,
        tracker: TrackerRun = TrackerRun(),
    ) -> None:
        self.run_dir = Path(run_dir)
        self.is_main = is_main
        self._backends: list[Any] = []
        self._file = None
        if not is_main:
            return
        for name in report_to:
            if name not in _BACKENDS:
                raise ValueError(f"unknown report_to entry {name!r}; choose from {list(_BACKENDS)}")
        modules = {name: _import_backend(name) for name in report_to}
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self._file = RunLayout(self.run_dir).metrics.open("a", encoding="utf-8")
        self._backends = [
            _BACKENDS[name](module, self.run_dir, tracker) for name, module in modules.items()
        ]

    def log(self, step: int, metrics: Mapping[str, float], epoch: float | None = None) -> None:
        """Append one line for optimizer step ``step`` and forward it to the backends."""
        if self._file is None:
            return
        values = {name: float(value) for name, value in metrics.items()}
        record: dict[str, Any] = {"step": step}
        if epoch is not None:
            record["epoch"] = epoch
        record["time"] = round(time.time(), 3)
        record |= {name: _finite_or_none(value) for name, value in values.items()}
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        for backend in self._backends:
            backend.log(step, values)

    def close(self) -> None:
        """Flush and close the file and every backend; safe to call twice."""
        for backend in self._backends:
            backend.close()
        self._backends = []
        if self._file is not None:
            self._file.close()
            self._file = None


def mean_metrics_across_workers(metrics: Mapping[str, torch.Tensor]) -> dict[str, float]:
    """Average 0-dim metric tensors over all torch.distributed ranks in one all-reduce.

    Every rank must call this with the same keys (they are sorted, then stacked into one float64
    vector on the tensors' device, summed and divided by the world size). Without an initialised
    process group the local values are returned.
    """
    if not metrics:
        return {}
    names = sorted(metrics)
    stacked = torch.stack([metrics[name].detach().to(torch.float64).reshape(()) for name in names])
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(stacked, op=dist.ReduceOp.SUM)
        stacked /= dist.get_world_size()
    return dict(zip(names, stacked.tolist(), strict=True))


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    """Every record of ``run_dir/metrics.jsonl`` in order (an empty list when there is none)."""
    path = RunLayout(Path(run_dir)).metrics
    if not path.exists():
        return []
    with path.open(encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]
