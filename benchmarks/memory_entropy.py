"""Peak memory and time of chunked vs naive label log-probs + entropy (forward and backward).

Both variants start from final hidden states ``[B, T, H]`` and an lm-head ``[V, H]`` and compute
the per-sequence summed label log-probs (with gradient) and the MallowsPO normalised entropy
``Hn`` (without), then run the backward pass:

- ``naive``: full ``[B, T, V]`` logits, upcast to fp32, ``log_softmax``, gather, entropy — what a
  plain implementation does;
- ``chunked``: :func:`raypo.dispersion.sequence_logps_and_entropy` (completion positions only,
  ``--chunk-size`` positions at a time, each chunk recomputed in the backward pass).

Each measurement runs in its own subprocess, which first does a tiny warm-up run (kernel and
thread-pool set-up) and then reports its peak resident set size (``VmHWM``) minus the RSS just
before the measured run, and the wall time of forward and backward. Peak RSS is measured under
glibc's default allocator and, with ``MALLOC_MMAP_THRESHOLD_=65536``, with every large buffer
returned to the OS on free: glibc's default dynamic threshold keeps freed buffers below 32 MiB in
the heap, where they fragment, so RSS then measures the allocator as much as the live tensors.

The default sweeps the vocabulary (8k, 32k, 128k) and the sequence length (256, 1024) at batch 4
under the mmap allocator; a naive case whose fp32 logits would exceed ``--max-naive-logits-mib``
is skipped (recorded as such) so that the sweep cannot exhaust a shared machine's memory.

Example (the recorded results)::

    python benchmarks/memory_entropy.py
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

from common import (
    REPO_ROOT,
    Column,
    Table,
    add_output_argument,
    new_figure,
    peak_rss_bytes,
    write_results,
)

ALLOCATORS = {"glibc-default": {}, "glibc-mmap-64k": {"MALLOC_MMAP_THRESHOLD_": "65536"}}
MIB = 2**20


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Peak RSS and time of chunked vs naive logp + entropy, forward + backward "
        "from hidden states and an lm-head (each run in its own subprocess).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--batch", type=int, default=4, help="sequences per batch")
    parser.add_argument("--seq", type=int, nargs="+", default=[256, 1024], help="sequence lengths")
    parser.add_argument(
        "--vocab",
        type=int,
        nargs="+",
        default=[8000, 32000, 128000],
        help="vocabulary sizes",
    )
    parser.add_argument("--hidden", type=int, default=256, help="hidden size H of the lm-head")
    parser.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16")
    parser.add_argument(
        "--chunk-size",
        type=int,
        nargs="+",
        default=[1024, 256],
        help="positions per chunk (chunked variant); 256 at V=32000 is a 31 MiB fp32 chunk, below "
        "glibc's 32 MiB dynamic mmap threshold",
    )
    parser.add_argument(
        "--completion-fraction",
        type=float,
        default=1.0,
        help="share of each sequence that is completion (mask 1); the rest is prompt. At 1.0 the "
        "comparison measures chunking alone; below, chunked also skips the prompt positions",
    )
    parser.add_argument("--variants", nargs="+", choices=["naive", "chunked"], default=None)
    parser.add_argument(
        "--allocators", nargs="+", choices=sorted(ALLOCATORS), default=["glibc-mmap-64k"]
    )
    parser.add_argument(
        "--max-naive-logits-mib",
        type=float,
        default=1100.0,
        help="skip naive cases whose fp32 logits exceed this (they peak at ~3.5x it)",
    )
    parser.add_argument(
        "--quick", action="store_true", help="B=2, T=128, V 8000/32000, chunk 256 (smoke test)"
    )
    parser.add_argument("--repeats", type=int, default=1, help="timed runs; the fastest is kept")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds per subprocess")
    add_output_argument(parser, "memory_entropy")
    parser.add_argument("--worker", choices=["naive", "chunked"], help=argparse.SUPPRESS)
    parser.add_argument("--worker-seq", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--worker-vocab", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.variants = args.variants or ["naive", "chunked"]
    if args.quick:
        args.batch, args.seq, args.vocab, args.chunk_size = 2, [128], [8000, 32000], [256]
    return args


def _rss_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * resource.getpagesize()


def _inputs(batch: int, seq: int, vocab: int, hidden: int, dtype, fraction: float) -> dict:
    import torch

    generator = torch.Generator().manual_seed(0)
    prompt = seq - max(1, round(seq * fraction))
    mask = torch.zeros(batch, seq)
    mask[:, prompt:] = 1
    labels = torch.randint(0, vocab, (batch, seq), generator=generator).masked_fill(mask == 0, -100)
    scale = hidden**-0.5
    return {
        "labels": labels,
        "mask": mask,
        "hidden": (torch.randn(batch, seq, hidden, generator=generator) * scale).to(dtype),
        "weight": torch.randn(vocab, hidden, generator=generator).to(dtype).requires_grad_(),
    }


def _naive(inputs: dict, vocab: int):
    import torch

    labels, mask = inputs["labels"], inputs["mask"]
    logits = inputs["hidden"] @ inputs["weight"].T
    logp = torch.log_softmax(logits.float(), dim=-1)
    picked = logp.gather(-1, labels.clamp_min(0).unsqueeze(-1)).squeeze(-1)
    logps = (picked * mask).sum(dim=1)
    with torch.no_grad():
        entropy = -(logp.exp() * logp).sum(dim=-1)
        hn = (entropy * mask).sum(dim=1) / (mask.sum(dim=1) * math.log(vocab))
    return logps, hn


def _chunked(inputs: dict, chunk_size: int):
    from raypo.dispersion import sequence_logps_and_entropy

    stats = sequence_logps_and_entropy(
        inputs["labels"],
        inputs["mask"],
        hidden_states=inputs["hidden"],
        lm_head_weight=inputs["weight"],
        chunk_size=chunk_size,
    )
    return stats.logps, stats.hn


def _forward_backward(variant: str, inputs: dict, vocab: int, chunk_size: int | None) -> dict:
    inputs["hidden"].requires_grad_()
    start = time.perf_counter()
    if variant == "naive":
        logps, hn = _naive(inputs, vocab)
    else:
        logps, hn = _chunked(inputs, chunk_size)
    forward = time.perf_counter() - start
    logps.sum().backward()
    total = time.perf_counter() - start
    return {
        "forward_s": forward,
        "backward_s": total - forward,
        "total_s": total,
        "logps_sum": float(logps.sum()),
        "hn_mean": float(hn.mean()),
        "grad_weight_norm": float(inputs["weight"].grad.float().norm()),
    }


def _worker(args: argparse.Namespace) -> None:
    import torch

    dtype = getattr(torch, args.dtype)
    vocab = args.worker_vocab

    def make(batch: int, seq: int) -> dict:
        return _inputs(batch, seq, vocab, args.hidden, dtype, args.completion_fraction)

    chunk_size = args.chunk_size[0] if args.worker == "chunked" else None
    _forward_backward(args.worker, make(1, 16), vocab, chunk_size)
    inputs = make(args.batch, args.worker_seq)
    before = _rss_bytes()
    runs = []
    for _ in range(args.repeats):
        inputs["weight"].grad = None
        inputs["hidden"].grad = None
        runs.append(_forward_backward(args.worker, inputs, vocab, chunk_size))
    peak = peak_rss_bytes()
    result = min(runs, key=lambda run: run["total_s"])
    result.update(
        baseline_rss_mib=before / MIB,
        peak_rss_mib=peak / MIB,
        peak_rss_delta_mib=(peak - before) / MIB,
        torch_threads=torch.get_num_threads(),
    )
    print(json.dumps(result))


def _run_one(args: argparse.Namespace, case: dict) -> dict:
    variant, seq, vocab, chunk_size = case["variant"], case["seq"], case["vocab"], case["chunk"]
    command = [sys.executable, str(Path(__file__).resolve()), "--worker", variant]
    command += ["--worker-seq", str(seq), "--worker-vocab", str(vocab), "--batch", str(args.batch)]
    command += ["--hidden", str(args.hidden), "--dtype", args.dtype, "--repeats", str(args.repeats)]
    if chunk_size is not None:
        command += ["--chunk-size", str(chunk_size)]
    command += ["--completion-fraction", str(args.completion_fraction)]
    pythonpath = os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, **ALLOCATORS[case["allocator"]], "PYTHONPATH": pythonpath}
    row = {"variant": variant, "seq": seq, "vocab": vocab, "allocator": case["allocator"]}
    row |= {"batch": args.batch, "hidden": args.hidden, "dtype": args.dtype}
    row["chunk_size"] = chunk_size
    row["fp32_logits_mib"] = args.batch * seq * vocab * 4 / MIB
    if variant == "naive" and row["fp32_logits_mib"] > args.max_naive_logits_mib:
        return row | {"error": f"skipped: fp32 logits over {args.max_naive_logits_mib:g} MiB"}
    try:
        done = subprocess.run(
            command, env=env, capture_output=True, text=True, timeout=args.timeout
        )
    except subprocess.TimeoutExpired:
        return row | {"error": f"timed out after {args.timeout} s"}
    if done.returncode != 0:
        return row | {"error": f"exit {done.returncode}: {done.stderr.strip()[-500:]}"}
    return row | json.loads(done.stdout.strip().splitlines()[-1])


_COLUMNS = (
    Column("batch", "B"),
    Column("seq", "T"),
    Column("vocab", "V"),
    Column("hidden", "H"),
    Column("dtype"),
    Column("variant"),
    Column("chunk_size", "chunk"),
    Column("allocator"),
    Column("fp32_logits_mib", "fp32 logits MiB", ".0f"),
    Column("peak_rss_delta_mib", "peak RSS delta MiB", ".0f"),
    Column("forward_s", "forward s", ".2f"),
    Column("backward_s", "backward s", ".2f"),
    Column("total_s", "total s", ".2f"),
    Column("logps_sum", "logps sum", ".6g"),
    Column("hn_mean", "Hn mean", ".6f"),
)


def _table(rows: list[dict]) -> Table:
    columns = _COLUMNS + ((Column("error"),) if any("error" in row for row in rows) else ())
    return Table(
        "Chunked vs naive logp + entropy: peak memory and time (forward + backward)",
        rows,
        columns,
        note="peak RSS delta = VmHWM minus RSS before the measured run (inputs allocated); "
        "logps sum and Hn mean must agree between variants.",
    )


def _cases(args: argparse.Namespace) -> list[dict]:
    runs = [("naive", None)] if "naive" in args.variants else []
    runs += [("chunked", size) for size in args.chunk_size if "chunked" in args.variants]
    grid = itertools.product(args.vocab, args.seq, args.allocators, runs)
    return [
        {"vocab": vocab, "seq": seq, "allocator": allocator, "variant": variant, "chunk": chunk}
        for vocab, seq, allocator, (variant, chunk) in grid
    ]


def _label(row: dict) -> str:
    chunk = f" {row['chunk_size']}" if row["chunk_size"] else ""
    return f"{row['variant']}{chunk}, T={row['seq']}"


def _figure(rows: list[dict]) -> object:
    """Peak RSS delta and total time against the vocabulary, one line per variant and length."""
    figure, axes = new_figure(ncols=2, size=(5.0, 3.8))
    measured = [row for row in rows if "error" not in row]
    for label in dict.fromkeys(_label(row) for row in measured):
        line = sorted((r for r in measured if _label(r) == label), key=lambda r: r["vocab"])
        style = "--" if label.startswith("naive") else "-"
        vocab = [r["vocab"] for r in line]
        axes[0][0].plot(vocab, [r["peak_rss_delta_mib"] for r in line], style, marker="o")
        axes[0][1].plot(vocab, [r["total_s"] for r in line], style, marker="o", label=label)
    for ax, ylabel in zip(axes[0], ("peak RSS delta (MiB)", "forward + backward (s)"), strict=True):
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("vocabulary size V")
        ax.set_ylabel(ylabel)
    axes[0][1].legend(fontsize=7)
    figure.suptitle(f"logp + entropy from hidden states, B={rows[0]['batch']}, {rows[0]['dtype']}")
    figure.tight_layout()
    return figure


def _findings(rows: list[dict]) -> list[str]:
    """Per (V, T): naive peak and time against the best chunked variant's."""
    lines = []
    for vocab, seq in dict.fromkeys((r["vocab"], r["seq"]) for r in rows):
        case = [r for r in rows if (r["vocab"], r["seq"]) == (vocab, seq) and "error" not in r]
        chunked = [r for r in case if r["variant"] == "chunked"]
        naive = [r for r in case if r["variant"] == "naive"]
        if not chunked:
            continue
        best = min(chunked, key=lambda r: r["peak_rss_delta_mib"])
        text = (
            f"V={vocab}, T={seq}: chunked ({best['chunk_size']}) peaks at "
            f"{best['peak_rss_delta_mib']:.0f} MiB in {best['total_s']:.2f} s"
        )
        if naive:
            text += (
                f"; naive at {naive[0]['peak_rss_delta_mib']:.0f} MiB "
                f"({naive[0]['peak_rss_delta_mib'] / max(best['peak_rss_delta_mib'], 1):.1f}x) "
                f"in {naive[0]['total_s']:.2f} s"
            )
        else:
            text += "; naive skipped (memory guard)"
        lines.append(text)
    return lines


def main(argv: list[str] | None = None) -> None:
    """Run every case in its own subprocess and write the results with a figure."""
    args = _parse_args(argv)
    if args.worker:
        _worker(args)
        return
    started = time.perf_counter()
    rows = []
    for case in _cases(args):
        row = _run_one(args, case)
        print(json.dumps(row), flush=True)
        rows.append(row)
    settings = {k: v for k, v in vars(args).items() if not k.startswith("worker")}
    files = write_results(
        "memory_entropy",
        title="Chunked vs naive logp + entropy: peak memory and time",
        description=__doc__.split("\n\n", 1)[1].rsplit("\n\n", 2)[0],
        tables=[_table(rows)],
        findings=_findings(rows),
        settings=settings,
        figure=_figure(rows),
        out=args.out,
        started=started,
    )
    print(f"wrote {files.json} and {files.markdown}")


if __name__ == "__main__":
    main()
