"""``raypo sft``: the ``raypo train`` driver with the SFT step (:mod:`raypo.sft.loop`).

Everything but the step is ``raypo train``'s (:func:`raypo.train.run.train`): data reading,
validation, rejects and tokenisation, Ray Data streaming to the workers, DeepSpeed ZeRO 0-3,
the learning-rate schedule, ``metrics.jsonl``, checkpoints and ``--resume``, and the export of
``final/`` (Hugging Face format with the tokenizer). An SFT run has no reference model and no
objective: :func:`sft_config` sets the config so that none is loaded or computed.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys

from raypo.config import LossConfig, RaypoConfig
from raypo.data.validate import DataQualityError
from raypo.run_layout import RunLayout
from raypo.sft.loop import sft_micro_step
from raypo.train.progress import summary_lines
from raypo.train.run import TrainResult, train
from raypo.train.worker_plan import Recipe

SFT = Recipe(command="sft", micro_step=sft_micro_step, uses_reference=False, sft_data=True)
"""``raypo sft``'s recipe: the SFT step, no reference values, SFT data (prompt/completion and
messages rows, or the chosen completions of pairs)."""


def sft_config(config: RaypoConfig) -> RaypoConfig:
    """``config`` as an SFT run trains it: no tiny-model pre-fit (SFT is that fit), no
    reference model on the workers (``precomputed`` loads none, and :data:`SFT` skips its
    pass), and the default objective in place of one whose parameters the workers would build
    (MixDPO's strength distribution)."""
    reference = dataclasses.replace(config.reference, mode="precomputed")
    model = dataclasses.replace(config.model, tiny_fit_steps=0)
    return dataclasses.replace(config, model=model, reference=reference, loss=LossConfig())


def sft(config: RaypoConfig, resume: bool = False) -> TrainResult:
    """Fine-tune ``config.model`` on the prompt + completion of each row of ``config.data``
    (a pair's chosen completion; :mod:`raypo.data.formats` lists the row shapes);
    ``resume`` continues the run in ``config.run_path`` as ``raypo train --resume`` does."""
    return train(sft_config(config), resume=resume, recipe=SFT)


def main(config: RaypoConfig, args: argparse.Namespace) -> int:
    """CLI entry of ``raypo sft``."""
    resume_dir = getattr(args, "resume", None)
    if resume_dir:
        config = dataclasses.replace(config, run_dir=str(resume_dir))
    try:
        result = sft(config, resume=bool(resume_dir))
    except DataQualityError as error:
        print(f"raypo sft: {error}", file=sys.stderr)
        return 1
    for line in summary_lines(result.metrics):
        print(line)
    print(f"run directory: {result.run_path}")
    print(f"metrics: {RunLayout(result.run_path).metrics}")
    print(f"final model: {result.final_dir} (use it as model.name_or_path of raypo train)")
    return 0
