"""QLoRA (``model.lora.load_in_4bit``) without a GPU: the config and preflight errors a CPU
machine gets before any work (through the CLI), and the loading path with the GPU part stood in
for. The stand-in (:func:`four_bit_stand_in`) is the only mock: ``from_pretrained`` records the
keywords raypo gives it and loads the tiny model in its own dtype instead of in 4 bits, flagged
``is_loaded_in_4bit`` as transformers flags a 4-bit model, and ``torch.cuda.current_device`` is
0. PEFT's k-bit preparation, the adapters, the reference, the export and the checkpoint code then
run as they do on a GPU."""

from __future__ import annotations

import dataclasses
import importlib.util
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import peft
import pytest
import torch
from hh_pairs import hh_columns
from transformers import AutoModelForCausalLM, BitsAndBytesConfig

from raypo import cli
from raypo.config import ConfigError, RaypoConfig, load_config
from raypo.data.collate import collate_pairs
from raypo.data.reference import ReferenceScorer, reference_fingerprint
from raypo.forward import reference_columns
from raypo.lora import (
    add_adapters,
    causal_lm,
    is_adapted,
    is_quantized,
    parameter_count,
    trainable_summary,
)
from raypo.models import load_policy, resolve_model_path
from raypo.preflight import check_inputs, check_resources
from raypo.run_layout import ExportLayout
from raypo.train.checkpoint import TrainState, load_trainable, save_checkpoint
from raypo.train.export import export_policy
from raypo.train.loop import _base_weights, _load_for_training, _reference
from raypo.train.manifest import CheckpointError
from raypo.train.worker_plan import WorkerPlan

REPO = Path(__file__).resolve().parents[1]
QUICKSTART = str(REPO / "configs" / "quickstart.yaml")
QLORA = [
    "--model.lora.enabled=true",
    "--model.lora.rank=4",
    "--model.lora.load_in_4bit=true",
    "--trainer.use_gpu=true",
]
"""A valid QLoRA config over the defaults (CPU-free checks only; nothing here runs on a GPU)."""


def _qlora_config(*overrides: str) -> RaypoConfig:
    return load_config(None, [*QLORA, *overrides])


@pytest.mark.parametrize(
    ("overrides", "key", "message"),
    [
        (
            ["--model.lora.load_in_4bit=true"],
            "model.lora.load_in_4bit",
            "4-bit weights are not trained, only adapters on them: set model.lora.enabled true",
        ),
        (
            ["--model.lora.enabled=true", "--model.lora.load_in_4bit=true"],
            "model.lora.load_in_4bit",
            "needs trainer.use_gpu true: bitsandbytes' 4-bit layers compute on CUDA GPUs",
        ),
        (
            [*QLORA, "--trainer.zero_stage=3"],
            "model.lora.load_in_4bit",
            "does not work with trainer.zero_stage 3 here: use zero_stage 2",
        ),
        (
            [*QLORA, "--reference.mode=precomputed", "--reference.gpus_per_actor=0"],
            "reference.gpus_per_actor",
            "the precomputed reference is the 4-bit base, which runs on GPUs",
        ),
    ],
    ids=["without_lora", "without_gpus", "zero_3", "cpu_reference_pass"],
)
def test_qlora_settings_that_cannot_work_name_the_key(
    overrides: list[str], key: str, message: str
) -> None:
    with pytest.raises(ConfigError) as error:
        load_config(None, overrides)
    assert error.value.key == key and message in str(error.value)


def test_the_shipped_qlora_config_is_the_lora_config_in_4_bits() -> None:
    qlora = load_config(REPO / "configs" / "llama-3-8b-qlora-ultrafeedback.yaml")
    lora = load_config(REPO / "configs" / "llama-3-8b-lora-ultrafeedback.yaml")
    assert qlora.model.lora == dataclasses.replace(lora.model.lora, load_in_4bit=True)
    same_model = dataclasses.replace(qlora.model, lora=lora.model.lora)
    assert dataclasses.replace(qlora, name=lora.name, model=same_model) == lora
    assert (qlora.trainer.use_gpu, qlora.trainer.zero_stage, qlora.model.dtype) == (
        True,
        2,
        "bf16",
    )
    assert qlora.reference.mode == "precomputed" and qlora.reference.gpus_per_actor == 1


