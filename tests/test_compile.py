"""model.compile: the decoder layers' norms, MLPs and attention projections
through torch.compile (inductor, here its CPU backend) give the eager path's
log-probs, reference log-probs, loss and gradients, for LoRA with some
layers recomputed and for full fine-tuning, over micro-batches of two shapes
(dynamic shapes: no recompile per shape) and with and without padding (the
attention mask None or a tensor).

Tolerance: inductor fuses the norms and the LoRA adds into other kernels,
which sum in another order: fp32 rounding, measured within 1e-6 on
log-probs around -3 and 8e-7 on gradients. The bounds are test_packing's.
A compiled region that dropped the adapter, the scaling or the recompute
would move log-probs by far more (the LoRA B matrices are set non-zero).
"""
from __future__ import annotations

import pytest
import torch

from grpo_core.algorithm import LOSS_AGG_MODES
from grpo_core.policy import _compiled_blocks, set_compiled
from tests.test_packing import LOGPROB_ATOL, grads_after, make_batch, make_policy, model_dir, vocab_of  # noqa: F401

LAYOUTS = {"lora-recompute-1": ("model.lora_rank=4", "model.lora_alpha=8", "model.gradient_checkpointing=true",
                                "model.recompute_layers=1"),
           "full": ("model.lora_rank=0",)}


def _nonzero_adapter(policy) -> None:
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, p in policy.model.named_parameters():
            if "lora_B" in name:  # a DTensor shard on world 1: its local tensor is the whole matrix
                local = p.to_local() if hasattr(p, "to_local") else p
                local.copy_(torch.randn(local.shape, generator=gen) * 0.05)


def _logprobs(policy, batch):
    with torch.no_grad():
        out = [policy.forward_logprobs(batch.input_ids, batch.attention_mask, 0.7, reference=ref, with_entropy=True)
               for ref in (False, True)]
    policy.end_no_grad_passes()  # as train.batched_logprobs does
    return out


@pytest.mark.parametrize("layout", LAYOUTS)
def test_compiled_blocks_equal_eager(model_dir, layout):
    policy, cfg = make_policy(model_dir, *LAYOUTS[layout], f"algorithm.loss_agg={LOSS_AGG_MODES[0]}",
                              "algorithm.entropy_coef=0.01")
    _nonzero_adapter(policy)
    blocks = list(_compiled_blocks(policy.model))
    assert len(blocks) == 2 * 7  # 2 layers x (2 norms, the MLP, q/k/v/o)
    vocab = vocab_of(policy)
    batches = [make_batch(vocab), make_batch(vocab, rows=4, seed=9)]
    same = make_batch(vocab, rows=3, seed=11)  # every row as long: no padding, HF passes no mask
    same.attention_mask[:] = 1
    same.response_mask[:, : same.response_mask.shape[1] // 2] = 0
    batches.append(same)
    eager = [(_logprobs(policy, b), grads_after(policy, b, cfg)) for b in batches]
    set_compiled(policy.model, True)
    assert all(b._compiled_call_impl is not None for b in blocks)
    compiled = [(_logprobs(policy, b), grads_after(policy, b, cfg)) for b in batches]
    for b, (want, got) in enumerate(zip(eager, compiled)):
        mask = batches[b].response_mask.bool()
        for (lp_w, ent_w), (lp_g, ent_g) in zip(want[0], got[0]):
            assert lp_w[mask].lt(-0.5).all()
            torch.testing.assert_close(lp_g[mask], lp_w[mask], rtol=0, atol=LOGPROB_ATOL)
            torch.testing.assert_close(ent_g[mask], ent_w[mask], rtol=0, atol=LOGPROB_ATOL)
        (s_w, g_w), (s_g, g_g) = want[1], got[1]
        for key in s_w:
            assert s_g[key] == pytest.approx(s_w[key], rel=1e-5, abs=1e-6), (b, key)
        assert any(g.abs().max() > 1e-4 for g in g_w.values())
        for name, g in g_w.items():
            torch.testing.assert_close(g_g[name], g, rtol=1e-4, atol=1e-6, msg=lambda m, n=name: f"batch {b} {n}: {m}")
    if layout.startswith("lora"):  # the adapter is in the compiled graphs: the reference (adapter off) differs
        assert (compiled[0][0][0][0] - compiled[0][0][1][0]).abs().max() > 100 * LOGPROB_ATOL
    set_compiled(policy.model, False)
    assert all(b._compiled_call_impl is None for b in blocks)
