"""LoRA on the tiny model (:mod:`raypo.lora`): the ``model.lora`` config section, the adapted
policy's trainable parameters, the adapter-disabled reference against a separate frozen copy,
and the merged export against base + adapter."""

from __future__ import annotations

import dataclasses
import importlib.util
from functools import partial
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from hh_pairs import hh_columns
from peft import PeftModel
from transformers import AutoModelForCausalLM

from raypo.config import ConfigError, LossConfig, config_to_yaml, load_config
from raypo.config_inputs import LoraConfig
from raypo.data.collate import collate_pairs
from raypo.eval.run import ModelPaths, check_backend_loads, model_paths
from raypo.eval.sampling import BackendChoice, EvalError
from raypo.forward import reference_columns
from raypo.lora import (
    adapters_disabled,
    add_adapters,
    causal_lm,
    is_adapter_dir,
    peft_config,
    save_adapted,
    trainable_summary,
)
from raypo.models import load_policy, resolve_model_path
from raypo.run_layout import ExportLayout, RunLayout
from raypo.step import StepResult, preference_step
from raypo.train.export import export_policy
from raypo.train.loop import _reference, param_groups
from raypo.train.worker_plan import WorkerPlan
from raypo.tune.run import shares_preparation
from raypo.tune.space import apply_params

LORA = LoraConfig(enabled=True, rank=4, alpha=8.0)


def _adapted(gradient_checkpointing: bool = False):
    """The tiny policy with rank-4 adapters on every linear layer, their B matrices random (a
    fresh adapter has B = 0 and changes nothing), and its tokenizer."""
    torch.manual_seed(0)
    model, tokenizer = load_policy("tiny")
    if gradient_checkpointing:
        model.gradient_checkpointing_enable()
    policy = add_adapters(model, LORA, gradient_checkpointing)
    with torch.no_grad():
        for name, param in policy.named_parameters():
            if "lora_B" in name:
                param.copy_(0.1 * torch.randn_like(param))
    return policy, tokenizer


def _batch(tokenizer):
    return collate_pairs(hh_columns(tokenizer, count=4), tokenizer.pad_token_id)


def _step_against_disabled_adapters(policy, batch: dict, loss: LossConfig) -> StepResult:
    """The step of the online LoRA reference: the policy with its adapters disabled."""
    return preference_step(
        causal_lm(policy),
        batch,
        loss,
        reference_model=causal_lm(policy),
        reference_context=lambda: adapters_disabled(policy),
    )


def test_lora_section_nests_under_model_from_yaml_and_overrides(tmp_path: Path) -> None:
    path = tmp_path / "run.yaml"
    path.write_text("model:\n  lora:\n    enabled: true\n    rank: 8\n")
    config = load_config(path, ["--model.lora.target_modules=q_proj,v_proj"])
    assert config.model.lora == LoraConfig(
        enabled=True, rank=8, target_modules=["q_proj", "v_proj"]
    )
    assert not load_config().model.lora.enabled  # off unless asked for
    saved = tmp_path / "resolved.yaml"
    saved.write_text(config_to_yaml(config))
    assert load_config(saved) == config


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["--model.lora.rnk=4"], "unknown key; did you mean model.lora.rank?"),
        (["--model.lora.rank=0"], "model.lora.rank = 0 (from command line): must be >= 1"),
        (["--model.lora.dropout=1"], "must be in [0, 1)"),
        (
            ["--model.lora.target_modules=all-linear,q_proj"],
            "all-linear stands alone: it already names every linear layer",
        ),
    ],
)
def test_bad_lora_settings_name_the_key(overrides: list[str], message: str) -> None:
    with pytest.raises(ConfigError) as error:
        load_config(None, overrides)
    assert message in str(error.value)


def test_lora_without_peft_installed_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "peft" else find_spec(name)
    )
    with pytest.raises(ConfigError, match=r"pip install 'raypo\[lora\]'"):
        load_config(None, ["--model.lora.enabled=true"])
    assert not load_config().model.lora.enabled  # a run without LoRA does not need peft


