"""Parity matrix: raypo's chunked log-probs, entropies and training step against each model's own
``forward`` (``log_softmax(model(input_ids).logits)``), in float64, over tiny random configs of
the causal LM architectures raypo is used with, including those whose ``forward`` changes the
lm-head's output (Gemma-2/3 softcapping, Granite's ``logits_scaling``, Cohere's ``logit_scale``).

Every model's lm-head weight is scaled by 30 so that its logits reach tens of nats: at that size
the final-logit transforms change the log-probs by far more than the tolerances (checked by
``test_the_matrix_is_sensitive_to_each_transform``), so the matrix fails when a transform is
missing. The expected values are computed here, one unpadded sequence at a time, from the
model's own logits; nothing is hard-coded.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import numpy as np
import pytest
import torch
import transformers
from tiny_models import ARCHITECTURES, PAD, VOCAB, tiny_causal_lm
from torch import Tensor, nn

from raypo.config import LossConfig
from raypo.data.collate import collate_pairs
from raypo.dispersion import sequence_logps_and_entropy
from raypo.forward import reference_columns, sequence_stats, sequence_stats_and_aux_loss
from raypo.model_parts import HEAD_TRANSFORMS, UnsupportedModelError, head_transform
from raypo.step import ForwardSettings, preference_step

HEAD_SCALE = 30.0
FLOAT32_NORMS = ["cohere", "gemma2", "gemma3_text"]
"""The architectures whose norms compute in float32 whatever the model's dtype."""
TRANSFORMED = ["gemma2", "gemma3_text", "granite", "cohere"]
"""The architectures whose forward changes the lm-head's output."""

# Two pairs of different lengths: right padding in the collated batch, completions of 2 to 6.
COLUMNS = {
    "prompt_ids": [[5, 6, 7], [8, 9, 10, 11, 12]],
    "chosen_ids": [[20, 21, 22, 23], [30, 31]],
    "rejected_ids": [[40, 41], [50, 51, 52, 53, 54, 55]],
}


def build(name: str, seed: int = 0) -> nn.Module:
    """A float64, eval-mode tiny model of architecture ``name`` with its lm-head scaled up."""
    return tiny_causal_lm(name, seed=seed, head_scale=HEAD_SCALE)


def own_stats(model: nn.Module) -> tuple[Tensor, Tensor]:
    """Summed completion log-probs and Hn of the 2B sequences (chosen first), one unpadded
    sequence at a time from ``log_softmax(model(input_ids).logits)`` in float64; differentiable."""
    logps, hns = [], []
    for half in ("chosen_ids", "rejected_ids"):
        for prompt, completion in zip(COLUMNS["prompt_ids"], COLUMNS[half], strict=True):
            ids = torch.tensor([prompt + completion])
            logits = model(input_ids=ids).logits[0].double()
            logp = torch.log_softmax(logits[len(prompt) - 1 : -1], dim=-1)
            logps.append(logp.gather(1, torch.tensor(completion)[:, None]).sum())
            entropy = -(logp.exp() * logp).sum(-1).detach()
            hns.append(entropy.mean() / math.log(logits.shape[-1]))
    return torch.stack(logps), torch.stack(hns)


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    """Tiny tensors gain nothing from intra-op threads; on a busy 2-core runner the thread pool's
    contention made this module 5x slower (35 s against 6 s)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def batch() -> dict[str, Tensor]:
    return collate_pairs(COLUMNS, PAD)


@pytest.fixture(scope="module", params=sorted(ARCHITECTURES))
def case(request: pytest.FixtureRequest) -> tuple[str, nn.Module, nn.Module]:
    """(name, policy, reference): two differently seeded models of one architecture."""
    return request.param, build(request.param, seed=0), build(request.param, seed=1)


def own_batch_logps(model: nn.Module, batch: dict[str, Tensor]) -> Tensor:
    """The same log-probs from one forward of the model over the padded batch: the reference for
    gradients, whose sums over positions (float32 in some models' norms, e.g. Cohere's) would
    otherwise differ from the unpadded ones in their rounding alone."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    logp = torch.log_softmax(logits.double(), dim=-1)
    picked = logp.gather(-1, batch["target_ids"].unsqueeze(-1)).squeeze(-1)
    return (picked * batch["target_mask"]).sum(dim=1)


