"""The raypo command line: help for every command, override handling, dispatch to the module that
implements a command, and one-line errors (exit status 2, no traceback)."""

from __future__ import annotations

import importlib
import os
import re
import subprocess
import sys
import time
import types
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from raypo import cli
from raypo.config import RaypoConfig, load_config, save_config
from raypo.run_layout import RunLayout

REPO = Path(__file__).resolve().parents[1]
QUICKSTART = str(REPO / "configs" / "quickstart.yaml")


def run_raypo(*args: str, module: str = "raypo.cli") -> subprocess.CompletedProcess[str]:
    """``python -m raypo.cli ARGS`` in a fresh interpreter, with this checkout importable."""
    path = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        capture_output=True,
        text=True,
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": path},
        timeout=120,
    )


@pytest.mark.parametrize(
    ("command", "fragment"),
    [
        ([], "Preference optimisation (MallowsPO, MixDPO and the DPO family)"),
        (["prepare"], "validate every row"),
        (["train"], "with the objective loss.type"),
        (["eval"], "Sample completions for held-out prompts"),
        (["tune"], "Search tune.search_space with Ray Tune"),
        (["report"], "Rebuild RUN_DIR/eval/report.md"),
        (["config"], "Inspect configurations without running anything"),
        (["config", "show"], "Print the resolved configuration"),
        (["config", "fields"], "List every config field"),
        (["objectives"], "List the preference objectives"),
    ],
)
def test_every_command_has_help_that_says_what_it_does(command: list[str], fragment: str) -> None:
    result = run_raypo(*command, "--help")
    assert result.returncode == 0, result.stderr
    assert fragment in " ".join(result.stdout.split())


def test_train_help_documents_the_override_syntax() -> None:
    result = run_raypo("train", "--help")
    assert "--SECTION.FIELD VALUE   or   --SECTION.FIELD=VALUE" in result.stdout
    assert "--resume RUN_DIR" in result.stdout


def test_python_dash_m_raypo_runs_the_cli() -> None:
    result = run_raypo("--help", module="raypo")
    assert result.returncode == 0 and result.stdout.startswith("usage: raypo")


def test_help_imports_neither_torch_nor_ray() -> None:
    code = (
        "import sys\n"
        "from raypo.cli import main\n"
        "try:\n    main(['train', '--help'])\n"
        "except SystemExit:\n    pass\n"
        "print(sorted(m for m in ('torch', 'ray', 'deepspeed') if m in sys.modules))\n"
    )
    path = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    result = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": path},
        timeout=60,
    )
    assert result.stdout.strip().splitlines()[-1] == "[]", result.stderr


def test_config_show_prints_the_resolved_yaml_with_overrides() -> None:
    result = run_raypo("config", "show", QUICKSTART, "--loss.beta", "0.3", "--seed=5")
    assert result.returncode == 0, result.stderr
    shown = yaml.safe_load(result.stdout)
    assert shown["loss"]["beta"] == 0.3 and shown["seed"] == 5
    assert shown["loss"]["type"] == "mallows_theta"  # from the file
    assert shown["trainer"]["zero_stage"] == 2


def test_a_bad_override_exits_2_with_one_line_and_no_traceback() -> None:
    result = run_raypo("config", "show", QUICKSTART, "--loss.beta", "0")
    assert result.returncode == 2
    assert result.stderr == "raypo: error: loss.beta = 0.0 (from command line): must be > 0\n"
    assert result.stdout == ""


def test_an_unknown_override_key_is_named_with_a_suggestion(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert cli.main(["config", "show", QUICKSTART, "--trainer.zero_stag", "3"]) == 2
    error = capsys.readouterr().err
    assert "trainer.zero_stag = '3' (from command line): unknown key" in error
    assert "did you mean trainer.zero_stage?" in error and "Traceback" not in error


def test_a_bad_value_in_the_file_names_the_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("trainer:\n  zero_stage: 4\n")
    assert cli.main(["config", "show", str(path)]) == 2
    assert capsys.readouterr().err == (
        f"raypo: error: trainer.zero_stage = 4 (from {path}): must be in [0, 3]\n"
    )


def test_split_overrides_separates_config_flags_from_arguments() -> None:
    argv = ["train", "--loss.beta", "0.2", "c.yaml", "--seed=3", "--resume", "r", "--name", "x"]
    rest, overrides = cli.split_overrides(argv)
    assert rest == ["train", "c.yaml", "--resume", "r"]
    assert overrides == ["--loss.beta", "0.2", "--seed=3", "--name", "x"]
    # A negative number is a value, not a flag; a flag followed by a flag has no value.
    assert cli.split_overrides(["--loss.gamma", "-1", "--loss.beta", "--x.y", "1"])[1] == [
        "--loss.gamma",
        "-1",
        "--loss.beta",
        "--x.y",
        "1",
    ]


@pytest.fixture
def recorded(monkeypatch: pytest.MonkeyPatch) -> list[tuple[RaypoConfig, object]]:
    """Route every run command to a fake implementation that records its arguments."""
    calls: list[tuple[RaypoConfig, object]] = []
    module = types.ModuleType("fake_raypo_command")

    def main(config: RaypoConfig, args: object) -> int:
        calls.append((config, args))
        return 0

    module.main = main  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "fake_raypo_command", module)
    for command in cli.COMMANDS:
        monkeypatch.setitem(cli.COMMANDS, command, "fake_raypo_command:main")
    return calls


