"""TRL parity: the same preference pairs through TRL's ``DPOTrainer`` and through raypo give the
same token ids and the same step-1 loss, on tiny random models of three architectures (Llama,
Qwen2, Gemma-2 with its final-logit softcapping), for standard (text) and conversational pairs.

TRL's side is TRL itself: its dataset preparation (``trainer.train_dataset``), its collator and
its ``compute_loss`` on the first batch. raypo's side is what ``raypo prepare`` and ``raypo train``
run per pair and per batch: row normalisation, :func:`raypo.data.tokenize.tokenize_pairs`,
:func:`raypo.data.collate.collate_pairs` and :func:`raypo.step.preference_step`. The reference
model is a differently seeded copy, so the step-1 loss is not the trivial ``log 2``.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from tiny_models import tiny_causal_lm
from torch import nn

from raypo.config import DataConfig, LossConfig
from raypo.data.collate import collate_pairs
from raypo.data.formats import normalise_row
from raypo.data.records import PreferencePair
from raypo.data.tokenize import TokenizedPair, tokenize_pairs
from raypo.models import builtin_data_path, load_tokenizer
from raypo.step import preference_step

trl = pytest.importorskip("trl")

PAIRS = 6
BETA = 0.1
ARCHITECTURES = {"llama": {}, "qwen2": {}, "gemma2": {"final_logit_softcapping": 5.0}}
"""The architectures of the parity (tests/tiny_models.py) and their settings here: a softcap
that the lm-head's scaled logits reach."""


def hh_rows() -> list[dict]:
    """The first pairs of the packaged HH sample whose dialogues are short (few tokens)."""
    with builtin_data_path("hh_sample").open(encoding="utf-8") as handle:
        rows = [json.loads(line) for line in handle]
    rows.sort(key=lambda row: len(row["chosen"]) + len(row["rejected"]))
    return rows[:PAIRS]


def standard_rows() -> list[dict]:
    """HH pairs as TRL's standard explicit-prompt format: prompt, chosen, rejected strings."""
    rows = []
    for number, row in enumerate(hh_rows()):
        pair = normalise_row(row, DataConfig(schema="hh"), "hh", number, "")
        assert isinstance(pair, PreferencePair)
        rows.append({"prompt": pair.prompt, "chosen": pair.chosen, "rejected": pair.rejected})
    return rows


def conversational_rows() -> list[dict]:
    """The same pairs as chat messages: the last Human turn as the user message."""
    rows = []
    for row in standard_rows():
        question = row["prompt"].rsplit("\n\nHuman: ", 1)[-1].removesuffix("\n\nAssistant:")
        rows.append(
            {
                "prompt": [{"role": "user", "content": question.strip()}],
                "chosen": [{"role": "assistant", "content": row["chosen"].strip()}],
                "rejected": [{"role": "assistant", "content": row["rejected"].strip()}],
            }
        )
    return rows


DATASETS = {"standard": standard_rows, "conversational": conversational_rows}


def build(name: str, tokenizer, seed: int) -> nn.Module:
    """A float32 tiny model of architecture ``name`` for ``tokenizer``, its lm-head scaled up so
    that Gemma-2's softcapping changes the logits."""
    return tiny_causal_lm(
        name,
        seed=seed,
        dtype=torch.float32,
        head_scale=10.0,
        vocab_size=len(tokenizer),
        max_position_embeddings=1024,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **ARCHITECTURES[name],
    )


def trl_first_batch(policy, reference, tokenizer, rows: list[dict], tmp_path: Path):
    """TRL's tokenised dataset and its loss on one batch holding every pair. TRL gets copies of
    the models: it replaces their ``forward`` (for its fused lm-head) and their config."""
    from datasets import Dataset

    args = trl.DPOConfig(
        output_dir=str(tmp_path / "trl"),
        per_device_train_batch_size=len(rows),
        beta=BETA,
        max_length=None,
        report_to=[],
        use_cpu=True,
        bf16=False,  # TRL's default autocasts to bf16, even on CPU; raypo's model.dtype is fp32
        dataloader_num_workers=0,
        seed=0,
    )
    trainer = trl.DPOTrainer(
        model=copy.deepcopy(policy),
        ref_model=copy.deepcopy(reference),
        args=args,
        train_dataset=Dataset.from_list(rows),
        processing_class=tokenizer,
    )
    batch = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    with torch.no_grad():
        loss = trainer.compute_loss(trainer.model, batch)
    return trainer.train_dataset, float(loss)


def raypo_pairs(rows: list[dict], tokenizer) -> list[TokenizedPair]:
    config = DataConfig(max_length=1024, max_prompt_length=1000)
    pairs = [normalise_row(row, config, "rows", number, "") for number, row in enumerate(rows)]
    tokenized = tokenize_pairs(pairs, tokenizer, config)
    assert all(isinstance(pair, TokenizedPair) for pair in tokenized), tokenized
    return tokenized


@pytest.mark.parametrize("data", sorted(DATASETS))
@pytest.mark.parametrize("name", sorted(ARCHITECTURES))
def test_token_ids_and_step_one_loss_equal_trls(name: str, data: str, tmp_path: Path) -> None:
    tokenizer = load_tokenizer("tiny")
    policy = build(name, tokenizer, seed=0)
    reference = build(name, tokenizer, seed=1)
    rows = DATASETS[data]()
    trl_dataset, trl_loss = trl_first_batch(policy, reference, tokenizer, rows, tmp_path)
    ours = raypo_pairs(rows, tokenizer)
    for pair, theirs in zip(ours, trl_dataset, strict=True):
        assert pair.prompt_ids == theirs["prompt_ids"]
        assert pair.chosen_ids == theirs["chosen_ids"]
        assert pair.rejected_ids == theirs["rejected_ids"]
    columns = {
        key: [getattr(pair, key) for pair in ours]
        for key in ("prompt_ids", "chosen_ids", "rejected_ids")
    }
    batch = collate_pairs(columns, tokenizer.pad_token_id)
    policy.train()
    with torch.no_grad():
        result = preference_step(
            policy, batch, LossConfig(type="dpo", beta=BETA), reference_model=reference
        )
    assert int(batch["target_mask"].sum()) == sum(
        len(row["chosen_ids"]) + len(row["rejected_ids"]) for row in trl_dataset
    )
    assert float(result.loss) == pytest.approx(trl_loss, abs=1e-5)
    assert abs(trl_loss - 0.6931471805599453) > 1e-3, "the reference must differ from the policy"
