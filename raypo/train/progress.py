"""The driver's view of a training run: one live progress line, held-out lines, the summary.

Ray Train's controller writes every report to ``RUN_DIR/metrics.jsonl``
(:class:`raypo.train.metrics.MetricsLogger`); :class:`ProgressMonitor` follows that file from the
driver and prints, so the console holds raypo's lines alone (the controller's own prints would
come through Ray's log forwarding, prefixed by its process). On a terminal the progress is a live
bar; in a file or pipe it is a line at most every ``interval_s`` seconds, and always at the last
step. Held-out evaluations get a line each.
"""

from __future__ import annotations

import json
import math
import sys
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TextIO

PROGRESS_KEYS = (
    "loss",
    "rewards/accuracies",
    "rewards/margins",
    "learning_rate",
    "tokens_per_s",
)
"""Training metrics shown on the progress line, in this order, when present."""

HELD_OUT_KEYS = ("eval/loss", "eval/rewards/accuracies", "eval/likelihood/accuracies")
"""Held-out metrics shown on an evaluation's line, in this order, when present."""

Z_95 = 1.959964
"""The standard normal quantile of a two-sided 95% interval."""


def duration(seconds: float) -> str:
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


def wilson_interval(fraction: float, count: int) -> tuple[float, float]:
    """The 95% Wilson score interval of a proportion ``fraction`` observed on ``count`` trials
    (Wilson 1927; better than the normal approximation for small counts and extreme fractions)."""
    if count <= 0:
        return (0.0, 1.0)
    z2 = Z_95 * Z_95
    centre = (fraction + z2 / (2 * count)) / (1 + z2 / count)
    half = Z_95 * math.sqrt(fraction * (1 - fraction) / count + z2 / (4 * count * count))
    half /= 1 + z2 / count
    return (max(0.0, centre - half), min(1.0, centre + half))


class EtaClock:
    """Seconds left of a run, from the records of metrics.jsonl alone.

    At the first record the rate is its own ``step_time_s`` over the steps it covers (so the first
    ETA is not 0 and excludes start-up); from the second on, the wall time between the first
    record and the latest over the steps between them (evaluations and checkpoints included).
    """

    def __init__(self, total_steps: int, start_step: int = 0) -> None:
        self.total_steps = total_steps
        self._previous_step = start_step
        self._first: tuple[float, int] | None = None
        self._seconds_per_step: float | None = None

    def update(self, record: Mapping[str, Any]) -> float | None:
        """Take one record; the seconds left after it (None while no rate is known)."""
        step, when = int(record["step"]), record.get("time")
        if self._first is None:
            covered = step - self._previous_step
            interval = record.get("step_time_s")
            if interval is not None and covered > 0:
                self._seconds_per_step = float(interval) / covered
            if when is not None:
                self._first = (float(when), step)
        elif when is not None and step > self._first[1]:
            self._seconds_per_step = (float(when) - self._first[0]) / (step - self._first[1])
        self._previous_step = step
        if self._seconds_per_step is None:
            return None
        return max(0.0, self._seconds_per_step * (self.total_steps - step))


def progress_line(
    step: int, total_steps: int, metrics: Mapping[str, Any], eta: float | None
) -> str:
    """``step 40/100 (40%) | loss 0.6812 | ... | ETA 1m05s`` for the metrics present."""
    percent = 100.0 * step / max(1, total_steps)
    parts = [f"step {step}/{total_steps} ({percent:.0f}%)"]
    parts += [
        f"{name} {_format_value(name, metrics[name])}"
        for name in PROGRESS_KEYS
        if metrics.get(name) is not None
    ]
    parts.append(f"ETA {duration(eta)}" if eta is not None else "ETA ?")
    return " | ".join(parts)


def held_out_line(step: int, metrics: Mapping[str, Any]) -> str:
    """``held-out at step 20 (41 pairs): eval/loss 0.6901 | ...``."""
    shown = [
        f"{name} {metrics[name]:.4f}" for name in HELD_OUT_KEYS if metrics.get(name) is not None
    ]
    return f"held-out at step {step} ({int(metrics.get('eval/pairs', 0))} pairs): " + " | ".join(
        shown
    )


def _last_step(text: bytes) -> int:
    """The step of the last whole record in metrics.jsonl's ``text`` (0 for none): where a
    resumed run's first logging interval starts."""
    lines = [line for line in text.decode("utf-8").splitlines() if line.strip()]
    for line in reversed(lines):
        try:
            return int(json.loads(line)["step"])
        except (ValueError, KeyError):
            continue
    return 0


