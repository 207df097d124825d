"""Prompt groups (trainer.share_prompts): a prompt's n responses run as one
sequence behind a single copy of the prompt, a mask keeping each response to
its prompt and itself. Log-probs, entropy, every loss aggregation, the
gradients and a whole train_step must equal the padded path's.

Tolerances as in test_packing.py (the same fp32 sums in other kernels: a
[G, L] sequence with a 4D mask against [B, T] rows with a padding mask):
log-probs within 1e-5, gradients rtol 1e-4. A response attending to its
sibling moves log-probs by ~0.1 (test_a_response_sees_its_prompt_and_itself).
"""
from __future__ import annotations

import pytest
import torch

from grpo_core import config
from grpo_core.algorithm import LOSS_AGG_MODES
from grpo_core.batch import group_prompts, pack, unit_lengths
from grpo_core.config import ConfigError
from grpo_core.train import batched_logprobs, train_step

from .test_packing import LOGPROB_ATOL, grads_after, make_policy, model_dir, vocab_of  # noqa: F401 - model_dir is a fixture

GROUP, PROMPTS = 3, 4


def make_batch(vocab: int, prompts: int = PROMPTS, group: int = GROUP, seed: int = 5):
    gen = torch.Generator().manual_seed(seed)
    rand = lambda lo, hi: torch.randint(3, vocab, (int(torch.randint(lo, hi, (1,), generator=gen)),), generator=gen).tolist()  # noqa: E731
    heads = [rand(2, 8) for _ in range(prompts)]
    batch = pack([h for h in heads for _ in range(group)], [rand(1, 12) for _ in range(prompts * group)],
                 torch.randn(prompts * group, generator=gen), 0)
    batch.old_logprobs = torch.full_like(batch.response_mask, -3.0)  # ratio != 1: the loss depends on the weights
    batch.ref_logprobs = torch.full_like(batch.response_mask, -3.5)
    return batch


def test_group_layout_by_hand():
    # two rows of prompt [5, 6] with responses [7, 8, 9] and [4]; pad 0
    batch = pack([[5, 6], [5, 6]], [[7, 8, 9], [4]], torch.zeros(2), 0)
    g = group_prompts(batch.input_ids, batch.attention_mask, batch.response_mask, 2)
    assert g.input_ids.tolist() == [[5, 6, 7, 8, 9, 4]]
    assert g.position_ids.tolist() == [[0, 1, 2, 3, 4, 2]]
    # the first token of each response is scored from the prompt's last position (1)
    assert g.sources.tolist() == [1, 2, 3, 1]
    assert g.targets.tolist() == [7, 8, 9, 4]
    assert g.scored.tolist() == [[False, True, True, True], [False, True, False, False]]
    sees = g.attention_mask[0, 0].int().tolist()
    assert sees == [[1, 0, 0, 0, 0, 0],
                    [1, 1, 0, 0, 0, 0],
                    [1, 1, 1, 0, 0, 0],
                    [1, 1, 1, 1, 0, 0],
                    [1, 1, 1, 1, 1, 0],
                    [1, 1, 0, 0, 0, 1]]  # the second response sees the prompt and itself, not the first
    assert unit_lengths(batch, 2) == [6] and unit_lengths(batch, 1) == [5, 3]


def test_rows_of_a_group_must_share_their_prompt():
    batch = pack([[5, 6], [5, 7]], [[7], [4]], torch.zeros(2), 0)
    with pytest.raises(ValueError, match="do not share one prompt"):
        group_prompts(batch.input_ids, batch.attention_mask, batch.response_mask, 2)
    with pytest.raises(ValueError, match="groups of 3"):
        group_prompts(batch.input_ids, batch.attention_mask, batch.response_mask, 3)


def test_a_padding_slot_attends_to_itself_and_nothing_else():
    """Groups of unequal length: the shorter one's padding queries see only themselves (no NaN)."""
    batch = pack([[5, 6], [5, 6], [3], [3]], [[7, 8, 9], [4], [2], [2]], torch.zeros(4), 0)
    g = group_prompts(batch.input_ids, batch.attention_mask, batch.response_mask, 2)
    assert g.input_ids.shape == (2, 6)
    sees = g.attention_mask[1, 0]
    assert sees[3:].int().tolist() == [[0, 0, 0, 1, 0, 0], [0, 0, 0, 0, 1, 0], [0, 0, 0, 0, 0, 1]]


LAYOUTS = {"lora": ("model.lora_rank=4", "model.lora_alpha=8"), "full": ("model.lora_rank=0",),
           "lora-ckpt": ("model.lora_rank=4", "model.gradient_checkpointing=true")}


