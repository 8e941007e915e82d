"""raypo.config: every shipped config loads, overrides convert, and each bad setting is one clear
ConfigError naming the key, the value and the source (file or command line)."""

from __future__ import annotations

import dataclasses
import inspect
from pathlib import Path

import pytest

from raypo.config import (
    SECTIONS,
    ConfigError,
    LossConfig,
    RaypoConfig,
    config_to_dict,
    field_help,
    field_index,
    load_config,
    save_config,
)
from raypo.config_base import attribute_docstrings, parse_search_expression

REPO = Path(__file__).resolve().parents[1]
CONFIG_FILES = sorted((REPO / "configs").glob("*.yaml"))

# The registry raypo.losses.OBJECTIVES must offer (issue 3 / the shared contract).
OBJECTIVE_NAMES = [
    "dpo",
    "ipo",
    "hinge",
    "simpo",
    "mallows_theta",
    "mallows_theta_ipo",
    "mallows_theta_simpo",
    "mallows_phi",
    "mixdpo",
]


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "run.yaml"
    path.write_text(text)
    return path


PIPELINE_CONFIGS = {
    "pythia-2.8b-hh-sft.yaml",
    "pythia-2.8b-hh.yaml",
    "pythia-2.8b-hh-mixdpo.yaml",
    "llama-3-8b-ultrafeedback-mallows.yaml",
}
"""The papers' pipelines (cluster/README.md, "The papers' pipelines")."""
HH_SUBSETS = ["harmless-base", "helpful-base", "helpful-online", "helpful-rejection-sampled"]
"""Anthropic/hh-rlhf's preference data_dirs (160,800 train pairs together, its default config)."""


def test_the_configs_directory_is_not_empty() -> None:
    names = {path.name for path in CONFIG_FILES}
    assert {"quickstart.yaml", "pythia-2.8b-hh.yaml", "llama-3-8b-ultrafeedback.yaml"} <= names
    assert PIPELINE_CONFIGS <= names


def test_the_hh_pipelines_start_from_the_sft_stage_s_export() -> None:
    """The SFT stage reads the HH data the preference stages read; its ``final/`` is their policy
    and reference; the MixDPO config reads HH's subsets as groups and scores a win rate."""
    configs = REPO / "configs"
    sft = load_config(configs / "pythia-2.8b-hh-sft.yaml")
    export = str(sft.run_path / "final")
    mallows = load_config(configs / "pythia-2.8b-hh.yaml")
    mixdpo = load_config(configs / "pythia-2.8b-hh-mixdpo.yaml")
    for config in (mallows, mixdpo):
        assert config.model.name_or_path == config.reference_model_path == export
        assert config.eval.reward_model is not None
    assert mallows.data == sft.data and mallows.loss.type == "mallows_theta"
    assert mixdpo.loss.type == "mixdpo"
    assert (mixdpo.data.subsets, mixdpo.data.group_field) == (HH_SUBSETS, None)
    assert dataclasses.replace(mixdpo.data, subsets=[]) == sft.data
    sweep = load_config(configs / "sweep-pythia-2.8b-hh.yaml")
    assert sweep.model.name_or_path == f"/mnt/shared/raypo/{sft.name}/final"


def test_the_llama_mallows_config_is_the_ultrafeedback_recipe_with_mallows_theta() -> None:
    configs = REPO / "configs"
    recipe = load_config(configs / "llama-3-8b-ultrafeedback.yaml")
    mallows = load_config(configs / "llama-3-8b-ultrafeedback-mallows.yaml")
    assert (mallows.loss.type, mallows.loss.beta) == ("mallows_theta", recipe.loss.beta)
    same = dataclasses.replace(
        mallows,
        name=recipe.name,
        loss=recipe.loss,
        reference=dataclasses.replace(mallows.reference, cache_dir=recipe.reference.cache_dir),
        eval=dataclasses.replace(mallows.eval, reward_model=recipe.eval.reward_model),
    )
    assert same == recipe


@pytest.mark.parametrize("path", CONFIG_FILES, ids=lambda p: p.name)
def test_every_shipped_config_loads_validates_and_round_trips(path: Path, tmp_path: Path) -> None:
    config = load_config(path)
    assert isinstance(config, RaypoConfig)
    assert load_config(save_config(config, tmp_path / "resolved.yaml")) == config


def test_quickstart_is_the_offline_cpu_job_the_readme_promises() -> None:
    config = load_config(REPO / "configs" / "quickstart.yaml")
    assert config.model.name_or_path == "tiny"
    assert config.data.path == "builtin:hh_sample"
    assert config.loss.type == "mallows_theta"
    assert config.reference.mode == "precomputed"
    assert (config.trainer.num_workers, config.trainer.zero_stage) == (2, 2)
    assert (config.trainer.use_gpu, config.model.dtype, config.trainer.torch_adam) == (
        False,
        "fp32",
        True,
    )