def test_only_adapter_parameters_are_trained(raypo_cache: str) -> None:
    policy, _ = _adapted()
    trainable = [name for name, p in policy.named_parameters() if p.requires_grad]
    assert trainable and all("lora_A" in name or "lora_B" in name for name in trainable)
    # every linear layer of every decoder block (7 in a Llama block) has A and B; no lm_head
    blocks = policy.config.num_hidden_layers
    assert len(trainable) == 2 * 7 * blocks
    adapter_size = sum(p.numel() for name, p in policy.named_parameters() if "lora_" in name)
    assert trainable_summary(policy).startswith(f"{adapter_size:,} of ")
    optimized = [p for group in param_groups(policy, 0.01) for p in group["params"]]
    assert {id(p) for p in optimized} == {id(p) for p in policy.parameters() if p.requires_grad}


def test_output_layer_adapter_is_refused(raypo_cache: str) -> None:
    model, _ = load_policy("tiny")
    with pytest.raises(ValueError, match="output layer"):
        add_adapters(model, LoraConfig(enabled=True, target_modules=["q_proj", "lm_head"]))


def test_adapter_disabled_reference_equals_a_separate_frozen_copy(raypo_cache: str) -> None:
    policy, tokenizer = _adapted()
    frozen, _ = load_policy("tiny")
    batch = _batch(tokenizer)
    policy.train()
    with adapters_disabled(policy):
        assert not policy.training  # as a separate reference in eval mode
        disabled = reference_columns(causal_lm(policy), batch)
    assert policy.training  # restored on exit
    expected = reference_columns(frozen.eval(), batch)
    for name, value in expected.items():
        torch.testing.assert_close(disabled[name], value, rtol=0, atol=1e-6)
    adapted = reference_columns(causal_lm(policy), batch)
    assert not torch.allclose(adapted["ref_chosen_logps"], expected["ref_chosen_logps"])


@pytest.mark.parametrize("gradient_checkpointing", [False, True])
def test_step_with_the_disabled_adapter_reference_trains_only_the_adapters(
    raypo_cache: str, gradient_checkpointing: bool
) -> None:
    """The step with ``reference_context`` gives the loss of the step with a separate frozen
    reference, and its gradient reaches the adapters only (also through checkpointed blocks)."""
    policy, tokenizer = _adapted(gradient_checkpointing)
    frozen, _ = load_policy("tiny")
    batch, loss = _batch(tokenizer), LossConfig(type="mallows_theta", beta=0.5)
    policy.train()
    shared = _step_against_disabled_adapters(policy, batch, loss)
    separate = preference_step(causal_lm(policy), batch, loss, reference_model=frozen.eval())
    torch.testing.assert_close(shared.loss, separate.loss, rtol=1e-6, atol=1e-7)
    shared.loss.backward()
    grads = {name: p.grad for name, p in policy.named_parameters() if p.grad is not None}
    assert all("lora_" in name for name in grads)
    lora_b = [g for name, g in grads.items() if "lora_B" in name]
    assert len(lora_b) == 7 * policy.config.num_hidden_layers
    assert all(bool(g.abs().sum() > 0) for g in lora_b)


def test_merged_export_equals_base_plus_adapter(raypo_cache: str, tmp_path: Path) -> None:
    policy, tokenizer = _adapted()
    ids = _batch(tokenizer)["input_ids"]
    assert save_adapted(policy, tmp_path) == ExportLayout(tmp_path).adapter
    merged = AutoModelForCausalLM.from_pretrained(tmp_path, local_files_only=True).eval()
    base = AutoModelForCausalLM.from_pretrained(resolve_model_path("tiny"))
    reloaded = PeftModel.from_pretrained(base, ExportLayout(tmp_path).adapter).eval()
    assert not any("lora" in name for name, _ in merged.named_parameters())
    with torch.no_grad():
        expected = reloaded(input_ids=ids).logits
        torch.testing.assert_close(merged(input_ids=ids).logits, expected, rtol=0, atol=1e-5)
        with reloaded.disable_adapter():
            base_logits = reloaded(input_ids=ids).logits
    assert (base_logits - expected).abs().max() > 1e-3  # the adapter changed the model