def test_qlora_on_a_cpu_machine_fails_before_torch_and_ray_through_the_cli(
    tmp_path: Path,
) -> None:
    """The quickstart with QLoRA asked for: one config error naming the key and the way out,
    before torch, Ray, DeepSpeed or bitsandbytes is imported and before the run directory."""
    run_dir = tmp_path / "run"
    flags = ["--model.lora.enabled", "true", "--model.lora.load_in_4bit", "true"]
    code = (
        "import sys\n"
        "from raypo.cli import main\n"
        f"assert main(['train', {QUICKSTART!r}, *{flags!r}, '--run_dir', {str(run_dir)!r}]) == 2\n"
        "print(sorted({'torch', 'ray', 'deepspeed', 'bitsandbytes'} & set(sys.modules)))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120
    )
    assert result.stdout == "[]\n", result.stderr
    assert (
        "raypo: error: model.lora.load_in_4bit = True (from command line): needs "
        "trainer.use_gpu true: bitsandbytes' 4-bit layers compute on CUDA GPUs. Without GPUs "
        "train plain LoRA (model.lora.load_in_4bit false) in bf16 or fp32\n"
    ) in result.stderr
    assert "Traceback" not in result.stderr
    assert not run_dir.exists()


def test_qlora_without_bitsandbytes_names_the_extra_before_ray_starts(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == "bitsandbytes" else find_spec(name, *a),
    )
    run_dir = tmp_path / "run"
    flags = [*QLORA, "--reference.gpus_per_actor=1", f"--run_dir={run_dir}"]
    assert cli.main(["train", QUICKSTART, *flags]) == 2
    assert capsys.readouterr().err == (
        "raypo: error: model.lora.load_in_4bit = True: needs the bitsandbytes package: pip "
        "install 'raypo[qlora]'\n"
    )
    assert not run_dir.exists()
    check_inputs(load_config(QUICKSTART))  # a run without 4-bit loading does not need it


def test_a_cluster_without_gpus_is_named_for_qlora_not_for_use_gpu() -> None:
    config = _qlora_config("--reference.mode=online")
    with pytest.raises(ConfigError) as error:
        check_resources(config, {"CPU": 4.0})
    assert [problem.key for problem in error.value.errors] == ["model.lora.load_in_4bit"]
    message = str(error.value)
    assert "needs a CUDA GPU per worker (bitsandbytes' 4-bit layers), but the cluster " in message
    assert "has 0 GPU(s)" in message
    assert "--model.lora.load_in_4bit false --trainer.use_gpu false" in message
    check_resources(config, {"CPU": 4.0, "GPU": 1.0})


