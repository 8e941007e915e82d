"""The model and data sections of the config: which weights to start from, which pairs to train on.

Re-exported by :mod:`raypo.config`, which holds the other sections and the loading functions.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment

from raypo.config_base import ConfigError, Section, bounded

TINY_MODEL = "tiny"
"""The ``model.name_or_path`` value that selects the embedded tiny model (:mod:`raypo.models`)."""

ALL_LINEAR = "all-linear"
"""PEFT's name for every linear layer of the model except its output layer."""


@dataclass(frozen=True)
class LoraConfig(Section):
    """Low-rank adapters (LoRA, Hu et al. 2021) on the policy, with the ``peft`` package: only
    the adapters (and the MixDPO strength) are trained; the reference is the same model with
    its adapters disabled, so no second copy of the weights is held."""

    SECTION: ClassVar[str] = "model.lora"

    enabled: bool = False
    """Train adapters instead of every weight (needs ``pip install raypo[lora]``). The online
    reference is then the policy with its adapters disabled (unless
    ``reference.model_name_or_path`` names other weights); ``final/`` holds the merged model and
    ``final/adapter/`` the adapter in PEFT format (see ``merge_on_export``)."""
    rank: int = bounded(16, ">= 1")
    """Rank r of each adapter's low-rank update B A (PEFT's ``r``)."""
    alpha: float = bounded(32.0, "> 0")
    """Scale numerator: the update is multiplied by alpha / r (alpha / sqrt(r) with
    ``use_rslora``); PEFT's ``lora_alpha``."""
    dropout: float = bounded(0.0, "[0, 1)")
    """Dropout on each adapter's input (PEFT's ``lora_dropout``); independent of
    ``model.disable_dropout``, which zeroes the base model's own dropout."""
    target_modules: list[str] = field(default_factory=lambda: [ALL_LINEAR])
    """Names (or name suffixes) of the modules that get adapters, e.g. ``[q_proj, v_proj]``;
    ``[all-linear]`` = every linear layer except the output layer, whatever the architecture
    calls them. The output layer (lm_head) cannot take an adapter: raypo computes log-probs from
    its weight in chunks."""
    modules_to_save: list[str] = field(default_factory=list)
    """Modules trained in full beside the adapters and saved with them (e.g. ``[embed_tokens]``
    after adding tokens); [] = none. Not the output layer (see ``target_modules``)."""
    use_rslora: bool = False
    """Rank-stabilised LoRA (Kalajdzievski 2023): scale by alpha / sqrt(r) instead of alpha / r,
    so that a larger rank does not shrink the update."""
    use_dora: bool = False
    """Weight-decomposed LoRA (DoRA, Liu et al. 2024): adapts the direction and learns the
    magnitude of each weight row separately; slower per step than plain LoRA."""
    merge_on_export: bool = True
    """``final/`` = the merged model (base + adapter as plain weights, loadable by transformers
    and vLLM), with the adapter in ``final/adapter/``. false = ``final/`` is the adapter alone
    (PEFT format and tokenizer: megabytes instead of the whole model), which ``raypo eval``
    (``hf`` merges it into its base, ``vllm`` serves it on its base) and
    ``PeftModel.from_pretrained`` load onto its base."""
    load_in_4bit: bool = False
    """QLoRA (Dettmers et al. 2023): load the base weights in 4 bits with bitsandbytes (NF4 with
    double quantisation, computing in ``model.dtype``; Llama-3-8B's base takes 5.7 GB of GPU
    memory instead of 16) and train the adapters on them in ``model.dtype``. Needs CUDA GPUs
    (``trainer.use_gpu``), ``trainer.zero_stage`` 0-2 and ``pip install 'raypo[qlora]'``. The
    reference is loaded the same way, so that it is the model training starts from: the online
    one is the 4-bit base with the adapters disabled (or the 4-bit weights of
    ``reference.model_name_or_path``), the precomputed pass runs it on GPUs
    (``reference.gpus_per_actor`` > 0). ``final/`` holds the adapter merged into the base loaded
    in ``model.dtype``, not into the 4-bit one."""

    def _validate(self) -> None:
        self._require(
            self.enabled or not self.load_in_4bit,
            "load_in_4bit",
            "4-bit weights are not trained, only adapters on them: set model.lora.enabled true",
        )
        targets = self.target_modules
        self._require(bool(targets), "target_modules", f"must not be empty (default: {ALL_LINEAR})")
        self._require(
            ALL_LINEAR not in targets or len(targets) == 1,
            "target_modules",
            f"{ALL_LINEAR} stands alone: it already names every linear layer",
        )
        if self.enabled and importlib.util.find_spec("peft") is None:
            problem = "needs the peft package: pip install 'raypo[lora]'"
            raise ConfigError(self._key("enabled"), True, problem)


