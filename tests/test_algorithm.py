"""Pure GRPO tensor math against numbers worked out by hand."""
from __future__ import annotations

import inspect
import math

import pytest
import torch
from torch.testing import assert_close

from grpo_core import config, memory
from grpo_core.constants import HEAD_CHUNK_TOKENS, LOGPROB_CHUNK
from grpo_core.algorithm import (
    KL_ESTIMATORS,
    LOSS_AGG_MODES,
    aggregate_loss,
    aggregate_weight,
    entropy_from_logits,
    group_advantages,
    kl_penalty,
    lm_head_logprobs,
    masked_mean,
    masked_sum,
    policy_loss,
    token_logprobs,
)

LN2, LN3 = math.log(2.0), math.log(3.0)


def t(values: list) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32)


# ---------------------------------------------------------------- advantages

def test_group_advantages_std_normalised() -> None:
    # group 1: [1,0,0,1], mean 0.5, deviations +-0.5, unbiased var = 4*0.25/3 = 1/3,
    #          std = 1/sqrt(3) -> adv = +-0.5*sqrt(3) (eps=0).
    # group 2: all ones -> deviations 0 -> 0 / (0 + eps) = 0.
    r = t([1, 0, 0, 1, 1, 1, 1, 1])
    a = 0.5 * math.sqrt(3.0)
    assert_close(group_advantages(r, 4, eps=0.0)[:4], t([a, -a, -a, a]))
    b = 0.5 / (1 / math.sqrt(3.0) + 1e-6)  # default eps=1e-6 in the denominator
    assert_close(group_advantages(r, 4), t([b, -b, -b, b, 0, 0, 0, 0]))
    # [0,1,2]: mean 1, unbiased std sqrt((1+0+1)/2) = 1 -> [-1,0,1] / (1 + 1e-6)
    assert_close(group_advantages(t([0, 1, 2]), 3), t([-1, 0, 1]) / (1 + 1e-6))


def test_group_advantages_dr_grpo_only_centres() -> None:
    r = t([1, 0, 0, 1, 1, 1, 1, 1])
    assert_close(group_advantages(r, 4, norm_by_std=False), t([0.5, -0.5, -0.5, 0.5, 0, 0, 0, 0]))
    # [0, 3]: mean 1.5 -> [-1.5, 1.5]
    assert_close(group_advantages(t([0, 3]), 2, norm_by_std=False), t([-1.5, 1.5]))


def test_group_of_one_gives_zeros_and_bad_sizes_raise() -> None:
    assert_close(group_advantages(t([1, 0, 5]), 1), t([0, 0, 0]))
    with pytest.raises(ValueError):
        group_advantages(t([1, 0, 5]), 2)


# ---------------------------------------------------------------- masking / aggregation

def test_masked_sum_and_mean() -> None:
    x = t([[1, 2, 3], [4, 5, 6]])
    m = t([[1, 1, 0], [0, 0, 1]])
    assert_close(masked_sum(x, m), t(9))  # 1 + 2 + 6
    assert_close(masked_mean(x, m), t(3))  # 9 / 3
    assert_close(masked_mean(x, m, dim=-1), t([1.5, 6]))  # (1+2)/2, 6/1
    assert_close(masked_sum(x, m, dim=0), t([1, 2, 6]))
    # inf/nan under the mask are ignored; an empty row averages to 0, not nan
    y = t([[float("inf"), 2.0], [float("nan"), 1.0]])
    assert_close(masked_mean(y, t([[0, 1], [0, 0]]), dim=-1), t([2, 0]))


LOSS = t([[1, 2, 3, 4], [10, 20, 99, 99], [7, 7, 7, 7]])
MASK = t([[1, 1, 1, 1], [1, 1, 0, 0], [0, 0, 0, 0]])  # row 3 has no tokens: left out of seq means


AGG_CASES = [
        ("token-mean", None, 40 / 6),  # (1+2+3+4+10+20) / 6 tokens
        ("seq-mean-token-sum", None, 20.0),  # (10 + 30) / 2 seqs
        ("seq-mean-token-mean", None, 8.75),  # (10/4 + 30/2) / 2 = (2.5 + 15) / 2
        ("seq-mean-token-sum-norm", None, 5.0),  # (10/4 + 30/4) / 2, T = 4
        ("seq-mean-token-sum-norm", 8, 2.5),  # (10/8 + 30/8) / 2
]