def test_train_hands_the_validated_config_to_its_module(
    recorded: list[tuple[RaypoConfig, object]],
) -> None:
    # Overrides may come before CONFIG: they never swallow the positional argument.
    assert cli.main(["train", "--loss.beta", "0.2", QUICKSTART, "--trainer.num_workers=1"]) == 0
    (config, args), *_ = recorded
    assert (config.loss.beta, config.trainer.num_workers, config.loss.type) == (
        0.2,
        1,
        "mallows_theta",
    )
    assert args.command == "train"


def test_train_resume_reads_the_run_directory_config(
    tmp_path: Path, recorded: list[tuple[RaypoConfig, object]]
) -> None:
    saved = load_config(QUICKSTART, ["--name", "resumed"])
    save_config(saved, RunLayout(tmp_path).config)
    assert cli.main(["train", "--resume", str(tmp_path)]) == 0
    assert recorded[0][0] == saved


def test_eval_policy_and_baseline_flags_are_config_overrides(
    recorded: list[tuple[RaypoConfig, object]],
) -> None:
    assert cli.main(["eval", "--policy", "runs/a/final", "--baseline", "runs/b/final"]) == 0
    config = recorded[0][0]
    assert (config.eval.policy, config.eval.baseline) == ("runs/a/final", "runs/b/final")


@pytest.mark.parametrize("form", ["separate", "equals"])
def test_eval_of_a_run_directory_reads_its_saved_config(
    tmp_path: Path, recorded: list[tuple[RaypoConfig, object]], form: str
) -> None:
    save_config(load_config(QUICKSTART, ["--seed", "11"]), RunLayout(tmp_path).config)
    flags = ["--run_dir", str(tmp_path)] if form == "separate" else [f"--run_dir={tmp_path}"]
    assert cli.main(["eval", *flags, "--eval.num_prompts", "3"]) == 0
    config = recorded[0][0]
    assert (config.seed, config.loss.type, config.eval.num_prompts) == (11, "mallows_theta", 3)
    assert config.run_dir == str(tmp_path)


def test_report_reads_the_config_saved_in_the_run_directory(
    tmp_path: Path, recorded: list[tuple[RaypoConfig, object]]
) -> None:
    save_config(load_config(None, ["--seed", "11"]), RunLayout(tmp_path).config)
    assert cli.main(["report", str(tmp_path)]) == 0
    assert recorded[0][0].seed == 11


