"""Padding-free micro-batches (trainer.pack_sequences): the rows of a
micro-batch run as one sequence, positions restarting per row, attention
kept within a row. Log-probs, entropy, every loss aggregation and the
gradients must equal the padded path's, for LoRA and full fine-tuning.

Tolerance: both paths compute the same fp32 sums over the same tokens, but
in different kernels (a [1, N] sequence with a per-document mask against
[B, T] rows with a padding mask, GEMMs of other shapes), so they agree to
fp32 rounding, not bitwise. Measured here: log-probs and entropy within
7e-7 (values around -4 and 3, a few ulps), gradients within 8e-7 of their
largest entry. The bounds (1e-5 absolute; rtol 1e-4 for gradients, summed
over ~100 tokens in another order) leave room for other CPUs' kernels. A single row
attending across a row boundary moves log-probs by ~0.1-0.5 (see
test_attention_stays_within_a_row), four orders above these tolerances.
"""
from __future__ import annotations

import pytest
import torch

from grpo_core import config
from grpo_core.algorithm import LOSS_AGG_MODES
from grpo_core.batch import pack, pack_rows
from grpo_core.train import forward_backward

LOGPROB_ATOL = 1e-5


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from grpo_core.tiny import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("m") / "tiny",
                            [f"user\n{a} + {b}\nassistant\n#### {a + b}" for a in range(10) for b in range(10)])


def make_batch(vocab: int, rows: int = 6, seed: int = 3):
    gen = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(3, vocab, (int(torch.randint(2, 8, (1,), generator=gen)),), generator=gen).tolist()
               for _ in range(rows)]
    responses = [torch.randint(3, vocab, (int(torch.randint(1, 14, (1,), generator=gen)),), generator=gen).tolist()
                 for _ in range(rows)]
    batch = pack(prompts, responses, torch.randn(rows, generator=gen), 0)
    batch.old_logprobs = torch.full_like(batch.response_mask, -3.0)  # ratio != 1: the loss depends on the weights
    batch.ref_logprobs = torch.full_like(batch.response_mask, -3.5)
    return batch


def make_policy(model_dir, *overrides: str):
    from grpo_core import distributed
    from grpo_core.policy import Policy

    info = distributed.init_distributed("cpu")
    cfg = config.load(None, [f"model.path={model_dir}", "trainer.device=cpu", "rollout.max_tokens=16",
                             "algorithm.kl_coef=0.1", *overrides])
    torch.manual_seed(0)
    return Policy(str(model_dir), cfg.model, cfg.trainer, info, needs_reference=cfg.algorithm.kl_coef > 0), cfg


def vocab_of(policy) -> int:
    return policy.model.get_output_embeddings().weight.shape[0]


def test_packed_layout_by_hand():
    ids = torch.tensor([[5, 6, 7, 0], [8, 9, 0, 0], [1, 2, 3, 4]])
    mask = (ids != 0).long()
    mask[2] = 1
    p = pack_rows(ids, mask)
    assert p.input_ids.tolist() == [[5, 6, 7, 8, 9, 1, 2, 3, 4]]
    assert p.position_ids.tolist() == [[0, 1, 2, 0, 1, 0, 1, 2, 3]]
    # position t of a row scores its token t+1: rows of 3, 2, 4 tokens score 2, 1, 3
    assert p.scored.tolist() == [[True, True, False], [True, False, False], [True, True, True]]
    assert p.sources.tolist() == [0, 1, 3, 5, 6, 7]
    assert p.targets.tolist() == [6, 7, 9, 2, 3, 4]
    with pytest.raises(ValueError, match="right-padded"):
        pack_rows(ids, torch.tensor([[0, 1, 1, 1], [1, 1, 0, 0], [1, 1, 1, 1]]))


LAYOUTS = {"lora": ("model.lora_rank=4", "model.lora_alpha=8"), "full": ("model.lora_rank=0",),
           "lora-ckpt": ("model.lora_rank=4", "model.gradient_checkpointing=true"),
           "full-eager": ("model.lora_rank=0", "model.attn_implementation=eager")}


