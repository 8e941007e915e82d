"""The CLI entries of ``raypo sft`` and ``raypo prepare``, which run :mod:`raypo.train.run`'s
driver: SFT is ``raypo train`` with the SFT recipe, and preparing a run that trains the embedded
tiny model fits it first (:func:`raypo.train.run.fit_tiny_model`)."""

from __future__ import annotations

import argparse
import dataclasses
import sys

from raypo.config import RaypoConfig
from raypo.data.prepare import prepare, prepare_report
from raypo.data.validate import DataQualityError
from raypo.ray_runtime import local_ray
from raypo.run_lock import RunLock
from raypo.train.run import TrainResult, fit_tiny_model, print_result, train
from raypo.train.sft import SFT, sft_config


def sft(config: RaypoConfig, resume: bool = False) -> TrainResult:
    """Fine-tune ``config.model`` on the prompt + completion of each row of ``config.data``
    (a pair's chosen completion; :mod:`raypo.data.formats` lists the row shapes);
    ``resume`` continues the run in ``config.run_path`` as ``raypo train --resume`` does."""
    return train(sft_config(config), resume=resume, recipe=SFT)


def sft_main(config: RaypoConfig, args: argparse.Namespace) -> int:
    """CLI entry of ``raypo sft``."""
    resume_dir = getattr(args, "resume", None)
    if resume_dir:
        config = dataclasses.replace(config, run_dir=str(resume_dir))
    try:
        result = sft(config, resume=bool(resume_dir))
    except DataQualityError as error:
        print(f"raypo sft: {error}", file=sys.stderr)
        return 1
    final = f"final model: {result.final_dir} (use it as model.name_or_path of raypo train)"
    print_result(result, final)
    return 0


def prepare_main(config: RaypoConfig, args: argparse.Namespace) -> int:
    """CLI entry of ``raypo prepare``: the tiny model's fit when asked, then every stage before
    training; prints the summary and where everything was written."""
    del args
    try:
        with RunLock(config.run_path, "raypo prepare"), local_ray():
            run = prepare(fit_tiny_model(config, "prepare"))
    except DataQualityError as error:
        print(f"raypo prepare: {error}", file=sys.stderr)
        return 1
    print(prepare_report(run))
    return 0