@pytest.mark.parametrize("mode, norm_length, expected", AGG_CASES)
def test_aggregate_loss(mode: str, norm_length: int | None, expected: float) -> None:
    assert_close(aggregate_loss(LOSS, MASK, mode, norm_length=norm_length), t(expected))


def test_aggregate_loss_rejects_unknown_mode() -> None:
    with pytest.raises(ValueError, match="token-mean"):
        aggregate_loss(LOSS, MASK, "mean")
    with pytest.raises(ValueError, match="token-mean"):
        aggregate_weight(MASK, "mean")


def test_every_mode_has_a_hand_computed_case_and_is_what_config_allows() -> None:
    assert {mode for mode, _, _ in AGG_CASES} == set(LOSS_AGG_MODES)
    assert config.CHOICES["algorithm.loss_agg"] is LOSS_AGG_MODES
    assert config.CHOICES["algorithm.kl_estimator"] is KL_ESTIMATORS


@pytest.mark.parametrize("mode, weight", [("token-mean", 6.0), *((m, 3.0) for m in LOSS_AGG_MODES[1:])])
def test_aggregate_weight(mode: str, weight: float) -> None:
    # the mean's denominator: MASK's 6 tokens, or its 3 rows (the empty one counted, as the trainer always did)
    assert aggregate_weight(MASK, mode) == weight


@pytest.mark.parametrize("mode", LOSS_AGG_MODES)
def test_micro_batches_weighted_by_aggregate_weight_add_up_to_the_batch(mode: str) -> None:
    loss, mask = LOSS[:2], MASK[:2]
    whole = aggregate_weight(mask, mode)
    parts = [aggregate_loss(loss[r], mask[r], mode, norm_length=4) * aggregate_weight(mask[r], mode) / whole
             for r in ([0], [1])]
    assert_close(parts[0] + parts[1], aggregate_loss(loss, mask, mode, norm_length=4))


# ---------------------------------------------------------------- policy loss

def test_policy_loss_asymmetric_clip_by_hand() -> None:
    # old logprobs 0, new = log(ratio): ratios [[1.5, 0.5, pad], [1.5, 0.5, pad]]
    # clip range [1 - 0.2, 1 + 0.28] = [0.8, 1.28]; advantages [+1, -2]
    # seq0 (A=+1): r=1.5: max(-1.5, -1.28) = -1.28 (clipped); r=0.5: max(-0.5, -0.8) = -0.5
    # seq1 (A=-2): r=1.5: max(3.0, 2.56) = 3.0;                r=0.5: max(1.0, 1.6) = 1.6 (clipped)
    # token-mean = (-1.28 - 0.5 + 3.0 + 1.6) / 4 = 2.82 / 4 = 0.705
    logp = torch.log(t([[1.5, 0.5, 1.0], [1.5, 0.5, 1.0]]))
    logp[:, 2] = 100.0  # padding with a wild value: must not leak in
    logp.requires_grad_(True)
    old = torch.zeros(2, 3)
    mask = t([[1, 1, 0], [1, 1, 0]])
    loss, stats = policy_loss(logp, old, t([1.0, -2.0]), mask, clip_low=0.2, clip_high=0.28, loss_agg="token-mean")
    assert_close(loss, t(0.705))
    assert_close(stats["clip_fraction"], t(0.5))  # 2 of 4 tokens
    assert_close(stats["ratio_mean"], t(1.0))  # (1.5 + 0.5 + 1.5 + 0.5) / 4
    assert_close(stats["approx_kl"], t(-math.log(0.75) / 2))  # -(ln1.5 + ln0.5) * 2 / 4
    loss.backward()
    # clipped tokens get no gradient; unclipped: d(-A r)/dlogp = -A r, / 4 tokens
    # (0,1): -(1)(0.5)/4 = -0.125; (1,0): -(-2)(1.5)/4 = 0.75
    assert_close(logp.grad, t([[0, -0.125, 0], [0.75, 0, 0]]))