@pytest.fixture
def four_bit_stand_in(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    """The GPU part stood in for (module docstring); returns the keywords of every
    ``from_pretrained`` call of a causal LM."""
    calls: list[dict[str, Any]] = []
    real = AutoModelForCausalLM.from_pretrained

    def from_pretrained(source: str, **kwargs: Any) -> Any:
        calls.append(dict(kwargs))
        quantization = kwargs.pop("quantization_config", None)
        kwargs.pop("device_map", None)
        model = real(source, **kwargs)
        if quantization is not None:
            model.is_loaded_in_4bit = True
        return model

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", from_pretrained)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    return calls


def _adapted_4bit(config: RaypoConfig) -> Any:
    """The tiny policy loaded as a QLoRA worker loads it, with adapters whose B is random (a
    fresh adapter changes nothing)."""
    torch.manual_seed(0)
    model, _ = _load_for_training(config, resolve_model_path("tiny"))
    policy = add_adapters(model, config.model.lora, config.model.gradient_checkpointing)
    with torch.no_grad():
        for name, param in policy.named_parameters():
            if "lora_B" in name:
                param.copy_(0.1 * torch.randn_like(param))
    return policy


def test_the_4bit_base_is_asked_for_with_qlora_settings_in_the_model_dtype(
    raypo_cache: str, four_bit_stand_in: list[dict[str, Any]]
) -> None:
    """NF4, double quantisation, compute dtype = model.dtype, on the current GPU; a plain load
    asks for none of it."""
    model, _ = load_policy("tiny", "bf16", load_in_4bit=True)
    assert is_quantized(model)
    settings = four_bit_stand_in[-1]
    quantization = settings["quantization_config"]
    assert isinstance(quantization, BitsAndBytesConfig)
    assert quantization.load_in_4bit and not quantization.load_in_8bit
    assert quantization.bnb_4bit_quant_type == "nf4"
    assert quantization.bnb_4bit_use_double_quant
    assert quantization.bnb_4bit_compute_dtype == torch.bfloat16 == settings["dtype"]
    assert settings["device_map"] == {"": 0}
    plain, _ = load_policy("tiny", "bf16")
    assert "quantization_config" not in four_bit_stand_in[-1] and not is_quantized(plain)


def test_a_qlora_worker_prepares_the_4bit_base_and_trains_only_the_adapters(
    raypo_cache: str, four_bit_stand_in: list[dict[str, Any]], monkeypatch: pytest.MonkeyPatch
) -> None:
    prepared: list[Any] = []
    real_prepare = peft.prepare_model_for_kbit_training

    def prepare(model: Any, **kwargs: Any) -> Any:
        prepared.append(kwargs)
        return real_prepare(model, **kwargs)

    monkeypatch.setattr(peft, "prepare_model_for_kbit_training", prepare)
    config = _qlora_config("--model.gradient_checkpointing=true", "--reference.mode=online")
    policy = _adapted_4bit(config)
    assert "quantization_config" in four_bit_stand_in[-1]
    # raypo sets up checkpointing itself, as for plain LoRA
    assert prepared == [{"use_gradient_checkpointing": False}]
    assert is_adapted(policy) and is_quantized(policy)
    trainable = [name for name, p in policy.named_parameters() if p.requires_grad]
    assert trainable and all("lora_A" in name or "lora_B" in name for name in trainable)
    assert trainable_summary(policy).startswith(
        f"{sum(p.numel() for p in policy.parameters() if p.requires_grad):,} of "
    )


def test_the_online_qlora_reference_is_the_4bit_base_with_the_adapters_off(
    raypo_cache: str, four_bit_stand_in: list[dict[str, Any]], tmp_path: Path
) -> None:
    """No second model: the worker's reference is the policy's own 4-bit model under
    adapters_disabled, whose columns equal those of a separately loaded 4-bit base."""
    config = _qlora_config("--reference.mode=online")
    policy = _adapted_4bit(config)
    tiny = resolve_model_path("tiny")
    plan = WorkerPlan(config, 1, 1, tiny, tiny, tiny, str(tmp_path / "final"), has_eval=False)
    loads = len(four_bit_stand_in)
    reference, context = _reference(plan, policy, world_size=1)
    assert len(four_bit_stand_in) == loads  # nothing loaded
    assert reference is causal_lm(policy) and context is not None
    tokenizer = load_policy("tiny")[1]
    batch = collate_pairs(hh_columns(tokenizer, count=4), tokenizer.pad_token_id)
    with context():
        disabled = reference_columns(reference, batch)
    base, _ = load_policy("tiny", load_in_4bit=True)
    for name, value in reference_columns(base.eval(), batch).items():
        torch.testing.assert_close(disabled[name], value, rtol=0, atol=1e-6)


def test_the_precomputed_qlora_reference_is_the_4bit_base_and_cached_apart(
    raypo_cache: str, four_bit_stand_in: list[dict[str, Any]]
) -> None:
    config = _qlora_config("--reference.gpus_per_actor=1")
    scorer = ReferenceScorer(resolve_model_path("tiny"), config.model, 64, "off")
    assert "quantization_config" in four_bit_stand_in[-1] and is_quantized(scorer.model)
    lora = load_config(None, ["--model.lora.enabled=true", "--model.lora.rank=4"])
    # 4-bit loading is part of the reference pass's fingerprint; LoRA alone is not (its
    # reference is the base in the model's dtype, as without LoRA)
    assert reference_fingerprint(lora) == reference_fingerprint(load_config(None))
    assert reference_fingerprint(config) != reference_fingerprint(lora)


def test_the_qlora_export_merges_the_adapter_into_the_base_in_the_model_dtype(
    raypo_cache: str, four_bit_stand_in: list[dict[str, Any]], tmp_path: Path
) -> None:
    """final/ = the trained adapter merged into the base loaded without 4-bit settings (it
    computes what the adapted policy computes); the 4-bit policy is not merged in place."""
    config = _qlora_config("--reference.mode=online")
    policy = _adapted_4bit(config).eval()
    tokenizer = load_policy("tiny")[1]
    ids = collate_pairs(hh_columns(tokenizer, count=4), tokenizer.pad_token_id)["input_ids"]
    with torch.no_grad():
        expected = policy(input_ids=ids).logits
    engine = SimpleNamespace(module=policy, zero_optimization_stage=lambda: 0)
    final = tmp_path / "final"
    loads = len(four_bit_stand_in)
    tiny = resolve_model_path("tiny")
    export_policy(engine, tiny, final, rank=0, base_weights=lambda: _base_weights(config, tiny))
    assert [("quantization_config" in call) for call in four_bit_stand_in[loads:]] == [False]
    assert is_adapted(policy)
    assert any("lora_A" in name for name, _ in policy.named_parameters())
    assert (ExportLayout(final).adapter / "adapter_config.json").is_file()
    merged = AutoModelForCausalLM.from_pretrained(final, local_files_only=True).eval()
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=ids).logits, expected, rtol=0, atol=1e-5)