def shared(cfg, on: bool = True):
    return config.validate(config.build(config.TrainConfig, config.apply_overrides(
        config.TrainConfig, config.to_dict(cfg), [f"trainer.share_prompts={str(on).lower()}", f"rollout.n={GROUP}"])))


@pytest.mark.parametrize("layout", LAYOUTS)
def test_grouped_logprobs_and_entropy_equal_padded(model_dir, layout):  # noqa: F811
    policy, _ = make_policy(model_dir, *LAYOUTS[layout])
    batch = make_batch(vocab_of(policy))
    mask = batch.response_mask.bool()
    g = group_prompts(batch.input_ids, batch.attention_mask, batch.response_mask, GROUP)
    for reference in (False, True):
        with torch.no_grad():
            padded = policy.forward_logprobs(batch.input_ids, batch.attention_mask, 0.7, reference=reference,
                                             with_entropy=True)
            grouped = policy.forward_logprobs(batch.input_ids, batch.attention_mask, 0.7, reference=reference,
                                              with_entropy=True, layout=g)
        assert grouped[0].shape == padded[0].shape == batch.response_mask.shape
        assert padded[0][mask].lt(-0.5).all()  # real values, not zeros
        for got, want in zip(grouped, padded):
            torch.testing.assert_close(got[mask], want[mask], rtol=0, atol=LOGPROB_ATOL)
        assert (grouped[0][~mask] == 0).all()  # only response tokens are scored


def test_a_response_sees_its_prompt_and_itself(model_dir):  # noqa: F811
    """Changing row 0's response changes nothing in its siblings; changing the prompt changes them all."""
    policy, _ = make_policy(model_dir, "model.lora_rank=0")
    batch = make_batch(vocab_of(policy), prompts=1)
    mask = batch.response_mask.bool()
    p = int(batch.attention_mask[0].sum() - batch.response_mask[0].sum())

    def logprobs(ids):
        g = group_prompts(ids, batch.attention_mask, batch.response_mask, GROUP)
        with torch.no_grad():
            return policy.forward_logprobs(ids, batch.attention_mask, 1.0, layout=g)[0]

    base = logprobs(batch.input_ids)
    response_changed, prompt_changed = batch.input_ids.clone(), batch.input_ids.clone()
    n0 = int(batch.attention_mask[0].sum())
    response_changed[0, p:n0] = (response_changed[0, p:n0] + 1) % vocab_of(policy)
    prompt_changed[:, 0] = (prompt_changed[:, 0] + 1) % vocab_of(policy)
    moved = logprobs(response_changed)
    torch.testing.assert_close(moved[1:], base[1:], rtol=0, atol=0)
    assert (moved[0][mask[0]] - base[0][mask[0]]).abs().max() > 0.01
    changed = logprobs(prompt_changed)
    assert all((changed[r][mask[r]] - base[r][mask[r]]).abs().max() > 0.01 for r in range(GROUP))


@pytest.mark.parametrize("layout", LAYOUTS)
def test_loss_and_gradients_equal_padded_for_every_loss_agg(model_dir, layout):  # noqa: F811
    for loss_agg in LOSS_AGG_MODES:
        policy, cfg = make_policy(model_dir, *LAYOUTS[layout], f"algorithm.loss_agg={loss_agg}",
                                  "algorithm.entropy_coef=0.01")
        batch = make_batch(vocab_of(policy))
        s_pad, g_pad = grads_after(policy, batch, shared(cfg, False))
        s_grp, g_grp = grads_after(policy, batch, shared(cfg))
        assert s_pad.keys() == s_grp.keys() >= {"policy_loss", "kl", "entropy"}
        for key in s_pad:
            assert s_grp[key] == pytest.approx(s_pad[key], rel=1e-5, abs=1e-6), (loss_agg, key)
        assert any(g.abs().max() > 1e-4 for g in g_pad.values())
        for name, g in g_pad.items():
            torch.testing.assert_close(g_grp[name], g, rtol=1e-4, atol=1e-6, msg=lambda m, n=name: f"{loss_agg} {n}: {m}")