@dataclass(frozen=True)
class ModelConfig(Section):
    """The policy model: which weights, in which precision, with which attention."""

    SECTION: ClassVar[str] = "model"

    name_or_path: str = TINY_MODEL
    """Policy to start from: a hub id (``EleutherAI/pythia-2.8b``), a directory written by
    ``save_pretrained``, or ``tiny`` = the embedded ~150k-parameter Llama model and 512-token BPE
    tokenizer that :func:`raypo.models.resolve_model_path` builds offline (cached under
    ``$RAYPO_CACHE_DIR``). All objectives."""
    tokenizer_name_or_path: str | None = None
    """Tokenizer to use; null = the one stored with ``name_or_path``."""
    dtype: Literal["fp32", "bf16", "fp16"] = "fp32"
    """Precision of the weights and of DeepSpeed's mixed-precision training: fp32 or bf16 on CPU
    (DeepSpeed's CPU backend has no fp16), bf16 on Ampere or newer GPUs. Log-probs, entropies and
    losses are computed in float32 or wider whatever this is."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass: less memory, about 30% more compute."""
    trust_remote_code: bool = False
    """Let ``from_pretrained`` run Python code shipped with a hub model; off = only models that
    transformers itself implements load."""
    attn_implementation: Literal["eager", "sdpa", "flash_attention_2"] = "sdpa"
    """Attention kernel passed to ``from_pretrained`` for the policy and the reference, in
    training, the reference pass and evaluation; ``flash_attention_2`` needs a GPU and the
    flash-attn package."""
    disable_dropout: bool = True
    """Set every dropout of the policy and the reference to 0 when they are loaded for training
    and for the reference pass, as TRL's ``disable_dropout`` (default on) does: with dropout the
    policy's log-probs in train mode are noisy against the reference's (computed without), and
    that noise enters every reward margin. Off = keep the model's own dropout rates."""
    router_aux_loss_coef: float | None = bounded(None, ">= 0")
    """Weight of a Mixture-of-Experts policy's router load-balancing loss, added to the
    preference loss and logged as ``aux_loss``, as TRL's ``router_aux_loss_coef``; null = the
    model config's own ``router_aux_loss_coef`` (0.001 for Mixtral and Qwen2-MoE), 0 = none. Only
    models whose config has ``output_router_logits`` have this loss; a non-zero value for any
    other model is an error."""
    lora: LoraConfig = field(default_factory=LoraConfig)
    """Low-rank adapters instead of full fine-tuning (:class:`LoraConfig`); off by default."""
    tiny_fit_steps: int = bounded(0, ">= 0")
    """Only for ``name_or_path: tiny``: steps of a ``raypo sft`` run on the training split's
    chosen completions into ``RUN_DIR/tiny-fit`` before preference training, whose ``final/``
    is then the policy and the reference, so that the reference is not random; 0 = keep the
    random initialisation."""

    @property
    def tokenizer_path(self) -> str:
        """The tokenizer to load: ``tokenizer_name_or_path``, else ``name_or_path``."""
        if self.tokenizer_name_or_path is None:
            return self.name_or_path
        return self.tokenizer_name_or_path

    @property
    def load_kwargs(self) -> dict[str, Any]:
        """What this section tells ``from_pretrained``: the keyword arguments ``dtype``,
        ``attn_implementation`` and ``trust_remote_code`` of :func:`raypo.models.load_policy`
        and of the evaluation loaders."""
        return {
            "dtype": self.dtype,
            "attn_implementation": self.attn_implementation,
            "trust_remote_code": self.trust_remote_code,
        }

    def _validate(self) -> None:
        self._require(bool(self.name_or_path.strip()), "name_or_path", "must not be empty")


