"""TRL's names for raypo's settings, so that a TRL user's ``DPOConfig`` habits find their way.

:data:`TRL_FIELDS` maps a field of TRL's ``DPOConfig`` (and its ``TrainingArguments`` and
``ModelConfig`` parents) to the raypo setting that does the same, with the value to give where the
two differ in kind; :data:`TRL_LOSS_TYPES` maps TRL's ``loss_type`` values to raypo's objectives.
An unknown key with one of these names gets the raypo spelling as its suggestion (on the command
line with or without a section, and in YAML); the README's table lists the same pairs. Importing
this module imports nothing.
"""

from __future__ import annotations

TRL_FIELDS: dict[str, str] = {
    "model_name_or_path": "model.name_or_path",
    "torch_dtype": "model.dtype",
    "dtype": "model.dtype",
    "bf16": "model.dtype: bf16",
    "fp16": "model.dtype: fp16",
    "gradient_checkpointing": "model.gradient_checkpointing",
    "attn_implementation": "model.attn_implementation",
    "trust_remote_code": "model.trust_remote_code",
    "use_peft": "model.lora.enabled",
    "lora_r": "model.lora.rank",
    "lora_alpha": "model.lora.alpha",
    "lora_dropout": "model.lora.dropout",
    "lora_target_modules": "model.lora.target_modules",
    "load_in_4bit": "model.lora.load_in_4bit",
    "dataset_name": "data.path",
    "dataset_train_split": "data.split",
    "dataset_test_split": "data.eval_split",
    "max_length": "data.max_length",
    "max_prompt_length": "data.max_prompt_length",
    "max_completion_length": "data.max_completion_length",
    "truncation_mode": "data.truncation_mode",
    "loss_type": "loss.type",
    "beta": "loss.beta",
    "label_smoothing": "loss.label_smoothing",
    "simpo_gamma": "loss.gamma",
    "ref_model_name_or_path": "reference.model_name_or_path",
    "precompute_ref_log_probs": "reference.mode: precomputed (online = computed every step)",
    "precompute_ref_batch_size": "reference.batch_size",
    "per_device_train_batch_size": "trainer.per_device_batch_size",
    "gradient_accumulation_steps": "trainer.gradient_accumulation_steps",
    "learning_rate": "trainer.learning_rate",
    "weight_decay": "trainer.weight_decay",
    "adam_beta1": "trainer.adam_beta1",
    "adam_beta2": "trainer.adam_beta2",
    "adam_epsilon": "trainer.adam_epsilon",
    "lr_scheduler_type": "trainer.lr_scheduler",
    "warmup_ratio": "trainer.warmup_ratio",
    "warmup_steps": "trainer.warmup_steps",
    "num_train_epochs": "trainer.num_epochs",
    "max_steps": "trainer.max_steps",
    "max_grad_norm": "trainer.max_grad_norm",
    "padding_free": "trainer.padding_free",
    "deepspeed": "trainer.zero_stage (raypo writes the DeepSpeed config)",
    "logging_steps": "trainer.logging_steps",
    "save_steps": "trainer.save_steps",
    "save_total_limit": "trainer.save_total_limit",
    "eval_steps": "trainer.eval_steps",
    "report_to": "trainer.report_to",
    "run_name": "trainer.tracker_run_name",
    "output_dir": "run_dir",
    "seed": "seed",
}
"""TRL field -> the raypo key (and value, after ``:``) that does the same."""

TRL_LOSS_TYPES: dict[str, str] = {
    "sigmoid": "dpo",
    "ipo": "ipo",
    "hinge": "hinge",
    "simpo": "simpo",
}
"""TRL's ``loss_type`` (DPO's, and CPO's ``simpo``) -> raypo's ``loss.type``."""


def trl_hints() -> dict[str, str]:
    """TRL field -> the suggestion an unknown key of that name gets."""
    return {name: f"TRL's {name} is raypo's {target}" for name, target in TRL_FIELDS.items()}
