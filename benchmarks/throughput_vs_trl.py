"""`raypo train` against TRL's DPOTrainer: pairs/s, tokens/s, whole-job wall time, peak memory.

Headline rows: ``raypo train CONFIG.yaml`` as a user runs it (a subprocess of the ``raypo``
command line: it starts a local Ray, prepares the data with Ray Data, runs the reference pass
when the reference is precomputed, then trains on 1 Ray Train worker with DeepSpeed ZeRO-2 and
torch Adam, checkpoints and exports the policy), once with ``reference.mode: online`` and once
with ``precomputed``, against TRL 1.16's ``DPOTrainer`` in a fresh Python process. Both sides
train the same Llama (the standard CPU benchmark: hidden 256, 4 layers, 4 heads, FFN 688, a BPE
of 8,192 tokens trained on the 1,800 HH pairs) from the same weights against the same reference
weights (a second model of another seed), on the same pairs in the same order (the first HH
pairs in file order; ``--long-tail``: the longest ones), fp32, DPO with beta 0.1, AdamW at a
constant learning rate of 1e-5, gradient norm clipped at 1, 8 pairs per micro-step
(``--accumulation N``: N micro-steps per optimizer step on both sides). raypo's worker holds 1.5
CPUs and runs torch with 2 threads, as TRL does; raypo pads nothing it need not
(``trainer.padding_free: auto``, bucketed forwards on CPU), TRL pads each batch to its longest
sequence. TRL gets raypo's token ids (``prompt_ids``/``chosen_ids``/``rejected_ids``), so its
tokenisation is not timed: conservative for raypo, whose data preparation is. TRL's run saves
nothing; raypo's job writes its final checkpoint and exported policy (also conservative).

Measured per run: steady-state pairs/s and tokens/s after the warm-up steps (raypo: from its
``metrics.jsonl`` intervals; TRL: from its step-end times), the wall time of the whole
subprocess for the same number of steps (raypo: start-up, data preparation, reference pass,
training, checkpoint, export; TRL: imports, model loading, training), peak memory (the training
process's own high-water mark: TRL's process, raypo's Ray Train worker; and the largest summed
RSS of the whole process tree, sampled every 0.2 s: for raypo the driver, Ray's GCS, raylet and
dashboard, the Train controller, the worker and the Ray Data tasks), and the mean training loss
of the first logging interval (raypo logs the mean over its first 5 steps; TRL's losses of the
same steps are averaged), with a check that raypo trained exactly TRL's pairs in TRL's order
(the pair ids in its final checkpoint's train state). Diagnosis rows (``--no-diagnosis`` skips
them) run the step a raypo worker runs (:func:`raypo.step.preference_step`, online or with the
reference values of a pass before training) alone in one process, without Ray or DeepSpeed: the
gap to the ``raypo train`` rows is what Ray Train, DeepSpeed and Ray Data cost. The sides
alternate within each round (TRL, raypo online, raypo precomputed, the diagnosis steps) so that
load on a shared machine hits them alike; ratios to TRL are taken within each round.

Each ``raypo train`` starts its own local Ray as a user's does: with the machine's CPUs.

    python benchmarks/throughput_vs_trl.py                    # results/throughput_vs_trl.*
    python benchmarks/throughput_vs_trl.py --long-tail        # max length 1024: *_long.*
    python benchmarks/throughput_vs_trl.py --accumulation 4   # *_accum4.*
"""

from __future__ import annotations

import argparse
import dataclasses
import gzip
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from common import Column, Table, add_output_argument, new_figure, write_results
from scaling import (
    HH_PATH,
    QUICK,
    RAY_ENV,
    STANDARD,
    build_models,
    ray_train_config,
    steady_throughput,
)

NAME = "throughput_vs_trl"
SIDES = {
    "trl": "TRL DPOTrainer",
    "raypo-online": "raypo train, online reference",
    "raypo-precomputed": "raypo train, precomputed reference",
    "step-online": "diagnosis: the step alone in one process, no Ray/DeepSpeed, online reference",
    "step-precomputed": (
        "diagnosis: the step alone in one process, no Ray/DeepSpeed, precomputed reference"
    ),
}
"""Side key -> the label its table row carries."""
RAYPO_SIDES = ("raypo-online", "raypo-precomputed")
DIAGNOSIS_SIDES = ("step-online", "step-precomputed")
TARGETS = {"raypo-online": 3.0, "raypo-precomputed": 4.0}
"""Issue 17's pairs/s targets, as multiples of TRL's (stated in the findings, not asserted)."""


TRAIN_WORKER_TITLE = "RayTrainWorker"
"""What Ray puts in the process title of a Ray Train worker."""
COMPILER_TITLE = "cc1plus"
"""In a process title: the C++ compiler (DeepSpeed building an op into torch's extension cache)."""
TITLE_CHARS = 160
"""Process titles are kept this long."""
RESULT_PREFIX = "SIDE_RUN "
MIB = 2**20


