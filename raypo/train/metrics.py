"""Training metrics: averaged over workers, appended to RUN_DIR/metrics.jsonl, shown as progress.

Only the main process (rank 0, or Ray Train's controller) writes. Each ``log`` call appends one
JSON object per line, ``{"step", ["epoch"], "time", <metric>: value, ...}`` with ``time`` in Unix
seconds and non-finite values written as ``null`` (strict JSON), flushed at once so a crashed run
keeps every line logged. The same values go to TensorBoard, Weights & Biases and MLflow when
``trainer.report_to`` lists them.
"""

from __future__ import annotations

import importlib
import json
import math
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from raypo.run_layout import RunLayout

_PROGRESS_KEYS = (
    "loss",
    "rewards/accuracies",
    "rewards/margins",
    "eval/loss",
    "eval/rewards/accuracies",
    "learning_rate",
    "tokens_per_s",
)
"""Metrics shown on the progress line, in this order, when present."""

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


class _TensorBoard:
    def __init__(self, module: Any, run_dir: Path) -> None:
        self.writer = module.SummaryWriter(log_dir=str(RunLayout(run_dir).tensorboard))

    def log(self, step: int, metrics: Mapping[str, float]) -> None:
        for name, value in metrics.items():
            self.writer.add_scalar(name, value, global_step=step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class _WandB:
    def __init__(self, module: Any, run_dir: Path) -> None:
        self.module = module
        self.run = module.init(project="raypo", name=run_dir.name, dir=str(run_dir))

    def log(self, step: int, metrics: Mapping[str, float]) -> None:
        self.run.log(dict(metrics), step=step)

    def close(self) -> None:
        self.run.finish()


class _MLflow:
    def __init__(self, module: Any, run_dir: Path) -> None:
        self.module = module
        self.run = module.start_run(run_name=run_dir.name)

    def log(self, step: int, metrics: Mapping[str, float]) -> None:
        self.module.log_metrics(dict(metrics), step=step)

    def close(self) -> None:
        self.module.end_run()


_BACKENDS = {"tensorboard": _TensorBoard, "wandb": _WandB, "mlflow": _MLflow}


def _finite_or_none(value: float) -> float | None:
    return value if math.isfinite(value) else None


def _duration(seconds: float) -> str:
    """``1h02m03s`` / ``2m03s`` / ``3s``."""
    whole = int(round(seconds))
    hours, rest = divmod(whole, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m{secs:02d}s"
    if minutes:
        return f"{minutes}m{secs:02d}s"
    return f"{secs}s"


def _format_value(name: str, value: float) -> str:
    if name == "learning_rate":
        return f"{value:.2e}"
    if name == "tokens_per_s":
        return f"{value:.0f}"
    return f"{value:.4f}"


class MetricsLogger:
    """Writes metrics.jsonl, prints progress and forwards to the ``report_to`` backends.

    Args:
        run_dir: the run directory; ``metrics.jsonl`` (and ``tensorboard/``) go inside.
        total_steps: optimizer steps of the whole run, for the progress fraction and ETA.
        report_to: any of ``tensorboard``, ``wandb``, ``mlflow``; each must be installed.
        is_main: only the main process writes; elsewhere every method does nothing.
        clock: monotonic seconds behind the ETA (replaceable in tests).
    """

    def __init__(
        self,
        run_dir: Path,
        total_steps: int,
        report_to: list[str],
        is_main: bool,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.run_dir = Path(run_dir)
        self.total_steps = total_steps
        self.is_main = is_main
        self._clock = clock
        self._created = clock()
        self._first: tuple[float, int] | None = None
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
        self._backends = [_BACKENDS[name](module, self.run_dir) for name, module in modules.items()]

    def log(self, step: int, metrics: Mapping[str, float], epoch: float | None = None) -> None:
        """Append one line for optimizer step ``step``, print progress, forward to backends."""
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
        print(self.progress_line(step, values), flush=True)
        for backend in self._backends:
            backend.log(step, values)

    def progress_line(self, step: int, metrics: Mapping[str, float]) -> str:
        """``step 40/100 (40%) | loss 0.6812 | ... | ETA 1m05s`` for the metrics present."""
        percent = 100.0 * step / max(1, self.total_steps)
        parts = [f"step {step}/{self.total_steps} ({percent:.0f}%)"]
        parts += [
            f"{name} {_format_value(name, metrics[name])}"
            for name in _PROGRESS_KEYS
            if name in metrics
        ]
        eta = self._eta(step)
        parts.append(f"ETA {_duration(eta)}" if eta is not None else "ETA ?")
        return " | ".join(parts)

    def _eta(self, step: int) -> float | None:
        """Seconds left at the rate between the first logged step and now (so start-up time and
        steps done before a resume do not count); before a second log, the rate since creation
        assuming the run started at step 0."""
        now = self._clock()
        if self._first is None:
            self._first = (now, step)
            elapsed, steps = now - self._created, step
        else:
            elapsed, steps = now - self._first[0], step - self._first[1]
        if steps <= 0:
            return None
        return max(0.0, elapsed / steps * (self.total_steps - step))

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