class ProgressMonitor:
    """Follows ``metrics.jsonl`` in a thread and prints the run's progress (module docstring).

    Args:
        metrics_path: the file Ray Train's controller appends to; lines already in it (a
            resumed run's earlier steps) are skipped.
        total_steps: optimizer steps of the whole run.
        live: a redrawn bar (a terminal) instead of periodic lines.
        interval_s: the least time between two periodic lines.
        out: where to print.
    """

    def __init__(
        self,
        metrics_path: Path,
        total_steps: int,
        live: bool,
        interval_s: float = 10.0,
        out: TextIO | None = None,
    ) -> None:
        self.path = Path(metrics_path)
        self.total_steps = total_steps
        self.live = live
        self.interval_s = interval_s
        self.out = out or sys.stdout
        earlier = self.path.read_bytes() if self.path.exists() else b""
        self._offset = len(earlier)
        self._eta = EtaClock(total_steps, start_step=_last_step(earlier))
        self._last_printed: float | None = None
        self._pending: str | None = None
        self._bar: Any = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._follow, name="raypo-progress", daemon=True)

    def __enter__(self) -> ProgressMonitor:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.poll()
        if self._pending is not None:
            self._print(self._pending)
        if self._bar is not None:
            self._bar.close()

    def _follow(self) -> None:
        while not self._stop.wait(0.5):
            self.poll()

    def poll(self) -> None:
        """Print what the records appended since the last poll show."""
        if not self.path.exists():
            return
        with self.path.open(encoding="utf-8") as handle:
            handle.seek(self._offset)
            text = handle.read()
        complete = text[: text.rfind("\n") + 1]
        self._offset += len(complete.encode("utf-8"))
        for line in complete.splitlines():
            if line.strip():
                self.show(json.loads(line))

    def show(self, record: Mapping[str, Any]) -> None:
        """Print (or hold back, between periodic lines) what one record shows."""
        step = int(record["step"])
        if "loss" in record:
            self._show_training(step, record)
        if "eval/pairs" in record:
            self._print(held_out_line(step, record))

    def _show_training(self, step: int, record: Mapping[str, Any]) -> None:
        eta = self._eta.update(record)
        line = progress_line(step, self.total_steps, record, eta)
        if self.live:
            self._update_bar(step, line)
            return
        when = float(record.get("time") or 0.0)
        due = self._last_printed is None or when - self._last_printed >= self.interval_s
        if due or step >= self.total_steps:
            self._last_printed = when
            self._pending = None
            self._print(line)
        else:
            self._pending = line

    def _update_bar(self, step: int, line: str) -> None:
        from tqdm import tqdm

        if self._bar is None:
            self._bar = tqdm(total=self.total_steps, file=self.out, unit="step", leave=True)
        self._bar.set_description_str(line.partition(" | ")[2], refresh=False)
        self._bar.update(step - self._bar.n)

    def _print(self, line: str) -> None:
        if self._bar is not None:
            self._bar.write(line, file=self.out)
        else:
            print(line, file=self.out, flush=True)


def _with_interval(fraction: float, count: int) -> str:
    low, high = wilson_interval(fraction, count)
    return f"{fraction:.3f} [{low:.2f}, {high:.2f}]"


def summary_lines(metrics: Mapping[str, Any]) -> list[str]:
    """The held-out result of a finished run, before training (the reference) against after
    (the policy) on the same measure, each with its 95% interval; nothing without held-out
    pairs."""
    pairs = int(metrics.get("eval/pairs", 0))
    if not pairs:
        return []
    lines = [f"held-out result on {pairs} pairs (95% intervals):"]
    before = metrics.get("eval/reference/accuracies")
    after = metrics.get("eval/likelihood/accuracies")
    if after is not None:
        reference = "n/a" if before is None else _with_interval(before, pairs)
        lines.append(
            "  likelihood accuracy (the chosen completion is the likelier): before (reference) "
            f"{reference} -> after (policy) {_with_interval(after, pairs)}"
        )
    reward = metrics.get("eval/rewards/accuracies")
    if reward is not None:
        low, high = wilson_interval(reward, pairs)
        verdict = "includes" if low <= 0.5 <= high else "excludes"
        lines.append(
            f"  implicit-reward accuracy: {_with_interval(reward, pairs)}; before training every "
            f"margin is 0, so chance (0.5) is its baseline, which the interval {verdict}"
        )
    return lines
