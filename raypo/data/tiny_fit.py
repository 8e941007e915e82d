"""A brief next-token fit of a small causal LM, so the quickstart's reference model is not random.

The embedded tiny model starts from random weights; preference training against a random
reference measures little. :func:`fit_reference` trains it for a few hundred AdamW steps on text
(the quickstart passes the chosen dialogues of its training pairs) in one process with plain
torch, and saves the result in Hugging Face format. It is meant for models of a few million
parameters at most: it runs on the driver and hashes the input directory's files.
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
import transformers
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from raypo.models import MARKER_FILE, load_policy

FIT_REPORT = "raypo_fit.json"
"""Written last into a fitted directory: its fingerprint, the losses before and after, timing."""

_FORMAT_VERSION = 1
_WARMUP_FRACTION = 0.1
"""Steps of linear warmup before the cosine decay, as a fraction of all steps."""
_MAX_GRAD_NORM = 1.0
"""Global gradient-norm clip: keeps the first steps at a high learning rate stable."""
_REPORT_TEXTS = 256
"""The loss before and after is measured on the first this many texts (bounded cost)."""
_IGNORE = -100
_ATTENTION = "sdpa"
"""Attention kernel of the fit: the fitted model is raypo's own tiny Llama, fitted on CPU, where
sdpa (transformers' and ``model.attn_implementation``'s default) is the fast one. The saved
model records no kernel, so the run loads it with its own ``model.attn_implementation``."""


def _encode(
    tokenizer: PreTrainedTokenizerBase, texts: Sequence[str], max_length: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ``input_ids`` [B, T] and ``labels`` [B, T] (-100 at padding).

    Texts are taken as given (``add_special_tokens=False``: the quickstart's texts already carry
    the chat template's BOS / EOS) and truncated to ``max_length`` tokens.
    """
    encoded = tokenizer(
        list(texts),
        add_special_tokens=False,
        truncation=True,
        max_length=max_length,
        padding=True,
        return_tensors="pt",
    )
    labels = encoded["input_ids"].masked_fill(encoded["attention_mask"] == 0, _IGNORE)
    return encoded["input_ids"], labels


def _summed_token_loss(
    model: PreTrainedModel, input_ids: torch.Tensor, labels: torch.Tensor
) -> tuple[torch.Tensor, int]:
    """Summed next-token cross-entropy over the non-padding targets, and their number."""
    attention_mask = (labels != _IGNORE).long()
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits
    targets = labels[:, 1:]
    loss = F.cross_entropy(
        logits[:, :-1].float().reshape(-1, logits.shape[-1]),
        targets.reshape(-1),
        ignore_index=_IGNORE,
        reduction="sum",
    )
    return loss, int((targets != _IGNORE).sum())


@torch.no_grad()
def language_model_loss(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    texts: Sequence[str],
    max_length: int = 256,
    batch_size: int = 16,
) -> float:
    """Mean next-token cross-entropy (nats per predicted token) of ``model`` on ``texts``."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for start in range(0, len(texts), batch_size):
        input_ids, labels = _encode(tokenizer, texts[start : start + batch_size], max_length)
        loss, tokens = _summed_token_loss(model, input_ids, labels)
        total, count = total + float(loss), count + tokens
    model.train(was_training)
    if count == 0:
        raise ValueError("the texts hold no token to predict (each needs at least two tokens)")
    return total / count


def _fingerprint(model_dir: Path, texts: Sequence[str], settings: dict[str, float | int]) -> str:
    """Hex digest of the input model's files, the texts, the fit settings and library versions."""
    digest = hashlib.sha256()
    # The tiny model's marker records its build time, which says nothing about the weights.
    files = [p for p in model_dir.rglob("*") if p.is_file() and p.name != MARKER_FILE]
    for path in sorted(files):
        name = path.relative_to(model_dir).as_posix().encode()
        digest.update(len(name).to_bytes(8, "little") + name)
        digest.update(hashlib.sha256(path.read_bytes()).digest())
    for text in texts:
        encoded = text.encode("utf-8")
        digest.update(len(encoded).to_bytes(8, "little") + encoded)
    key = {
        "format": _FORMAT_VERSION,
        "settings": settings,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
    }
    digest.update(json.dumps(key, sort_keys=True).encode())
    return digest.hexdigest()[:16]


def read_fit_report(directory: Path) -> dict | None:
    """The report of a completed fit in ``directory``, or None when there is none."""
    try:
        report = json.loads((Path(directory) / FIT_REPORT).read_text())
    except (OSError, ValueError):
        return None
    return report if isinstance(report, dict) and "fingerprint" in report else None