def test_train_without_a_config_is_a_usage_error(
    recorded: list[tuple[RaypoConfig, object]], capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as caught:
        cli.main(["train"])
    assert caught.value.code == 2
    assert "train needs CONFIG (or --resume RUN_DIR)" in capsys.readouterr().err
    assert recorded == []


def test_a_command_whose_module_is_missing_exits_2_naming_it(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setitem(cli.COMMANDS, "prepare", "raypo.no_such_module:main")
    assert cli.main(["prepare", "--data.max_rows", "5"]) == 2
    assert capsys.readouterr().err == (
        "raypo prepare: not available: this raypo installation has no raypo.no_such_module, "
        "the module that implements it\n"
    )


def test_objectives_lists_the_registry(capsys: pytest.CaptureFixture[str]) -> None:
    from raypo.objectives import OBJECTIVES

    assert cli.main(["objectives"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in lines] == list(OBJECTIVES)
    simpo = next(line for line in lines if line.startswith("simpo "))
    assert "reference-free" in simpo and OBJECTIVES["simpo"].summary in simpo


def test_config_fields_documents_a_section(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["config", "fields", "loss"]) == 0
    out = capsys.readouterr().out
    assert "loss.beta  (a number, > 0; default 0.1)" in out
    assert "trainer." not in out


@pytest.fixture
def restored_environ() -> Iterator[None]:
    """``raypo train`` sets the console's environment variables (raypo.console) in its process:
    restore them after an in-process run."""
    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)


@pytest.mark.parametrize(
    ("flag", "hint"),
    [
        ("--learning_rate", "TRL's learning_rate is raypo's trainer.learning_rate"),
        ("--num_train_epochs", "TRL's num_train_epochs is raypo's trainer.num_epochs"),
        ("--trainer.per_device_train_batch_size", "raypo's trainer.per_device_batch_size"),
        ("--model_name_or_path", "TRL's model_name_or_path is raypo's model.name_or_path"),
        ("--bf16", "TRL's bf16 is raypo's model.dtype: bf16"),
        ("--output_dir", "TRL's output_dir is raypo's run_dir"),
        ("--precompute_ref_log_probs", "raypo's reference.mode: precomputed"),
    ],
)
def test_trl_names_with_or_without_a_section_get_raypo_s_key(
    flag: str, hint: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(["config", "show", QUICKSTART, flag, "1"]) == 2
    error = capsys.readouterr().err
    assert error.startswith(f"raypo: error: {flag[2:]} = '1' (from command line): unknown key; ")
    assert hint in error


def test_trl_s_sigmoid_loss_is_pointed_at_dpo(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["config", "show", QUICKSTART, "--loss.type", "sigmoid"]) == 2
    assert "TRL's loss_type 'sigmoid' is raypo's 'dpo'" in capsys.readouterr().err


def test_every_config_error_is_reported_at_once(capsys: pytest.CaptureFixture[str]) -> None:
    overrides = ["--loss.beta=0", "--trainer.zero_stag=3", "--trainer.num_workers=0", "--seed=x"]
    assert cli.main(["config", "show", QUICKSTART, *overrides]) == 2
    keys = [line.split(" = ")[0] for line in capsys.readouterr().err.splitlines()]
    assert sorted(keys) == sorted(
        f"raypo: error: {key}"
        for key in ("loss.beta", "trainer.zero_stag", "trainer.num_workers", "seed")
    )


def test_config_and_input_errors_come_before_torch_and_ray_are_imported(tmp_path: Path) -> None:
    # A bad value, then a missing data path: each is reported without importing either.
    code = (
        "import sys\n"
        "from raypo.cli import main\n"
        f"assert main(['train', {QUICKSTART!r}, '--loss.beta', '0']) == 2\n"
        f"assert main(['train', {QUICKSTART!r}, '--data.path', {str(tmp_path / 'no.jsonl')!r},"
        f" '--run_dir', {str(tmp_path / 'run')!r}]) == 2\n"
        "print(sorted({'torch', 'ray', 'deepspeed'} & set(sys.modules)))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120
    )
    assert result.stdout == "[]\n", result.stderr
    assert "loss.beta = 0.0 (from command line): must be > 0" in result.stderr
    assert f"data.path = '{tmp_path / 'no.jsonl'}'" in result.stderr
    assert "no such file or directory" in result.stderr
    assert not (tmp_path / "run").exists()


def test_a_gpu_asked_of_a_cpu_only_ray_fails_before_any_work(
    ray_session: None,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    restored_environ: None,
) -> None:
    run_dir = tmp_path / "run"
    # Imported first: the bound is on the work done before the error (none), not on how fast
    # torch and Ray Train import on a loaded test machine.
    importlib.import_module("raypo.train.run")
    capsys.readouterr()
    started = time.monotonic()
    status = cli.main(["train", QUICKSTART, "--trainer.use_gpu=true", f"--run_dir={run_dir}"])
    elapsed = time.monotonic() - started
    out, err = capsys.readouterr()
    assert status == 2 and elapsed < 30
    assert out == ""
    assert err.startswith("raypo: error: trainer.use_gpu = True: asks for 2 GPU(s)")
    assert "the cluster has 0 GPU(s) and 4 CPU(s) in all" in err
    # No data, config or model written (the run's lock and empty directories may exist).
    written = [p for p in run_dir.rglob("*") if p.is_file() and not p.name.startswith(".")]
    assert written == []


_OWN_LINE = re.compile(
    r"^(raypo (train|prepare): |step \d+/\d+ |held-out |  (likelihood|implicit-reward) accuracy|"
    r"run directory: |metrics: |final policy: )"
)
"""raypo's own console lines (stage lines, progress, held-out lines, the summary)."""


@pytest.mark.slow
def test_the_quickstart_console_is_short_and_raypo_s_own(tmp_path: Path) -> None:
    # The quickstart's stages on fewer rows and steps: data, tiny fit, reference pass, plan,
    # progress, held-out evaluations and the summary, each on its own line.
    result = subprocess.run(
        [
            str(Path(sys.executable).parent / "raypo"),
            "train",
            QUICKSTART,
            f"--run_dir={tmp_path / 'run'}",
            "--data.max_rows=64",
            "--model.tiny_fit_steps=5",
            "--trainer.max_steps=4",
            "--trainer.logging_steps=1",
            "--trainer.eval_steps=2",
            "--trainer.save_steps=0",
            "--eval.during_training_num_prompts=0",
        ],
        # One stream, in the order a terminal shows it (Ray's C++ notices go to stderr).
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        cwd=REPO,
        timeout=1800,  # about a minute on an idle 2-core machine; far more on a loaded one
    )
    console = result.stdout.splitlines()
    assert result.returncode == 0, "\n".join(console[-40:])
    own = [line for line in console if _OWN_LINE.match(line)]
    assert len(console) < 60 and len(own) >= 0.8 * len(console), "\n".join(console)
    text = "\n".join(own)
    for fragment in (
        "raypo train: data: read 64 rows from builtin:hh_sample, accepted ",
        "raypo train: tiny fit: 5 steps",
        "raypo train: reference pass: ",
        "raypo train: plan: ",
        "step 4/4 (100%) | loss ",
        "held-out at step 2 (",
        "held-out result on ",
        "  likelihood accuracy (the chosen completion is the likelier): before (reference) ",
        "run directory: ",
    ):
        assert fragment in text, "\n".join(console)
    assert console[-1].startswith("final policy: ")
