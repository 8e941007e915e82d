"""Tests for raypo.dispersion against independent float64 numpy computations.

References: MallowsPO (Chen et al., ICLR 2025) and docs/methods.md, "Dispersion estimate".
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from raypo.dispersion import (
    HN_FLOOR,
    dispersion_phi,
    dispersion_weight,
    normalized_entropy,
    sequence_logps_and_entropy,
)


def _completion_mask(batch: int, seq: int, generator: torch.Generator) -> torch.Tensor:
    """``[batch, seq]`` int64: a prompt, then >= 1 completion position, then padding."""
    mask = torch.zeros(batch, seq, dtype=torch.int64)
    for row in range(batch):
        prompt = int(torch.randint(0, seq // 2, (1,), generator=generator))
        length = int(torch.randint(1, seq - prompt + 1, (1,), generator=generator))
        mask[row, prompt : prompt + length] = 1
    return mask


def _np_log_softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def _np_hn(logits: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Float64 Hn(y) = sum_t H_t m_t / (sum_t m_t ln V) from the full softmax (docs/methods.md)."""
    logp = _np_log_softmax(logits)
    entropy = -(np.exp(logp) * logp).sum(axis=-1)
    selected = mask != 0
    return (entropy * selected).sum(axis=1) / (selected.sum(axis=1) * math.log(logits.shape[-1]))


