"""How a mini-batch is cut into micro-batches must not change the update:
one micro-batch holding every row == length-sorted micro-batches of 3 rows,
or of a token budget (padded or packed), for every loss aggregation (the
denominators are global and Dr.GRPO's divisor is a constant, not a
micro-batch's padded width). The binning and the padding fraction by hand."""
from __future__ import annotations

import pytest
import torch

from grpo_core import config
from grpo_core.algorithm import LOSS_AGG_MODES
from grpo_core.batch import pack, unit_lengths
from grpo_core.microbatch import Slots, by_tokens, even_out, longest_first
from grpo_core.train import batched_logprobs, train_step

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
    stats = train_step(policy, optimizer, scheduler, make_batch(policy.model.base_model.model.config.vocab_size), cfg)
    return {k: v - before[k] for k, v in policy.trainable_state_dict().items()} | {"stats": stats}


def test_rows_sort_longest_first_and_stably():
    batch = pack([[1], [1, 2], [1], [1, 2, 3]], [[5], [5], [5, 6], [5]], torch.zeros(4), 0)
    assert longest_first([0, 1, 2, 3], unit_lengths(batch, 1)) == [3, 1, 2, 0]


def test_token_bins_by_hand():
    lengths = [10, 7, 5, 3, 2]
    # packed, first-fit decreasing: 2 fills the first bin's room
    assert by_tokens(range(5), lengths, 12, packed=True) == [[0, 4], [1, 2], [3]]
    # padded, sorted greedy: rows x the longest <= 20
    assert by_tokens(range(5), lengths, 20, packed=False) == [[0, 1], [2, 3, 4]]
    # a row longer than the budget runs alone
    assert by_tokens(range(5), lengths, 6, packed=True) == [[0], [1], [2], [3, 4]]
    assert by_tokens(range(5), lengths, 6, packed=False) == [[0], [1], [2], [3, 4]]
    tally = Slots()
    for rows in ([0, 1], [2, 3, 4]):
        tally.add(rows, lengths, packed=False)
    assert (tally.real, tally.total) == (27, 35)  # 2 x 10 + 3 x 5 slots for 27 tokens


def test_even_out_splits_the_fullest_bin_then_adds_fillers():
    lengths = [10, 7, 5, 3, 2]
    assert even_out([[0, 1], [2, 3, 4]], 2, lengths, packed=False) == [[0, 1], [2, 3, 4]]
    assert even_out([[0, 1], [2, 3, 4]], 3, lengths, packed=False) == [[0], [1], [2, 3, 4]]  # 20 slots > 15
    assert even_out([[0, 4], [1, 2, 3]], 3, lengths, packed=True) == [[0, 4], [1], [2, 3]]  # 12 tokens < 15
    assert even_out([[0], [1]], 4, lengths, packed=True) == [[0], [1], [], []]


CUTS = {"rows of 3": (3,), "packed rows of 3": (3, "trainer.pack_sequences=true"),
        "40 tokens": (ROWS, "trainer.micro_batch_tokens=40"),
        "packed 40 tokens": (ROWS, "trainer.micro_batch_tokens=40", "trainer.pack_sequences=true"),
        "1 token (a row each)": (ROWS, "trainer.micro_batch_tokens=1")}


@pytest.mark.parametrize("cut", CUTS)
@pytest.mark.parametrize("loss_agg", LOSS_AGG_MODES)
def test_micro_batching_does_not_change_the_update(model_dir, loss_agg, cut):
    whole, sliced = one_update(model_dir, loss_agg, ROWS), one_update(model_dir, loss_agg, *CUTS[cut])
    whole.pop("stats"), sliced.pop("stats")
    assert any(d.abs().max() > 1e-4 for d in whole.values())
    for name in whole:
        torch.testing.assert_close(sliced[name], whole[name], rtol=1e-4, atol=1e-7, msg=name)