@pytest.mark.parametrize("partitioned_head", [False, True], ids=["weight", "module"])
def test_logps_entropy_and_gradients_equal_the_models_own(case, batch, partitioned_head) -> None:
    """Values to 1e-12 relative; gradients of a fixed combination of the log-probs to 1e-9 of
    each parameter's largest gradient entry. The padded batch (``padding_free="off"``), as the
    gradients' reference is; the padding-free layouts have their own test below."""
    name, model, _ = case
    stats = sequence_stats(
        model, batch, chunk_size=3, partitioned_head=partitioned_head, padding_free="off"
    )
    expected_logps, expected_hn = own_stats(model)
    np.testing.assert_allclose(stats.logps.detach(), expected_logps.detach(), rtol=1e-12)
    np.testing.assert_allclose(stats.hn, expected_hn, rtol=1e-12)
    weights = torch.linspace(-1.0, 1.5, 4, dtype=torch.float64)
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    names, params = [n for n, _ in named], [p for _, p in named]
    ours = torch.autograd.grad((weights * stats.logps).sum(), params, allow_unused=True)
    own = own_batch_logps(model, batch)
    theirs = torch.autograd.grad((weights * own).sum(), params, allow_unused=True)
    for param_name, got, want in zip(names, ours, theirs, strict=True):
        if want is None:  # e.g. an expert no token was routed to
            assert got is None or not got.any(), param_name
            continue
        scale = float(want.abs().max().clamp_min(1e-300))
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9 * scale, msg=param_name)


@pytest.mark.parametrize("layout", ["bucketed", "packed"])
def test_padding_free_layouts_equal_the_models_own(case, batch, layout: str) -> None:
    """Each layout's log-probs and entropies equal the model's own forward of each sequence
    alone (1e-12 relative), and so do the gradients of a combination of them (1e-9 of each
    parameter's largest entry; the norms of Cohere and Gemma compute in float32 even in a float64
    model, which makes any two layouts' gradients differ at 1e-7)."""
    name, model, _ = case
    stats = sequence_stats(model, batch, chunk_size=3, padding_free=layout)
    expected_logps, expected_hn = own_stats(model)
    np.testing.assert_allclose(stats.logps.detach(), expected_logps.detach(), rtol=1e-12)
    np.testing.assert_allclose(stats.hn, expected_hn, rtol=1e-12)
    weights = torch.linspace(-1.0, 1.5, 4, dtype=torch.float64)
    params = [p for p in model.parameters() if p.requires_grad]
    ours = torch.autograd.grad((weights * stats.logps).sum(), params, allow_unused=True)
    theirs = torch.autograd.grad((weights * expected_logps).sum(), params, allow_unused=True)
    rtol = 1e-6 if name in FLOAT32_NORMS else 1e-9
    for got, want in zip(ours, theirs, strict=True):
        if want is None:
            assert got is None or not got.any()
            continue
        scale = float(want.abs().max().clamp_min(1e-300))
        torch.testing.assert_close(got, want, rtol=rtol, atol=rtol * scale)


def test_reference_columns_equal_the_models_own(case, batch) -> None:
    """The float32 reference columns round the float64 values once (2^-24 relative)."""
    _, model, _ = case
    columns = reference_columns(model, batch, chunk_size=4)
    logps, hns = own_stats(model)
    logps, hns = logps.detach().numpy(), hns.numpy()
    got_logps = np.concatenate([columns["ref_chosen_logps"], columns["ref_rejected_logps"]])
    got_hn = np.concatenate([columns["ref_hn_chosen"], columns["ref_hn_rejected"]])
    np.testing.assert_allclose(got_logps, logps, rtol=2**-23)
    np.testing.assert_allclose(got_hn, hns, rtol=2**-23)


def test_training_step_loss_equals_the_models_own(case, batch) -> None:
    """MallowsPO-theta with an online reference: ``mean log(1 + exp(-beta w h))`` with
    ``h = (pi_w - ref_w) - (pi_l - ref_l)`` and ``w = -c ln((Hn_w + Hn_l) / 2)`` of the
    reference, all from the models' own logits. The reference values enter the step as float32
    columns, and ``w`` is computed from them in float32: so here too."""
    _, policy, reference = case
    config = LossConfig(type="mallows_theta", beta=0.1, dispersion_scale=0.5)
    result = preference_step(
        policy, batch, config, reference_model=reference, forward=ForwardSettings(chunk_size=3)
    )
    with torch.no_grad():
        pol, _ = own_stats(policy)
        ref, ref_hn = (values.float() for values in own_stats(reference))
        aux = own_aux_loss(policy, batch)
    h = (pol[:2] - ref[:2]) - (pol[2:] - ref[2:])
    w = -0.5 * torch.log(((ref_hn[:2] + ref_hn[2:]) / 2).clamp_min(1e-6))
    expected = float(torch.nn.functional.softplus(-0.1 * w.double() * h).mean())
    if aux is not None:  # a MoE policy: plus its config's router_aux_loss_coef (TRL's default)
        expected += policy.config.router_aux_loss_coef * float(aux)
    assert float(result.loss.detach()) == pytest.approx(expected, rel=1e-12)
    assert result.loss.requires_grad
    assert ("aux_loss" in result.metrics) == (aux is not None)


