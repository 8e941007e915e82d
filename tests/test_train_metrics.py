"""metrics.jsonl, the progress line, report_to backends and the cross-worker average."""

from __future__ import annotations

import json
import socket
import sys
import time
import types
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from raypo.config import config_to_dict, load_config
from raypo.train.metrics import (
    MetricsLogger,
    TrackerRun,
    flat_params,
    mean_metrics_across_workers,
    read_metrics,
)


def test_jsonl_lines_in_order_with_epoch_and_time(tmp_path: Path) -> None:
    logger = MetricsLogger(tmp_path / "run", report_to=[], is_main=True)
    logger.log(10, {"loss": 0.69, "rewards/accuracies": 0.5}, epoch=0.5)
    logger.log(20, {"loss": 0.5, "grad_norm": float("nan")})
    # Flushed per line: readable before close.
    records = read_metrics(tmp_path / "run")
    logger.close()
    logger.close()
    assert [r["step"] for r in records] == [10, 20]
    assert records[0]["epoch"] == 0.5 and "epoch" not in records[1]
    assert records[0]["loss"] == 0.69 and records[0]["rewards/accuracies"] == 0.5
    assert records[1]["grad_norm"] is None  # NaN is written as null (strict JSON)
    assert abs(records[0]["time"] - time.time()) < 60
    assert list(records[0])[:3] == ["step", "epoch", "time"]
    for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines():
        json.loads(line, parse_constant=lambda token: pytest.fail(f"non-JSON {token}"))


def test_appends_to_an_existing_file(tmp_path: Path) -> None:
    for step in (1, 2):
        logger = MetricsLogger(tmp_path, report_to=[], is_main=True)
        logger.log(step, {"loss": 1.0})
        logger.close()
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2]


def test_non_main_process_writes_nothing(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    # Not even a missing backend matters off rank 0.
    logger = MetricsLogger(tmp_path / "run", ["wandb"], is_main=False)
    logger.log(1, {"loss": 1.0})
    logger.close()
    assert not (tmp_path / "run").exists()
    assert read_metrics(tmp_path / "run") == []
    assert capsys.readouterr().out == ""


@pytest.mark.parametrize("backend", ["tensorboard", "wandb", "mlflow"])
def test_missing_backend_is_a_clear_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, backend: str
) -> None:
    module = {"tensorboard": "torch.utils.tensorboard"}.get(backend, backend)
    monkeypatch.setitem(sys.modules, module, None)  # makes `import module` raise ImportError
    message = f"trainer.report_to lists {backend} but {backend} is not installed: pip install "
    with pytest.raises(RuntimeError, match=message + backend):
        MetricsLogger(tmp_path, [backend], is_main=True)
    assert not (tmp_path / "metrics.jsonl").exists()


def test_unknown_backend_is_rejected(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="comet"):
        MetricsLogger(tmp_path, ["comet"], is_main=True)


def test_metrics_are_forwarded_to_wandb(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple] = []

    class Run:
        def log(self, values: dict, step: int) -> None:
            calls.append(("log", values, step))

        def finish(self) -> None:
            calls.append(("finish",))

    def init(**kwargs: object) -> Run:
        calls.append(("init", kwargs))
        return Run()

    monkeypatch.setitem(sys.modules, "wandb", types.SimpleNamespace(init=init))
    logger = MetricsLogger(tmp_path / "my-run", ["wandb"], is_main=True)
    logger.log(3, {"loss": 0.5})
    logger.close()
    assert calls == [
        (
            "init",
            {
                "project": "raypo",
                "name": "my-run",
                "tags": None,
                "config": {},
                "dir": str(tmp_path / "my-run"),
            },
        ),
        ("log", {"loss": 0.5}, 3),
        ("finish",),
    ]


def test_trackers_get_the_project_name_tags_and_resolved_config(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[tuple] = []

    class Run:
        def finish(self) -> None:
            calls.append(("finish",))

    def init(**kwargs: object) -> Run:
        calls.append(("wandb.init", kwargs))
        return Run()

    mlflow = types.SimpleNamespace(
        set_experiment=lambda name: calls.append(("mlflow.set_experiment", name)),
        start_run=lambda **kwargs: calls.append(("mlflow.start_run", kwargs)),
        log_params=lambda params: calls.append(("mlflow.log_params", params)),
        end_run=lambda: calls.append(("mlflow.end_run",)),
    )
    monkeypatch.setitem(sys.modules, "wandb", types.SimpleNamespace(init=init))
    monkeypatch.setitem(sys.modules, "mlflow", mlflow)
    config = config_to_dict(
        load_config(None, ["--trainer.tracker_project=prefs", "--trainer.tracker_tags=a,b"])
    )
    tracker = TrackerRun("prefs", "beta-0.1", ("a", "b"), config)
    MetricsLogger(tmp_path, ["wandb", "mlflow"], is_main=True, tracker=tracker).close()
    wandb_init = calls[0][1]
    assert (wandb_init["project"], wandb_init["name"], wandb_init["tags"]) == (
        "prefs",
        "beta-0.1",
        ["a", "b"],
    )
    assert wandb_init["config"]["loss"]["beta"] == 0.1
    assert calls[1:3] == [
        ("mlflow.set_experiment", "prefs"),
        ("mlflow.start_run", {"run_name": "beta-0.1", "tags": {"a": "", "b": ""}}),
    ]
    params = calls[3][1]
    assert params["loss.beta"] == 0.1 and params["trainer.tracker_tags"] == "['a', 'b']"
    assert params["trainer.max_steps"] == "None"


def test_flat_params_joins_nested_keys() -> None:
    assert flat_params({"loss": {"beta": 0.1}, "seed": 3, "tags": ["x"]}) == {
        "loss.beta": 0.1,
        "seed": 3,
        "tags": "['x']",
    }


def test_mean_without_distributed_returns_local_values() -> None:
    assert not dist.is_initialized()
    local = {"loss": torch.tensor(0.25), "rewards/accuracies": torch.tensor(0.75)}
    assert mean_metrics_across_workers(local) == {"loss": 0.25, "rewards/accuracies": 0.75}
    assert mean_metrics_across_workers({}) == {}


def _average_on_rank(rank: int, port: int, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    # Insertion order differs between ranks on purpose: keys are matched by name.
    if rank == 0:
        local = {"loss": torch.tensor(1.0), "acc": torch.tensor(0.5)}
    else:
        local = {"acc": torch.tensor(1.0, dtype=torch.float32), "loss": torch.tensor(3.0)}
    result = mean_metrics_across_workers(local)
    dist.destroy_process_group()
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(result))


def test_mean_across_two_gloo_workers(tmp_path: Path) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    mp.spawn(_average_on_rank, args=(port, str(tmp_path)), nprocs=2, join=True)
    for rank in (0, 1):
        result = json.loads((tmp_path / f"rank{rank}.json").read_text())
        # (1 + 3) / 2 = 2 and (0.5 + 1) / 2 = 0.75 on both ranks.
        assert result == {"acc": 0.75, "loss": 2.0}
