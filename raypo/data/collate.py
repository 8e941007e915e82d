"""One concatenated chosen+rejected batch of tensors from a batch of tokenised pairs.

The ``B`` pairs become ``2B`` right-padded sequences, the ``B`` chosen ones (prompt + chosen)
first, then the ``B`` rejected ones (prompt + rejected), so that one forward serves both halves
(:mod:`raypo.forward`). Targets are shifted here: ``target_ids[:, t] = input_ids[:, t + 1]`` and
``target_mask[:, t]`` is true exactly when token ``t + 1`` is a completion token, so the prompt and
the padding never reach the loss and ``target_mask.sum(1)`` equals the completion lengths.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from raypo.forward import REFERENCE_PREFIX


def collate_pairs(
    rows: Mapping[str, Sequence[Any] | np.ndarray],
    pad_token_id: int,
    pad_to_multiple_of: int | None = None,
) -> dict[str, Tensor]:
    """Pad a column-major batch of ``B`` tokenised pairs into one ``[2B, T]`` batch.

    Args:
        rows: columns as Ray Data's ``iter_batches(batch_format="numpy")`` yields them:
            ``prompt_ids``, ``chosen_ids``, ``rejected_ids`` (length-``B`` sequences or object
            arrays of int lists / arrays) and optional ``ref_*`` float columns; other columns
            (``id``, lengths, ...) are ignored.
        pad_token_id: id written at padded positions of ``input_ids`` and ``target_ids``.
        pad_to_multiple_of: round ``T`` up to a multiple of this (tensor-core friendly shapes);
            None = the longest sequence of the batch.

    Returns:
        ``input_ids`` ``[2B, T]`` int64; ``attention_mask`` ``[2B, T]`` int64 (1 on real tokens);
        ``target_ids`` ``[2B, T]`` int64 (the next token; pad in the last real column and after);
        ``target_mask`` ``[2B, T]`` bool; ``completion_lengths`` ``[2B]`` int64; each ``ref_*``
        column as float32 ``[B]``. Rows ``0..B-1`` are chosen, ``B..2B-1`` rejected.

    Raises:
        ValueError: an empty batch, columns of different lengths, an empty prompt or completion,
            or ``pad_to_multiple_of < 1``.
    """
    prompts = _id_arrays(rows, "prompt_ids")
    completions = _id_arrays(rows, "chosen_ids") + _id_arrays(rows, "rejected_ids")
    size = len(prompts)
    if size == 0 or len(completions) != 2 * size:
        raise ValueError(
            f"collate_pairs needs a non-empty batch with as many chosen and rejected as prompts; "
            f"got {size} prompts and {len(completions)} completions"
        )
    for index, ids in enumerate(prompts + completions):
        if len(ids) == 0:
            name = ("prompt", "chosen", "rejected")[index // size]
            raise ValueError(f"pair {index % size} of the batch has an empty {name}")
    prompt_lengths = [len(ids) for ids in prompts + prompts]
    completion_lengths = [len(ids) for ids in completions]
    width = max(p + c for p, c in zip(prompt_lengths, completion_lengths, strict=True))
    if pad_to_multiple_of is not None:
        if pad_to_multiple_of < 1:
            raise ValueError(f"pad_to_multiple_of must be >= 1, got {pad_to_multiple_of}")
        width = -(-width // pad_to_multiple_of) * pad_to_multiple_of
    input_ids = np.full((2 * size, width), pad_token_id, dtype=np.int64)
    target_ids = np.full((2 * size, width), pad_token_id, dtype=np.int64)
    attention_mask = np.zeros((2 * size, width), dtype=np.int64)
    target_mask = np.zeros((2 * size, width), dtype=bool)
    for index, (prompt, completion) in enumerate(zip(prompts + prompts, completions, strict=True)):
        length = len(prompt) + len(completion)
        input_ids[index, : len(prompt)] = prompt
        input_ids[index, len(prompt) : length] = completion
        target_ids[index, : length - 1] = input_ids[index, 1:length]
        attention_mask[index, :length] = 1
        target_mask[index, len(prompt) - 1 : length - 1] = True
    batch = {
        "input_ids": torch.from_numpy(input_ids),
        "attention_mask": torch.from_numpy(attention_mask),
        "target_ids": torch.from_numpy(target_ids),
        "target_mask": torch.from_numpy(target_mask),
        "completion_lengths": torch.tensor(completion_lengths, dtype=torch.int64),
    }
    for name, values in rows.items():
        if name.startswith(REFERENCE_PREFIX):
            batch[name] = _ref_column(name, values, size)
    return batch


def _id_arrays(rows: Mapping[str, Sequence[Any] | np.ndarray], name: str) -> list[np.ndarray]:
    if name not in rows:
        raise ValueError(f"collate_pairs: the batch has no {name!r} column; got {sorted(rows)}")
    return [np.asarray(ids, dtype=np.int64) for ids in rows[name]]


def _ref_column(name: str, values: Sequence[Any] | np.ndarray, size: int) -> Tensor:
    column = torch.from_numpy(np.array(values, dtype=np.float32))  # a writable copy
    if column.shape != (size,):
        raise ValueError(
            f"column {name!r} must hold one number per pair ({size}), got {column.shape}"
        )
    return column