def test_update_padding_fraction_by_hand(model_dir):
    """make_batch's rows are 15, 14, 13, 10, 10, 8, 7, 5 tokens (82), longest first."""
    lengths = make_batch(64).attention_mask.sum(dim=1).sort(descending=True).values.tolist()
    assert lengths == [15, 14, 13, 10, 10, 8, 7, 5]
    fraction = lambda *extra: one_update(model_dir, "token-mean", *extra)["stats"]["update_padding_fraction"]  # noqa: E731
    assert fraction(ROWS) == pytest.approx(1 - 82 / 120)  # one pass of 8 x 15 slots
    assert fraction(3) == pytest.approx(1 - 82 / (45 + 30 + 14))  # 3 x 15, 3 x 10, 2 x 7
    # 40 slots, padded: [15, 14] 30 | [13, 10, 10] 39 | [8, 7, 5] 24
    assert fraction(ROWS, "trainer.micro_batch_tokens=40") == pytest.approx(1 - 82 / 93)
    assert fraction(ROWS, "trainer.micro_batch_tokens=40", "trainer.pack_sequences=true") == 0.0


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
    for micro, tokens in ((3, 0), (ROWS, 0), (ROWS, 30), (ROWS, 1)):
        tally = Slots()
        got = batched_logprobs(policy, batch, micro, 1.0, reference=False, tokens=tokens, slots=tally)
        torch.testing.assert_close(got[mask], one_by_one, rtol=0, atol=2e-6)
        assert tally.real == int(batch.attention_mask.sum())


def test_rows_needing_old_logprobs_by_hand():
    from grpo_core.train import rows_needing_old_logprobs

    def trainer(mini: int, epochs: int = 1):
        return config.load(None, ["model.path=x", "trainer.prompts_per_step=4", f"trainer.mini_batch_prompts={mini}",
                                  f"trainer.ppo_epochs={epochs}"]).trainer

    assert rows_needing_old_logprobs(8, trainer(2)) == [4, 5, 6, 7]  # 2 rows a prompt: the second mini-batch
    assert rows_needing_old_logprobs(8, trainer(1)) == [2, 3, 4, 5, 6, 7]
    assert rows_needing_old_logprobs(8, trainer(4)) == []  # one mini-batch: no pass
    assert rows_needing_old_logprobs(8, trainer(4, epochs=2)) == list(range(8))  # epoch 2 sees moved weights


def test_first_mini_batch_on_policy_equals_its_old_logprob_pass(model_dir):
    """Two mini-batches: old log-probs for the second only, the first taking the detached current
    ones, give the update that old log-probs for every row give (SGD, fp32)."""
    from grpo_core import distributed
    from grpo_core.policy import Policy
    from grpo_core.train import rows_needing_old_logprobs

    info = distributed.init_distributed("cpu")
    cfg = config.load(None, [f"model.path={model_dir}", "model.lora_rank=4", "model.lora_alpha=8", "trainer.device=cpu",
                             f"trainer.prompts_per_step={ROWS}", f"trainer.mini_batch_prompts={ROWS // 2}", "rollout.n=1",
                             "trainer.micro_batch_size=3", "rollout.max_tokens=16", "algorithm.kl_coef=0",
                             "optim.lr=0.01", "optim.weight_decay=0", "algorithm.clip_low=0.001", "algorithm.clip_high=0.001"])
    moved = {}
    for skip in (False, True):
        torch.manual_seed(0)
        policy = Policy(str(model_dir), cfg.model, cfg.trainer, info, needs_reference=False)
        # a step first, so that LoRA B is non-zero and the log-probs depend on every adapter weight
        optimizer = torch.optim.SGD(policy.trainable_parameters(), lr=1.0)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
        batch = make_batch(policy.model.base_model.model.config.vocab_size)
        train_step(policy, optimizer, scheduler, batch, cfg)
        before = {k: v.clone() for k, v in policy.trainable_state_dict().items()}
        only = rows_needing_old_logprobs(len(batch), cfg.trainer) if skip else None
        tally = Slots()
        batch.old_logprobs = batched_logprobs(policy, batch, 3, 1.0, reference=False, only=only, slots=tally)
        if skip:
            assert only == list(range(ROWS // 2, ROWS)) and not batch.old_logprobs[: ROWS // 2].any()
        stats = train_step(policy, optimizer, scheduler, batch, cfg, first_mini_on_policy=skip)
        moved[skip] = {k: v - before[k] for k, v in policy.trainable_state_dict().items()}
        moved[skip]["slots"] = torch.tensor(float(tally.real))
        assert stats["clip_fraction"] > 0  # the second mini-batch's ratio moved past the tight clip
    full, half = moved[False].pop("slots"), moved[True].pop("slots")
    assert half < full  # the pass covered only the second mini-batch's rows
    assert max(float(v.abs().max()) for v in moved[False].values()) > 1e-4
    for key in moved[False]:
        torch.testing.assert_close(moved[True][key], moved[False][key], rtol=0, atol=1e-6)