def test_defaults_are_valid_and_equal_an_empty_load() -> None:
    assert load_config(None) == RaypoConfig()
    assert RaypoConfig().loss == LossConfig(type="dpo", beta=0.1)


@pytest.mark.parametrize("name", OBJECTIVE_NAMES)
def test_every_registered_objective_is_a_valid_loss_type(name: str) -> None:
    assert load_config(None, [f"--loss.type={name}"]).loss.type == name


def test_overrides_in_both_syntaxes_convert_to_the_field_types(tmp_path: Path) -> None:
    path = write(tmp_path, "loss:\n  beta: 0.5\n  type: mallows_phi\n")
    config = load_config(
        path,
        [
            "--loss.beta",
            "0.2",
            "--trainer.num_workers=4",
            "--trainer.use_gpu",
            "true",
            "--data.group_field",
            "null",
            "--data.max_rows=10",
            "--trainer.report_to",
            "tensorboard,wandb",
            "--seed",
            "7",
            "eval.temperature=0",
            "--tune.search_space.loss.beta",
            "loguniform(0.01, 1.0)",
        ],
    )
    assert config.loss.beta == 0.2 and isinstance(config.loss.beta, float)
    assert config.loss.type == "mallows_phi"  # from the file, untouched by the overrides
    assert config.trainer.num_workers == 4 and isinstance(config.trainer.num_workers, int)
    assert config.trainer.use_gpu is True
    assert config.data.group_field is None
    assert config.data.max_rows == 10
    assert config.trainer.report_to == ["tensorboard", "wandb"]
    assert config.seed == 7
    assert config.eval.temperature == 0.0
    assert config.tune.search_space == {"loss.beta": "loguniform(0.01, 1.0)"}


def test_yaml_exponent_floats_and_ints_for_floats_are_accepted(tmp_path: Path) -> None:
    # PyYAML (YAML 1.1) reads "5e-7" as a string; users write it anyway.
    path = write(tmp_path, "trainer:\n  learning_rate: 5e-7\nloss:\n  beta: 1\n")
    config = load_config(path)
    assert config.trainer.learning_rate == 5e-7
    assert config.loss.beta == 1.0 and isinstance(config.loss.beta, float)


def test_a_mapping_override_is_read_as_yaml() -> None:
    space = "{loss.beta: 'uniform(0.05, 0.5)', loss.type: 'choice([dpo, mallows_theta])'}"
    config = load_config(None, ["--tune.search_space", space])
    assert config.tune.search_space == {
        "loss.beta": "uniform(0.05, 0.5)",
        "loss.type": "choice([dpo, mallows_theta])",
    }


FILE_ERRORS = [
    # (YAML text, key named, value named, words of the problem)
    ("loss:\n  bta: 0.2\n", "loss.bta", "0.2", "unknown key; did you mean loss.beta?"),
    ("loss:\n  learning_rate: 0.1\n", "loss.learning_rate", "0.1", "trainer.learning_rate"),
    ("lossy:\n  beta: 0.1\n", "lossy", "{'beta': 0.1}", "did you mean loss?"),
    ("seeed: 3\n", "seeed", "3", "unknown key; did you mean seed?"),
    ("loss:\n  beta: high\n", "loss.beta", "'high'", "expected a number"),
    ("trainer:\n  num_workers: 2.5\n", "trainer.num_workers", "2.5", "expected an integer"),
    ("trainer:\n  use_gpu: 1\n", "trainer.use_gpu", "1", "expected true or false"),
    ("loss:\n  beta: 0\n", "loss.beta", "0.0", "must be > 0"),
    ("loss:\n  beta: -0.1\n", "loss.beta", "-0.1", "must be > 0"),
    ("loss:\n  dispersion_scale: 0.0\n", "loss.dispersion_scale", "0.0", "must be > 0"),
    ("loss:\n  label_smoothing: 0.5\n", "loss.label_smoothing", "0.5", "must be in [0, 0.5)"),
    ("trainer:\n  zero_stage: 4\n", "trainer.zero_stage", "4", "must be in [0, 3]"),
    ("data:\n  eval_fraction: 1.0\n", "data.eval_fraction", "1.0", "must be in [0, 1)"),
    ("reference:\n  mode: offline\n", "reference.mode", "'offline'", "one of precomputed"),
    ("data:\n  format: jsnl\n", "data.format", "'jsnl'", "did you mean 'jsonl'?"),
    ("loss:\n  type: mallows\n", "loss.type", "'mallows'", "expected one of dpo, ipo"),
    ("loss: 0.1\n", "loss", "0.1", "must be a mapping of loss fields"),
    (
        "loss:\n  type: mallows_theta\nreference:\n  mode: none\n",
        "reference.mode",
        "'none'",
        "'mallows_theta' needs the reference model: its dispersion weight w(x)",
    ),
    (
        "loss:\n  type: dpo\nreference:\n  mode: none\n",
        "reference.mode",
        "'none'",
        "its margin h is a log-ratio against the reference model",
    ),
    (
        "loss:\n  type: mixdpo\n  mixdpo_estimator: series\n",
        "loss.mixdpo_estimator",
        "'series'",
        "only for loss.mixdpo_distribution gamma",
    ),
    ("data:\n  max_prompt_length: 512\n", "data.max_prompt_length", "512", "< data.max_length"),
    ("trainer:\n  offload_params: true\n", "trainer.offload_params", "True", "zero_stage 3"),
    ("model:\n  dtype: fp16\n", "model.dtype", "'fp16'", "needs trainer.use_gpu true"),
    ("trainer:\n  report_to: [neptune]\n", "trainer.report_to", "['neptune']", "tensorboard"),
    ("name: a/b\n", "name", "'a/b'", "letters, digits"),
    (
        "trainer:\n  zero_stage: 3\n  padding_free: bucketed\n",
        "trainer.padding_free",
        "'bucketed'",
        "ZeRO-3",
    ),
    ("run_dir: out/{nam}\n", "run_dir", "'out/{nam}'", "only placeholder is {name}"),
]


