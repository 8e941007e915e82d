"""The embedded tiny model's fit (``model.tiny_fit_steps``) as a ``raypo sft`` run into
``RUN_DIR/tiny-fit`` (:mod:`raypo.train.sft`, :func:`raypo.train.run.fit_tiny_model`). The fit
end to end (it lowers the completion loss, its final/ is the run's model, it is reused) is
checked by tests/test_train_e2e.py's MixDPO run, which fits on ZeRO-3 workers."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from raypo.config import load_config
from raypo.models import TINY_NAME
from raypo.run_layout import RunLayout
from raypo.train.sft import (
    TINY_FIT_BATCH_SIZE,
    TINY_FIT_LEARNING_RATE,
    needs_tiny_fit,
    tiny_fit_config,
    tiny_fit_fingerprint,
)


def _config(run_dir: Path, *overrides: str):
    return load_config(
        None,
        [
            f"--run_dir={run_dir}",
            "--data.path=builtin:hh_sample",
            "--data.schema=hh",
            "--data.max_rows=64",
            "--data.max_length=96",
            "--data.max_prompt_length=64",
            "--data.eval_fraction=0.25",
            "--data.num_cpus_per_op=0.25",
            "--trainer.num_workers=2",
            "--trainer.cpus_per_worker=0.5",
            "--trainer.torch_adam=true",
            "--trainer.learning_rate=1e-4",
            "--trainer.max_steps=3",
            "--trainer.eval_steps=1",
            "--trainer.report_to=[tensorboard]",
            "--eval.during_training_num_prompts=2",
            "--model.lora.enabled=true",
            "--model.tiny_fit_steps=12",
            *overrides,
        ],
    )


def test_the_fit_is_an_sft_run_of_its_own_settings(tmp_path: Path) -> None:
    """The fit trains every weight of the tiny model at its own rate and batch on the run's data,
    split and workers, into RUN_DIR/tiny-fit, with nothing of the preference run's schedule,
    evaluation, adapters or trackers."""
    config = _config(tmp_path / "run")
    fit = tiny_fit_config(config)
    assert needs_tiny_fit(config) and not needs_tiny_fit(fit)
    assert fit.run_path == RunLayout(config.run_path).tiny_fit
    assert fit.model.name_or_path == TINY_NAME and not fit.model.lora.enabled
    assert fit.data == config.data and fit.seed == config.seed
    assert fit.reference.mode == "precomputed"  # no reference model loaded on the workers
    trainer = fit.trainer
    assert trainer.num_workers == 2 and trainer.per_device_batch_size * 2 == TINY_FIT_BATCH_SIZE
    assert (trainer.learning_rate, trainer.max_steps) == (TINY_FIT_LEARNING_RATE, 12)
    assert (trainer.save_steps, trainer.eval_steps, trainer.report_to) == (0, 0, [])
    assert fit.eval.during_training_num_prompts == 0
    assert not needs_tiny_fit(_config(tmp_path / "b", "--model.tiny_fit_steps=0"))
    assert not needs_tiny_fit(_config(tmp_path / "c", "--model.name_or_path=gpt2"))


def test_the_fingerprint_follows_what_the_fit_depends_on(tmp_path: Path) -> None:
    data = tmp_path / "pairs.jsonl"
    data.write_text('{"prompt": "p", "chosen": "a", "rejected": "b"}\n')
    base = _config(tmp_path / "run", f"--data.path={data}", "--data.schema=auto")
    print_ = tiny_fit_fingerprint(tiny_fit_config(base))
    for unrelated in ("--loss.beta=3", "--trainer.tracker_project=x", "--trainer.num_epochs=2"):
        same = _config(tmp_path / "run", f"--data.path={data}", "--data.schema=auto", unrelated)
        assert tiny_fit_fingerprint(tiny_fit_config(same)) == print_, unrelated  # no refit
    for change in ("--model.tiny_fit_steps=13", "--seed=1", "--data.max_length=80"):
        other = _config(tmp_path / "run", f"--data.path={data}", "--data.schema=auto", change)
        assert tiny_fit_fingerprint(tiny_fit_config(other)) != print_, change
    data.write_text('{"prompt": "p", "chosen": "a", "rejected": "c"}\n')
    os.utime(data, ns=(1, 1))  # another content, another modification time
    assert tiny_fit_fingerprint(tiny_fit_config(base)) != print_


def test_files_raypo_did_not_write_are_not_replaced(tmp_path: Path) -> None:
    """A tiny-fit/ of the user's own (no raypo lock file in it) is an error, left as it was;
    so is a prepared run given to train() with a config that still asks for the fit."""
    from raypo.data.prepare import PreparedRun
    from raypo.train.run import fit_tiny_model, train

    config = _config(tmp_path / "run")
    fit_dir = RunLayout(config.run_path).tiny_fit
    fit_dir.mkdir(parents=True)
    (fit_dir / "notes.txt").write_text("mine")
    with pytest.raises(SystemExit, match="holds files raypo did not write"):
        fit_tiny_model(config)
    assert [p.name for p in fit_dir.iterdir()] == ["notes.txt"]
    prepared = PreparedRun(data=None, reference=None, seconds={})  # never read: refused first
    with pytest.raises(ValueError, match="fit_tiny_model"):
        train(config, prepared=prepared)