@dataclass(frozen=True)
class Settings:
    """What both sides share."""

    pairs: int = 8
    """Pairs per micro-step (TRL: ``per_device_train_batch_size``)."""
    accumulation: int = 1
    """Micro-steps per optimizer step (``gradient_accumulation_steps`` on both sides)."""
    max_length: int = 512
    steps: int = 100
    """Optimizer steps of every run, warm-up included."""
    warmup: int = 10
    """Steps left out of the steady-state rates (a multiple of ``logging_steps``)."""
    logging_steps: int = 5
    """raypo's metrics interval; TRL's first-interval loss averages as many steps."""
    long_tail: bool = False
    """Train on the longest HH pairs (by tokenised length) instead of the first ones."""
    learning_rate: float = 1e-5
    beta: float = 0.1
    max_grad_norm: float = 1.0
    cpus_per_worker: float = 1.5
    threads: int = 2
    """torch threads of TRL and the diagnosis steps: those of raypo's worker
    (:func:`raypo.train.loop.torch_threads` of ``cpus_per_worker``)."""

    @property
    def step_pairs(self) -> int:
        """Pairs per optimizer step."""
        return self.pairs * self.accumulation

    @property
    def total_pairs(self) -> int:
        """Pairs of a whole run: each trained once."""
        return self.step_pairs * self.steps

    def check(self) -> None:
        """Raise ValueError if the warm-up does not end on a logging boundary before the end."""
        if self.warmup % self.logging_steps or not 0 < self.warmup < self.steps:
            raise ValueError(
                f"warm-up {self.warmup} must be a positive multiple of logging_steps "
                f"{self.logging_steps} below steps {self.steps}"
            )


@dataclass(frozen=True)
class StepRun:
    """What a TRL or diagnosis process reports of its training."""

    step_s: list[float]
    """Wall time of every optimizer step: previous step's end to this step's end, so collation
    and the trainer's own bookkeeping count."""
    losses: list[float]
    """Training loss of every micro-step."""
    reference_pass_s: float = 0.0
    """Diagnosis with a precomputed reference: the pass over all batches before training."""


@dataclass(frozen=True)
class SideRun:
    """One run of one side, as the tables use it."""

    side: str
    pairs_per_s: float
    """Steady state: after the warm-up steps."""
    tokens_per_s: float
    """Real (unpadded) tokens of the chosen and rejected sequences per second, steady state."""
    step_s: float
    """Mean optimizer step time, steady state."""
    wall_s: float
    """The whole subprocess, start to exit."""
    process_peak_mib: float
    """Peak RSS (VmHWM) of the training process: TRL's or the diagnosis process, raypo's Ray
    Train worker."""
    tree_peak_mib: float
    """Largest summed RSS of the subprocess and all its descendants (sampled)."""
    first_loss: float
    """Mean training loss over the first ``logging_steps`` steps."""
    same_pairs_in_order: bool | None
    """raypo train: its final train state lists TRL's pair ids in TRL's order; else None."""
    times_s: list[float]
    """Every step's time (TRL, diagnosis) or every logged interval's (raypo train)."""
    losses: list[float]
    """Every micro-step's loss (TRL, diagnosis) or every logged interval's mean (raypo train)."""
    processes: list[tuple[str, float]]
    """Every process of the tree: its title and peak RSS (VmHWM) in MiB, largest first."""
    compiled: bool = False
    """A C++ compiler ran in the tree: the wall time includes building an op."""
    reference_pass_s: float = 0.0


@dataclass
class TreeMemory:
    """Peak memory of the process tree under ``root``, sampled every ``interval`` seconds in a
    thread: the largest summed RSS, and each process's own peak (its VmHWM, the kernel's exact
    high-water mark, read while the process lives) with its title (Ray workers set theirs)."""

    root: int
    interval: float = 0.2
    tree_peak: int = 0
    peaks: dict[int, tuple[str, int]] = field(default_factory=dict)
    """pid -> (latest title seen, VmHWM bytes)."""
    _stop: threading.Event = field(default_factory=threading.Event, repr=False)
    _thread: threading.Thread | None = field(default=None, repr=False)

    def sample(self) -> None:
        """Read every live process of the tree once."""
        import psutil

        try:
            root = psutil.Process(self.root)
            processes = [root, *root.children(recursive=True)]
        except psutil.Error:
            return
        total = 0
        for process in processes:
            try:
                total += process.memory_info().rss
                title = " ".join(process.cmdline()).strip()[:TITLE_CHARS]
                high = _high_water_mark(process.pid)
            except (psutil.Error, OSError):
                continue
            old_title, old_high = self.peaks.get(process.pid, ("", 0))
            self.peaks[process.pid] = (title or old_title, max(old_high, high))
        self.tree_peak = max(self.tree_peak, total)

    def processes(self) -> list[tuple[str, float]]:
        """Every process seen: (title, VmHWM in MiB), largest first."""
        return sorted(((t, high / MIB) for t, high in self.peaks.values()), key=lambda p: -p[1])

    def saw(self, title_part: str) -> bool:
        """Whether any process's title contained ``title_part``."""
        return any(title_part in title for title, _ in self.peaks.values())

    def peak_of(self, title_part: str) -> int:
        """The largest VmHWM among processes whose title contains ``title_part``."""
        peaks = [high for title, high in self.peaks.values() if title_part in title]
        if not peaks:
            titles = sorted({title for title, _ in self.peaks.values()})
            raise RuntimeError(f"no process titled *{title_part}* among {titles}")
        return max(peaks)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self.interval)

    def __enter__(self) -> TreeMemory:
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()