def _train(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    texts: Sequence[str],
    steps: int,
    settings: dict,
) -> None:
    """``steps`` AdamW steps on batches drawn without replacement, reshuffled each pass."""
    generator = torch.Generator().manual_seed(settings["seed"])
    optimizer = torch.optim.AdamW(model.parameters(), lr=settings["learning_rate"])
    warmup = math.ceil(_WARMUP_FRACTION * steps)
    scheduler = transformers.get_cosine_schedule_with_warmup(optimizer, warmup, steps)
    batch_size = min(settings["batch_size"], len(texts))
    order: list[int] = []
    model.train()
    for _ in range(steps):
        if len(order) < batch_size:
            order = torch.randperm(len(texts), generator=generator).tolist()
        batch, order = order[:batch_size], order[batch_size:]
        input_ids, labels = _encode(tokenizer, [texts[i] for i in batch], settings["max_length"])
        loss, tokens = _summed_token_loss(model, input_ids, labels)
        (loss / max(tokens, 1)).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), _MAX_GRAD_NORM)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
    model.eval()


def fit_reference(
    model_dir_in: str,
    texts: Sequence[str],
    output_dir: Path,
    steps: int,
    learning_rate: float = 3e-3,
    batch_size: int = 16,
    max_length: int = 256,
    seed: int = 0,
) -> Path:
    """Fit the causal LM in ``model_dir_in`` to ``texts`` for ``steps`` steps, into ``output_dir``.

    AdamW at ``learning_rate`` with 10% linear warmup and cosine decay, gradient norm clipped at 1,
    batches of ``batch_size`` texts truncated to ``max_length`` tokens, in float32 on CPU. The
    model and tokenizer are saved with ``save_pretrained``, then :data:`FIT_REPORT` with the mean
    token loss on the first 256 texts before and after. When ``output_dir`` already holds a
    completed fit of the same model files, texts and settings it is returned as is; a fit with
    another fingerprint is replaced; any other non-empty directory is an error. The new fit is
    built in a sibling directory and renamed into place, so a crash never leaves a partial one.
    """
    source, output = Path(model_dir_in), Path(output_dir)
    if not source.is_dir():
        raise ValueError(f"fit_reference needs a model directory, got {model_dir_in!r}")
    if steps < 1 or not texts:
        raise ValueError(f"fit_reference needs steps >= 1 and texts (got {steps}, {len(texts)})")
    settings = {
        "steps": steps,
        "learning_rate": learning_rate,
        "batch_size": batch_size,
        "max_length": max_length,
        "seed": seed,
    }
    fingerprint = _fingerprint(source, texts, settings)
    existing = read_fit_report(output)
    if existing is not None and existing["fingerprint"] == fingerprint:
        return output
    if existing is None and output.exists() and any(output.iterdir()):
        raise FileExistsError(
            f"{output} is not empty and holds no {FIT_REPORT}; delete it or choose another "
            "directory for the fitted model"
        )
    output.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{output.name}-", dir=output.parent))
    try:
        _fit_into(staging, source, texts, settings, fingerprint)
        shutil.rmtree(output, ignore_errors=True)
        staging.rename(output)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return output


def _fit_into(
    directory: Path, source: Path, texts: Sequence[str], settings: dict, fingerprint: str
) -> None:
    """Load, measure, train, measure, save; the report goes last."""
    started = time.perf_counter()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(settings["seed"])
        model, tokenizer = load_policy(str(source), "fp32", attn_implementation=_ATTENTION)
        sample = list(texts[:_REPORT_TEXTS])
        before = language_model_loss(model, tokenizer, sample, settings["max_length"])
        fit_started = time.perf_counter()
        _train(model, tokenizer, texts, settings["steps"], settings)
        fit_seconds = time.perf_counter() - fit_started
        after = language_model_loss(model, tokenizer, sample, settings["max_length"])
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    report = {
        "fingerprint": fingerprint,
        "source": str(source),
        "num_texts": len(texts),
        **settings,
        "loss_before": round(before, 6),
        "loss_after": round(after, 6),
        "loss_texts": len(sample),
        "fit_seconds": round(fit_seconds, 3),
        "total_seconds": round(time.perf_counter() - started, 3),
    }
    (directory / FIT_REPORT).write_text(json.dumps(report, indent=2) + "\n")
