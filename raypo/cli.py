"""The ``raypo`` command line.

``prepare``, ``train``, ``eval``, ``tune`` and ``report`` load and validate the configuration here
(defaults, then the YAML file, then ``--section.field value`` overrides) and hand it to
``main(config, args) -> int`` of the module named in :data:`COMMANDS`, imported only when that
command runs: ``raypo --help`` and every ``--help`` import neither torch nor Ray. ``config show``,
``config fields`` and ``objectives`` are answered here. A bad setting prints one line naming the
key, the value and its source, and exits with status 2.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import textwrap
from collections.abc import Callable, Sequence
from pathlib import Path

from raypo import __version__
from raypo.config import (
    COMMAND_LINE,
    SECTIONS,
    ConfigError,
    RaypoConfig,
    config_to_yaml,
    field_help,
    field_index,
    load_config,
)
from raypo.console import configure as configure_console
from raypo.preflight import check_inputs, model_named
from raypo.run_layout import RunLayout
from raypo.run_lock import refuse_if_locked
from raypo.trl_names import TRL_FIELDS

COMMANDS: dict[str, str] = {
    "prepare": "raypo.train.commands:prepare_main",
    "train": "raypo.train.run:main",
    "sft": "raypo.train.commands:sft_main",
    "eval": "raypo.eval.run:main",
    "tune": "raypo.tune.run:main",
    "report": "raypo.eval.report:main",
}
"""Subcommand -> ``module:function`` implementing it, called as ``function(config, args)``."""

OVERRIDE_HELP = """\
overrides:
  Any config field can be set on the command line, as
    --SECTION.FIELD VALUE   or   --SECTION.FIELD=VALUE
  e.g. --loss.beta 0.2 --trainer.num_workers 8 --trainer.use_gpu true
  Top-level fields take no section: --seed 3, --name myrun, --run_dir out/{name}.
  Values are read as the field's type: true/false, numbers (5e-7), null for "unset",
  YAML for lists and mappings: --trainer.report_to '[tensorboard]',
  --tune.search_space.loss.beta 'loguniform(0.01, 1.0)'.
  Sections: model, data, loss, reference, trainer, eval, tune.
  `raypo config fields [SECTION]` lists every field with its type, range, default and meaning;
  `raypo config show CONFIG [overrides]` prints the resolved configuration."""

_RUN = RunLayout(Path("RUN_DIR"))
"""The run directory's files as the help names them."""

_DESCRIPTIONS = {
    "prepare": (
        "read, validate and tokenise the preference data",
        "Read the preference data (data.path), validate every row (rejected rows go to "
        f"{_RUN.rejects} with a reason), tokenise it and, with reference.mode precomputed, "
        f"run the reference model once over it. Writes {_RUN.prepared}/ and "
        f"{_RUN.data_summary}; for model.name_or_path tiny with model.tiny_fit_steps it first "
        f"fits the tiny model with raypo sft into {_RUN.tiny_fit}/. CONFIG is optional: flags "
        "such as --data.path suffice.",
    ),
    "train": (
        "train a policy on preference pairs",
        "Train the policy (model.name_or_path) with the objective loss.type on "
        "trainer.num_workers Ray Train workers with DeepSpeed ZeRO (trainer.zero_stage). Writes "
        f"the resolved config, {_RUN.metrics.name}, checkpoints and the final HF-format policy "
        f"({_RUN.final}) under RUN_DIR.",
    ),
    "sft": (
        "supervised fine-tuning on the completions (before raypo train)",
        "Fine-tune model.name_or_path on the prompt + chosen completion of each row of data.path "
        "with the completion-only next-token loss, on the same Ray Train + DeepSpeed workers, "
        f"trainer settings and run directory as raypo train. Its {_RUN.final} is a model for "
        "raypo train's model.name_or_path and reference.model_name_or_path.",
    ),
    "eval": (
        "sample from a policy, score it and write the report",
        "Sample completions for held-out prompts from a policy (eval.policy, default "
        f"{_RUN.final}) with vLLM or transformers, score them against eval.baseline, and write "
        f"{_RUN.eval_results}, {_RUN.eval_samples.name} and {_RUN.eval_report.name} with plots.",
    ),
    "tune": (
        "run a Ray Tune sweep of training runs",
        "Search tune.search_space with Ray Tune, each trial a training run; writes the trial "
        "table, the best config as a ready-to-run YAML and plots under RUN_DIR.",
    ),
    "report": (
        "rebuild a run's report, or compare runs side by side",
        f"Rebuild {_RUN.eval_report} and its plots from the files a run saved, using the "
        f"run's resolved configuration ({_RUN.config}). Given two or more run directories "
        "(`raypo report RUN_A RUN_B`), write their comparison instead: training curves, policy "
        "entropy, completion length, accuracy and margins per dispersion quintile and reward "
        "distributions with the runs side by side, and a table of headline numbers, in --out "
        "(default: compare-<A>-vs-<B> beside the runs).",
    ),
}


