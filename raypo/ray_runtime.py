"""Starting or joining Ray, the same way on a laptop and on a cluster."""

from __future__ import annotations

import logging
import os

import ray

logger = logging.getLogger(__name__)


def init_ray() -> None:
    """Join the Ray cluster this process belongs to, or start a local one.

    Inside ``ray job submit`` (or with ``RAY_ADDRESS`` set) this connects to that cluster; otherwise
    it starts a single-node Ray on this machine. A no-op when Ray is already initialised, so tests
    and notebooks can start Ray with their own resources first.
    """
    if ray.is_initialized():
        return
    address = os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address)
    else:
        ray.init(include_dashboard=False)
    logger.info("ray: %s", ray.cluster_resources())


def disable_data_progress_bars() -> None:
    """Silence Ray Data's progress bars (tests, and runs whose output is a log file)."""
    from ray.data import DataContext

    context = DataContext.get_current()
    context.enable_progress_bars = False
    context.enable_operator_progress_bars = False