@dataclass(frozen=True)
class DataConfig(Section):
    """Where the preference pairs come from; how they are checked, tokenised and split."""

    SECTION: ClassVar[str] = "data"

    path: str = "builtin:hh_sample"
    """Training data: a file, glob or directory of shards (JSONL, Parquet), a directory written by
    ``datasets.save_to_disk``, a ``datasets.load_dataset`` name, or ``builtin:NAME`` = a sample
    shipped in the package (``builtin:hh_sample``: 400 raw HH-RLHF harmless pairs)."""
    format: Literal["auto", "jsonl", "parquet", "hf_disk", "hf"] = "auto"
    """How ``path`` is stored: ``jsonl`` / ``parquet`` files, ``hf_disk`` (a ``save_to_disk``
    directory) or ``hf`` (``datasets.load_dataset(path)``). ``auto`` decides from the path (file
    suffixes, a ``dataset_info.json``, ``builtin:``); anything else is ``hf``."""
    schema: Literal[
        "auto", "pairs", "hh", "implicit", "conversational", "completion", "messages"
    ] = "auto"
    """Shape of a row. ``pairs``: prompt/chosen/rejected strings. ``hh``: chosen/rejected each a
    whole raw HH dialogue (``\\n\\nHuman:`` / ``\\n\\nAssistant:``), split at the last shared
    Assistant turn. ``implicit``: chosen/rejected strings that both start with the prompt (TRL's
    implicit prompt), split where they first differ as TRL's ``extract_prompt`` does.
    ``conversational``: chat message lists (role/content, a content may be a list of text parts)
    rendered with the chat template; prompt messages repeated at the start of chosen/rejected (as
    in UltraFeedback binarized) are removed. Rows with one completion, read only by ``raypo
    sft``: ``completion`` = prompt and completion columns (strings, or message lists: TRL's
    prompt-completion format); ``messages`` = one message list whose last message, an assistant
    message, is the completion and the messages before it the prompt. ``auto`` decides per row:
    no chosen and no rejected column -> messages when the row has ``messages_field``, else
    completion; message lists -> conversational, a prompt column -> pairs, else hh when both hold
    ``\\n\\nAssistant:``, else implicit."""
    hf_name: str | None = None
    """Dataset configuration name given to ``load_dataset`` (``format: hf``); null = none. When
    ``path`` is a local file or glob, the builder reading it as ``data_files`` (``json``,
    ``parquet``, ``csv``; null = from the suffix): ``format: hf, hf_name: json, path: x.jsonl``
    is ``load_dataset("json", data_files="x.jsonl", split=split)``."""
    hf_data_dir: str | None = None
    """``data_dir`` given to ``load_dataset`` (``format: hf``), e.g. ``harmless-base`` of
    Anthropic/hh-rlhf; null = the whole dataset."""
    split: str = "train"
    """Split to train on, for sources with splits (``hf``, ``hf_disk``)."""
    eval_split: str | None = None
    """Split of held-out pairs (``test_prefs`` of UltraFeedback binarized); null = hold out
    ``eval_fraction`` of the training rows instead."""
    eval_fraction: float = bounded(0.05, "[0, 1)")
    """Fraction of the training rows held out for evaluation when ``eval_split`` is null, drawn
    with the run's ``seed``; 0 = no held-out pairs."""
    prompt_field: str = "prompt"
    """Column of the prompt (string or message list); unused by ``schema: hh``."""
    chosen_field: str = "chosen"
    """Column of the preferred completion (the whole dialogue for ``schema: hh``)."""
    rejected_field: str = "rejected"
    """Column of the dispreferred completion (the whole dialogue for ``schema: hh``)."""
    completion_field: str = "completion"
    """Column of the completion of a ``schema: completion`` row (``raypo sft``)."""
    messages_field: str = "messages"
    """Column of the message list of a ``schema: messages`` row (``raypo sft``)."""
    subsets: list[str] = field(default_factory=list)
    """Parts of ``path`` read as separate sources, each part's name the group of its pairs
    (unless ``group_field`` is set), so that evaluation reports accuracy per part: with ``format:
    hf`` the ``data_dir`` of each ``load_dataset`` call (HH-RLHF's ``[helpful-base,
    harmless-base]``), else files or directories under ``path`` (``path/NAME``). [] = ``path``
    read whole."""
    group_field: str | None = None
    """Optional column naming a pair's group (annotator group, region, persona); evaluation
    reports accuracy per group. null = no groups, or with ``subsets`` each pair's subset."""
    id_field: str | None = None
    """Optional column of unique pair ids; null = ids made from source file and row number."""
    max_rows: int | None = bounded(None, ">= 1")
    """Read at most this many rows of ``path`` (quick trials); null = all."""
    max_length: int = bounded(512, ">= 2")
    """Tokens of prompt + completion per sequence after truncation."""
    max_prompt_length: int = bounded(256, ">= 1")
    """Tokens kept of the prompt (cut per ``truncation_mode``); less than ``max_length``."""
    max_completion_length: int | None = bounded(None, ">= 1")
    """Tokens kept of each completion (cut at its end); null = ``max_length`` minus the prompt's
    tokens."""
    truncation_mode: Literal["keep_end", "keep_start", "reject"] = "keep_end"
    """What happens to a prompt over ``max_prompt_length``: ``keep_end`` keeps its last tokens
    (the last turns, next to the completion; a leading BOS stays), ``keep_start`` its first
    tokens, ``reject`` rejects the pair (reason ``prompt_too_long``)."""
    chat_template: str | None = None
    """Jinja chat template to render message pairs with instead of the tokenizer's own (needed
    when the tokenizer has none): the template itself, or the path of a file holding it, read
    when the config is loaded so that the resolved config, the workers and the reference cache's
    fingerprint all see its text. null = the tokenizer's template."""
    append_eos: bool = True
    """End each completion with the tokenizer's EOS token, counted in its length, unless it ends
    with EOS already (chat pairs: unless the template's rendering of the turn holds EOS), so that
    the policy learns to stop. Cut by completion truncation like any other token."""
    max_reject_fraction: float = bounded(0.1, "[0, 1]")
    """Stop before training when more than this fraction of the rows read is rejected (malformed,
    empty, identical chosen and rejected, prompt over budget)."""
    shuffle: bool = True
    """Shuffle the training pairs, deterministically from the run's ``seed`` and the pair ids;
    every epoch goes through them in that order. false = the order the prepared files hold them
    in, the sources' (with ``preserve_order``), as TRL takes them; a precomputed reference pass
    keeps it."""
    preserve_order: bool = True
    """Keep Ray Data's row order through preparation, the reference pass and the split over the
    workers, so that a run is a function of its config and seed: the same pairs reach the same
    rank at the same step. false lets blocks flow in completion order (less waiting on slow
    tasks on a large cluster) and gives up that reproducibility."""
    num_cpus_per_op: float = bounded(0.25, "> 0")
    """CPUs Ray Data reserves per read/tokenise task; fractional so that data and training
    workers share a small machine."""

    def _validate(self) -> None:
        self._require(bool(self.path.strip()), "path", "must not be empty")
        self._check_subsets()
        self._require(
            self.max_prompt_length < self.max_length,
            "max_prompt_length",
            f"must be < data.max_length ({self.max_length})",
        )
        if self.chat_template is not None:
            object.__setattr__(self, "chat_template", self._read_chat_template())

    def _check_subsets(self) -> None:
        names = self.subsets
        self._require(all(name.strip() for name in names), "subsets", "a name is empty")
        self._require(len(set(names)) == len(names), "subsets", "a name is repeated")
        if names and self.hf_data_dir is not None:
            problem = "each entry of data.subsets is a data_dir already; set only one of the two"
            raise ConfigError(self._key("hf_data_dir"), self.hf_data_dir, problem)
        if names and self.path.startswith("builtin:"):
            problem = "builtin data has no subsets; set data.subsets []"
            raise ConfigError(self._key("subsets"), names, problem)

    def _read_chat_template(self) -> str:
        """The text of ``chat_template`` (read from its file when it names one), once it
        compiles as transformers compiles templates."""
        value = self.chat_template
        shown = value if len(value) <= 80 else value[:77] + "..."
        path = Path(value)
        try:
            path = path.expanduser()
            is_file = path.is_file()
        except (OSError, ValueError, RuntimeError):
            # A template's own text may be no possible file name (too long, a NUL byte, "~x").
            is_file = False
        try:
            text = path.read_text(encoding="utf-8") if is_file else value
        except (OSError, UnicodeDecodeError) as error:
            raise ConfigError(self._key("chat_template"), shown, f"cannot read: {error}") from None
        if "{{" not in text and "{%" not in text:
            problem = "is neither an existing file nor a Jinja template (no {{ }} or {% %})"
            raise ConfigError(self._key("chat_template"), shown, problem)
        try:
            _chat_template_environment().parse(text)
        except jinja2.TemplateSyntaxError as error:
            problem = f"is not a valid Jinja template: {error.message} (line {error.lineno})"
            raise ConfigError(self._key("chat_template"), shown, problem) from None
        return text


class _GenerationBlock(jinja2.ext.Extension):
    """Parses ``{% generation %}...{% endgeneration %}``, the assistant-turn marker of training
    templates (TRL's ``*_training.jinja``) that transformers' template environment knows."""

    tags: ClassVar[set[str]] = {"generation"}

    def parse(self, parser: jinja2.parser.Parser) -> list[jinja2.nodes.Node]:
        """The block's body, rendered as it is."""
        next(parser.stream)
        return parser.parse_statements(("name:endgeneration",), drop_needle=True)


def _chat_template_environment() -> jinja2.Environment:
    """A Jinja environment that parses what transformers' chat template compiler parses."""
    return ImmutableSandboxedEnvironment(
        trim_blocks=True,
        lstrip_blocks=True,
        extensions=[jinja2.ext.loopcontrols, _GenerationBlock],
    )