_RESUME_HELP = {
    "train": "continue the run in RUN_DIR from its newest whole checkpoint, with the run's own "
    f"settings ({_RUN.config}); a CONFIG or flags given with it may change only logging, "
    "checkpoint cadence, evaluation and storage",
    "sft": "continue the SFT run in RUN_DIR from its newest whole checkpoint, as train does",
    "tune": f"continue the sweep in RUN_DIR (CONFIG defaults to {_RUN.config})",
}


_OWN_OPTIONS = frozenset({"config", "resume", "policy", "baseline", "verbose", "help", "version"})
"""Options argparse answers, never taken for a config field of the same name."""


def split_overrides(argv: Sequence[str]) -> tuple[list[str], list[str]]:
    """Separate ``--section.field VALUE`` / ``--section.field=VALUE`` / ``--seed 3`` overrides
    from the arguments argparse handles. A flag with no value is kept for
    :func:`raypo.config.load_config` to report, and so is a field name given without its section
    (``--learning_rate``) or a TRL name (``--num_train_epochs``): its error suggests the key."""
    top_level = {key for key in field_index() if "." not in key}
    top_level |= {key.rpartition(".")[2] for key in field_index()} | set(TRL_FIELDS)
    top_level -= _OWN_OPTIONS
    rest: list[str] = []
    overrides: list[str] = []
    position = 0
    while position < len(argv):
        token = argv[position]
        position += 1
        flag = token[2:].partition("=")[0] if token.startswith("--") else ""
        if "." not in flag and flag not in top_level:
            rest.append(token)
            continue
        overrides.append(token)
        takes_next = "=" not in token and position < len(argv)
        if takes_next and not argv[position].startswith("--"):
            overrides.append(argv[position])
            position += 1
    return rest, overrides


def _override_value(overrides: Sequence[str], key: str) -> str | None:
    """The value given to ``--key`` among the split-off overrides, if any."""
    for position, token in enumerate(overrides):
        flag, equals, value = token.partition("=")
        if flag == f"--{key}":
            if equals:
                return value
            return overrides[position + 1] if position + 1 < len(overrides) else None
    return None


def _config_file(args: argparse.Namespace, overrides: Sequence[str] = ()) -> Path | None:
    """The YAML to load: CONFIG or --config, else the saved config of --resume or RUN_DIR (for
    ``eval``, the run directory given as ``--run_dir``, when it holds a saved config)."""
    if args.config_file and args.config_option:
        raise ConfigError(None, None, "give CONFIG or --config, not both", COMMAND_LINE)
    chosen = args.config_file or args.config_option
    if chosen:
        return Path(chosen)
    # report: the first RUN_DIR's config is loaded and validated here (a comparison reads the
    # others itself).
    reported = getattr(args, "run_dirs", None) or [None]
    run_dir = getattr(args, "resume", None) or reported[0]
    if run_dir:
        return RunLayout(Path(run_dir)).config
    if getattr(args, "command", None) == "eval":
        evaluated = _override_value(overrides, "run_dir")
        saved = RunLayout(Path(evaluated)).config if evaluated else None
        if saved is not None and saved.exists():
            return saved
    return None


