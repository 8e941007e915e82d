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

Example (the recorded results)::

    python benchmarks/memory_entropy.py --batch 8 --seq 1024 --vocab 32000
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO_ROOT / "benchmarks" / "results" / "memory_entropy"
ALLOCATORS = {"glibc-default": {}, "glibc-mmap-64k": {"MALLOC_MMAP_THRESHOLD_": "65536"}}
MIB = 2**20


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Peak RSS and time of chunked vs naive logp + entropy, forward + backward "
        "from hidden states and an lm-head (each run in its own subprocess).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--batch", type=int, default=8, help="sequences per batch")
    parser.add_argument("--seq", type=int, nargs="+", default=[1024], help="sequence lengths")
    parser.add_argument(
        "--vocab",
        type=int,
        nargs="+",
        default=[32000],
        help="vocabulary sizes (e.g. 8000 32000 128000)",
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
        "--allocators", nargs="+", choices=sorted(ALLOCATORS), default=sorted(ALLOCATORS)
    )
    parser.add_argument("--repeats", type=int, default=1, help="timed runs; the fastest is kept")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds per subprocess")
    parser.add_argument(
        "--out", type=Path, default=DEFAULT_OUT, help="output path stem: writes STEM.json, STEM.md"
    )
    parser.add_argument("--worker", choices=["naive", "chunked"], help=argparse.SUPPRESS)
    parser.add_argument("--worker-seq", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--worker-vocab", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.variants = args.variants or ["naive", "chunked"]
    return args


def _peak_rss_bytes() -> int:
    """This process image's peak RSS; ru_maxrss would survive execve and report the parent's."""
    with open("/proc/self/status") as status:
        line = next(line for line in status if line.startswith("VmHWM:"))
    return int(line.split()[1]) * 1024


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
    peak = _peak_rss_bytes()
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
    try:
        done = subprocess.run(
            command, env=env, capture_output=True, text=True, timeout=args.timeout
        )
    except subprocess.TimeoutExpired:
        return row | {"error": f"timed out after {args.timeout} s"}
    if done.returncode != 0:
        return row | {"error": f"exit {done.returncode}: {done.stderr.strip()[-500:]}"}
    return row | json.loads(done.stdout.strip().splitlines()[-1])


def _markdown(rows: list[dict], meta: dict) -> str:
    lines = [
        "# Chunked vs naive logp + entropy: peak memory and time (forward + backward)",
        "",
        f"Produced by `{meta['command']}` on {meta['machine']} "
        f"({meta['cpus']} CPUs, torch {meta['torch']}); {meta['note']}",
        "",
        "| B | T | V | H | dtype | variant | chunk | allocator | fp32 logits MiB "
        "| peak RSS delta MiB | forward s | backward s | total s | logps sum | Hn mean |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        head = (
            f"| {row['batch']} | {row['seq']} | {row['vocab']} | {row['hidden']} | {row['dtype']} "
            f"| {row['variant']} | {row['chunk_size'] or '-'} | {row['allocator']} "
            f"| {row['fp32_logits_mib']:.0f} "
        )
        if "error" in row:
            lines.append(head + f"| failed: {row['error'][:80]} | | | | | |")
            continue
        lines.append(
            head + f"| {row['peak_rss_delta_mib']:.0f} | {row['forward_s']:.2f} "
            f"| {row['backward_s']:.2f} | {row['total_s']:.2f} | {row['logps_sum']:.6g} "
            f"| {row['hn_mean']:.6f} |"
        )
    return "\n".join(lines) + "\n"


def _cases(args: argparse.Namespace) -> list[dict]:
    runs = [("naive", None)] if "naive" in args.variants else []
    runs += [("chunked", size) for size in args.chunk_size if "chunked" in args.variants]
    grid = itertools.product(args.vocab, args.seq, args.allocators, runs)
    return [
        {"vocab": vocab, "seq": seq, "allocator": allocator, "variant": variant, "chunk": chunk}
        for vocab, seq, allocator, (variant, chunk) in grid
    ]


def main(argv: list[str] | None = None) -> None:
    args = _parse_args(argv)
    if args.worker:
        _worker(args)
        return
    import torch

    started = time.perf_counter()
    rows = []
    for case in _cases(args):
        row = _run_one(args, case)
        print(json.dumps(row), flush=True)
        rows.append(row)
    meta = {
        "command": "python benchmarks/memory_entropy.py " + " ".join(sys.argv[1:]),
        "machine": platform.platform(),
        "cpus": os.cpu_count(),
        "torch": torch.__version__,
        "wall_s": time.perf_counter() - started,
        "note": "peak RSS delta = VmHWM minus RSS before the measured run (inputs allocated); "
        "logps sum and Hn mean must agree between variants.",
    }
    stem = args.out.with_suffix("") if args.out.suffix in (".json", ".md") else args.out
    stem.parent.mkdir(parents=True, exist_ok=True)
    stem.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    stem.with_suffix(".md").write_text(_markdown(rows, meta))
    print(f"wrote {stem.with_suffix('.json')} and {stem.with_suffix('.md')}")


if __name__ == "__main__":
    main()
