"""Throughput and peak memory of ``raypo prepare`` on the 1,800 real HH pairs with the tiny model.

Runs the data stage twice on a fresh local Ray: tokenisation only (``reference.mode online``),
then with the reference pass (``precomputed``, cache cleared first). Peak memory is the largest
sum of resident set sizes of this process and every process it started (Ray's raylet, workers
and actors), sampled every 0.1 s. Writes JSON and a markdown table.

    python benchmarks/prepare_throughput.py --out benchmarks/results/prepare_throughput
"""

from __future__ import annotations

import argparse
import gzip
import json
import platform
import shutil
import tempfile
import threading
import time
from pathlib import Path

import psutil
import ray
import torch

from raypo.config import load_config
from raypo.data.prepare import prepare

HH = Path(__file__).resolve().parents[1] / "tests" / "data" / "hh_harmless_1800.jsonl.gz"


class PeakRss:
    """Samples the summed RSS of this process tree in a background thread."""

    def __init__(self) -> None:
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        me = psutil.Process()
        while not self._stop.is_set():
            total = 0
            for process in [me, *me.children(recursive=True)]:
                try:
                    total += process.memory_info().rss
                except psutil.Error:
                    continue
            self.peak = max(self.peak, total)
            time.sleep(0.1)

    def __enter__(self) -> PeakRss:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def _measure(workdir: Path, data: Path, mode: str, args: argparse.Namespace) -> dict:
    config = load_config(
        None,
        [
            f"--run_dir={workdir / mode}",
            f"--data.path={data}",
            f"--data.max_length={args.max_length}",
            f"--data.max_prompt_length={args.max_length // 2}",
            f"--reference.mode={mode}",
            f"--reference.batch_size={args.batch_size}",
            f"--reference.num_actors={args.actors}",
            "--reference.cpus_per_actor=1",
            "--data.num_cpus_per_op=0.5",
        ],
    )
    with PeakRss() as peak:
        run = prepare(config)
    stage = "reference" if mode == "precomputed" else "tokenise"
    seconds = run.seconds[stage]
    rows = run.data.summary.total if stage == "tokenise" else run.data.summary.accepted
    return {
        "stage": stage,
        "rows": rows,
        "seconds": round(seconds, 2),
        "pairs_per_s": round(rows / seconds, 1),
        "peak_rss_mib": round(peak.peak / 2**20),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="benchmarks/results/prepare_throughput")
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=32, help="reference pass batch size")
    parser.add_argument("--actors", type=int, default=1, help="reference pass actors")
    args = parser.parse_args()

    ray.init(num_cpus=4, include_dashboard=False)
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        data = workdir / "hh.jsonl"
        data.write_bytes(gzip.decompress(HH.read_bytes()))
        results = [_measure(workdir, data, mode, args) for mode in ("online", "precomputed")]
        shutil.rmtree(workdir / "precomputed", ignore_errors=True)
    ray.shutdown()

    meta = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{platform.platform()}, {psutil.cpu_count()} CPUs",
        "torch": torch.__version__,
        "ray": ray.__version__,
        "max_length": args.max_length,
        "note": "tokenise = read + validate + tokenise + write Parquet (with Ray task start-up); "
        "reference = tiny-model forward over train+eval pairs with chunked logp+entropy",
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({**meta, "results": results}, indent=2) + "\n")
    table = ["| stage | rows | seconds | pairs/s | peak RSS (MiB) |", "|---|---|---|---|---|"]
    table += [
        "| " + " | ".join(str(r[k]) for k in ("stage", "rows", "seconds", "pairs_per_s")) + " | "
        f"{r['peak_rss_mib']} |"
        for r in results
    ]
    text = f"# prepare throughput ({meta['date']})\n\n{meta['machine']}; torch {meta['torch']}, "
    text += f"ray {meta['ray']}; max_length {args.max_length}.\n{meta['note']}.\n\n"
    out.with_suffix(".md").write_text(text + "\n".join(table) + "\n")
    print("\n".join(table))


if __name__ == "__main__":
    main()