def test_policy_loss_seq_mean_token_sum_and_token_advantages() -> None:
    # ratio 1 everywhere -> loss per token = -A; A given per token [B, T]
    # seq sums: -(1 + 2) = -3 and -(4) = -4 (last token masked) -> mean -3.5
    adv = t([[1, 2], [4, 8]])
    loss, stats = policy_loss(
        torch.zeros(2, 2), torch.zeros(2, 2), adv, t([[1, 1], [1, 0]]),
        clip_low=0.2, clip_high=0.2, loss_agg="seq-mean-token-sum",
    )
    assert_close(loss, t(-3.5))
    assert_close(stats["clip_fraction"], t(0.0))


# ---------------------------------------------------------------- KL / entropy

def test_kl_estimators_by_hand() -> None:
    logp = t([LN2, -LN2, 0.0])
    ref = torch.zeros(3)
    # k1 = logp - ref
    assert_close(kl_penalty(logp, ref, "k1"), t([LN2, -LN2, 0]))
    # k2 = 0.5 (logp - ref)^2
    assert_close(kl_penalty(logp, ref, "k2"), t([0.5 * LN2**2, 0.5 * LN2**2, 0]))
    # k3 = e^(ref-logp) - (ref-logp) - 1: d=ln2 -> 1/2 + ln2 - 1; d=-ln2 -> 2 - ln2 - 1
    assert_close(kl_penalty(logp, ref, "k3"), t([LN2 - 0.5, 1 - LN2, 0]))


def test_k3_is_clamped_like_verl() -> None:
    # ref-logp = 30 -> clamp 20 -> e^20 - 21 -> clamp 10; ref-logp = -30 -> clamp -20 -> e^-20 + 19 -> 10
    out = kl_penalty(t([-30.0, 30.0]), torch.zeros(2), "k3")
    assert_close(out, t([10.0, 10.0]))
    with pytest.raises(ValueError):
        kl_penalty(t([0.0]), t([0.0]), "k4")


def test_entropy_by_hand_and_stable() -> None:
    logits = t([[0, 0, 0, 0], [0, LN3, -1e9, -1e9], [1000, 1000, -1000, -1000], [float("-inf"), 5, float("-inf"), float("-inf")]])
    # uniform over 4 -> ln 4; p = [1/4, 3/4] -> -(1/4 ln 1/4 + 3/4 ln 3/4); two huge equal logits -> ln 2;
    # one finite logit among -inf -> 0 (not nan)
    h = -(0.25 * math.log(0.25) + 0.75 * math.log(0.75))
    assert_close(entropy_from_logits(logits), t([math.log(4), h, LN2, 0]))
    assert entropy_from_logits(logits.to(torch.bfloat16)).dtype == torch.float32


# ---------------------------------------------------------------- token logprobs

def test_token_logprobs_by_hand_with_gradient() -> None:
    # pos 0: logits [0, ln3] -> p = [1/4, 3/4], target 1 -> ln(3/4)
    # pos 1: logits [ln2, ln2] -> p = [1/2, 1/2], target 0 -> ln(1/2)
    logits = t([[[0, LN3], [LN2, LN2]]]).requires_grad_(True)
    targets = torch.tensor([[1, 0]])
    out = token_logprobs(logits, targets, chunk=1)
    assert_close(out, t([[math.log(0.75), math.log(0.5)]]))
    out.sum().backward()
    # d log p_y / d logits = onehot(y) - p: [-1/4, 1/4] and [1/2, -1/2]
    assert_close(logits.grad, t([[[-0.25, 0.25], [0.5, -0.5]]]))


@pytest.mark.parametrize("chunk", [1, 3, 7, 256])
def test_token_logprobs_chunking_matches_full(chunk: int) -> None:
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 7, 11, generator=gen).requires_grad_(True)
    targets = torch.randint(0, 11, (2, 7), generator=gen)
    expected = torch.log_softmax(logits, -1).gather(-1, targets[..., None]).squeeze(-1)
    (g_expected,) = torch.autograd.grad(expected.sum(), logits)
    out = token_logprobs(logits, targets, chunk=chunk)
    assert_close(out, expected)
    (g_out,) = torch.autograd.grad(out.sum(), logits)
    assert_close(g_out, g_expected)
    # bf16 logits come back as float32 log-probs (math in float32)
    with torch.no_grad():
        assert token_logprobs(logits.to(torch.bfloat16), targets, chunk=chunk).dtype == torch.float32