@pytest.mark.parametrize("layout", LAYOUTS)
def test_packed_logprobs_and_entropy_equal_padded(model_dir, layout):
    policy, _ = make_policy(model_dir, *LAYOUTS[layout])
    batch = make_batch(vocab_of(policy))
    mask = batch.response_mask.bool()
    for reference in (False, True):
        with torch.no_grad():
            padded = policy.forward_logprobs(batch.input_ids, batch.attention_mask, 0.7, reference=reference,
                                             with_entropy=True)
            packed = policy.forward_logprobs(batch.input_ids, batch.attention_mask, 0.7, reference=reference,
                                             with_entropy=True, layout=pack_rows(batch.input_ids, batch.attention_mask))
        assert packed[0].shape == padded[0].shape == batch.response_mask.shape
        assert padded[0][mask].lt(-0.5).all()  # real values, not zeros
        for got, want in zip(packed, padded):
            torch.testing.assert_close(got[mask], want[mask], rtol=0, atol=LOGPROB_ATOL)
        assert (packed[0][~batch.attention_mask[:, 1:].bool()] == 0).all()  # nothing scored past a row's end


def test_attention_stays_within_a_row(model_dir):
    """Changing row 0 changes nothing in row 1 (and the test can tell: with
    a cache, transformers ignores the restarts and attention crosses rows)."""
    policy, _ = make_policy(model_dir, "model.lora_rank=0")
    batch = make_batch(vocab_of(policy), rows=2)
    other = batch.input_ids.clone()
    n0 = int(batch.attention_mask[0].sum())
    other[0, :n0] = (other[0, :n0] + 1) % vocab_of(policy)
    with torch.no_grad():
        a = policy.forward_logprobs(batch.input_ids, batch.attention_mask, 1.0, layout=pack_rows(batch.input_ids, batch.attention_mask))[0]
        b = policy.forward_logprobs(other, batch.attention_mask, 1.0, layout=pack_rows(other, batch.attention_mask))[0]
        hf = policy.model
        p = pack_rows(batch.input_ids, batch.attention_mask)
        leaky = hf(input_ids=p.input_ids, position_ids=p.position_ids, use_cache=True).logits
        sealed = hf(input_ids=p.input_ids, position_ids=p.position_ids, use_cache=False).logits
    torch.testing.assert_close(a[1], b[1], rtol=0, atol=0)
    assert (a[0] - b[0]).abs().max() > 0.01
    assert (leaky[0, n0:] - sealed[0, n0:]).abs().max() > 100 * LOGPROB_ATOL  # the trap this path avoids


def grads_after(policy, batch, cfg, packed: bool = False) -> tuple[dict[str, float], dict[str, torch.Tensor]]:
    cfg = config.validate(config.build(config.TrainConfig, config.apply_overrides(
        config.TrainConfig, config.to_dict(cfg), [f"trainer.pack_sequences={str(packed).lower()}"])))
    for p in policy.trainable_parameters():
        p.grad = None
    stats = forward_backward(policy, batch, cfg, loss_scale=1.0)
    grads = {n: (p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad).clone()
             for n, p in policy.model.named_parameters() if p.requires_grad}
    return stats, grads


@pytest.mark.parametrize("layout", ["lora", "full", "lora-ckpt"])
def test_loss_and_gradients_equal_padded_for_every_loss_agg(model_dir, layout):
    for loss_agg in LOSS_AGG_MODES:
        policy, cfg = make_policy(model_dir, *LAYOUTS[layout], f"algorithm.loss_agg={loss_agg}",
                                  "algorithm.entropy_coef=0.01")
        batch = make_batch(vocab_of(policy))
        s_pad, g_pad = grads_after(policy, batch, cfg, packed=False)
        s_pack, g_pack = grads_after(policy, batch, cfg, packed=True)
        assert s_pad.keys() == s_pack.keys() >= {"policy_loss", "kl", "entropy"}
        for key in s_pad:
            assert s_pack[key] == pytest.approx(s_pad[key], rel=1e-5, abs=1e-6), (loss_agg, key)
        assert len(g_pad) > 0 and any(g.abs().max() > 1e-4 for g in g_pad.values())
        for name, g in g_pad.items():
            torch.testing.assert_close(g_pack[name], g, rtol=1e-4, atol=1e-6, msg=lambda m, n=name: f"{loss_agg} {n}: {m}")
