"""Pure tensor math for GRPO: advantages, clipped policy loss, KL, entropy,
and token log-probs straight from the LM head's input (lm_head_logprobs).

Only torch: no torch.distributed and no config objects, so every function
is testable with small hand-computed tensors and reusable by any trainer.
Masks are 1 for response tokens that count and 0 for prompt/padding.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from .constants import HEAD_CHUNK_TOKENS, KL_ESTIMATORS, LOGPROB_CHUNK, LOSS_AGG_MODES

__all__ = [
    "KL_ESTIMATORS",
    "LOSS_AGG_MODES",
    "aggregate_loss",
    "aggregate_weight",
    "entropy_from_logits",
    "group_advantages",
    "kl_penalty",
    "lm_head_logprobs",
    "masked_mean",
    "masked_sum",
    "policy_loss",
    "token_logprobs",
]

def group_advantages(rewards: Tensor, group_size: int, *, eps: float = 1e-6, norm_by_std: bool = True) -> Tensor:
    """GRPO outcome advantages; rewards are laid out group by group ([B*n]).

    (r - group mean) / (unbiased group std + eps); with norm_by_std=False only
    the mean is removed (Dr.GRPO). A group of one has no baseline -> zeros.
    """
    if rewards.dim() != 1 or group_size < 1 or rewards.numel() % group_size:
        raise ValueError(f"rewards of shape {tuple(rewards.shape)} do not split into groups of {group_size}")
    r = rewards.to(torch.float32).view(-1, group_size)
    if group_size == 1:
        return torch.zeros_like(r).view(-1)
    centered = r - r.mean(dim=1, keepdim=True)
    if norm_by_std:
        centered = centered / (r.std(dim=1, unbiased=True, keepdim=True) + eps)
    return centered.view(-1)


def masked_sum(x: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    # torch.where first: masked positions may hold inf/nan (e.g. exp of padding
    # log-ratios), and inf * 0 would poison the sum.
    m = mask.to(x.dtype)
    values = torch.where(mask.bool(), x * m, torch.zeros_like(x))
    return values.sum() if dim is None else values.sum(dim=dim)


def masked_mean(x: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """Mean over masked entries; 0 (not nan) where nothing is masked in."""
    total = masked_sum(x, mask, dim)
    count = mask.to(x.dtype).sum() if dim is None else mask.to(x.dtype).sum(dim=dim)
    # clamp only bites for an empty mask, where total is 0 anyway.
    return total / count.clamp(min=1e-8)


def aggregate_loss(per_token_loss: Tensor, mask: Tensor, loss_agg: str, *, norm_length: int | None = None) -> Tensor:
    """Reduce a [B, T] per-token loss to a scalar.

    token-mean: every response token weighs the same (DAPO / verl default).
    seq-mean-token-sum: per-sequence sum, mean over sequences.
    seq-mean-token-mean: per-sequence mean, mean over sequences (original GRPO).
    seq-mean-token-sum-norm: per-sequence sum / norm_length (default T), mean
      over sequences; a constant divisor removes GRPO's length bias (Dr.GRPO).
    Sequence means run over sequences with at least one token, as verl does.
    """
    if loss_agg == "token-mean":
        return masked_mean(per_token_loss, mask)
    seq_has_tokens = (mask.to(per_token_loss.dtype).sum(dim=-1) > 0).to(per_token_loss.dtype)
    if loss_agg == "seq-mean-token-sum":
        seq = masked_sum(per_token_loss, mask, dim=-1)
    elif loss_agg == "seq-mean-token-mean":
        seq = masked_mean(per_token_loss, mask, dim=-1)
    elif loss_agg == "seq-mean-token-sum-norm":
        length = per_token_loss.shape[-1] if norm_length is None else norm_length
        seq = masked_sum(per_token_loss, mask, dim=-1) / length
    else:
        raise ValueError(f"unknown loss_agg {loss_agg!r}; valid: {', '.join(LOSS_AGG_MODES)}")
    return masked_mean(seq, seq_has_tokens)


def aggregate_weight(mask: Tensor, loss_agg: str) -> float:
    """How much the rows of `mask` weigh in aggregate_loss's mean: their response tokens
    (token-mean) or their count (the seq-mean modes). Micro-batches of one mini-batch
    are scaled by their share of its weight, so accumulation equals one big batch."""
    if loss_agg not in LOSS_AGG_MODES:
        raise ValueError(f"unknown loss_agg {loss_agg!r}; valid: {', '.join(LOSS_AGG_MODES)}")
    return float(mask.sum()) if loss_agg == "token-mean" else float(mask.shape[0])


def policy_loss(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    mask: Tensor,
    *,
    clip_low: float,
    clip_high: float,
    loss_agg: str = "token-mean",
    norm_length: int | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """PPO clipped surrogate with asymmetric clipping (ratio in [1-low, 1+high]).

    logprobs/old_logprobs/mask are [B, T]; advantages are [B] (one per
    sequence, broadcast over its tokens) or [B, T]. Returns the scalar loss
    and detached 0-dim stats: clip_fraction, ratio_mean, approx_kl.
    """
    adv = advantages.unsqueeze(-1) if advantages.dim() == 1 else advantages
    # Clamp the log-ratio before exp so a stale token cannot overflow (verl does the same).
    log_ratio = torch.clamp(logprobs - old_logprobs, min=-20.0, max=20.0)
    ratio = torch.exp(log_ratio)
    unclipped = -adv * ratio
    clipped = -adv * torch.clamp(ratio, 1.0 - clip_low, 1.0 + clip_high)
    per_token = torch.maximum(unclipped, clipped)  # pessimistic bound
    loss = aggregate_loss(per_token, mask, loss_agg, norm_length=norm_length)
    with torch.no_grad():
        stats = {
            "clip_fraction": masked_mean((clipped > unclipped).to(per_token.dtype), mask),
            "ratio_mean": masked_mean(ratio, mask),
            "approx_kl": masked_mean(-log_ratio, mask),
        }
    return loss, stats


def kl_penalty(logprobs: Tensor, ref_logprobs: Tensor, estimator: str = "k3") -> Tensor:
    """Per-token estimate of KL(policy || reference) from sampled tokens.

    k1: logp - ref (unbiased, high variance, can be negative)
    k2: 0.5 * (logp - ref)^2
    k3: exp(ref - logp) - (ref - logp) - 1 (unbiased, >= 0, low variance);
        clamped like verl's low_var_kl so one outlier token cannot dominate.
    """
    diff = logprobs - ref_logprobs
    if estimator == "k1":
        return diff
    if estimator == "k2":
        return 0.5 * diff.square()
    if estimator == "k3":
        kl = torch.clamp(-diff, min=-20.0, max=20.0)
        return torch.clamp(torch.exp(kl) - kl - 1.0, min=-10.0, max=10.0)
    raise ValueError(f"unknown kl estimator {estimator!r}; valid: {', '.join(KL_ESTIMATORS)}")


def entropy_from_logits(logits: Tensor) -> Tensor:
    """Entropy of softmax(logits) over the last dim, in float32.

    Through log_softmax (stable for large logits); tokens with -inf logits
    have p = 0 and contribute 0 rather than 0 * -inf = nan.
    """
    return _entropy_from_logp(torch.log_softmax(logits.to(torch.float32), dim=-1))


def _entropy_from_logp(logp: Tensor) -> Tensor:
    p = logp.exp()
    plogp = torch.where(p > 0, p * logp, torch.zeros_like(p))
    return -plogp.sum(dim=-1)


def _chunk_logprobs(logits: Tensor, targets: Tensor) -> Tensor:
    logp = torch.log_softmax(logits.to(torch.float32), dim=-1)
    return logp.gather(-1, targets.unsqueeze(-1)).squeeze(-1)


def token_logprobs(logits: Tensor, targets: Tensor, *, chunk: int = LOGPROB_CHUNK) -> Tensor:
    """log softmax(logits)[target] per position: [B, T, V], [B, T] -> [B, T] float32.

    A float32 log-softmax over a large vocabulary is the biggest tensor of the
    update, so it is formed `chunk` positions at a time; under autograd each
    chunk is recomputed in backward instead of kept, bounding peak memory.
    """
    if logits.shape[:-1] != targets.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and targets {tuple(targets.shape)} do not line up")
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    targets = targets.long()
    grad = torch.is_grad_enabled() and logits.requires_grad
    pieces = []
    for start in range(0, logits.shape[1], chunk):
        x, t = logits[:, start : start + chunk], targets[:, start : start + chunk]
        pieces.append(checkpoint(_chunk_logprobs, x, t, use_reentrant=False) if grad else _chunk_logprobs(x, t))
    if not pieces:
        return logits.new_zeros(targets.shape, dtype=torch.float32)
    return torch.cat(pieces, dim=1)


def _head_chunk(
    hidden: Tensor, weight: Tensor, bias: Tensor | None, targets: Tensor, temperature: float, with_entropy: bool
) -> Tensor | tuple[Tensor, Tensor]:
    logits = F.linear(hidden, weight, bias)  # the matmul in the compute dtype, the softmax in >= fp32
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    if temperature != 1.0:
        # In place: one [chunk, V] temporary fewer (neither linear's nor the
        # cast's backward reads its output).
        logits = logits.div_(temperature)
    logp = torch.log_softmax(logits, dim=-1)
    picked = logp.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    return (picked, _entropy_from_logp(logp)) if with_entropy else picked


def lm_head_logprobs(
    hidden: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    targets: Tensor,
    *,
    temperature: float = 1.0,
    chunk: int = HEAD_CHUNK_TOKENS,
    with_entropy: bool = False,
) -> tuple[Tensor, Tensor | None]:
    """Token log-probs (and entropy) under softmax((hidden @ weight.T + bias) / temperature),
    without ever forming the logits of all positions.

    hidden [..., H], weight [V, H], bias [V] or None, targets [...] (the same
    leading shape). Returns (logprobs, entropy), both [...] float32 (float64
    for float64 inputs); entropy is None unless with_entropy. Only the logits
    of `chunk` tokens exist at a time (matmul in hidden's dtype, softmax in
    float32); under autograd each chunk is checkpointed, so backward
    recomputes its logits instead of keeping [tokens, V] of them. Callers
    wanting entropy only as a metric detach it.
    """
    if hidden.shape[:-1] != targets.shape:
        raise ValueError(f"hidden {tuple(hidden.shape)} and targets {tuple(targets.shape)} do not line up")
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[-1]:
        raise ValueError(f"weight {tuple(weight.shape)} is not [vocab, {hidden.shape[-1]}]")
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    # Cast once here, not per chunk: a mismatched weight's copy is [V, H].
    weight = weight.to(hidden.dtype)
    bias = bias.to(hidden.dtype) if bias is not None else None
    h = hidden.reshape(-1, hidden.shape[-1])
    t = targets.reshape(-1).long()
    grad = torch.is_grad_enabled() and any(x is not None and x.requires_grad for x in (hidden, weight, bias))
    logps, ents = [], []
    for start in range(0, h.shape[0], chunk):
        args = (h[start : start + chunk], weight, bias, t[start : start + chunk], temperature, with_entropy)
        # The chunk is a pure function of its inputs (no RNG), so no RNG state to keep.
        out = checkpoint(_head_chunk, *args, use_reentrant=False, preserve_rng_state=False) if grad else _head_chunk(*args)
        logp, ent = out if with_entropy else (out, None)
        logps.append(logp)
        ents.append(ent)
    if not logps:
        empty = hidden.new_zeros(targets.shape, dtype=torch.promote_types(hidden.dtype, torch.float32))
        return empty, (empty.clone() if with_entropy else None)
    logprobs = torch.cat(logps).view(targets.shape)
    return logprobs, (torch.cat(ents).view(targets.shape) if with_entropy else None)