def test_tune_searches_the_lora_rank_and_alpha_on_one_preparation() -> None:
    config = load_config(
        None,
        [
            "--model.lora.enabled=true",
            "--tune.search_space.model.lora.rank=choice([4, 16])",
            "--tune.search_space.model.lora.alpha=loguniform(4, 64)",
        ],
    )
    assert set(config.tune.search_space) == {"model.lora.rank", "model.lora.alpha"}
    trial = apply_params(config, {"model.lora.rank": 4, "model.lora.alpha": 8.0}, "t0", "runs/t0")
    assert (trial.model.lora.rank, trial.model.lora.alpha) == (4, 8.0)
    assert all(shares_preparation(key) for key in config.tune.search_space)
    assert not shares_preparation("model.name_or_path")
    with pytest.raises(ConfigError, match="must be >= 1"):
        load_config(None, ["--tune.search_space.model.lora.rank=choice([0, 4])"])


def test_every_lora_setting_reaches_peft() -> None:
    lora = LoraConfig(
        enabled=True,
        rank=2,
        alpha=3.0,
        dropout=0.1,
        target_modules=["q_proj", "v_proj"],
        modules_to_save=["embed_tokens"],
        use_rslora=True,
        use_dora=True,
    )
    settings = peft_config(lora)
    assert (settings.r, settings.lora_alpha, settings.lora_dropout) == (2, 3.0, 0.1)
    assert settings.target_modules == {"q_proj", "v_proj"}
    assert settings.modules_to_save == ["embed_tokens"]
    assert settings.use_rslora and settings.use_dora
    assert peft_config(LORA).target_modules == "all-linear"  # PEFT's shorthand, not a name
    assert peft_config(LORA).modules_to_save is None


@pytest.mark.parametrize("stage", [0, 3])
def test_exported_adapter_directory_loads_as_the_merged_model(
    raypo_cache: str, tmp_path: Path, stage: int
) -> None:
    """export_policy of a LoRA policy (a stand-in engine; under ZeRO-3 its gathered state dict
    is loaded into a fresh adapted copy): final/adapter holds the adapter and the run's
    tokenizer, and load_policy (which raypo eval's hf backend uses) loads it merged into its
    base, as final/ itself; vLLM sampling takes it too (served on its base)."""
    policy, tokenizer = _adapted()
    ids = _batch(tokenizer)["input_ids"]
    with torch.no_grad():
        expected = policy(input_ids=ids).logits
    state_dict = policy.state_dict()
    engine = SimpleNamespace(
        module=policy,
        zero_optimization_stage=lambda: stage,
        _zero3_consolidated_16bit_state_dict=lambda: state_dict,
    )
    final, tiny = tmp_path / "final", resolve_model_path("tiny")
    fresh = partial(add_adapters, load_policy("tiny")[0], LORA)  # B = 0 until the load
    export_policy(engine, tiny, final, rank=0, chat_template="{{ x }}", unpartitioned_policy=fresh)
    adapter = ExportLayout(final).adapter
    assert is_adapter_dir(adapter) and not is_adapter_dir(final)
    for path in (final, adapter):
        model, loaded_tokenizer = load_policy(str(path))
        assert loaded_tokenizer.chat_template == "{{ x }}"
        with torch.no_grad():
            logits = model(input_ids=ids).logits
        torch.testing.assert_close(logits, expected, rtol=0, atol=1e-5)
    paths = ModelPaths(str(adapter), tiny, tiny, "reference")
    check_backend_loads(BackendChoice("hf", ""), paths)
    check_backend_loads(BackendChoice("vllm", ""), paths)


@pytest.mark.parametrize(
    ("variant", "named"),
    [({"use_dora": True}, "use_dora"), ({"modules_to_save": ["embed_tokens"]}, "modules_to_save")],
)
def test_vllm_refuses_an_adapter_its_lora_does_not_serve(
    raypo_cache: str, tmp_path: Path, variant: dict, named: str
) -> None:
    """vLLM's LoRA has no DoRA and no modules trained in full: such an adapter is refused for
    eval.backend vllm, naming the setting and the two ways out; hf still takes it."""
    policy = add_adapters(load_policy("tiny")[0], dataclasses.replace(LORA, **variant))
    adapter = save_adapted(policy, tmp_path / "final", merge=False)
    tiny = resolve_model_path("tiny")
    paths = ModelPaths(str(adapter), tiny, tiny, "reference")
    check_backend_loads(BackendChoice("hf", ""), paths)
    with pytest.raises(EvalError, match=f"LoRA adapter with {named}.*eval.backend hf"):
        check_backend_loads(BackendChoice("vllm", ""), paths)