def own_aux_loss(model: nn.Module, batch: dict[str, Tensor]) -> Tensor | None:
    """The model's own router load-balancing loss on the padded batch, as TRL's DPOTrainer gets
    it (one forward of chosen+rejected with their attention mask); None for a dense model."""
    if not hasattr(model.config, "output_router_logits"):
        return None
    return model(
        input_ids=batch["input_ids"],
        attention_mask=batch["attention_mask"],
        output_router_logits=True,
        use_cache=False,
    ).aux_loss


@pytest.mark.parametrize("name", TRANSFORMED)
def test_the_matrix_is_sensitive_to_each_transform(name: str, batch) -> None:
    """Without the model's final-logit transform the log-probs are off by far more than the
    matrix's tolerances, and raypo refuses the model when its registry entry is missing."""
    model = build(name)
    assert head_transform(model).after is not None
    hidden = model.base_model(**{k: batch[k] for k in ("input_ids", "attention_mask")})[0]
    untransformed = sequence_logps_and_entropy(
        batch["target_ids"],
        batch["target_mask"],
        hidden_states=hidden,
        lm_head_weight=model.get_output_embeddings().weight,
    )
    expected_logps, expected_hn = own_stats(model)
    assert (untransformed.logps - expected_logps).abs().max() > 1e-3 * expected_logps.abs().max()
    assert ((untransformed.hn - expected_hn) / expected_hn).abs().max() > 1e-3
    registry = {k: v for k, v in HEAD_TRANSFORMS.items() if k != type(model).__name__}
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr("raypo.model_parts.HEAD_TRANSFORMS", registry)
        with pytest.raises(UnsupportedModelError, match=rf"{type(model).__name__} .*'{name}'"):
            sequence_stats(build(name), batch)


class _DoubledLlama(transformers.LlamaForCausalLM):
    """A causal LM whose forward changes its logits in a way raypo does not know."""

    def forward(self, *args, **kwargs):
        output = super().forward(*args, **kwargs)
        output.logits = output.logits * 2
        return output


class _ScaledHead(nn.Linear):
    def forward(self, hidden: Tensor) -> Tensor:
        return super().forward(hidden) * 0.5


def test_unknown_transforms_are_refused_naming_the_model(batch) -> None:
    named = r"_DoubledLlama \(model_type 'llama'\).*changes the lm-head's output"
    with pytest.raises(UnsupportedModelError, match=named):
        sequence_stats(tiny_causal_lm("llama", model_class=_DoubledLlama), batch)


def test_a_head_with_its_own_forward_is_refused_unless_it_runs_as_a_module(batch) -> None:
    """From the weight alone raypo cannot apply a head's own forward; run as a module (the
    ZeRO-3 path, ``partitioned_head``) the head's forward is what it computes."""
    model = tiny_causal_lm("llama")
    head = _ScaledHead(64, VOCAB, bias=False).double()
    with torch.no_grad():
        head.weight.copy_(model.lm_head.weight * HEAD_SCALE)
    model.lm_head = head
    with pytest.raises(UnsupportedModelError, match="_ScaledHead overrides nn.Linear.forward"):
        sequence_stats(model, batch)
    stats = sequence_stats(model, batch, partitioned_head=True)
    with torch.no_grad():
        expected_logps, expected_hn = own_stats(model)
    np.testing.assert_allclose(stats.logps.detach(), expected_logps, rtol=1e-12)
    np.testing.assert_allclose(stats.hn, expected_hn, rtol=1e-12)


def test_the_check_runs_once_and_restores_training_mode(batch) -> None:
    model = tiny_causal_lm("llama").train()
    calls = []
    model.register_forward_hook(lambda *_: calls.append(1))
    sequence_stats(model, batch)
    sequence_stats(model, batch)
    assert len(calls) == 1  # the model's own forward ran once, for the check
    assert all(module.training for module in model.modules())


