"""Forward + backward time of every objective of raypo.losses on a batch of margins (CPU).

python benchmarks/loss_timing.py --batch 4096
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from common import Column, Table, add_output_argument, write_results

from raypo.losses import (
    StrengthDistribution,
    dpo_loss,
    hinge_loss,
    ipo_loss,
    mallows_phi_loss,
    mallows_theta_ipo_loss,
    mallows_theta_loss,
    simpo_loss,
)


def _cases(batch: int) -> dict:
    generator = torch.Generator().manual_seed(0)
    h = torch.randn(batch, generator=generator) * 5
    w = torch.rand(batch, generator=generator) + 0.05
    logps = -torch.rand(2, batch, generator=generator) * 200
    lengths = torch.randint(1, 300, (2, batch), generator=generator)
    strengths = {
        f"mixdpo ({family}, {estimator})": StrengthDistribution(
            family, 0.1, 0.5, estimator=estimator
        )
        for family, estimator in (
            ("lognormal", "quadrature"),
            ("lognormal", "mc"),
            ("gamma", "series"),
            ("gamma", "quadrature"),
        )
    }
    cases = {
        "dpo": (lambda x: dpo_loss(x, 0.1), h),
        "ipo": (lambda x: ipo_loss(x, 0.1), h),
        "hinge": (lambda x: hinge_loss(x, 0.1), h),
        "simpo": (lambda x: simpo_loss(x, logps[1], lengths[0], lengths[1], 2.0, 0.5), logps[0]),
        "mallows_theta": (lambda x: mallows_theta_loss(x, w, 0.1), h),
        "mallows_theta_ipo": (lambda x: mallows_theta_ipo_loss(x, w, 0.1), h),
        "mallows_phi": (lambda x: mallows_phi_loss(x, w, 0.1), h),
    }
    cases |= {name: (module, h) for name, module in strengths.items()}
    return cases


def _time(fn, x: torch.Tensor, repeats: int) -> float:
    samples = []
    for _ in range(repeats + 2):
        leaf = x.clone().requires_grad_(True)
        started = time.perf_counter()
        fn(leaf).mean().backward()
        samples.append(time.perf_counter() - started)
    return statistics.median(samples[2:])


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--batch", type=int, default=4096, help="pairs per batch")
    parser.add_argument("--repeats", type=int, default=20, help="timed calls (median kept)")
    add_output_argument(parser, "loss_timing")
    args = parser.parse_args()
    started = time.perf_counter()
    rows = [
        {"objective": name, "ms": round(1e3 * _time(fn, x, args.repeats), 3)}
        for name, (fn, x) in _cases(args.batch).items()
    ]
    table = Table(
        "forward + backward time per objective",
        rows,
        [Column("objective"), Column("ms", "ms (fwd+bwd)")],
        note=f"batch {args.batch}, {torch.get_num_threads()} torch threads; median "
        "forward+backward of the per-pair loss's mean; MixDPO at default points.",
    )
    files = write_results(
        "loss_timing",
        title="Loss timing",
        description="Forward + backward time of every objective of raypo.losses on a batch of "
        "random margins (CPU, single process).",
        tables=[table],
        settings=args,
        out=args.out,
        started=started,
    )
    print(files.markdown.read_text())


if __name__ == "__main__":
    main()