def _aliases(args: argparse.Namespace) -> list[str]:
    """Overrides from options whose destination is a dotted config key (``--policy``)."""
    return [f"--{key}={value}" for key, value in vars(args).items() if "." in key and value]


def _run_external(args: argparse.Namespace, overrides: list[str]) -> int:
    """Load and validate the config, then call the command's implementation."""
    config_file = _config_file(args, overrides)
    if config_file is None and args.command in ("train", "sft", "tune"):
        args.parser.error(f"{args.command} needs CONFIG (or --resume RUN_DIR)")
    if len(getattr(args, "run_dirs", None) or []) > 1 and overrides:
        args.parser.error(
            f"a comparison reads each run's own {_RUN.config.name}; settings such as "
            f"{overrides[0]} apply to one run: give them with a single RUN_DIR"
        )
    config = load_config(config_file, overrides + _aliases(args))
    if args.command in ("prepare", "train", "sft", "tune"):
        check_inputs(config, model_named(config_file, overrides))
    configure_console(args.verbose, config.trainer.use_gpu)
    if args.command in ("prepare", "train", "sft"):
        # Answered before torch and Ray are imported: a second run is refused within seconds.
        run_path = Path(getattr(args, "resume", None) or config.run_path)
        refuse_if_locked(run_path, f"raypo {args.command}")
    # Imported only now: a bad config is reported before torch and Ray are imported.
    handler = _handler(args.command)
    if handler is None:
        module = COMMANDS[args.command].partition(":")[0]
        print(
            f"raypo {args.command}: not available: this raypo installation has no {module}, "
            f"the module that implements it",
            file=sys.stderr,
        )
        return 2
    return int(handler(config, args))


