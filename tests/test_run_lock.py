"""One writer per run directory (raypo.run_lock), the CLI's early refusal, and the resume's rule
on changed settings (raypo.train.resume.resumed_config)."""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from raypo.config import load_config, save_config
from raypo.run_layout import RunLayout
from raypo.run_lock import RunLock, RunLocked, refuse_if_locked

HOLD = """
import sys, time
from pathlib import Path
from raypo.run_lock import RunLock
lock = RunLock(Path(sys.argv[1])).acquire()
print("held", flush=True)
time.sleep(600)
"""


@pytest.fixture
def holder(tmp_path: Path):
    """Another process holding the lock of ``tmp_path / 'run'``; killed (SIGKILL) at the end."""
    process = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(tmp_path / "run")], stdout=subprocess.PIPE, text=True
    )
    assert process.stdout.readline().strip() == "held"
    yield process
    process.kill()
    process.wait()


def test_a_second_writer_is_refused_naming_the_holder(tmp_path: Path, holder) -> None:
    with pytest.raises(RunLocked) as refused:
        RunLock(tmp_path / "run").acquire()
    message = str(refused.value)
    assert f"host {socket.gethostname()}, pid {holder.pid}" in message
    assert "choose another --run_dir" in message
    with pytest.raises(RunLocked, match=f"pid {holder.pid}"):
        refuse_if_locked(tmp_path / "run")


def test_the_lock_of_a_killed_run_is_taken_over_with_a_warning(
    tmp_path: Path, holder, caplog: pytest.LogCaptureFixture
) -> None:
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    refuse_if_locked(tmp_path / "run")  # free: the kernel dropped the dead holder's lock
    with caplog.at_level(logging.WARNING), RunLock(tmp_path / "run") as lock:
        assert lock.held
    assert f"stale lock of host {socket.gethostname()}, pid {holder.pid}" in caplog.text


def test_released_on_every_way_out_and_refused_in_the_same_process(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError), RunLock(tmp_path / "run"):
        with pytest.raises(RunLocked, match=f"pid {os.getpid()}"):
            RunLock(tmp_path / "run").acquire()
        raise RuntimeError("the run failed")
    assert RunLayout(tmp_path / "run").lock.read_text() == ""  # released cleanly: not stale
    with RunLock(tmp_path / "run") as lock:
        assert lock.held


def test_an_unwritable_run_directory_is_named(tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    with pytest.raises(SystemExit, match=f"cannot write the run directory {blocker}/run"):
        RunLock(blocker / "run").acquire()


def test_raypo_train_into_a_locked_run_directory_is_refused_within_seconds(
    tmp_path: Path, holder
) -> None:
    run = tmp_path / "run"
    save_config(load_config(None, [f"--run_dir={run}"]), RunLayout(run).config)
    started = time.monotonic()
    refused = subprocess.run(
        [sys.executable, "-m", "raypo", "train", "--resume", str(run)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    seconds = time.monotonic() - started
    assert refused.returncode != 0
    assert f"is in use by another run (host {socket.gethostname()}, pid {holder.pid}" in (
        refused.stderr
    )
    assert "Traceback" not in refused.stderr
    # No torch, Ray or DeepSpeed import before the answer (their import alone takes ~10 s here).
    assert seconds < 8, seconds


def _saved_and_given(tmp_path: Path, *given: str):
    from raypo.train.resume import resumed_config

    run = f"--run_dir={tmp_path / 'run'}"
    saved = load_config(None, [run, "--trainer.max_steps=20", "--trainer.logging_steps=5"])
    return resumed_config(saved, load_config(None, [run, *given]), "RUN/config.yaml")


def test_resume_refuses_a_changed_max_steps_naming_the_difference(tmp_path: Path) -> None:
    with pytest.raises(SystemExit) as refused:
        _saved_and_given(tmp_path, "--trainer.max_steps=30", "--seed=7")
    message = str(refused.value)
    assert "trainer.max_steps: 20 -> 30" in message and "seed: 42 -> 7" in message
    assert "trainer.logging_steps" not in message.split("Refused")[1]


def test_resume_takes_the_safe_changes_and_keeps_the_rest(tmp_path: Path) -> None:
    config = _saved_and_given(
        tmp_path, "--trainer.max_steps=20", "--trainer.logging_steps=1", "--eval.batch_size=3"
    )
    assert (config.trainer.max_steps, config.trainer.logging_steps) == (20, 1)
    assert config.eval.batch_size == 3


def test_resume_accepts_the_runs_fit_of_the_tiny_model_for_tiny(tmp_path: Path) -> None:
    """A run given ``tiny`` saved the ``final/`` of its fit of it (raypo.train.run.fit_tiny_model);
    the same CONFIG given again with --resume is the same run."""
    from raypo.train.resume import resumed_config
    from raypo.train.sft import TINY_FIT_REPORT

    fit = RunLayout(tmp_path / "run").tiny_fit
    fitted = fit / "final"
    fitted.mkdir(parents=True)
    (fit / TINY_FIT_REPORT).write_text('{"fingerprint": "f"}')
    run = f"--run_dir={tmp_path / 'run'}"
    saved = load_config(
        None, [run, f"--model.name_or_path={fitted}", f"--model.tokenizer_name_or_path={fitted}"]
    )
    config = resumed_config(saved, load_config(None, [run]), "RUN/config.yaml")
    assert config.model.name_or_path == str(fitted)
    (fit / TINY_FIT_REPORT).unlink()  # an unfinished fit is not the run's model
    with pytest.raises(SystemExit, match="model.name_or_path"):
        resumed_config(saved, load_config(None, [run]), "RUN/config.yaml")
