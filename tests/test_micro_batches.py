"""How a mini-batch is cut into micro-batches must not change the update:
one micro-batch holding every row == length-sorted micro-batches of 3, for
every loss aggregation (the denominators are global and Dr.GRPO's divisor
is a constant, not a micro-batch's padded width)."""
from __future__ import annotations

import pytest
import torch

from grpo_core import config
from grpo_core.algorithm import LOSS_AGG_MODES
from grpo_core.batch import pack
from grpo_core.train import batched_logprobs, by_length, train_step

ROWS = 8


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from grpo_core.tiny import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("m") / "tiny",
                            [f"user\n{a} + {b}\nassistant\n#### {a + b}" for a in range(10) for b in range(10)])


def make_batch(vocab: int):
    gen = torch.Generator().manual_seed(7)
    prompts = [torch.randint(3, vocab, (int(torch.randint(3, 7, (1,), generator=gen)),), generator=gen).tolist()
               for _ in range(ROWS)]
    responses = [torch.randint(3, vocab, (int(torch.randint(1, 12, (1,), generator=gen)),), generator=gen).tolist()
                 for _ in range(ROWS)]
    batch = pack(prompts, responses, torch.randn(ROWS, generator=gen), 0)
    batch.old_logprobs = torch.full_like(batch.response_mask, -3.0)  # ratio != 1: the loss depends on the weights
    batch.ref_logprobs = torch.full_like(batch.response_mask, -3.5)
    return batch


def one_update(model_dir, loss_agg: str, micro: int, *extra: str) -> dict[str, torch.Tensor]:
    from grpo_core import distributed
    from grpo_core.policy import Policy

    info = distributed.init_distributed("cpu")
    cfg = config.load(None, [f"model.path={model_dir}", "model.lora_rank=4", "model.lora_alpha=8", "trainer.device=cpu",
                             f"trainer.prompts_per_step={ROWS}", f"trainer.mini_batch_prompts={ROWS}", "rollout.n=1",
                             f"trainer.micro_batch_size={micro}", f"algorithm.loss_agg={loss_agg}", "rollout.max_tokens=16",
                             "algorithm.kl_coef=0.1", "algorithm.entropy_coef=0.01", "optim.lr=0.01", "optim.weight_decay=0",
                             *extra])
    torch.manual_seed(0)
    policy = Policy(str(model_dir), cfg.model, cfg.trainer, info, needs_reference=False)
    optimizer = torch.optim.SGD(policy.trainable_parameters(), lr=1.0)  # the update is the gradient itself
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    before = {k: v.clone() for k, v in policy.trainable_state_dict().items()}
    train_step(policy, optimizer, scheduler, make_batch(policy.model.base_model.model.config.vocab_size), cfg)
    return {k: v - before[k] for k, v in policy.trainable_state_dict().items()}


def test_rows_sort_longest_first_and_stably():
    batch = pack([[1], [1, 2], [1], [1, 2, 3]], [[5], [5], [5, 6], [5]], torch.zeros(4), 0)
    assert by_length(batch, [0, 1, 2, 3]) == [3, 1, 2, 0]


CUTS = {"rows of 3": (3,), "packed rows of 3": (3, "trainer.pack_sequences=true")}


@pytest.mark.parametrize("cut", CUTS)
@pytest.mark.parametrize("loss_agg", LOSS_AGG_MODES)
def test_micro_batching_does_not_change_the_update(model_dir, loss_agg, cut):
    whole, sliced = one_update(model_dir, loss_agg, ROWS), one_update(model_dir, loss_agg, *CUTS[cut])
    assert any(d.abs().max() > 1e-4 for d in whole.values())
    for name in whole:
        torch.testing.assert_close(sliced[name], whole[name], rtol=1e-4, atol=1e-7, msg=name)


def test_log_prob_micro_batches_do_not_change_the_log_probs(model_dir):
    from grpo_core import distributed
    from grpo_core.policy import Policy

    info = distributed.init_distributed("cpu")
    cfg = config.load(None, [f"model.path={model_dir}", "model.lora_rank=4", "trainer.device=cpu"])
    torch.manual_seed(0)
    policy = Policy(str(model_dir), cfg.model, cfg.trainer, info, needs_reference=False)
    batch = make_batch(policy.model.base_model.model.config.vocab_size)
    mask = batch.response_mask.bool()  # the loss reads these; padded positions are never read
    one_by_one = batched_logprobs(policy, batch, 1, 1.0, reference=False)[mask]
    assert one_by_one.lt(-0.1).all() and one_by_one.numel() == int(mask.sum())
    for micro in (3, ROWS):
        torch.testing.assert_close(batched_logprobs(policy, batch, micro, 1.0, reference=False)[mask], one_by_one,
                                   rtol=0, atol=2e-6)