def _handler(command: str) -> Callable[[RaypoConfig, argparse.Namespace], int] | None:
    """The function implementing ``command``; None when its module is not installed."""
    module_name, _, function = COMMANDS[command].partition(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as error:
        missing = error.name or ""
        if module_name == missing or module_name.startswith(missing + "."):
            return None
        raise
    return getattr(module, function)


def _config_show(args: argparse.Namespace, overrides: list[str]) -> int:
    config = load_config(_config_file(args), overrides)
    sys.stdout.write(config_to_yaml(config))
    return 0


def _config_fields(args: argparse.Namespace, overrides: list[str]) -> int:
    _no_overrides("config fields", overrides)
    for row in field_help():
        if args.section and row.key.partition(".")[0] != args.section:
            continue
        bounds = f", {row.bounds}" if row.bounds else ""
        print(f"{row.key}  ({row.type}{bounds}; default {row.default!r})")
        print(textwrap.fill(row.help, width=96, initial_indent="    ", subsequent_indent="    "))
    return 0


def _objectives(args: argparse.Namespace, overrides: list[str]) -> int:
    _no_overrides("objectives", overrides)
    from raypo.objectives import OBJECTIVES

    width = max(len(name) for name in OBJECTIVES)
    for name, spec in OBJECTIVES.items():
        uses = (("reference", spec.uses_reference), ("w(x)", spec.uses_dispersion))
        needs = [need for need, used in uses if used]
        print(f"{name:<{width}}  {'+'.join(needs) or 'reference-free':<16}  {spec.summary}")
    return 0


def _no_overrides(command: str, overrides: list[str]) -> None:
    if overrides:
        problem = f"raypo {command} takes no config overrides (got {' '.join(overrides)})"
        raise ConfigError(None, None, problem, COMMAND_LINE)


def _add_config_arguments(parser: argparse.ArgumentParser, required: str) -> None:
    parser.add_argument(
        "config_file", nargs="?", metavar="CONFIG", help=f"YAML config file ({required})"
    )
    parser.add_argument("--config", dest="config_option", metavar="CONFIG", help="same as CONFIG")


def _subparser(
    commands: argparse._SubParsersAction, name: str, summary: str, description: str, epilog: bool
) -> argparse.ArgumentParser:
    """A subcommand parser whose --help shows ``description`` and, with ``epilog``, the
    override syntax."""
    return commands.add_parser(
        name,
        help=summary,
        description=textwrap.fill(description, width=88),
        epilog=OVERRIDE_HELP if epilog else None,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,
    )


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``raypo`` and its subcommands (overrides are split off first)."""
    parser = argparse.ArgumentParser(
        prog="raypo",
        description="Preference optimisation (MallowsPO, MixDPO and the DPO family) on Ray Train "
        "workers with DeepSpeed, from a laptop to a cluster.",
        epilog=OVERRIDE_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,
    )
    parser.add_argument("--version", action="version", version=f"raypo {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (summary, description) in _DESCRIPTIONS.items():
        sub = _subparser(commands, name, summary, description, epilog=True)
        sub.set_defaults(run=_run_external, parser=sub)
        sub.add_argument(
            "--verbose",
            action="store_true",
            help="also print Ray's, Ray Data's and the libraries' own progress and INFO logs "
            "(otherwise they are only in Ray's session logs)",
        )
        if name == "report":
            sub.add_argument(
                "run_dirs",
                nargs="+",
                metavar="RUN_DIR",
                help="a run directory; two or more: compare them",
            )
            sub.add_argument(
                "--out",
                metavar="DIR",
                help="where a comparison goes (default: compare-<A>-vs-<B> beside the runs)",
            )
            sub.set_defaults(config_file=None, config_option=None)
        else:
            optional = name in ("prepare", "eval")
            _add_config_arguments(sub, "optional" if optional else "required unless --resume")
        if name in ("train", "sft", "tune"):
            sub.add_argument(
                "--resume",
                metavar="RUN_DIR",
                help=_RESUME_HELP[name],
            )
        if name == "eval":
            sub.add_argument("--policy", dest="eval.policy", metavar="PATH", help="= --eval.policy")
            sub.add_argument(
                "--baseline", dest="eval.baseline", metavar="PATH", help="= --eval.baseline"
            )
    _add_inspection_commands(commands)
    return parser


def _add_inspection_commands(commands: argparse._SubParsersAction) -> None:
    """``config show``, ``config fields`` and ``objectives``: answered without running anything."""
    config = _subparser(
        commands,
        "config",
        "show the resolved configuration or the list of fields",
        "Inspect configurations without running anything: `config show` prints the resolved "
        "YAML, `config fields` documents every field.",
        epilog=False,
    )
    actions = config.add_subparsers(dest="action", metavar="ACTION", required=True)
    show = _subparser(
        actions,
        "show",
        "print the resolved configuration as YAML",
        "Print the resolved configuration (defaults, then CONFIG, then overrides) as YAML, "
        "after validating it.",
        epilog=True,
    )
    _add_config_arguments(show, "optional; defaults without it")
    show.set_defaults(run=_config_show)
    fields = _subparser(
        actions,
        "fields",
        "list every config field with its type, range, default and meaning",
        "List every config field: dotted key, accepted values, range, default and the "
        "docstring it has in raypo/config.py.",
        epilog=False,
    )
    fields.add_argument("section", nargs="?", choices=list(SECTIONS), help="only this section")
    fields.set_defaults(run=_config_fields)
    objectives = _subparser(
        commands,
        "objectives",
        "list the objectives loss.type accepts",
        "List the preference objectives of raypo.objectives.OBJECTIVES (the values of loss.type), "
        "what each needs (the reference model, the dispersion w(x)) and its formula.",
        epilog=False,
    )
    objectives.set_defaults(run=_objectives)


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``raypo`` with ``argv`` (default: the process arguments); returns the exit status."""
    rest, overrides = split_overrides(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(rest)
    try:
        return args.run(args, overrides)
    except ConfigError as error:
        for problem in error.errors:
            print(f"raypo: error: {problem}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
