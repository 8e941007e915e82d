"""The vLLM sampler: a Ray actor holding one vLLM ``LLM`` engine.

Why an actor pool of our own and not Ray Data's LLM processor (``ray.data.llm``): evaluation
sets are small (hundreds to a few thousand prompts) and fit in the driver's memory, so Ray Data's
streaming buys nothing, while the pool gives what evaluation needs: one engine per actor that is
started once per model and killed before the next model (policy, then baseline) needs the GPUs;
one seed per request (``seed + prompt index``), so samples do not depend on how prompts are split
over actors; and the same actor interface as the transformers backend, so both are driven and
timed by one function (:func:`raypo.eval.sampling.sample_completions`). It scales the way the
processor would: data-parallel over ``eval.num_actors`` engines of ``eval.tensor_parallel_size``
GPUs each, vLLM's continuous batching inside each engine, near-linear while every actor keeps a
full batch (``max_num_seqs``) busy.

The engine gets the prompts as token ids (``TokensPrompt``), loads the weights in the run's
``model.dtype`` (fp32 on CPU makes greedy ids match transformers exactly), ignores the model's
``generation_config.json`` (``generation_config="vllm"``) so that only the ``eval`` settings
apply, and returns ids only (``detokenize=False``): the text is decoded by the policy's Hugging
Face tokenizer as in the transformers backend. A LoRA adapter directory (an adapter-only
``final/`` or ``final/adapter``) is served on its base: the engine loads the base with LoRA
enabled and every request names the adapter (``LoRARequest``), so no merged copy is written.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from raypo.config import EvalConfig
from raypo.generation import Generation, SamplingSettings, finish_completion

VLLM_DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
"""``model.dtype`` -> vLLM's ``dtype`` argument."""
KVCACHE_ENV = "VLLM_CPU_KVCACHE_SPACE"
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
"""The ``max_lora_rank`` values vLLM's engine accepts (its ``MaxLoRARanks``)."""


def cpu_runtime_env(config: EvalConfig) -> dict[str, Any]:
    """Ray runtime env of a CPU vLLM actor: the KV-cache size (an environment setting of vLLM's
    CPU backend) unless the environment already sets it."""
    space = os.environ.get(KVCACHE_ENV, str(config.vllm_cpu_kvcache_gib))
    return {"env_vars": {KVCACHE_ENV: space}}


def lora_engine_options(adapter: str, settings: dict[str, Any]) -> dict[str, Any]:
    """The ``LLM`` keywords that serve the adapter directory ``adapter`` (PEFT ``settings``) on
    its base: LoRA on, one adapter, room for its rank (the next rank vLLM accepts)."""
    rank = int(settings["r"])
    room = [allowed for allowed in VLLM_LORA_RANKS if allowed >= rank]
    if not room:
        raise ValueError(f"{adapter}: rank {rank} is above vLLM's largest ({VLLM_LORA_RANKS[-1]})")
    return {"enable_lora": True, "max_loras": 1, "max_lora_rank": room[0]}


class VLLMSampler:
    """Ray actor: one vLLM engine for ``model_path`` (a model, or a LoRA adapter directory served
    on its base) sampling from token-id prompts; ``trust_remote_code``
    (``model.trust_remote_code``) lets the engine and the tokenizer run code shipped with the
    model."""

    def __init__(
        self, model_path: str, dtype: str, config: EvalConfig, *, trust_remote_code: bool = False
    ) -> None:
        from vllm import LLM
        from vllm.lora.request import LoRARequest

        from raypo.lora import adapter_base, adapter_settings, is_adapter_dir
        from raypo.models import load_tokenizer

        base, tokenizer, options = model_path, model_path, {}
        self.lora_request = None
        if is_adapter_dir(model_path):
            base = adapter_base(model_path)
            # raypo's export writes the run's tokenizer beside the adapter (its chat template)
            if not (Path(model_path) / "tokenizer_config.json").is_file():
                tokenizer = base
            options = lora_engine_options(model_path, adapter_settings(model_path))
            self.lora_request = LoRARequest("policy", 1, model_path)
        self.tokenizer = load_tokenizer(tokenizer, trust_remote_code=trust_remote_code)
        self.llm = LLM(
            model=base,
            tokenizer=tokenizer,
            trust_remote_code=trust_remote_code,
            dtype=VLLM_DTYPES[dtype],
            seed=config.seed,
            tensor_parallel_size=config.tensor_parallel_size,
            gpu_memory_utilization=config.gpu_memory_utilization,
            enforce_eager=True,
            generation_config="vllm",
            **options,
        )

    def ready(self) -> bool:
        """True once the engine is up (the pool times generation from here)."""
        return True

    def generate(
        self, prompts: list[list[int]], settings: SamplingSettings, first_index: int
    ) -> list[Generation]:
        """``settings.n`` completions of each prompt; ``first_index`` numbers the prompts."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        params = [
            SamplingParams(
                n=settings.n,
                temperature=settings.temperature,
                top_p=settings.top_p,
                max_tokens=settings.max_tokens,
                seed=settings.seed + first_index + offset,
                detokenize=False,
            )
            for offset in range(len(prompts))
        ]
        inputs = [TokensPrompt(prompt_token_ids=ids) for ids in prompts]
        outputs = self.llm.generate(inputs, params, use_tqdm=False, lora_request=self.lora_request)
        eos = self.tokenizer.eos_token_id
        generations = []
        for offset, output in enumerate(outputs):
            for completion in output.outputs:
                ids = finish_completion(list(completion.token_ids), eos)
                text = self.tokenizer.decode(ids, skip_special_tokens=True)
                generations.append(Generation(first_index + offset, completion.index, text, ids))
        return generations
