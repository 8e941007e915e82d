"""Forward + backward time of every objective of raypo.losses on a batch of margins (CPU).

python benchmarks/loss_timing.py --batch 4096 --out benchmarks/results/loss_timing
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch

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
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=4096)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--out", default="benchmarks/results/loss_timing")
    args = parser.parse_args()
    rows = [
        {"objective": name, "ms": round(1e3 * _time(fn, x, args.repeats), 3)}
        for name, (fn, x) in _cases(args.batch).items()
    ]
    meta = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{platform.platform()}, {torch.get_num_threads()} torch threads",
        "torch": torch.__version__,
        "batch": args.batch,
        "note": "median forward+backward of the per-pair loss's mean; MixDPO at default points",
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({**meta, "results": rows}, indent=2) + "\n")
    table = ["| objective | ms (fwd+bwd) |", "|---|---|"]
    table += [f"| {row['objective']} | {row['ms']} |" for row in rows]
    header = f"# loss timing ({meta['date']})\n\nbatch {args.batch}; {meta['machine']}; "
    header += f"torch {meta['torch']}. {meta['note']}.\n\n"
    out.with_suffix(".md").write_text(header + "\n".join(table) + "\n")
    print("\n".join(table))


if __name__ == "__main__":
    main()