def test_the_transform_keeps_the_chunked_memory_saving() -> None:
    """With Gemma-2's softcapping inside the chunks, the forward still saves for backward only
    the gathered hidden states and indices, not the fp32 logits ([N, V], N * V * 4 bytes) that a
    full softcapped log_softmax saves. (Peak RSS, forward + backward, B=4, T=512, V=32000,
    chunks of 64, MALLOC_MMAP_THRESHOLD_=65536: 51 MiB with softcapping against 43 MiB without
    and 1261 MiB for the full softcapped logits; measured once when the transform was added.)"""
    from test_dispersion import _new_saved_bytes

    generator = torch.Generator().manual_seed(5)
    rows, seq, hidden_size, vocab = 2, 128, 32, 4096
    hidden = torch.randn(rows, seq, hidden_size, generator=generator, requires_grad=True)
    weight = torch.randn(vocab, hidden_size, generator=generator, requires_grad=True)
    labels = torch.randint(0, vocab, (rows, seq), generator=generator)
    mask = torch.ones(rows, seq)
    transform = head_transform(build("gemma2")).after

    def chunked() -> Tensor:
        return sequence_logps_and_entropy(
            labels,
            mask,
            hidden_states=hidden,
            lm_head_weight=weight,
            chunk_size=32,
            logits_transform=transform,
        ).logps

    def full() -> Tensor:
        logp = torch.log_softmax(transform(hidden @ weight.T), dim=-1)
        return logp.gather(-1, labels.unsqueeze(-1)).squeeze(-1).sum(1)

    logits_bytes = rows * seq * vocab * 4
    assert _new_saved_bytes(full, [hidden, weight]) >= logits_bytes
    assert _new_saved_bytes(chunked, [hidden, weight]) < logits_bytes / 50


MOE_ARCHITECTURES = ["qwen2_moe", "mixtral"]


@pytest.mark.parametrize("name", MOE_ARCHITECTURES)
def test_moe_step_adds_the_models_own_router_loss(name: str, batch) -> None:
    """``aux_loss`` is the model's own, the loss is the preference loss plus coef * aux_loss
    (the config's coefficient, or ``router_aux_loss_coef``), and so are its gradients."""
    policy, reference = build(name, seed=0), build(name, seed=1)
    config = LossConfig(type="dpo", beta=0.1)
    params = [p for p in policy.parameters() if p.requires_grad]
    aux = own_aux_loss(policy, batch)
    without = preference_step(
        policy, batch, config, reference_model=reference, forward=ForwardSettings(3, False, 0.0)
    )
    assert "aux_loss" not in without.metrics
    for coef in (None, 0.5):
        weight = policy.config.router_aux_loss_coef if coef is None else coef
        result = preference_step(
            policy,
            batch,
            config,
            reference_model=reference,
            forward=ForwardSettings(3, False, coef),
        )
        torch.testing.assert_close(result.metrics["aux_loss"], aux.detach(), rtol=1e-6, atol=0)
        expected = without.loss + weight * aux.double()
        torch.testing.assert_close(result.loss, expected, rtol=1e-12, atol=0)
        assert float(result.metrics["loss"]) == float(result.loss.detach())
        ours = torch.autograd.grad(result.loss, params, allow_unused=True)
        theirs = torch.autograd.grad(expected, params, allow_unused=True, retain_graph=True)
        for got, want in zip(ours, theirs, strict=True):
            if want is None:
                assert got is None or not got.any()
                continue
            # The routers' softmax runs in float32: where one backward carries the sum of both
            # losses' gradients through it, that sum is rounded to float32, not each part.
            scale = float(want.abs().max())
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6 * scale)


def test_a_dense_model_has_no_router_loss_and_refuses_a_coefficient(batch) -> None:
    policy = build("llama")
    config = LossConfig(type="simpo")
    assert "aux_loss" not in preference_step(policy, batch, config).metrics
    with pytest.raises(ValueError, match="router_aux_loss_coef is 0.1 but LlamaForCausalLM"):
        preference_step(policy, batch, config, forward=ForwardSettings(router_aux_loss_coef=0.1))


class _DoubledAuxMixtral(transformers.MixtralForCausalLM):
    """A MoE causal LM whose forward weights its router loss in a way raypo does not know."""

    def forward(self, *args, **kwargs):
        output = super().forward(*args, **kwargs)
        if output.aux_loss is not None:
            output.aux_loss = output.aux_loss * 2
        return output


def test_a_router_loss_raypo_does_not_reproduce_is_refused(batch) -> None:
    model = tiny_causal_lm("mixtral", model_class=_DoubledAuxMixtral)
    named = r"router load-balancing loss of _DoubledAuxMixtral \(model_type 'mixtral'\)"
    with pytest.raises(UnsupportedModelError, match=named):
        sequence_stats_and_aux_loss(model, batch)


def test_a_model_that_does_not_keep_packed_sequences_apart_is_refused(batch) -> None:
    """A decoder that drops ``position_ids`` sees one long sequence per packed row: refused for
    ``packed``, and the message names the model and the setting to change."""
    model = build("llama")
    own_forward = model.model.forward

    def without_positions(*args, position_ids=None, **kwargs):
        return own_forward(*args, **kwargs)

    model.model.forward = without_positions
    with pytest.raises(UnsupportedModelError, match="LlamaForCausalLM .*padding_free: bucketed"):
        sequence_stats(model, batch, padding_free="packed")
    stats = sequence_stats(model, batch, padding_free="bucketed")
    np.testing.assert_allclose(stats.logps.detach(), own_stats(model)[0].detach(), rtol=1e-12)
