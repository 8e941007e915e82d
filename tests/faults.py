"""Fault injection for the recovery tests, installed only by tests: a step callback
(:data:`raypo.train.worker_plan.StepCallback`) that kills a Ray Train worker process once.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import ray.cloudpickle
import ray.train

MARKER = "fault_injected"
"""File the killed worker writes first, into the directory the test gives."""


@dataclass(frozen=True)
class KillOnce:
    """The last rank dies hard (``os._exit``) at optimizer step ``step``, once: the marker file
    it writes first keeps a restarted run from dying again. Every rank first waits until Ray
    Train has recorded the checkpoints reported so far, as it would have long before a real
    failure; otherwise a fast step could die before the controller sees the checkpoint it is
    meant to restart from."""

    step: int
    marker_dir: str

    def __call__(self, event) -> None:
        marker = Path(self.marker_dir) / MARKER
        if event.step != self.step or marker.exists():
            return
        ray.train.get_all_reported_checkpoints()
        if event.rank == event.world_size - 1:
            marker.write_text(f"rank {event.rank} killed at step {event.step}\n")
            os._exit(1)


@dataclass(frozen=True)
class SecondRun:
    """Rank 0 starts ``raypo train --resume RUN_DIR`` into the run it belongs to at optimizer
    step ``step``, waits for it, and writes its exit status, stderr and seconds taken to
    ``RUN_DIR/../second_run.json`` (outside the run directory, which it must not change)."""

    step: int
    run_dir: str

    def __call__(self, event) -> None:
        if event.step != self.step or event.rank != 0:
            return
        started = time.monotonic()
        second = subprocess.run(
            [sys.executable, "-m", "raypo", "train", "--resume", self.run_dir],
            capture_output=True,
            text=True,
            timeout=300,
        )
        record = {
            "returncode": second.returncode,
            "stderr": second.stderr,
            "seconds": time.monotonic() - started,
        }
        (Path(self.run_dir).parent / "second_run.json").write_text(json.dumps(record))


def ship_by_value() -> None:
    """Ray workers cannot import the tests: pickle this module's callback by value."""
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