def _high_water_mark(pid: int) -> int:
    """``pid``'s VmHWM in bytes; 0 for a process that has exited (a zombie has none)."""
    with open(f"/proc/{pid}/status") as status:
        line = next((line for line in status if line.startswith("VmHWM:")), None)
    return 0 if line is None else int(line.split()[1]) * 1024


def variant_name(settings: Settings) -> str:
    """The results' file stem: ``throughput_vs_trl`` plus ``_long`` (long tail), ``_len<N>``
    (a max length other than the variant's default) and ``_accum<N>`` (accumulation)."""
    name = NAME + ("_long" if settings.long_tail else "")
    if settings.max_length != default_max_length(settings.long_tail):
        name += f"_len{settings.max_length}"
    if settings.accumulation > 1:
        name += f"_accum{settings.accumulation}"
    return name


def default_max_length(long_tail: bool) -> int:
    """1024 for the long tail (its pairs are long), else 512."""
    return 1024 if long_tail else 512


def default_steps(long_tail: bool, accumulation: int, logging_steps: int) -> int:
    """100 optimizer steps (25 of the long tail: its 200 longest of 1,796 pairs), divided by
    the accumulation so that a run trains as many pairs; at least 2 logging intervals."""
    return max(2 * logging_steps, (25 if long_tail else 100) // accumulation)


def default_warmup(steps: int, logging_steps: int) -> int:
    """2 logging intervals of runs of 50 steps or more, else 1."""
    return logging_steps * (2 if steps >= 50 else 1)


def raypo_config(settings: Settings, run_dir: Path, work: Path, online: bool) -> dict:
    """The ``raypo train`` config dict of one run (:func:`scaling.ray_train_config` on
    ``work/pairs.jsonl``, ``work/models/policy`` and ``work/models/reference``): 1 worker of
    ``settings.cpus_per_worker`` CPUs, ZeRO-2, torch Adam, no shuffle, no held-out split, a
    metrics line every ``logging_steps``, only the final checkpoint."""
    return ray_train_config(
        run_dir,
        work / "models" / "policy",
        work / "models" / "reference",
        workers=1,
        cpus_per_worker=settings.cpus_per_worker,
        global_batch=settings.pairs,
        steps=settings.steps,
        max_length=settings.max_length,
        **{
            "data.path": str(work / "pairs.jsonl"),
            "data.max_rows": None,
            "data.shuffle": False,
            "loss.beta": settings.beta,
            "reference.mode": "online" if online else "precomputed",
            "trainer.learning_rate": settings.learning_rate,
            "trainer.max_grad_norm": settings.max_grad_norm,
            "trainer.gradient_accumulation_steps": settings.accumulation,
            "trainer.logging_steps": settings.logging_steps,
            "trainer.save_steps": 0,
            "trainer.eval_steps": 0,
            "trainer.padding_free": "auto",
        },
    )


def accepted_pairs(data: Any, tokenizer: Any) -> list[Any]:
    """The :class:`raypo.data.tokenize.TokenizedPair` of every pair of ``data`` (a
    :class:`raypo.config.DataConfig`) that raypo's reader and tokeniser accept, in file order."""
    from raypo.data.readers import iter_pairs
    from raypo.data.records import PreferencePair
    from raypo.data.tokenize import TokenizedPair, tokenize_pairs

    pairs = [record for record in iter_pairs(data) if isinstance(record, PreferencePair)]
    return [p for p in tokenize_pairs(pairs, tokenizer, data) if isinstance(p, TokenizedPair)]


def longest_sequence(pair: Any) -> int:
    """Tokens of a pair's longer sequence (prompt + completion), after truncation."""
    return len(pair.prompt_ids) + max(len(pair.chosen_ids), len(pair.rejected_ids))


def select_lines(data: Any, tokenizer: Any, settings: Settings) -> list[bytes]:
    """The raw HH lines both sides train on: the first ``total_pairs`` accepted pairs of the HH
    file, or with ``long_tail`` the ``total_pairs`` with the longest sequences, in file order."""
    pairs = accepted_pairs(dataclasses.replace(data, path=str(HH_PATH)), tokenizer)
    if settings.long_tail:
        pairs = sorted(pairs, key=longest_sequence, reverse=True)
    chosen = sorted(pair.row for pair in pairs[: settings.total_pairs])
    if len(chosen) < settings.total_pairs:
        raise ValueError(f"only {len(chosen)} usable HH pairs, {settings.total_pairs} needed")
    lines = gzip.decompress(HH_PATH.read_bytes()).split(b"\n")
    return [lines[row - 1] for row in chosen]


def tokenized_rows(data: Any, tokenizer: Any) -> list[dict[str, Any]]:
    """raypo's pairs of ``data`` as rows: ``id`` and the token ids TRL is handed."""
    keys = ("id", "prompt_ids", "chosen_ids", "rejected_ids")
    return [{key: getattr(pair, key) for key in keys} for pair in accepted_pairs(data, tokenizer)]


def prepare_setup(shape: Any, settings: Settings, work: Path) -> list[dict[str, Any]]:
    """Models (``work/models``), the selected pairs (``work/pairs.jsonl``, what raypo reads)
    and their tokenised rows (``work/rows.json``, what TRL and the diagnosis read); returns the
    rows."""
    from raypo.config import config_from_dict
    from raypo.models import load_tokenizer

    policy, _ = build_models(shape, work / "models")
    tokenizer = load_tokenizer(str(policy))
    data = config_from_dict(raypo_config(settings, work / "setup", work, True)).data
    pairs_file = Path(data.path)
    pairs_file.write_bytes(b"\n".join(select_lines(data, tokenizer, settings)) + b"\n")
    rows = tokenized_rows(data, tokenizer)
    if len(rows) != settings.total_pairs:
        raise RuntimeError(f"{pairs_file}: {len(rows)} pairs accepted, not {settings.total_pairs}")
    (work / "rows.json").write_text(json.dumps(rows))
    return rows


def batch_tokens(rows: list[dict[str, Any]]) -> int:
    """Real (unpadded) tokens of the chosen and rejected sequences of ``rows``."""
    return sum(
        2 * len(r["prompt_ids"]) + len(r["chosen_ids"]) + len(r["rejected_ids"]) for r in rows
    )


def padding_share(rows: list[dict], pairs: int) -> float:
    """Share of the token positions of the padded batches of ``pairs`` consecutive ``rows``
    (each padded to its longest sequence, as TRL's are) that are padding."""
    padded = real = 0
    for start in range(0, len(rows) - pairs + 1, pairs):
        chunk = rows[start : start + pairs]
        lengths = [
            len(r["prompt_ids"]) + len(r[key])
            for key in ("chosen_ids", "rejected_ids")
            for r in chunk
        ]
        padded += len(lengths) * max(lengths)
        real += sum(lengths)
    return 1 - real / padded


def raypo_batches(rows: list[dict[str, Any]], pairs: int, pad_token_id: int) -> list[dict]:
    """raypo's collated ``[2B, T]`` batches of ``pairs`` consecutive rows each."""
    from raypo.data.collate import collate_pairs

    batches = []
    for start in range(0, len(rows) - pairs + 1, pairs):
        chunk = rows[start : start + pairs]
        batches.append(collate_pairs({k: [r[k] for r in chunk] for k in chunk[0]}, pad_token_id))
    return batches


def run_step_alone(
    policy_dir: Path, reference_dir: Path, rows: list[dict], settings: Settings, online: bool
) -> StepRun:
    """Diagnosis: the step of a raypo worker (:func:`raypo.step.preference_step` with
    ``padding_free: auto``, collation included) with torch's AdamW and gradient clipping, in
    this process; with ``online`` False the reference values come from a pass over all
    micro-batches before training, timed apart."""
    import torch

    from raypo.config import LossConfig
    from raypo.forward import reference_columns
    from raypo.models import load_policy
    from raypo.step import preference_step

    torch.manual_seed(0)
    policy, tokenizer = load_policy(str(policy_dir), "fp32")
    reference, _ = load_policy(str(reference_dir), "fp32")
    policy.train()
    reference.requires_grad_(False)
    pad = tokenizer.pad_token_id
    chunks = [rows[i : i + settings.pairs] for i in range(0, len(rows), settings.pairs)]
    pass_s, columns = 0.0, []
    if not online:
        started = time.perf_counter()
        columns = [
            reference_columns(reference, b) for b in raypo_batches(rows, settings.pairs, pad)
        ]
        pass_s = time.perf_counter() - started
    optimizer = torch.optim.AdamW(policy.parameters(), lr=settings.learning_rate, weight_decay=0.0)
    loss_config = LossConfig(type="dpo", beta=settings.beta)
    step_s, losses = [], []
    last = time.perf_counter()
    for step in range(settings.steps):
        optimizer.zero_grad(set_to_none=True)
        for index in range(step * settings.accumulation, (step + 1) * settings.accumulation):
            batch = raypo_batches(chunks[index], settings.pairs, pad)[0]
            if not online:
                batch |= columns[index]
            result = preference_step(
                policy, batch, loss_config, reference_model=reference if online else None
            )
            (result.loss / settings.accumulation).backward()
            losses.append(float(result.loss.detach()))
        torch.nn.utils.clip_grad_norm_(policy.parameters(), settings.max_grad_norm)
        optimizer.step()
        now = time.perf_counter()
        step_s.append(now - last)
        last = now
    return StepRun(step_s, losses, pass_s)


def trl_dataset(rows: list[dict[str, Any]]) -> Any:
    """The rows as the pre-tokenised ``datasets.Dataset`` TRL's collator reads."""
    from datasets import Dataset

    keys = ("prompt_ids", "chosen_ids", "rejected_ids")
    return Dataset.from_dict({key: [list(r[key]) for r in rows] for key in keys})


def trl_trainer(
    policy_dir: Path, reference_dir: Path, rows: list[dict], settings: Settings, output: Path
) -> Any:
    """A TRL DPOTrainer on ``rows`` with raypo's token ids and the shared settings; its
    ``losses`` list receives every micro-step's loss and ``step_ends`` every step's end time."""
    from transformers import TrainerCallback
    from trl import DPOConfig, DPOTrainer

    from raypo.models import load_policy

    class StepClock(TrainerCallback):
        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            trainer.step_ends.append(time.perf_counter())

    class PretokenizedDPOTrainer(DPOTrainer):
        """Takes the dataset as already tokenised (by raypo) and records each loss."""

        def _prepare_dataset(self, dataset: Any, *args: Any, **kwargs: Any) -> Any:
            return dataset

        def compute_loss(self, model: Any, inputs: Any, *args: Any, **kwargs: Any) -> Any:
            loss = super().compute_loss(model, inputs, *args, **kwargs)
            self.losses.append(float((loss[0] if isinstance(loss, tuple) else loss).detach()))
            return loss

    policy, tokenizer = load_policy(str(policy_dir), "fp32")
    reference, _ = load_policy(str(reference_dir), "fp32")
    config = DPOConfig(
        output_dir=str(output),
        per_device_train_batch_size=settings.pairs,
        gradient_accumulation_steps=settings.accumulation,
        max_steps=len(rows) // settings.step_pairs,
        learning_rate=settings.learning_rate,
        lr_scheduler_type="constant",
        warmup_steps=0,
        weight_decay=0.0,
        max_grad_norm=settings.max_grad_norm,
        optim="adamw_torch",
        beta=settings.beta,
        loss_type=["sigmoid"],
        max_length=settings.max_length,
        precompute_ref_log_probs=False,
        gradient_checkpointing=False,
        bf16=False,
        fp16=False,
        use_cpu=True,
        train_sampling_strategy="sequential",
        dataloader_num_workers=0,
        dataloader_pin_memory=False,
        report_to="none",
        logging_strategy="no",
        save_strategy="no",
        eval_strategy="no",
        disable_tqdm=True,
        seed=0,
    )
    trainer = PretokenizedDPOTrainer(
        model=policy,
        ref_model=reference,
        args=config,
        train_dataset=trl_dataset(rows),
        processing_class=tokenizer,
        callbacks=[StepClock()],
    )
    trainer.losses, trainer.step_ends = [], []
    return trainer


def run_trl(policy_dir: Path, reference_dir: Path, rows: list[dict], settings: Settings) -> StepRun:
    """TRL's DPOTrainer, in this process, on the same rows and settings."""
    with tempfile.TemporaryDirectory() as output:
        trainer = trl_trainer(policy_dir, reference_dir, rows, settings, Path(output))
        started = time.perf_counter()
        trainer.train()
    ends = [started, *trainer.step_ends]
    return StepRun([b - a for a, b in zip(ends, ends[1:], strict=False)], trainer.losses)


def _worker(args: argparse.Namespace) -> None:
    """Child process: TRL or a diagnosis step on the prepared setup; prints a JSON line."""
    import torch

    settings = Settings(**json.loads(args.settings))
    torch.set_num_threads(settings.threads)
    setup = Path(args.setup)
    rows = json.loads((setup / "rows.json").read_text())
    models = (setup / "models" / "policy", setup / "models" / "reference")
    if args.worker == "trl":
        run = run_trl(*models, rows, settings)
    else:
        run = run_step_alone(*models, rows, settings, online=args.worker == "step-online")
    print(RESULT_PREFIX + json.dumps(dataclasses.asdict(run)), flush=True)


def run_process(
    command: list[str], env: dict, log: Path, timeout_s: float
) -> tuple[float, TreeMemory]:
    """Run ``command`` (output to ``log``) in its own session while sampling its process tree's
    memory; its wall time and the samples. Raises RuntimeError on failure or after
    ``timeout_s`` (the session is ended first)."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("w") as out:
        started = time.perf_counter()
        process = subprocess.Popen(
            command, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
        with TreeMemory(process.pid) as memory:
            try:
                code = process.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                _end_session(process)
                code = f"timed out after {timeout_s:.0f} s"
        wall_s = time.perf_counter() - started
    if code != 0:
        tail = log.read_text()[-3000:]
        raise RuntimeError(f"{' '.join(command)}: {code}; see {log}:\n{tail}")
    return wall_s, memory


def _end_session(process: subprocess.Popen) -> None:
    """SIGTERM the session ``process`` leads, SIGKILL it after 30 s."""
    os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()


def first_interval_loss(losses: list[float], settings: Settings) -> float:
    """Mean of the micro-step losses of the first ``logging_steps`` optimizer steps."""
    first = losses[: settings.logging_steps * settings.accumulation]
    return sum(first) / len(first)


def steady_from_steps(step_s: list[float], rows: list[dict], settings: Settings) -> dict:
    """Pairs/s, tokens/s and mean step time over the steps after the warm-up."""
    timed = step_s[settings.warmup :]
    seconds = sum(timed)
    timed_rows = rows[settings.warmup * settings.step_pairs : len(step_s) * settings.step_pairs]
    return {
        "pairs_per_s": len(timed_rows) / seconds,
        "tokens_per_s": batch_tokens(timed_rows) / seconds,
        "step_s": seconds / len(timed),
    }


def run_worker_side(
    side: str, work: Path, settings: Settings, timeout_s: float, round_: int
) -> SideRun:
    """TRL or a diagnosis step in a fresh Python process (its own peak memory, no state of
    other runs)."""
    command = [sys.executable, str(Path(__file__).resolve()), "--worker", side]
    command += ["--setup", str(work), "--settings", json.dumps(dataclasses.asdict(settings))]
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "TQDM_DISABLE": "1"}
    log = work / "logs" / f"{side}-{round_}.log"
    wall_s, memory = run_process(command, env, log, timeout_s)
    lines = [line for line in log.read_text().splitlines() if line.startswith(RESULT_PREFIX)]
    run = StepRun(**json.loads(lines[-1][len(RESULT_PREFIX) :]))
    rows = json.loads((work / "rows.json").read_text())
    return SideRun(
        side=side,
        **steady_from_steps(run.step_s, rows, settings),
        wall_s=wall_s,
        process_peak_mib=memory.peaks[memory.root][1] / MIB,
        tree_peak_mib=memory.tree_peak / MIB,
        first_loss=first_interval_loss(run.losses, settings),
        same_pairs_in_order=None,
        times_s=run.step_s,
        losses=run.losses,
        processes=memory.processes(),
        reference_pass_s=run.reference_pass_s,
    )


def raypo_env() -> dict[str, str]:
    """The environment of a ``raypo train`` job: this one, without a Ray address (the job
    starts its own Ray), with :data:`scaling.RAY_ENV` less its report-poll interval (the
    product's default applies)."""
    from raypo.ray_runtime import REPORT_POLL_ENV

    env = {**os.environ, **RAY_ENV}
    for key in ("RAY_ADDRESS", REPORT_POLL_ENV):
        env.pop(key, None)
    return env


def trained_pair_ids(run_dir: Path) -> list[str]:
    """The pair ids the run's last checkpoint says rank 0 trained in its epoch, in order."""
    import torch

    states = sorted(run_dir.glob("ray/*/checkpoint_*/train_state_rank0.pt"))
    if not states:
        raise RuntimeError(f"{run_dir}: no checkpoint train state")
    return torch.load(states[-1], weights_only=True)["trained"]


def run_raypo_train(
    side: str, work: Path, settings: Settings, timeout_s: float, round_: int
) -> SideRun:
    """One whole ``raypo train CONFIG.yaml`` job in a subprocess, read back from its run
    directory."""
    from raypo.config import config_from_dict, save_config
    from raypo.train.metrics import read_metrics

    run_dir = work / f"{side}-{round_}"
    config = config_from_dict(raypo_config(settings, run_dir, work, side == "raypo-online"))
    path = save_config(config, work / "configs" / f"{side}-{round_}.yaml")
    command = [sys.executable, "-m", "raypo.cli", "train", str(path)]
    wall_s, memory = run_process(
        command, raypo_env(), work / "logs" / f"{side}-{round_}.log", timeout_s
    )
    steady = steady_throughput(side, config, settings.warmup, wall_s)
    logged = [record for record in read_metrics(run_dir) if "step_time_s" in record]
    rows = json.loads((work / "rows.json").read_text())
    return SideRun(
        side=side,
        pairs_per_s=steady.pairs_per_s,
        tokens_per_s=steady.tokens_per_s,
        step_s=settings.step_pairs / steady.pairs_per_s,
        wall_s=wall_s,
        process_peak_mib=memory.peak_of(TRAIN_WORKER_TITLE) / MIB,
        tree_peak_mib=memory.tree_peak / MIB,
        first_loss=logged[0]["loss"],
        same_pairs_in_order=trained_pair_ids(run_dir) == [row["id"] for row in rows],
        times_s=[record["step_time_s"] for record in logged],
        losses=[record["loss"] for record in logged],
        processes=memory.processes(),
        compiled=memory.saw(COMPILER_TITLE),
    )


def run_round(
    work: Path, settings: Settings, sides: list[str], timeout_s: float, round_: int
) -> dict[str, SideRun]:
    """Every side once, in the order of ``sides``."""
    runs = {}
    for side in sides:
        run = run_raypo_train if side in RAYPO_SIDES else run_worker_side
        runs[side] = run(side, work, settings, timeout_s, round_)
        print(f"round {round_} {side}: " + json.dumps(_brief(runs[side])), flush=True)
    return runs


def _brief(run: SideRun) -> dict[str, Any]:
    skip = ("times_s", "losses", "processes")
    return {k: v for k, v in dataclasses.asdict(run).items() if k not in skip}


def _median_ratio(rounds: list[dict[str, SideRun]], side: str, key: str) -> float:
    return statistics.median(getattr(r[side], key) / getattr(r["trl"], key) for r in rounds)


def summary_rows(rounds: list[dict[str, SideRun]]) -> list[dict[str, Any]]:
    """One table row per side: medians over rounds, ratios to TRL taken per round, peaks the
    largest of any round, losses and the order check of the first round."""
    trl_loss = rounds[0]["trl"].first_loss
    table = []
    for side in rounds[0]:
        runs = [r[side] for r in rounds]
        first = runs[0]
        table.append(
            {
                "key": side,
                "side": SIDES[side],
                "pairs_per_s": statistics.median(run.pairs_per_s for run in runs),
                "tokens_per_s": statistics.median(run.tokens_per_s for run in runs),
                "step_s": statistics.median(run.step_s for run in runs),
                "ratio_vs_trl": _median_ratio(rounds, side, "pairs_per_s"),
                "wall_s": statistics.median(run.wall_s for run in runs),
                "wall_vs_trl": _median_ratio(rounds, side, "wall_s"),
                "process_peak_mib": max(run.process_peak_mib for run in runs),
                "tree_peak_mib": max(run.tree_peak_mib for run in runs),
                "first_loss": first.first_loss,
                "first_loss_gap": abs(first.first_loss - trl_loss),
                "same_pairs_in_order": first.same_pairs_in_order,
                "compiled_runs": sum(run.compiled for run in runs),
            }
        )
    return table


COLUMNS = [
    Column("side"),
    Column("pairs_per_s", "pairs/s", ".3f"),
    Column("tokens_per_s", "tokens/s", ".0f"),
    Column("step_s", "step s", ".3f"),
    Column("ratio_vs_trl", "pairs/s vs TRL", ".2f"),
    Column("wall_s", "whole job s", ".0f"),
    Column("wall_vs_trl", "whole job vs TRL", ".2f"),
    Column("process_peak_mib", "training process peak RSS MiB", ".0f"),
    Column("tree_peak_mib", "process tree peak RSS MiB", ".0f"),
    Column("first_loss", "mean loss, first interval", ".7f"),
    Column("first_loss_gap", "|loss - TRL|", ".1e"),
    Column("same_pairs_in_order", "TRL's pairs in TRL's order"),
    Column("compiled_runs", "runs that compiled C++"),
]


def _met(ok: bool) -> str:
    return "met" if ok else "NOT met"


def _throughput_findings(by_side: dict[str, dict]) -> list[str]:
    lines = []
    for side, target in TARGETS.items():
        ratio = by_side[side]["ratio_vs_trl"]
        lines.append(
            f"{SIDES[side]}: {ratio:.2f}x TRL's pairs/s in the steady state "
            f"(target >= {target:g}x: {_met(ratio >= target)})."
        )
    diagnosis = [by_side[s] for s in DIAGNOSIS_SIDES if s in by_side]
    if diagnosis:
        ratios = ", ".join(f"{row['ratio_vs_trl']:.2f}x" for row in diagnosis)
        lines.append(
            f"Diagnosis, the step alone (online, precomputed): {ratios} TRL's pairs/s; the gap "
            "to the raypo train rows is what Ray Train, DeepSpeed and Ray Data cost per step."
        )
    return lines


def _job_findings(by_side: dict[str, dict], settings: Settings) -> list[str]:
    trl = by_side["trl"]
    lines = []
    for side in RAYPO_SIDES:
        row = by_side[side]
        lines.append(
            f"Whole job of {settings.steps} steps, {SIDES[side]}: {row['wall_s']:.0f} s against "
            f"TRL's {trl['wall_s']:.0f} s ({row['wall_vs_trl']:.2f}x; target <= 0.5x: "
            f"{_met(row['wall_vs_trl'] <= 0.5)})."
        )
    worker = max(by_side[side]["process_peak_mib"] for side in RAYPO_SIDES)
    tree = max(by_side[side]["tree_peak_mib"] for side in RAYPO_SIDES)
    lines.append(
        f"Peak RSS: raypo's Ray Train worker {worker:.0f} MiB against TRL's process "
        f"{trl['process_peak_mib']:.0f} MiB (target <=: {_met(worker <= trl['process_peak_mib'])})"
        f"; raypo's whole process tree (driver, Ray's GCS, raylet and dashboard, Train controller "
        f"and worker, Ray Data tasks; shared pages counted in each process) {tree:.0f} MiB."
    )
    compiled = sum(by_side[side]["compiled_runs"] for side in RAYPO_SIDES)
    if compiled:
        lines.append(
            f"{compiled} raypo train job(s) ran the C++ compiler (DeepSpeed building an op into "
            "torch's extension cache, once per machine unless another environment shares the "
            "cache): their wall time and process tree include the build."
        )
    return lines


def _loss_findings(by_side: dict[str, dict], settings: Settings) -> list[str]:
    gaps = {side: row["first_loss_gap"] for side, row in by_side.items() if side != "trl"}
    order = all(by_side[side]["same_pairs_in_order"] for side in RAYPO_SIDES)
    return [
        f"Mean loss over steps 1-{settings.logging_steps} (raypo's first metrics line, TRL's "
        f"losses of the same steps): TRL {by_side['trl']['first_loss']:.7f}, raypo train online "
        f"{by_side['raypo-online']['first_loss']:.7f}, precomputed "
        f"{by_side['raypo-precomputed']['first_loss']:.7f}; largest gap "
        f"{max(gaps.values()):.1e}. raypo train trained exactly TRL's pairs in TRL's order: "
        f"{order}."
    ]


def findings(table: list[dict], settings: Settings, rows: list[dict]) -> list[str]:
    """The verdicts: throughput, whole job and memory against the targets, first losses, the
    padding raypo's padding-free forwards skip."""
    by_side = {row["key"]: row for row in table}
    timed = rows[settings.warmup * settings.step_pairs :]
    padding = (
        f"Padding: {100 * padding_share(timed, settings.pairs):.0f}% of the token positions of "
        f"the timed micro-batches padded to their longest sequence (what TRL computes); raypo's "
        f"trainer.padding_free: auto (bucketed forwards on CPU) skips many of them. Torch "
        f"threads: {settings.threads} on both sides."
    )
    return [
        *_throughput_findings(by_side),
        *_job_findings(by_side, settings),
        *_loss_findings(by_side, settings),
        padding,
    ]


def _figure(table: list[dict]) -> Any:
    figure, axes = new_figure(ncols=3, size=(4.6, 4.2))
    names = [row["side"].replace(", ", ",\n").replace(" in one", "\nin one") for row in table]
    panels = [
        ("pairs_per_s", "pairs/s (steady state)", "ratio_vs_trl"),
        ("wall_s", "whole job s", "wall_vs_trl"),
        ("process_peak_mib", "training process peak RSS MiB", None),
    ]
    for axis, (key, label, ratio) in zip(axes[0], panels, strict=True):
        bars = axis.barh(names, [row[key] for row in table], color="tab:blue")
        labels = [
            f"{row[key]:.3g}" + (f" ({row[ratio]:.2f}x TRL)" if ratio else "") for row in table
        ]
        axis.bar_label(bars, labels=labels, fontsize=7)
        axis.set_xlim(0, 1.6 * max(row[key] for row in table))
        axis.set_xlabel(label)
        axis.invert_yaxis()
        axis.tick_params(axis="y", labelsize=6)
    for axis in axes[0][1:]:
        axis.set_yticklabels([])
    figure.tight_layout()
    return figure


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--pairs", type=int, default=8, help="pairs per micro-step")
    parser.add_argument("--accumulation", type=int, default=1, help="micro-steps per step")
    parser.add_argument("--long-tail", action="store_true", help="the longest HH pairs")
    parser.add_argument("--max-length", type=int, help="default 512; 1024 with --long-tail")
    parser.add_argument(
        "--steps",
        type=int,
        help="steps per run (default: 100, or 25 with --long-tail, divided by --accumulation)",
    )
    parser.add_argument(
        "--warmup",
        type=int,
        help="steps left out of the rates (default: 10, 5 for runs under 50 steps)",
    )
    parser.add_argument("--rounds", type=int, default=2, help="alternations of all sides")
    parser.add_argument("--no-diagnosis", action="store_true", help="skip the step-alone rows")
    parser.add_argument("--timeout", type=float, default=3600, help="seconds per run")
    parser.add_argument("--quick", action="store_true", help="small model and steps (smoke test)")
    parser.add_argument("--work-dir", type=Path, help="keep models, runs and logs here")
    add_output_argument(parser, f"{NAME}[_long][_lenN][_accumN]")
    parser.add_argument("--worker", choices=["trl", *DIAGNOSIS_SIDES], help=argparse.SUPPRESS)
    parser.add_argument("--setup", help=argparse.SUPPRESS)
    parser.add_argument("--settings", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.quick:
        args.pairs, args.rounds = 4, 1
        args.max_length = args.max_length or default_max_length(args.long_tail) // 4
        args.steps, args.warmup = args.steps or 10, args.warmup or 5
    return args


def settings_from(args: argparse.Namespace) -> Settings:
    """The :class:`Settings` of the command line, defaults filled in and checked."""
    from raypo.train.loop import torch_threads

    logging_steps = Settings.logging_steps
    steps = args.steps or default_steps(args.long_tail, args.accumulation, logging_steps)
    settings = Settings(
        pairs=args.pairs,
        accumulation=args.accumulation,
        max_length=args.max_length or default_max_length(args.long_tail),
        steps=steps,
        warmup=args.warmup or default_warmup(steps, logging_steps),
        long_tail=args.long_tail,
        threads=torch_threads(Settings.cpus_per_worker),
    )
    settings.check()
    return settings


def main(argv: list[str] | None = None) -> None:
    """Measure every side over alternating rounds; write the results."""
    args = _parse_args(argv)
    if args.worker:
        _worker(args)
        return
    started = time.perf_counter()
    shape = QUICK if args.quick else STANDARD
    settings = settings_from(args)
    sides = [s for s in SIDES if not (args.no_diagnosis and s in DIAGNOSIS_SIDES)]
    with tempfile.TemporaryDirectory() as scratch:
        work = args.work_dir or Path(scratch)
        rows = prepare_setup(shape, settings, work)
        rounds = [run_round(work, settings, sides, args.timeout, r + 1) for r in range(args.rounds)]
    table = summary_rows(rounds)
    what = "the longest" if settings.long_tail else "the first"
    write_results(
        variant_name(settings),
        title=(
            f"raypo train vs TRL DPOTrainer: {what} HH pairs, max length {settings.max_length}, "
            f"{settings.pairs} pairs x {settings.accumulation} micro-steps per step"
        ),
        description=__doc__.split("\n\n", 1)[1].rsplit("\n\n", 1)[0],
        tables=[Table("Per side: medians over rounds", table, COLUMNS)],
        findings=findings(table, settings, rows),
        settings=dataclasses.asdict(settings)
        | {
            "rounds": args.rounds,
            "quick": args.quick,
            "model": dataclasses.asdict(shape),
        },
        data={"rounds": [{s: dataclasses.asdict(r[s]) for s in r} for r in rounds]},
        figure=_figure(table),
        out=args.out,
        started=started,
    )
    print(json.dumps(table, indent=1))


if __name__ == "__main__":
    main()
