"""The brief next-token fit of the tiny model that makes the quickstart's reference non-random."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from transformers import AutoModelForCausalLM, AutoTokenizer

from raypo.data import tiny_fit
from raypo.data.tiny_fit import FIT_REPORT, fit_reference, language_model_loss, read_fit_report
from raypo.models import builtin_data_path, load_policy, resolve_model_path

MAX_LENGTH = 64


@pytest.fixture(scope="module")
def tiny_dir(raypo_cache: str) -> str:
    return resolve_model_path("tiny")


@pytest.fixture(scope="module")
def texts() -> tuple[list[str], list[str]]:
    """96 chosen HH dialogues: 64 to fit on, 32 held out."""
    with builtin_data_path("hh_sample").open(encoding="utf-8") as handle:
        chosen = [json.loads(line)["chosen"] for line in handle][:96]
    return chosen[:64], chosen[64:]


@pytest.fixture(scope="module")
def fitted(
    tiny_dir: str, texts: tuple[list[str], list[str]], tmp_path_factory: pytest.TempPathFactory
) -> Path:
    output = tmp_path_factory.mktemp("fit") / "tiny-fit"
    return fit_reference(tiny_dir, texts[0], output, steps=30, max_length=MAX_LENGTH)


def test_fit_reduces_training_and_held_out_loss(
    tiny_dir: str, texts: tuple[list[str], list[str]], fitted: Path
) -> None:
    train, held_out = texts
    report = read_fit_report(fitted)
    assert report is not None and report["steps"] == 30 and report["loss_texts"] == 64
    # A random 512-token model predicts about uniformly: ln(512) = 6.24 nats per token.
    assert report["loss_before"] == pytest.approx(math.log(512), abs=0.1)
    # 30 steps at 3e-3 reach about 4.5 (measured: 6.25 -> 4.65); demand a 1-nat drop.
    assert report["loss_after"] < report["loss_before"] - 1.0

    model = AutoModelForCausalLM.from_pretrained(fitted)
    tokenizer = AutoTokenizer.from_pretrained(fitted)
    base, base_tokenizer = load_policy(tiny_dir)
    assert language_model_loss(model, tokenizer, train, MAX_LENGTH) == pytest.approx(
        report["loss_after"], abs=1e-4
    )
    held_before = language_model_loss(base, base_tokenizer, held_out, MAX_LENGTH)
    held_after = language_model_loss(model, tokenizer, held_out, MAX_LENGTH)
    assert held_after < held_before - 1.0


def test_same_fit_is_reused(
    tiny_dir: str,
    texts: tuple[list[str], list[str]],
    fitted: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def refit(*args: object) -> None:
        raise AssertionError("a completed fit with the same fingerprint must be reused")

    monkeypatch.setattr(tiny_fit, "_fit_into", refit)
    weights = (fitted / "model.safetensors").stat().st_mtime_ns
    assert fit_reference(tiny_dir, texts[0], fitted, steps=30, max_length=MAX_LENGTH) == fitted
    assert (fitted / "model.safetensors").stat().st_mtime_ns == weights
    # Other settings or texts are another fit.
    for change in ({"steps": 31}, {"learning_rate": 1e-3}, {"seed": 1}):
        arguments = {"steps": 30, "max_length": MAX_LENGTH} | change
        with pytest.raises(AssertionError, match="must be reused"):
            fit_reference(tiny_dir, texts[0], fitted, **arguments)
    with pytest.raises(AssertionError, match="must be reused"):
        fit_reference(tiny_dir, texts[0][:-1], fitted, steps=30, max_length=MAX_LENGTH)


def test_a_changed_fit_replaces_the_old_one(
    tiny_dir: str, texts: tuple[list[str], list[str]], tmp_path: Path
) -> None:
    output = tmp_path / "fit"
    fit_reference(tiny_dir, texts[0][:8], output, steps=1, batch_size=4, max_length=16)
    first = read_fit_report(output)
    fit_reference(tiny_dir, texts[0][:8], output, steps=2, batch_size=4, max_length=16)
    second = read_fit_report(output)
    assert first is not None and second is not None
    assert (first["steps"], second["steps"]) == (1, 2)
    assert first["fingerprint"] != second["fingerprint"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fit"]  # no staging left behind


def test_refuses_foreign_directory_and_bad_arguments(
    tiny_dir: str, texts: tuple[list[str], list[str]], tmp_path: Path
) -> None:
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match=FIT_REPORT):
        fit_reference(tiny_dir, texts[0], tmp_path, steps=1)
    assert (tmp_path / "notes.txt").read_text() == "mine"
    with pytest.raises(ValueError, match="model directory"):
        fit_reference("EleutherAI/pythia-70m", texts[0], tmp_path / "a", steps=1)
    with pytest.raises(ValueError, match="steps >= 1"):
        fit_reference(tiny_dir, texts[0], tmp_path / "b", steps=0)
    with pytest.raises(ValueError, match="steps >= 1"):
        fit_reference(tiny_dir, [], tmp_path / "c", steps=1)
