"""What a raypo command prints: its own stage lines, and Ray's own output only when asked.

By default a command prints one line per stage (``raypo train: data: ...``), a training progress
line and its summary. Ray Data's progress dumps and execution plans, Ray Train's per-worker
``Reporting training result`` lines, Hugging Face's weight-loading bars and DeepSpeed's
accelerator notice go to Ray's session logs only (``RAY_SESSION/logs``: ``ray-data*.log``,
``ray-train-*.log``, ``worker-*.out``); ``--verbose`` shows them on the console as well.

The switches are environment variables read when Ray Data and the libraries are imported, and
inherited by the processes of a local Ray that raypo starts, so :func:`configure` runs before any
of them is imported. Importing this module imports neither torch nor Ray.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

VERBOSE_ENV = "RAYPO_VERBOSE"
"""Set to ``1`` by ``--verbose``; read by :func:`verbose` in the driver and its local Ray."""

RAY_DATA_QUIET_LOGGING = Path(__file__).parent / "resources" / "ray_data_logging.yaml"
"""Ray Data's logging config with its console handler at WARNING (its log file keeps INFO)."""


def configure(verbose: bool, use_gpu: bool) -> None:
    """Set the console switches for this process and the local Ray it may start.

    ``verbose``: keep Ray's and the libraries' own output on the console. ``use_gpu``: whether the
    run trains on GPUs; without them DeepSpeed is told it runs on CPU, which it otherwise
    announces with a warning in every process. A variable the user set already is left alone.
    """
    os.environ[VERBOSE_ENV] = "1" if verbose else "0"
    if verbose:
        return
    quiet = {
        # Ray Data: execution plans, "Running Dataset" dumps and progress bars.
        "RAY_DATA_LOGGING_CONFIG": str(RAY_DATA_QUIET_LOGGING),
        "RAY_DATA_DISABLE_PROGRESS_BARS": "1",
        # Hugging Face: "Loading weights" bars and advisory warnings.
        "HF_HUB_DISABLE_PROGRESS_BARS": "1",
        "TRANSFORMERS_VERBOSITY": "error",
        "TOKENIZERS_PARALLELISM": "false",
    }
    if not use_gpu:
        quiet["DS_ACCELERATOR"] = "cpu"
    for name, value in quiet.items():
        os.environ.setdefault(name, value)


def verbose() -> bool:
    """Whether ``--verbose`` asked for Ray's own output on the console."""
    return os.environ.get(VERBOSE_ENV) == "1"


def ray_train_log_level() -> str:
    """Ray Train's console log level: INFO (its per-worker report lines) only when verbose."""
    return "INFO" if verbose() else "WARNING"


def stage(command: str, text: str) -> None:
    """Print one stage line of ``raypo COMMAND`` at once (a pipe would hold it back)."""
    print(f"raypo {command}: {text}", flush=True)


def is_terminal() -> bool:
    """Whether stdout is a terminal (a live progress bar) rather than a file or pipe."""
    return sys.stdout.isatty()