@pytest.mark.parametrize(("text", "key", "value", "problem"), FILE_ERRORS)
def test_a_bad_file_setting_names_key_value_and_file(
    tmp_path: Path, text: str, key: str, value: str, problem: str
) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert caught.value.key == key
    assert str(caught.value) == f"{key} = {value} (from {path}): {caught.value.problem}"
    assert problem in caught.value.problem


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["--loss.beta", "0"], "loss.beta = 0.0 (from command line): must be > 0"),
        (["--loss.beta=abc"], "loss.beta = 'abc' (from command line): expected a number"),
        (["--loss.beta"], "loss.beta = None (from command line): --loss.beta needs a value"),
        (["--seed.x", "1"], "seed.x = '1' (from command line): seed has no sub-fields"),
        (["beta"], "command line: unexpected 'beta'; an override is --section.field VALUE"),
        (
            ["--tune.search_space.loss.beta", "uniform(-1, 1)"],
            "tune.search_space.loss.beta = 'uniform(-1, 1)' (from command line): -1.0 is "
            "outside loss.beta's range: must be > 0",
        ),
    ],
)
def test_a_bad_override_names_the_command_line(overrides: list[str], message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load_config(None, overrides)
    assert str(caught.value) == message


def test_a_cross_field_error_set_on_the_command_line_says_so(tmp_path: Path) -> None:
    path = write(tmp_path, "loss:\n  type: mallows_phi\n")
    with pytest.raises(ConfigError, match=r"\(from command line\): loss.type 'mallows_phi'"):
        load_config(path, ["--reference.mode", "none"])


def test_reference_free_objectives_may_run_without_a_reference() -> None:
    config = load_config(None, ["--loss.type", "simpo", "--reference.mode", "none"])
    assert config.reference.mode == "none"
    with pytest.raises(ConfigError, match="dispersion weight w"):
        load_config(None, ["--loss.type", "mallows_theta_simpo", "--reference.mode", "none"])


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("loss: [1, 2\n", "invalid YAML at line 2, column 1"),
        ("- loss\n", "the top level must be a mapping of sections"),
    ],
)
def test_unreadable_files_name_the_file(tmp_path: Path, text: str, problem: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert str(caught.value).startswith(f"{path}: {problem}")


def test_a_missing_file_names_the_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="nowhere.yaml: no such config file"):
        load_config(tmp_path / "nowhere.yaml")


def test_constructing_sections_in_python_validates_too() -> None:
    with pytest.raises(ConfigError, match=r"^loss.beta = -1.0: must be > 0$"):
        LossConfig(beta=-1.0)
    assert LossConfig(beta="0.25").beta == 0.25  # text is parsed exactly as on the command line
    with pytest.raises(dataclasses.FrozenInstanceError):
        LossConfig().beta = 0.2  # type: ignore[misc]


