"""``raypo sft``'s step on a Ray Train worker: one micro-batch of tokenised rows -> the SFT loss.

The worker loop, engine, checkpoints and export are ``raypo train``'s
(:mod:`raypo.train.loop`); the plan's ``micro_step`` makes it call :func:`sft_micro_step`
instead of the preference step. Each row's prompt and ``chosen`` completion are trained (the
completion of a prompt/completion or messages row); ``rejected_ids`` are never read (the data
read for SFT leaves them empty).
"""

from __future__ import annotations

from raypo.data.collate import collate_pairs
from raypo.sft.step import COMPLETION_KEYS, sft_step
from raypo.step import StepResult
from raypo.train.batches import MicroBatch
from raypo.train.loop import Worker


def sft_micro_step(worker: Worker, micro: MicroBatch) -> StepResult:
    """:func:`raypo.sft.step.sft_step` of the policy on one micro-batch's prompt + chosen
    sequences (with grad when grad mode is on)."""
    rows = micro.rows
    # The collator lays out pairs; with the chosen completion standing in for the rejected one
    # its first B rows are the prompt + chosen sequences, and the other B are never forwarded.
    pairs = {"prompt_ids": rows["prompt_ids"], "chosen_ids": rows["chosen_ids"]}
    pad_id = worker.tokenizer.pad_token_id
    collated = collate_pairs(pairs | {"rejected_ids": rows["chosen_ids"]}, pad_id)
    size = len(rows["prompt_ids"])
    batch = {name: collated[name][:size].to(worker.device) for name in COMPLETION_KEYS}
    return sft_step(worker.policy, batch, worker.forward)
