"""Export of the trained policy (``RUN_DIR/final``) on the tiny model: the weights load back and
the saved tokenizer carries the chat template the run tokenised with."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from raypo.models import CHAT_TEMPLATE, load_policy, resolve_model_path
from raypo.train.export import export_policy, save_tokenizer

RUN_TEMPLATE = (
    "{%- for message in messages -%}<{{ message['role'] }}>{{ message['content'] }}{%- endfor -%}"
)


def test_export_keeps_the_runs_chat_template(tmp_path: Path, raypo_cache: str) -> None:
    """A stage-0 engine's module and the tokenizer with ``data.chat_template`` in place of the
    tokenizer's own: the export loads back with the same weights and the run's template."""
    path = resolve_model_path("tiny")
    model, _ = load_policy(path, "fp32")
    engine = SimpleNamespace(module=model, zero_optimization_stage=lambda: 0)
    final = tmp_path / "final"
    export_policy(engine, path, final, rank=0, chat_template=RUN_TEMPLATE)
    assert AutoTokenizer.from_pretrained(final).chat_template == RUN_TEMPLATE
    loaded = AutoModelForCausalLM.from_pretrained(final)
    for name, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], value), name


def test_tokenizer_without_a_run_template_keeps_its_own(tmp_path: Path, raypo_cache: str) -> None:
    save_tokenizer(resolve_model_path("tiny"), tmp_path)
    assert AutoTokenizer.from_pretrained(tmp_path).chat_template == CHAT_TEMPLATE