def test_save_then_load_round_trips_every_field(tmp_path: Path) -> None:
    config = load_config(
        None,
        [
            "--name=trial-3",
            "--loss.type=mixdpo",
            "--loss.mixdpo_distribution=gamma",
            "--loss.mixdpo_estimator=series",
            "--loss.mixdpo_num_points=20",
            "--trainer.learning_rate=5e-7",
            "--trainer.max_steps=12",
            "--trainer.report_to=[tensorboard]",
            "--data.group_field=persona",
            "--tune.search_space.loss.beta=loguniform(0.01, 1.0)",
        ],
    )
    path = save_config(config, tmp_path / "nested" / "config.yaml")
    assert path.read_text().startswith("# resolved raypo config")
    assert load_config(path) == config
    assert config_to_dict(load_config(path))["loss"]["mixdpo_num_points"] == 20


def test_derived_paths_resolve_from_their_templates() -> None:
    config = load_config(None, ["--name", "exp1", "--model.name_or_path", "/models/sft"])
    assert config.run_path == Path("runs/exp1")
    assert config.reference_cache_path == Path("runs/exp1/reference")
    assert config.reference_model_path == "/models/sft"
    assert config.model.tokenizer_path == "/models/sft"
    other = load_config(None, ["--reference.model_name_or_path", "/models/ref"])
    assert other.reference_model_path == "/models/ref"


def test_every_field_has_a_docstring() -> None:
    classes = [RaypoConfig, *SECTIONS.values()]
    for cls in classes:
        docs = attribute_docstrings(inspect.getsourcefile(cls), cls.__name__)
        missing = [f.name for f in dataclasses.fields(cls) if not docs.get(f.name)]
        assert not missing, f"{cls.__name__} fields without a docstring: {missing}"
    rows = field_help()
    assert len(rows) == len(field_index())
    assert all(row.help for row in rows)


def test_field_help_reports_type_range_and_default() -> None:
    rows = {row.key: row for row in field_help()}
    beta = rows["loss.beta"]
    assert (beta.type, beta.bounds, beta.default) == ("a number", "> 0", 0.1)
    assert "strength" in beta.help
    assert rows["reference.mode"].type == "one of precomputed, online, none"
    assert rows["data.max_rows"].type == "an integer or null"
    assert rows["trainer.report_to"].default == []


@pytest.mark.parametrize(
    ("entry", "problem"),
    [
        ({"loss.bta": "uniform(0.1, 1)"}, "did you mean loss.beta?"),
        ({"tune.num_samples": "randint(1, 4)"}, "not a config field a trial can set"),
        ({"trainer.num_workers": "uniform(1, 4)"}, "does not fit trainer.num_workers"),
        ({"loss.beta": "normal(0, 1)"}, "expected one of uniform(...)"),
        ({"loss.beta": "loguniform(0, 1)"}, "needs lo > 0"),
        ({"loss.beta": "uniform(1, 0.5)"}, "needs lo < hi"),
        ({"loss.type": "choice([])"}, "non-empty list"),
        ({"seed": "choice([1, 2.5])"}, "each choice must be an integer"),
        ({"reference.mode": "choice([online, offline])"}, "one of precomputed"),
    ],
)
def test_search_space_entries_are_checked_against_their_fields(
    tmp_path: Path, entry: dict[str, str], problem: str
) -> None:
    key, expression = next(iter(entry.items()))
    path = write(tmp_path, f"tune:\n  search_space:\n    {key}: '{expression}'\n")
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert caught.value.key == f"tune.search_space.{key}"
    assert str(path) in str(caught.value) and problem in str(caught.value)


def test_grid_search_takes_only_choices() -> None:
    choices = ["--tune.search_alg=grid", "--tune.search_space.loss.type=choice([dpo, ipo])"]
    assert load_config(None, choices).tune.search_alg == "grid"
    with pytest.raises(ConfigError, match="a grid search takes only choice"):
        load_config(None, [*choices, "--tune.search_space.loss.beta=uniform(0.1, 1)"])


def test_search_expressions_parse_to_function_and_arguments() -> None:
    assert parse_search_expression("loguniform(0.01, 1.0)") == ("loguniform", [0.01, 1.0])
    assert parse_search_expression(" randint(1, 8) ") == ("randint", [1, 8])
    assert parse_search_expression("choice([dpo, mallows_theta])") == (
        "choice",
        [["dpo", "mallows_theta"]],
    )
    with pytest.raises(ValueError, match="takes two integers"):
        parse_search_expression("randint(1, 8.5)")


def test_the_readme_lists_every_trl_name_raypo_answers() -> None:
    from raypo.trl_names import TRL_FIELDS, TRL_LOSS_TYPES

    readme = (REPO / "README.md").read_text(encoding="utf-8")
    missing = [name for name in TRL_FIELDS if f"| `{name}` |" not in readme]
    assert missing == []
    assert all(f"`{trl}` -> `{ours}`" in readme for trl, ours in TRL_LOSS_TYPES.items())