def _np_logps(logits: np.ndarray, labels: np.ndarray, mask: np.ndarray) -> np.ndarray:
    logp = _np_log_softmax(logits)
    safe = np.where(mask != 0, labels, 0)
    picked = np.take_along_axis(logp, safe[..., None], axis=-1)[..., 0]
    return (picked * (mask != 0)).sum(axis=1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_normalized_entropy_matches_float64_full_softmax(dtype: torch.dtype) -> None:
    generator = torch.Generator().manual_seed(0)
    logits = (3 * torch.randn(5, 11, 257, generator=generator)).to(dtype)
    mask = _completion_mask(5, 11, generator)
    expected = _np_hn(logits.double().numpy(), mask.numpy())
    for chunk_size in (1, 4, 1024):
        hn = normalized_entropy(logits, mask, chunk_size=chunk_size)
        assert hn.dtype == torch.float32 and hn.shape == (5,)
        np.testing.assert_allclose(hn.numpy(), expected, rtol=1e-5, atol=1e-6)


def test_normalized_entropy_hand_computed_cases() -> None:
    """Row 0, V = 4: position 0 has logits (ln 2, 0, 0, 0), so p = (2/5, 1/5, 1/5, 1/5) and
    H = 0.4 ln 2.5 + 0.6 ln 5 = 1.3321790; position 1 is uniform, H = ln 4; position 2 is
    one-hot-like but masked out. Hn = (1.3321790 / ln 4 + 1) / 2 = (0.9609640 + 1) / 2 = 0.9804820.
    Row 1 is uniform: Hn = ln 4 / ln 4 = 1.
    Row 2 has logits (30, 0, 0, 0): p_other = e^-30 / (1 + 3 e^-30) ~ 9.4e-14, so
    H ~ 3 * 9.4e-14 * 30 ~ 8e-12 and Hn ~ 6e-12, i.e. 0 within 1e-10.
    """
    logits = torch.zeros(3, 3, 4)
    logits[0, 0, 0] = math.log(2.0)
    logits[0, 2, 0] = 30.0
    logits[2, :, 0] = 30.0
    mask = torch.tensor([[1, 1, 0], [1, 1, 1], [1, 1, 1]])
    hn = normalized_entropy(logits, mask)
    assert hn[0].item() == pytest.approx(0.9804820237218406, abs=1e-6)
    assert hn[1].item() == pytest.approx(1.0, abs=1e-6)
    assert 0.0 <= hn[2].item() < 1e-10


def test_normalized_entropy_ignores_minus_inf_logits() -> None:
    """Two of four logits at -inf leave a uniform distribution over 2: H = ln 2, Hn = 1/2."""
    logits = torch.tensor([[[0.0, 0.0, -math.inf, -math.inf]]])
    hn = normalized_entropy(logits, torch.ones(1, 1))
    assert hn.item() == pytest.approx(0.5, abs=1e-6)


def test_normalized_entropy_rejects_empty_rows_and_bad_shapes() -> None:
    logits = torch.zeros(3, 4, 5)
    mask = torch.tensor([[1, 0, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]])
    with pytest.raises(ValueError, match=r"batch indices \[1, 2\]"):
        normalized_entropy(logits, mask)
    with pytest.raises(ValueError, match="disagree"):
        normalized_entropy(logits, torch.ones(3, 5))
    with pytest.raises(ValueError, match=">= 2"):
        normalized_entropy(torch.zeros(1, 2, 1), torch.ones(1, 2))


def test_dispersion_weight_matches_numpy_and_has_no_grad() -> None:
    generator = torch.Generator().manual_seed(1)
    hn_w = torch.rand(64, generator=generator, requires_grad=True)
    hn_l = torch.rand(64, generator=generator)
    with torch.no_grad():
        hn_w[:4] = 0.0
        hn_l[:4] = torch.tensor([0.0, 1e-7, 1.5e-6, 1.0])
    for scale in (0.29, 1.0, 3.5):
        weight = dispersion_weight(hn_w, hn_l, scale)
        pair = (hn_w.detach().double().numpy() + hn_l.double().numpy()) / 2
        expected = -scale * np.log(np.maximum(pair, 1e-6))
        np.testing.assert_allclose(weight.numpy(), expected, rtol=1e-6)
        assert not weight.requires_grad
        np.testing.assert_allclose(dispersion_phi(weight).numpy(), np.exp(-expected), rtol=1e-6)


def test_dispersion_weight_hand_computed() -> None:
    """Hn = (0.5 + 0.3) / 2 = 0.4: w = -0.29 ln 0.4 = 0.29 * 0.9162907 = 0.2657243 and
    phi = 0.4^0.29 = 0.7666505; Hn = 0 is clamped to 1e-6: w = 0.29 * ln 1e6 = 4.0064981;
    Hn = 1 gives w = 0, phi = 1."""
    weight = dispersion_weight(torch.tensor([0.5, 0.0, 1.0]), torch.tensor([0.3, 0.0, 1.0]), 0.29)
    np.testing.assert_allclose(weight.numpy(), [0.26572431, 4.00649806, 0.0], atol=1e-6)
    assert dispersion_phi(weight)[0].item() == pytest.approx(0.76665045, abs=1e-6)
    assert HN_FLOOR == 1e-6


@pytest.mark.parametrize("scale", [0.0, -0.29, math.nan, math.inf])
def test_dispersion_weight_rejects_bad_scale(scale: float) -> None:
    with pytest.raises(ValueError, match="scale"):
        dispersion_weight(torch.ones(2), torch.ones(2), scale)


def test_dispersion_weight_rejects_shape_mismatch() -> None:
    with pytest.raises(ValueError, match="same shape"):
        dispersion_weight(torch.ones(2), torch.ones(3), 0.29)


def _problem(
    source: str,
    dtype: torch.dtype = torch.float32,
    seed: int = 2,
    sizes: tuple[int, int, int, int] = (3, 9, 6, 37),
) -> dict:
    """Random inputs for sequence_logps_and_entropy, sizes (B, T, H, V); labels are -100
    outside the completion mask, as a data collator writes them."""
    generator = torch.Generator().manual_seed(seed)
    batch, seq, hidden, vocab = sizes
    mask = _completion_mask(batch, seq, generator)
    labels = torch.randint(0, vocab, (batch, seq), generator=generator).masked_fill(mask == 0, -100)
    hidden_states = torch.randn(batch, seq, hidden, generator=generator, dtype=dtype)
    weight = torch.randn(vocab, hidden, generator=generator, dtype=dtype)
    bias = torch.randn(vocab, generator=generator, dtype=dtype) if source == "hidden_bias" else None
    tensors = {"hidden_states": hidden_states, "lm_head_weight": weight, "lm_head_bias": bias}
    if source == "logits":
        tensors = {"logits": (2 * torch.randn(batch, seq, vocab, generator=generator)).to(dtype)}
    tensors = {k: v.requires_grad_() for k, v in tensors.items() if v is not None}
    return {"labels": labels, "mask": mask, "tensors": tensors}


def _full_logits(tensors: dict) -> torch.Tensor:
    if "logits" in tensors:
        return tensors["logits"]
    logits = tensors["hidden_states"] @ tensors["lm_head_weight"].T
    return logits + tensors["lm_head_bias"] if "lm_head_bias" in tensors else logits


def _unchunked(labels: torch.Tensor, mask: torch.Tensor, tensors: dict) -> torch.Tensor:
    """Plain autograd reference: full [B, T, V] log_softmax, gather, masked sum."""
    logp = torch.log_softmax(_full_logits(tensors).float(), dim=-1)
    picked = logp.gather(-1, labels.clamp_min(0).unsqueeze(-1)).squeeze(-1)
    return (picked * mask).sum(dim=1)


@pytest.mark.parametrize("source", ["logits", "hidden", "hidden_bias"])
@pytest.mark.parametrize("chunk_size", [1, 3, 7, 10_000])
def test_chunked_equals_unchunked_values_and_gradients(source: str, chunk_size: int) -> None:
    problem = _problem(source)
    labels, mask, tensors = problem["labels"], problem["mask"], problem["tensors"]
    stats = sequence_logps_and_entropy(labels, mask, chunk_size=chunk_size, **tensors)
    reference = _unchunked(labels, mask, tensors)
    full = _full_logits(tensors).detach().double().numpy()

    np.testing.assert_allclose(stats.logps.detach().numpy(), reference.detach().numpy(), rtol=1e-5)
    np.testing.assert_allclose(
        stats.logps.detach().numpy(), _np_logps(full, labels.numpy(), mask.numpy()), rtol=1e-5
    )
    np.testing.assert_allclose(stats.hn.numpy(), _np_hn(full, mask.numpy()), rtol=1e-5, atol=1e-6)
    assert stats.lengths.tolist() == mask.sum(dim=1).tolist()
    assert stats.logps.dtype == torch.float32 and stats.logps.requires_grad
    assert not stats.hn.requires_grad

    upstream = torch.randn(3, generator=torch.Generator().manual_seed(3))
    chunked_grads = torch.autograd.grad(stats.logps, list(tensors.values()), upstream)
    reference_grads = torch.autograd.grad(reference, list(tensors.values()), upstream)
    for name, got, want in zip(tensors, chunked_grads, reference_grads, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5, msg=name)


def test_chunked_gradcheck_float64() -> None:
    problem = _problem("hidden_bias", dtype=torch.float64, seed=4, sizes=(2, 6, 3, 7))
    labels, mask, tensors = problem["labels"], problem["mask"], problem["tensors"]

    def logps(hidden, weight, bias):
        return sequence_logps_and_entropy(
            labels,
            mask,
            hidden_states=hidden,
            lm_head_weight=weight,
            lm_head_bias=bias,
            chunk_size=2,
            compute_entropy=False,
        ).logps

    assert torch.autograd.gradcheck(logps, tuple(tensors.values()))


def test_bf16_hidden_states_upcast_after_the_matmul() -> None:
    """bf16 hidden/lm-head: logits rounded to bf16 as the model computes them, softmax in fp32."""
    problem = _problem("hidden", dtype=torch.bfloat16)
    labels, mask, tensors = problem["labels"], problem["mask"], problem["tensors"]
    stats = sequence_logps_and_entropy(labels, mask, chunk_size=5, **tensors)
    full = _full_logits(tensors).detach().double().numpy()
    assert stats.logps.dtype == torch.float32
    np.testing.assert_allclose(
        stats.logps.detach().numpy(), _np_logps(full, labels.numpy(), mask.numpy()), rtol=1e-4
    )
    np.testing.assert_allclose(stats.hn.numpy(), _np_hn(full, mask.numpy()), rtol=1e-4)


def test_without_entropy_and_under_no_grad() -> None:
    problem = _problem("hidden")
    labels, mask, tensors = problem["labels"], problem["mask"], problem["tensors"]
    with torch.no_grad():
        stats = sequence_logps_and_entropy(labels, mask, compute_entropy=False, **tensors)
    assert stats.hn is None and not stats.logps.requires_grad
    expected = _unchunked(labels, mask, tensors).detach().numpy()
    np.testing.assert_allclose(stats.logps.numpy(), expected, rtol=1e-5)


def test_empty_rows() -> None:
    """A padding row (all-zero mask) has logp 0 and length 0; its Hn is refused."""
    problem = _problem("logits")
    labels, mask, tensors = problem["labels"], problem["mask"].clone(), problem["tensors"]
    mask[1] = 0
    stats = sequence_logps_and_entropy(labels, mask, compute_entropy=False, **tensors)
    assert stats.logps[1].item() == 0.0 and stats.lengths[1].item() == 0
    with pytest.raises(ValueError, match=r"batch indices \[1\]"):
        sequence_logps_and_entropy(labels, mask, **tensors)
    none = sequence_logps_and_entropy(labels, mask * 0, compute_entropy=False, **tensors)
    assert none.logps.tolist() == [0.0, 0.0, 0.0]


def test_input_validation() -> None:
    problem = _problem("hidden_bias")
    labels, mask, tensors = problem["labels"], problem["mask"], problem["tensors"]
    logits = _full_logits(tensors)
    with pytest.raises(ValueError, match="not both"):
        sequence_logps_and_entropy(labels, mask, logits=logits, **tensors)
    with pytest.raises(ValueError, match="both `hidden_states` and `lm_head_weight`"):
        sequence_logps_and_entropy(labels, mask, hidden_states=tensors["hidden_states"])
    with pytest.raises(ValueError, match="both `hidden_states` and `lm_head_weight`"):
        sequence_logps_and_entropy(labels, mask)
    with pytest.raises(ValueError, match=r"lm_head_weight must be \[V, hidden=6\]"):
        sequence_logps_and_entropy(
            labels, mask, hidden_states=tensors["hidden_states"], lm_head_weight=logits[0]
        )
    with pytest.raises(ValueError, match="agree"):
        sequence_logps_and_entropy(labels[:, :-1], mask[:, :-1], logits=logits)
    with pytest.raises(ValueError, match="chunk_size"):
        sequence_logps_and_entropy(labels, mask, logits=logits, chunk_size=0)
    bad = labels.masked_fill(mask != 0, 37)
    with pytest.raises(ValueError, match=r"label 37 .* outside \[0, 37\)"):
        sequence_logps_and_entropy(bad, mask, logits=logits)


def _new_saved_bytes(fn, existing: list[torch.Tensor]) -> int:
    """Bytes of the distinct storages autograd saves for backward while ``fn`` runs, minus the
    storages of ``existing`` tensors (inputs and parameters, alive anyway)."""
    storages: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        output = fn()
    for tensor in existing:
        storages.pop(tensor.untyped_storage().data_ptr(), None)
    del output
    return sum(storages.values())


def test_chunked_path_saves_far_less_for_backward_than_full_logits() -> None:
    """Full fp32 logits of the N completion positions take N * V * 4 bytes; the naive path saves
    at least that (log_softmax output), the chunked path only the gathered hidden states
    ([N, H], H << V) and indices."""
    generator = torch.Generator().manual_seed(5)
    batch, seq, hidden_size, vocab = 2, 128, 32, 4096
    hidden = torch.randn(batch, seq, hidden_size, generator=generator, requires_grad=True)
    weight = torch.randn(vocab, hidden_size, generator=generator, requires_grad=True)
    labels = torch.randint(0, vocab, (batch, seq), generator=generator)
    mask = torch.ones(batch, seq)
    logits_bytes = batch * seq * vocab * 4

    def chunked():
        return sequence_logps_and_entropy(
            labels, mask, hidden_states=hidden, lm_head_weight=weight, chunk_size=32
        )

    chunked_bytes = _new_saved_bytes(chunked, [hidden, weight])
    naive_bytes = _new_saved_bytes(
        lambda: _unchunked(labels, mask, {"hidden_states": hidden, "lm_head_weight": weight}),
        [hidden, weight],
    )
    assert naive_bytes >= logits_bytes
    assert chunked_bytes < logits_bytes / 50


_PEAK_RSS_SCRIPT = textwrap.dedent(
    """
    import json, resource, sys
    import torch
    from raypo.dispersion import sequence_logps_and_entropy

    def rss_bytes():
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * resource.getpagesize()

    def peak_rss_bytes():
        # VmHWM belongs to this process image; ru_maxrss survives execve and would report the
        # parent's (pytest's) resident size when that is larger.
        with open("/proc/self/status") as f:
            line = next(line for line in f if line.startswith("VmHWM:"))
        return int(line.split()[1]) * 1024

    def logps(batch, seq, hidden_size=64, vocab=32000):
        hidden = torch.randn(batch, seq, hidden_size, requires_grad=True)
        weight = torch.randn(vocab, hidden_size, requires_grad=True)
        labels = torch.randint(0, vocab, (batch, seq))
        mask = torch.ones(batch, seq)
        if sys.argv[1] == "chunked":
            return sequence_logps_and_entropy(
                labels, mask, hidden_states=hidden, lm_head_weight=weight, chunk_size=64
            ).logps
        logp = torch.log_softmax(hidden @ weight.T, dim=-1)
        with torch.no_grad():
            entropy = -(logp.exp() * logp).sum(-1)
        return (logp.gather(-1, labels.unsqueeze(-1)).squeeze(-1) * mask).sum(1)

    torch.manual_seed(0)
    logps(1, 8).sum().backward()  # first-call kernel and thread-pool set-up is not counted
    before = rss_bytes()
    logps(4, 512).sum().backward()
    peak = peak_rss_bytes()
    print(json.dumps({"delta": peak - before}))
    """
)


def _peak_rss_delta(variant: str) -> int:
    # A fixed glibc mmap threshold returns every freed tensor buffer to the OS, so peak RSS
    # tracks live tensors; with glibc's default dynamic threshold, freed buffers below 32 MiB
    # stay in a fragmented heap and RSS measures the allocator, not this code.
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    result = subprocess.run(
        [sys.executable, "-c", _PEAK_RSS_SCRIPT, variant],
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
        env=env,
    )
    return json.loads(result.stdout.strip().splitlines()[-1])["delta"]


def test_chunked_forward_backward_peak_rss_is_below_one_fp32_logits_tensor() -> None:
    """Forward + backward from hidden states, B=4, T=512, V=32000: one fp32 logits tensor is
    4 * 512 * 32000 * 4 B = 262 MB. The naive path holds several of them at its peak; the
    chunked one (64 positions, 8 MB per fp32 chunk) must stay under a quarter of one."""
    logits_bytes = 4 * 512 * 32000 * 4
    naive = _peak_rss_delta("naive")
    chunked = _peak_rss_delta("chunked")
    assert naive > logits_bytes
    assert chunked < logits_bytes / 4