class _RecordingEngine:
    """Records the module options raypo gives DeepSpeed's save and load."""

    def __init__(self, module: torch.nn.Module) -> None:
        self.module = module
        self.options: dict[str, Any] = {}

    def save_checkpoint(self, directory: str, tag: str, **options: Any) -> None:
        self.options = options


def test_a_qlora_checkpoint_leaves_the_4bit_base_out_and_restores_every_adapter(
    raypo_cache: str, four_bit_stand_in: list[dict[str, Any]], tmp_path: Path
) -> None:
    """bitsandbytes' quantisation constants (state-dict entries of a 4-bit layer that no layer
    reads back; here one made-up key) are passed over; a missing adapter is an error."""
    config = _qlora_config("--reference.mode=online")
    policy = _adapted_4bit(config)
    engine = _RecordingEngine(policy)
    (tmp_path / "checkpoint").mkdir()
    save_checkpoint(tmp_path / "checkpoint", engine, TrainState(), 0, 1, None, None)
    assert engine.options == {"exclude_frozen_parameters": True}
    saved = {name: value for name, value in policy.state_dict().items() if "lora_" in name}
    saved["base_model.model.model.layers.0.self_attn.q_proj.base_layer.weight.absmax"] = torch.ones(
        4
    )
    fresh = add_adapters(load_policy("tiny", load_in_4bit=True)[0], config.model.lora)
    load_trainable(saved, fresh)
    for (name, value), (_, restored) in zip(
        policy.named_parameters(), fresh.named_parameters(), strict=True
    ):
        torch.testing.assert_close(restored, value, rtol=0, atol=0, msg=name)
    first = next(name for name in saved if "lora_B" in name)
    with pytest.raises(CheckpointError, match=f"first: {first}.*other model.lora settings"):
        load_trainable({k: v for k, v in saved.items() if k != first}, fresh)


def test_a_4bit_weight_counts_the_values_it_stands_for() -> None:
    """bitsandbytes stores two 4-bit values per byte, shape [n / 2, 1]; its quant_state keeps
    the weight's own shape."""
    packed = torch.nn.Parameter(torch.zeros(16, 1, dtype=torch.uint8), requires_grad=False)
    packed.quant_state = SimpleNamespace(shape=torch.Size([4, 8]))
    assert parameter_count(packed) == 32
    assert parameter_count(torch.nn.Parameter(torch.zeros(4, 8))) == 32
