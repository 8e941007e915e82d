"""Throughput and peak memory of ``raypo prepare`` on the 1,800 real HH pairs with the tiny model.

Runs the data stage twice on a fresh local Ray: tokenisation only (``reference.mode online``),
then with the reference pass (``precomputed``, cache cleared first). Peak memory is the largest
sum of resident set sizes of this process and every process it started (Ray's raylet, workers
and actors), sampled every 0.1 s. Writes JSON and a markdown table.

    python benchmarks/prepare_throughput.py
"""

from __future__ import annotations

import argparse
import gzip
import shutil
import tempfile
import time
from pathlib import Path

import ray
from common import Column, ProcessTreeRss, Table, add_output_argument, write_results

from raypo.config import load_config
from raypo.data.prepare import prepare

HH = Path(__file__).resolve().parents[1] / "tests" / "data" / "hh_harmless_1800.jsonl.gz"


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
    with ProcessTreeRss() as peak:
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
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=32, help="reference pass batch size")
    parser.add_argument("--actors", type=int, default=1, help="reference pass actors")
    add_output_argument(parser, "prepare_throughput")
    args = parser.parse_args()
    started = time.perf_counter()

    ray.init(num_cpus=4, include_dashboard=False)
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        data = workdir / "hh.jsonl"
        data.write_bytes(gzip.decompress(HH.read_bytes()))
        results = [_measure(workdir, data, mode, args) for mode in ("online", "precomputed")]
        shutil.rmtree(workdir / "precomputed", ignore_errors=True)
    ray.shutdown()

    table = Table(
        "raypo prepare on 1,800 HH pairs",
        results,
        [
            Column("stage"),
            Column("rows"),
            Column("seconds"),
            Column("pairs_per_s", "pairs/s"),
            Column("peak_rss_mib", "peak RSS (MiB)"),
        ],
        note=f"max_length {args.max_length}. tokenise = read + validate + tokenise + write "
        "Parquet (with Ray task start-up); reference = tiny-model forward over train+eval pairs "
        "with chunked logp+entropy. Peak RSS sums the driver and all Ray processes.",
    )
    files = write_results(
        "prepare_throughput",
        title="Prepare throughput",
        description=__doc__.split("\n\n")[1],
        tables=[table],
        settings=args,
        out=args.out,
        started=started,
    )
    print(files.markdown.read_text())


if __name__ == "__main__":
    main()