# ---------------------------------------------------------------- log-probs from the LM head's input

# A head whose logits are the hidden state's two numbers and a 0: W = [[1, 0], [0, 1], [0, 0]].
W = t([[1, 0], [0, 1], [0, 0]])


def test_lm_head_logprobs_by_hand_with_gradient() -> None:
    # pos 0: hidden [0, ln3] -> logits [0, ln3, 0] -> p = [1/5, 3/5, 1/5], target 1 -> ln(3/5)
    # pos 1: hidden [ln2, ln2] -> logits [ln2, ln2, 0] -> p = [2/5, 2/5, 1/5], target 2 -> ln(1/5)
    hidden = t([[[0, LN3], [LN2, LN2]]]).requires_grad_(True)
    targets = torch.tensor([[1, 2]])
    lp, ent = lm_head_logprobs(hidden, W, None, targets, chunk=1, with_entropy=True)
    assert_close(lp, t([[math.log(0.6), math.log(0.2)]]))
    h0 = -(2 * 0.2 * math.log(0.2) + 0.6 * math.log(0.6))
    h1 = -(2 * 0.4 * math.log(0.4) + 0.2 * math.log(0.2))
    assert_close(ent, t([[h0, h1]]))
    (g,) = torch.autograd.grad(lp.sum(), hidden)
    # d log p_y / d hidden = W^T (onehot(y) - p): pos 0 [-1/5, 2/5, -1/5] -> [-1/5, 2/5];
    # pos 1 [-2/5, -2/5, 4/5] -> [-2/5, -2/5] (row 3 of W is zero)
    assert_close(g, t([[[-0.2, 0.4], [-0.4, -0.4]]]))


def test_lm_head_logprobs_temperature_and_bias_by_hand() -> None:
    # hidden [0, 2 ln3], bias [0, 0, ln2], temperature 2:
    # logits [0, 2 ln3, ln2] / 2 = [0, ln3, ln2/2] -> p proportional to [1, 3, sqrt 2]
    bias = t([0, 0, LN2])
    z = 4 + math.sqrt(2)
    lp, ent = lm_head_logprobs(t([[0, 2 * LN3]]), W, bias, torch.tensor([0]), temperature=2.0)
    assert ent is None
    assert_close(lp, t([math.log(1 / z)]))
    lp, _ = lm_head_logprobs(t([[0, 2 * LN3]]), W, bias, torch.tensor([2]), temperature=2.0)
    assert_close(lp, t([math.log(math.sqrt(2) / z)]))


def _unchunked(hidden, weight, bias, targets, temperature):
    logits = (hidden @ weight.T + bias) / temperature
    logp = torch.log_softmax(logits, -1)
    return logp.gather(-1, targets[..., None]).squeeze(-1), -(logp.exp() * logp).sum(-1)