def one_step(model_dir, *extra: str):  # noqa: F811
    """Reference log-probs, then one train_step (SGD, lr 1: the update is the gradient); the delta and stats."""
    from grpo_core import distributed
    from grpo_core.policy import Policy

    info = distributed.init_distributed("cpu")
    cfg = config.load(None, [f"model.path={model_dir}", "model.lora_rank=4", "model.lora_alpha=8", "trainer.device=cpu",
                             f"trainer.prompts_per_step={PROMPTS}", f"trainer.mini_batch_prompts={PROMPTS // 2}",
                             f"rollout.n={GROUP}", "rollout.max_tokens=16", "algorithm.kl_coef=0.1",
                             "algorithm.entropy_coef=0.01", "optim.weight_decay=0", *extra])
    torch.manual_seed(0)
    policy = Policy(str(model_dir), cfg.model, cfg.trainer, info, needs_reference=False)
    optimizer = torch.optim.SGD(policy.trainable_parameters(), lr=1.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    batch = make_batch(policy.model.base_model.model.config.vocab_size)
    t = cfg.trainer
    batch.ref_logprobs = batched_logprobs(policy, batch, t.logprob_micro, 1.0, reference=True,
                                          group=GROUP if t.share_prompts else 1, tokens=t.logprob_micro_batch_tokens)
    before = {k: v.clone() for k, v in policy.trainable_state_dict().items()}
    stats = train_step(policy, optimizer, scheduler, batch, cfg)
    return {k: v - before[k] for k, v in policy.trainable_state_dict().items()}, stats


CUTS = {"rows of 6 (2 groups)": ("trainer.micro_batch_size=6",),
        "rows of 1 (a group each)": ("trainer.micro_batch_size=1",),
        "40 tokens": ("trainer.micro_batch_tokens=40", "trainer.logprob_micro_batch_tokens=40")}


@pytest.mark.parametrize("cut", CUTS)
def test_a_grouped_train_step_equals_the_padded_one(model_dir, cut):  # noqa: F811
    """Two mini-batches of two prompt groups, the reference pass and the update in groups == padded rows."""
    padded, s_pad = one_step(model_dir, "trainer.micro_batch_size=12")
    grouped, s_grp = one_step(model_dir, "trainer.share_prompts=true", *CUTS[cut])
    assert any(d.abs().max() > 1e-4 for d in padded.values())
    for name in padded:
        torch.testing.assert_close(grouped[name], padded[name], rtol=1e-4, atol=1e-7, msg=name)
    for key in ("policy_loss", "kl", "entropy", "grad_norm"):
        assert s_grp[key] == pytest.approx(s_pad[key], rel=1e-4, abs=1e-6), key
    assert s_grp["update_padding_fraction"] < s_pad["update_padding_fraction"]


def test_grouped_update_padding_fraction_by_hand(model_dir):  # noqa: F811
    batch = make_batch(64)
    lengths = batch.attention_mask.sum(dim=1).tolist()
    units = unit_lengths(batch, GROUP)
    prompt = lambda r: int(batch.attention_mask[r].sum() - batch.response_mask[r].sum())  # noqa: E731
    assert units == [prompt(g * GROUP) + sum(lengths[r] - prompt(r) for r in range(g * GROUP, (g + 1) * GROUP))
                     for g in range(PROMPTS)]
    # one group a pass: no padding at all; one pass per mini-batch: 2 groups x the longer
    assert one_step(model_dir, "trainer.share_prompts=true", "trainer.micro_batch_size=1")[1]["update_padding_fraction"] == 0
    minis = [units[:2], units[2:]]
    want = 1 - sum(units) / sum(2 * max(m) for m in minis)
    got = one_step(model_dir, "trainer.share_prompts=true", "trainer.micro_batch_size=6")[1]["update_padding_fraction"]
    assert got == pytest.approx(want)


@pytest.mark.parametrize("bad,message", [
    ("trainer.pack_sequences=true", "two layouts of the same rows"),
    ("model.attn_implementation=eager", "needs model.attn_implementation=sdpa"),
])
def test_share_prompts_conflicts_are_refused(bad, message):
    with pytest.raises(ConfigError, match=message):
        config.load(None, ["model.path=x", "trainer.share_prompts=true", bad])


def test_ranks_must_hold_whole_prompt_groups():
    cfg = config.load(None, ["model.path=x", "trainer.share_prompts=true", "trainer.prompts_per_step=6",
                             "trainer.mini_batch_prompts=3"])
    config.check_layout(cfg, 3)
    with pytest.raises(ConfigError, match="divisible by the 2 ranks"):
        config.check_layout(cfg, 2)


def test_rows_that_are_not_whole_groups_are_named():
    batch = make_batch(64)
    with pytest.raises(ValueError, match="11 rows do not split into prompt groups of 3"):
        unit_lengths(batch.select(range(11)), GROUP)
