"""Starting or joining Ray, the same way on a laptop and on a cluster."""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Iterator
from contextlib import contextmanager

import ray

from raypo.console import verbose

logger = logging.getLogger(__name__)

REPORT_POLL_ENV = "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"
REPORT_POLL_SECONDS = "0.25"
"""How often Ray Train's controller polls the workers (and takes their reports) on a local Ray
that raypo starts; on a cluster, set the variable in the job's runtime environment."""


def init_ray() -> bool:
    """Join the Ray cluster this process belongs to, or start a local one.

    Inside ``ray job submit`` (or with ``RAY_ADDRESS`` set) this connects to that cluster; otherwise
    it starts a single-node Ray on this machine, with its dashboard: besides showing the run, the
    dashboard serves the State API, through which Ray Train's placement-group cleaner learns that
    a run's controller is gone. Without it the workers' CPUs of a run that ended abruptly (a
    sweep trial stopped by ASHA) stay reserved, and on a small machine the next trial waits for
    them forever. A no-op when Ray is already initialised, so tests and notebooks can start Ray
    with their own resources first. Returns whether it started a local Ray (which its caller
    then stops: :func:`local_ray`).
    """
    if not verbose():
        # Ray's deprecation notices about its own internals (raised inside Ray Data and Ray
        # Train, not by raypo's calls) are not the user's to act on. Importing Ray puts its own
        # filter for them first, so this one goes in front of it here.
        warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"ray\.")
    if ray.is_initialized():
        return False
    address = os.environ.get("RAY_ADDRESS")
    started = not address
    # Ray's own INFO lines (the dashboard's address, ...) and what its processes print (workers'
    # report lines and library notices, the raylet's warnings) only with --verbose
    # (raypo.console); they stay in the session's logs. Failures still reach the driver as
    # exceptions with the worker's traceback.
    quiet = {"logging_level": logging.INFO if verbose() else logging.WARNING}
    quiet["log_to_driver"] = verbose()
    if address:
        ray.init(address=address, **quiet)
    else:
        # Ray Train's controller takes a worker's report when it polls, every this many seconds
        # (2 by default), and a worker's next report waits until it has: with logging_steps 1 a
        # fast step would take 2 s. The local cluster's processes inherit this environment.
        os.environ.setdefault(REPORT_POLL_ENV, REPORT_POLL_SECONDS)
        ray.init(include_dashboard=True, **quiet)
    logger.info("ray: %s", ray.cluster_resources())
    return started


@contextmanager
def local_ray() -> Iterator[None]:
    """Ray, as :func:`init_ray` joins or starts it, for the duration of the block; a local
    cluster started here is stopped on every way out of it (an error, Ctrl-C), so that its
    processes (raylet, GCS, dashboard, runtime-env and dashboard agents, workers) do not outlive
    the command. A Ray joined or started by someone else is left running."""
    started = init_ray()
    try:
        yield
    finally:
        if started:
            ray.shutdown()


def disable_data_progress_bars() -> None:
    """Silence Ray Data's progress bars (tests, and runs whose output is a log file)."""
    from ray.data import DataContext

    context = DataContext.get_current()
    context.enable_progress_bars = False
    context.enable_operator_progress_bars = False


@contextmanager
def data_progress_bars(enabled: bool) -> Iterator[None]:
    """Ray Data's progress bars on (``enabled``: a terminal) or off for the datasets executed
    inside the block, whatever the console's default (:mod:`raypo.console`); one bar per
    dataset, not one per operator."""
    from ray.data import DataContext

    context = DataContext.get_current()
    saved = (context.enable_progress_bars, context.enable_operator_progress_bars)
    context.enable_progress_bars, context.enable_operator_progress_bars = enabled, False
    try:
        yield
    finally:
        context.enable_progress_bars, context.enable_operator_progress_bars = saved