@pytest.mark.parametrize("chunk", [1, 3, 4, 14, 1000])  # 14 tokens: 3 and 4 do not divide it
def test_lm_head_logprobs_matches_unchunked_values_and_grads(chunk: int) -> None:
    gen = torch.Generator().manual_seed(0)
    f64 = dict(dtype=torch.float64)
    hidden = torch.randn(2, 7, 5, generator=gen, **f64).requires_grad_(True)
    weight = torch.randn(11, 5, generator=gen, **f64).requires_grad_(True)
    bias = torch.randn(11, generator=gen, **f64).requires_grad_(True)
    targets = torch.randint(0, 11, (2, 7), generator=gen)
    c_lp, c_ent = torch.randn(2, 7, generator=gen, **f64), torch.randn(2, 7, generator=gen, **f64)
    inputs = (hidden, weight, bias)

    lp_ref, ent_ref = _unchunked(hidden, weight, bias, targets, 0.7)
    g_ref = torch.autograd.grad((c_lp * lp_ref + c_ent * ent_ref).sum(), inputs)
    lp, ent = lm_head_logprobs(hidden, weight, bias, targets, temperature=0.7, chunk=chunk, with_entropy=True)
    assert lp.dtype == ent.dtype == torch.float64
    assert_close(lp, lp_ref, rtol=1e-12, atol=1e-12)
    assert_close(ent, ent_ref, rtol=1e-12, atol=1e-12)
    g = torch.autograd.grad((c_lp * lp + c_ent * ent).sum(), inputs)
    for got, want in zip(g, g_ref):
        assert_close(got, want, rtol=1e-12, atol=1e-12)

    # float32 in, float32 out, to float32 rounding
    inputs32 = [x.detach().float().requires_grad_(True) for x in inputs]
    lp32, _ = lm_head_logprobs(*inputs32[:2], inputs32[2], targets, temperature=0.7, chunk=chunk)
    assert lp32.dtype == torch.float32
    assert_close(lp32, lp_ref.float(), rtol=1e-5, atol=1e-5)
    g32 = torch.autograd.grad((c_lp.float() * lp32).sum(), inputs32)
    g_ref_lp = torch.autograd.grad((c_lp * _unchunked(*inputs, targets, 0.7)[0]).sum(), inputs)
    for got, want in zip(g32, g_ref_lp):
        assert_close(got, want.float(), rtol=1e-5, atol=1e-5)


def test_lm_head_logprobs_keeps_no_logits_for_backward() -> None:
    # Every chunk is checkpointed: nothing of shape [tokens, vocab] is saved
    # for backward (an unchunked log_softmax would save its [14, 11] output).
    gen = torch.Generator().manual_seed(1)
    hidden = torch.randn(2, 7, 5, generator=gen).requires_grad_(True)
    weight = torch.randn(11, 5, generator=gen)
    saved: list[tuple[int, ...]] = []

    def pack(x):
        saved.append(tuple(x.shape))
        return x

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
        lp, ent = lm_head_logprobs(hidden, weight, None, torch.zeros(2, 7, dtype=torch.long), chunk=3, with_entropy=True)
    assert not [s for s in saved if len(s) >= 2 and s[-1] == 11], saved
    (lp.sum() + ent.sum()).backward()
    assert hidden.grad is not None and hidden.grad.shape == hidden.shape


def test_lm_head_logprobs_no_grad_bf16_and_bad_shapes() -> None:
    gen = torch.Generator().manual_seed(2)
    hidden, weight = torch.randn(3, 4, 8, generator=gen), torch.randn(13, 8, generator=gen)
    targets = torch.randint(0, 13, (3, 4), generator=gen)
    with torch.no_grad():
        lp, ent = lm_head_logprobs(hidden, weight, None, targets, chunk=5, with_entropy=True)
        lp16, ent16 = lm_head_logprobs(hidden.bfloat16(), weight.bfloat16(), None, targets, chunk=5, with_entropy=True)
    assert not lp.requires_grad and lp.shape == ent.shape == (3, 4)
    # bf16 matmul, float32 softmax: float32 results within bf16 rounding of the logits
    assert lp16.dtype == ent16.dtype == torch.float32
    assert_close(lp16, lp, rtol=0.05, atol=0.1)
    assert_close(ent16, ent, rtol=0.05, atol=0.1)
    # empty sequences give empty results
    empty, _ = lm_head_logprobs(hidden[:, :0], weight, None, targets[:, :0])
    assert empty.shape == (3, 0)
    with pytest.raises(ValueError, match="line up"):
        lm_head_logprobs(hidden, weight, None, targets[:, :3])
    with pytest.raises(ValueError, match="vocab"):
        lm_head_logprobs(hidden, weight[:, :7], None, targets)
    with pytest.raises(ValueError, match="chunk"):
        lm_head_logprobs(hidden, weight, None, targets, chunk=0)


def test_the_planner_models_the_trainer_s_chunk_sizes() -> None:
    default = lambda f: inspect.signature(f).parameters["chunk"].default  # noqa: E731
    assert (memory.Knobs().head_chunk_tokens, memory.Knobs().logprob_chunk) == \
        (default(lm_head_logprobs), default(token_logprobs)) == (HEAD_CHUNK_TOKENS, LOGPROB_CHUNK)
