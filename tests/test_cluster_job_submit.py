"""``ray job submit`` of a tiny ``raypo train`` to a two-node Ray cluster started on this machine.

The test starts a head node and a second worker node with ``ray start --block`` (each its own
process group and its own ``--temp-dir``: Ray allows per-node temp dirs since ray-project/ray
PR #57735), on their own loopback addresses (127.0.0.2 and 127.0.0.3: Ray rewrites 127.0.0.1 to
the machine's network address, any other loopback address it keeps), and free ports, so it shares
nothing with another Ray on the machine. It submits the job the way cluster/README.md tells users
to, from a checkout with ``--working-dir``, with the entrypoint form of the RayJob manifests
(CONFIG plus ``--resume RUN_DIR``: start, or continue after a restart), and each Train worker
reserving 2 of a node's 3 CPUs so the two workers must run on different nodes. To stay within a
few minutes on 2 cores the run skips the quickstart's tiny fit and precomputed reference pass
and the held-out evaluation (tests/test_train_e2e.py covers those) and trains 2 steps on 48
pairs. It stops only the
processes it started: ``ray stop`` would kill every Ray on the machine.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from ray.job_submission import JobStatus, JobSubmissionClient

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
"""The bin directory of this Python: its `ray` and `raypo` are the ones the nodes must run."""
HEAD_IP, WORKER_IP = "127.0.0.2", "127.0.0.3"
NODE_CPUS = 3
"""Logical CPUs per node: a Train worker's 2 leave 1 for Ray Data's tasks beside it."""
START_TIMEOUT_S = 150.0
JOB_TIMEOUT_S = 600.0
EXCLUDES = [".git", ".venv", "runs", "tests", "benchmarks", "cluster", ".*_cache", "*.egg-info"]
"""Left out of the uploaded working directory: only raypo/ and configs/ are needed."""


@dataclass(frozen=True)
class LocalCluster:
    """A head and a worker node started by this test."""

    dashboard: str
    """The job server's address, http://HOST:PORT."""
    gcs: str
    """The head's GCS address, HOST:PORT."""
    temp_root: Path
    """Parent of both nodes' temp dirs and logs."""


def _free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind((HEAD_IP, 0))
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def _node_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_ADDRESS")}
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    env.update(
        RAY_AUTH_MODE="disabled",
        RAY_TRAIN_HEALTH_CHECK_INTERVAL_S="0.1",
        RAY_USAGE_STATS_ENABLED="0",
        # a loaded 2-core machine may need more than the default 60 s to register a node
        RAY_raylet_start_wait_time_s="120",
    )
    return env


def _start_node(arguments: list[str], temp_dir: Path, log: Path) -> subprocess.Popen:
    temp_dir.mkdir()
    with open(log, "w") as stream:
        return subprocess.Popen(
            [str(BIN / "ray"), "start", *arguments, f"--temp-dir={temp_dir}", "--block"],
            stdout=stream,
            stderr=subprocess.STDOUT,
            env=_node_env(),
            start_new_session=True,  # a process group of its own, to stop it and only it
        )


def _wait_for(condition: Callable[[], bool], timeout_s: float, what: str, log: Path) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout_s:.0f} s waiting for {what}:\n{log.read_text()}")
        time.sleep(1.0)


def _started(process: subprocess.Popen, log: Path) -> Callable[[], bool]:
    def check() -> bool:
        if process.poll() is not None:
            pytest.fail(f"ray start exited with {process.returncode}:\n{log.read_text()}")
        return "Ray runtime started" in log.read_text()

    return check


def _stop(processes: list[subprocess.Popen], temp_root: Path) -> None:
    """SIGTERM then SIGKILL the nodes' process groups, then any process still naming their temp
    dirs (workers that left the group)."""
    for process in processes:
        _signal_group(process.pid, signal.SIGTERM)
    time.sleep(3.0)
    for process in processes:
        _signal_group(process.pid, signal.SIGKILL)
        process.wait(timeout=30)
    marker = str(temp_root).encode()
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            if marker in cmdline.read_bytes():
                os.kill(int(cmdline.parent.name), signal.SIGKILL)
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            continue


def _signal_group(pgid: int, signal_number: int) -> None:
    try:
        os.killpg(pgid, signal_number)
    except ProcessLookupError:
        return


