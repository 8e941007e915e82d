"""Forward + backward time of every objective's per-pair loss in raypo.losses on a batch (CPU).

Every objective of :data:`raypo.objectives.OBJECTIVES` is timed through its per-pair function in
:data:`raypo.losses.LOSS_FUNCTIONS` (what :func:`raypo.losses.preference_loss` calls), so a new
objective is timed without touching this file. The input ``h`` is random: a log-ratio margin, or
for the reference-free (SimPO-type) objectives the length-normalised margin of random log-probs
and lengths; ``w`` is a random dispersion weight. MixDPO is timed for four (family, estimator)
points of its strength distribution.

python benchmarks/loss_timing.py --batch 4096
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
from common import Column, Table, add_output_argument, write_results

from raypo.config import LossConfig
from raypo.losses import LOSS_FUNCTIONS, StrengthDistribution, length_normalised_margin
from raypo.objectives import OBJECTIVES

MIXDPO_POINTS = (
    ("lognormal", "quadrature"),
    ("lognormal", "mc"),
    ("gamma", "series"),
    ("gamma", "quadrature"),
)
"""The (family, estimator) points of MixDPO's strength distribution that are timed."""


def _per_pair(
    name: str, w: torch.Tensor, config: LossConfig, strength: StrengthDistribution | None
) -> Callable[[torch.Tensor], torch.Tensor]:
    """``h -> per-pair loss [B]`` of objective ``name``, as :func:`preference_loss` calls it."""
    return lambda h: LOSS_FUNCTIONS[name](h, w, config, strength)


def _cases(batch: int) -> dict:
    """``name -> (per-pair loss of h, h)`` for every registered objective."""
    generator = torch.Generator().manual_seed(0)
    margin = torch.randn(batch, generator=generator) * 5
    w = torch.rand(batch, generator=generator) + 0.05
    logps = -torch.rand(2, batch, generator=generator) * 200
    lengths = torch.randint(1, 300, (2, batch), generator=generator)
    normalised = length_normalised_margin(logps[0], logps[1], lengths[0], lengths[1])
    cases = {}
    for name, spec in OBJECTIVES.items():
        h = margin if spec.uses_reference else normalised
        # SimPO's own scale (Meng et al. 2024: beta 2, gamma 0.5) for the reference-free ones.
        beta, gamma = (0.1, 0.0) if spec.uses_reference else (2.0, 0.5)
        config = LossConfig(type=name, beta=beta, gamma=gamma)
        if not spec.learns_strength:
            cases[name] = (_per_pair(name, w, config, None), h)
            continue
        for family, estimator in MIXDPO_POINTS:
            strength = StrengthDistribution(family, beta, 0.5, estimator=estimator)
            cases[f"{name} ({family}, {estimator})"] = (_per_pair(name, w, config, strength), h)
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
        "forward+backward of the per-pair loss's mean; beta 0.1, and for the reference-free "
        "(SimPO-type) objectives beta 2, gamma 0.5; MixDPO with mean 0.1, CV 0.5 at each "
        "(family, estimator).",
    )
    files = write_results(
        "loss_timing",
        title="Loss timing",
        description="Forward + backward time of every objective's per-pair function "
        "(raypo.losses.LOSS_FUNCTIONS, one per name of raypo.objectives.OBJECTIVES) on a batch of "
        "random margins (CPU, single process).",
        tables=[table],
        settings=args,
        out=args.out,
        started=started,
    )
    print(files.markdown.read_text())


if __name__ == "__main__":
    main()
