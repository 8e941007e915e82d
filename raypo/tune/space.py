"""The search space of ``raypo tune`` and how a trial's sampled values become its config.

``tune.search_space`` maps dotted config keys to expressions (parsed and checked against the
fields by :mod:`raypo.config_base`); here they become Ray Tune domains, and a trial's sampled
values are applied to the sweep's config to give the trial's own complete config.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ray import tune

from raypo.config import RaypoConfig, TuneConfig, config_from_dict, config_to_dict
from raypo.config_base import parse_search_expression


def search_domains(tune_config: TuneConfig) -> dict[str, Any]:
    """``tune.search_space`` as Tune domains keyed by dotted config key (grid: grid_search)."""
    samplers = {"uniform": tune.uniform, "loguniform": tune.loguniform, "randint": tune.randint}
    domains: dict[str, Any] = {}
    for key, expression in tune_config.search_space.items():
        name, args = parse_search_expression(expression)
        if name == "choice":
            choose = tune.grid_search if tune_config.search_alg == "grid" else tune.choice
            domains[key] = choose(args[0])
        else:
            domains[key] = samplers[name](*args)
    return domains


def _plain(value: Any) -> Any:
    """A numpy scalar from a Tune sampler as the Python value the config accepts."""
    return value.item() if hasattr(value, "item") else value


def apply_params(
    base: RaypoConfig, params: Mapping[str, Any], name: str, run_dir: str
) -> RaypoConfig:
    """``base`` with each dotted ``params`` key set, renamed, in ``run_dir``, no tune section."""
    data = config_to_dict(base)
    for key, value in params.items():
        *sections, field_name = key.split(".")
        target = data
        for section in sections:
            target = target[section]
        target[field_name] = _plain(value)
    data.update(name=name, run_dir=run_dir, tune={})
    return config_from_dict(data)