@pytest.fixture
def local_cluster(raypo_cache: str) -> Iterator[LocalCluster]:
    """Two Ray nodes on this machine; both stopped afterwards."""
    # short: Ray's unix socket paths under the temp dir must stay below 108 bytes
    temp_root = Path(tempfile.mkdtemp(prefix="raypo-2n-"))
    gcs, dashboard, head_agent, worker_agent, client = _free_ports(5)
    head_log, worker_log = temp_root / "head.log", temp_root / "worker.log"
    common = [f"--num-cpus={NODE_CPUS}", "--disable-usage-stats"]
    head = _start_node(
        [
            "--head",
            f"--node-ip-address={HEAD_IP}",
            f"--port={gcs}",
            "--include-dashboard=true",
            f"--dashboard-host={HEAD_IP}",
            f"--dashboard-port={dashboard}",
            f"--dashboard-agent-listen-port={head_agent}",
            f"--ray-client-server-port={client}",
            *common,
        ],
        temp_root / "head",
        head_log,
    )
    processes = [head]
    try:
        _wait_for(_started(head, head_log), START_TIMEOUT_S, "the head node", head_log)
        worker = _start_node(
            [
                f"--address={HEAD_IP}:{gcs}",
                f"--node-ip-address={WORKER_IP}",
                f"--dashboard-agent-listen-port={worker_agent}",
                *common,
            ],
            temp_root / "worker",
            worker_log,
        )
        processes.append(worker)
        _wait_for(_started(worker, worker_log), START_TIMEOUT_S, "the worker node", worker_log)
        yield LocalCluster(f"http://{HEAD_IP}:{dashboard}", f"{HEAD_IP}:{gcs}", temp_root)
    finally:
        _stop(processes, temp_root)
        shutil.rmtree(temp_root, ignore_errors=True)


def _ray_job(cluster: LocalCluster, command: str, *arguments: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(BIN / "ray"), "job", command, "--address", cluster.dashboard, *arguments],
        capture_output=True,
        text=True,
        env=_node_env(),
        cwd=REPO,
        timeout=120,
    )


def test_ray_job_submit_trains_on_two_nodes(local_cluster: LocalCluster) -> None:
    run_dir = local_cluster.temp_root / "runs" / "quickstart"
    storage = local_cluster.temp_root / "ray"
    job_id = "raypo-two-node-test"
    submit = _ray_job(
        local_cluster,
        "submit",
        "--submission-id",
        job_id,
        "--no-wait",
        "--working-dir",
        ".",
        "--runtime-env-json",
        # RAY_ADDRESS: Ray Train's helper actors look for "the" local Ray, and this machine
        # may run others (the test session's own, for one)
        json.dumps({"excludes": EXCLUDES, "env_vars": {"RAY_ADDRESS": local_cluster.gcs}}),
        "--",
        "raypo",
        "train",
        "configs/quickstart.yaml",
        f"--run_dir={run_dir}",
        f"--trainer.storage_path={storage}",
        f"--resume={run_dir}",
        "--model.tiny_fit_steps=0",
        "--reference.mode=online",
        "--data.max_rows=48",
        "--data.max_length=96",
        "--data.max_prompt_length=64",
        "--data.eval_fraction=0",
        "--trainer.cpus_per_worker=2",
        "--trainer.per_device_batch_size=4",
        "--trainer.max_steps=2",
        "--trainer.save_steps=2",
        "--trainer.logging_steps=1",
    )
    assert submit.returncode == 0, submit.stdout + submit.stderr
    client = JobSubmissionClient(local_cluster.dashboard)
    deadline = time.monotonic() + JOB_TIMEOUT_S
    while not client.get_job_status(job_id).is_terminal() and time.monotonic() < deadline:
        time.sleep(2.0)
    status, logs = client.get_job_status(job_id), client.get_job_logs(job_id)
    # 2 workers x 2 CPUs do not fit one 3-CPU node: success means both nodes trained
    assert status == JobStatus.SUCCEEDED, f"job ended {status}:\n{logs[-6000:]}"
    assert f"run directory: {run_dir}" in logs
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics if "loss" in m] == [1, 2]
    assert (run_dir / "final" / "config.json").is_file()
    assert any(p.is_dir() for p in (storage / "quickstart").glob("checkpoint_*"))