def test_online_reference_is_the_policy_unless_other_weights_are_named(
    raypo_cache: str, tmp_path: Path
) -> None:
    """With LoRA the worker's online reference is the policy's own model under
    adapters_disabled; a reference.model_name_or_path of other weights loads those instead, and
    a precomputed reference loads nothing."""
    policy, tokenizer = _adapted()
    tiny = resolve_model_path("tiny")
    config = load_config(None, ["--model.lora.enabled=true", "--reference.mode=online"])
    plan = WorkerPlan(config, 1, 1, tiny, tiny, tiny, str(tmp_path / "final"), has_eval=False)
    reference, context = _reference(plan, policy, world_size=1)
    assert reference is causal_lm(policy) and context is not None
    policy.train()
    with context():
        assert not policy.training
    other = tmp_path / "other"
    load_policy("tiny")[0].save_pretrained(other)
    tokenizer.save_pretrained(other)
    reference, context = _reference(
        dataclasses.replace(plan, reference_path=str(other)), policy, world_size=1
    )
    assert context is None and not any(p.requires_grad for p in reference.parameters())
    assert not any("lora" in name for name, _ in reference.named_parameters())
    precomputed = dataclasses.replace(
        config, reference=dataclasses.replace(config.reference, mode="precomputed")
    )
    assert _reference(dataclasses.replace(plan, config=precomputed), policy, 1) == (None, None)


def test_adapter_only_export_is_final_itself_and_evaluates(
    raypo_cache: str, tmp_path: Path
) -> None:
    """model.lora.merge_on_export false: final/ is the adapter (no merged weights), which
    load_policy loads merged into its base and raypo eval takes as the run's policy."""
    policy, tokenizer = _adapted()
    ids = _batch(tokenizer)["input_ids"]
    with torch.no_grad():
        expected = policy(input_ids=ids).logits
    engine = SimpleNamespace(module=policy, zero_optimization_stage=lambda: 0)
    config = load_config(None, [f"--run_dir={tmp_path / 'run'}", "--model.lora.enabled=true"])
    final = RunLayout(config.run_path).final
    export_policy(engine, resolve_model_path("tiny"), final, rank=0, merge=False)
    assert is_adapter_dir(final) and not ExportLayout(final).adapter.exists()
    assert not any(path.name == "model.safetensors" for path in final.iterdir())
    model, _ = load_policy(str(final))
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, expected, rtol=0, atol=1e-5)
    assert model_paths(config).policy == str(final)


@pytest.mark.parametrize(
    "variant",
    [
        {"use_dora": True},
        {"use_rslora": True},
        {"modules_to_save": ["embed_tokens"]},
        {"target_modules": ["q_proj", "v_proj"], "dropout": 0.1},
    ],
    ids=["dora", "rslora", "modules_to_save", "q_v_dropout"],
)
def test_lora_variants_keep_the_base_as_reference_and_export_what_they_trained(
    raypo_cache: str, tmp_path: Path, variant: dict
) -> None:
    """Each setting through the step and the export: adapters disabled give the frozen
    model's reference columns; one optimizer step moves the policy; the merged export computes
    what the trained adapted policy computes."""
    model, tokenizer = load_policy("tiny")
    policy = add_adapters(model, dataclasses.replace(LORA, **variant))
    frozen, _ = load_policy("tiny")
    batch, loss = _batch(tokenizer), LossConfig(type="dpo", beta=1.0)
    optimizer = torch.optim.Adam([p for p in policy.parameters() if p.requires_grad], lr=1e-2)
    policy.train()
    for _ in range(2):  # B = 0 at first: the second step is the one that moves the policy
        step = _step_against_disabled_adapters(policy, batch, loss)
        step.loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    with adapters_disabled(policy):
        disabled = reference_columns(causal_lm(policy), batch)
    for name, value in reference_columns(frozen.eval(), batch).items():
        torch.testing.assert_close(disabled[name], value, rtol=0, atol=1e-6)
    policy.eval()
    with torch.no_grad():
        trained = policy(input_ids=batch["input_ids"]).logits
        assert not torch.allclose(trained, frozen(input_ids=batch["input_ids"]).logits)
    save_adapted(policy, tmp_path)
    merged = AutoModelForCausalLM.from_pretrained(tmp_path, local_files_only=True).eval()
    with torch.no_grad():
        logits = merged(input_ids=batch["input_ids"]).logits
    torch.testing.assert_close(logits, trained, rtol=0, atol=1e-5)
