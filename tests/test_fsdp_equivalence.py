"""World size 1 == world size 2: FSDP2-sharded updates (gloo, CPU) on the
same rollouts give the same losses and the same final weights; also with
token-budget micro-batches, where the ranks' own bin counts differ and the
ranks even them out (else FSDP's collectives would not pair up), and with
shared prompts (each rank's passes cut in whole prompt groups)."""
from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from grpo_core import config
from grpo_core.batch import pack
from grpo_core.microbatch import Cut

TOKENS = 24  # the token-budget mode's budget (packed): 3-4 passes per rank and mini-batch
MODES = ("full", "lora", "lora-tokens", "lora-shared")

STEPS = 3
PROMPTS, N = 8, 4


def make_batch(vocab: int, pad_id: int, step: int, shared: bool = False):
    """Deterministic fake rollouts: PROMPTS groups of N responses (shared: of one prompt each)."""
    gen = torch.Generator().manual_seed(100 + step)
    prompts, responses = [], []
    for i in range(PROMPTS * N):
        prompt = torch.randint(3, vocab, (int(torch.randint(4, 9, (1,), generator=gen)),), generator=gen).tolist()
        prompts.append(prompts[-1] if shared and i % N else prompt)
        responses.append(torch.randint(3, vocab, (int(torch.randint(1, 6, (1,), generator=gen)),), generator=gen).tolist())
    advantages = torch.randn(PROMPTS * N, generator=gen)
    return prompts, responses, advantages


def worker(rank: int, world: int, port: int, model_dir: str, out: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    from grpo_core import distributed

    info = distributed.init_distributed("cpu")
    results = {mode: train_mode(rank, world, info, model_dir, mode) for mode in MODES}
    if rank == 0:
        torch.save(results, out)
    distributed.barrier()
    distributed.shutdown()


def rank_rows(rank: int, world: int) -> list[int]:
    """Each rank takes whole groups, as grpo_step shards prompts."""
    return [i for g in range(rank, PROMPTS, world) for i in range(g * N, (g + 1) * N)]


def train_mode(rank: int, world: int, info, model_dir: str, mode: str) -> dict:
    from grpo_core import distributed
    from grpo_core.policy import Policy
    from grpo_core.train import batched_logprobs, train_step

    lora = mode.startswith("lora")
    overrides = [f"model.path={model_dir}", "trainer.prompts_per_step=8", "trainer.mini_batch_prompts=4",
                 "trainer.micro_batch_size=4", "algorithm.kl_coef=0.0", "optim.lr=0.01"]
    if lora:
        overrides += ["model.lora_rank=4", "model.lora_alpha=8"]
    if mode == "lora-tokens":
        overrides += [f"trainer.micro_batch_tokens={TOKENS}", "trainer.pack_sequences=true"]
    if mode == "lora-shared":  # ~20-token groups: 1-3 per pass
        overrides += ["trainer.share_prompts=true", f"rollout.n={N}", "trainer.micro_batch_tokens=40"]
    cfg = config.load(None, overrides)
    torch.manual_seed(0)
    policy = Policy(model_dir, cfg.model, cfg.trainer, info)
    optimizer = torch.optim.AdamW(policy.trainable_parameters(), lr=cfg.optim.lr, weight_decay=0.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    vocab = policy.model.config.vocab_size if not lora else policy.model.base_model.model.config.vocab_size
    losses, logprobs = [], {}
    for step in range(STEPS):
        prompts, responses, adv = make_batch(vocab, 0, step, shared=mode == "lora-shared")
        mine = rank_rows(rank, world)
        batch = pack([prompts[i] for i in mine], [responses[i] for i in mine], adv[mine], 0)
        if mode == "lora-tokens" and step == 0:  # the no-grad passes even out too (same weights on 1 and 2 ranks)
            lp = batched_logprobs(policy, batch, 4, 1.0, reference=False, packed=True, tokens=TOKENS)
            logprobs = {row: lp[i][batch.response_mask[i].bool()] for i, row in enumerate(mine)}
        # A fixed behaviour policy makes the loss depend on the weights (ratio != 1).
        batch.old_logprobs = torch.full_like(batch.response_mask, -4.0)
        stats = distributed.all_mean(train_step(policy, optimizer, scheduler, batch, cfg))
        losses.append(stats["policy_loss"])
    return {"losses": losses, "state": policy.trainable_state_dict(), "logprobs": logprobs}


def run_world(world: int, model_dir: Path, out: Path) -> dict:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.start_processes(worker, args=(world, port, str(model_dir), str(out)), nprocs=world, join=True, start_method="spawn")
    return torch.load(out, weights_only=True)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    from grpo_core.tiny import build_tiny_model

    path = tmp_path_factory.mktemp("m") / "tiny"
    return build_tiny_model(path, [f"user\n{a} + {b}\nassistant\n#### {a + b}" for a in range(10) for b in range(10)])


@pytest.fixture(scope="module")
def runs(tmp_path_factory, model_dir) -> tuple[dict, dict]:
    tmp = tmp_path_factory.mktemp("fsdp")
    return run_world(1, model_dir, tmp / "w1.pt"), run_world(2, model_dir, tmp / "w2.pt")


def test_the_ranks_bin_counts_differ_in_the_token_mode():
    """Else the token mode would not test the evening out."""
    differ = 0
    for step in range(STEPS):
        prompts, responses, _ = make_batch(64, 0, step)
        lengths = [len(p) + len(r) for p, r in zip(prompts, responses)]
        for mini in range(2):  # each rank's mini-batch: its first or second half of rows
            counts = []
            for rank in range(2):
                rows = rank_rows(rank, 2)[mini * 8 : (mini + 1) * 8]
                order = sorted(rows, key=lambda r: -lengths[r])
                counts.append(len(Cut(4, TOKENS, packed=True).bins(order, lengths)))
            differ += counts[0] != counts[1]
    assert differ > 0


@pytest.mark.parametrize("mode", MODES)
def test_world_two_matches_world_one(runs, mode):
    one, two = runs[0][mode], runs[1][mode]
    print(mode, "losses w1", one["losses"], "w2", two["losses"])
    assert len(set(one["losses"])) == STEPS, "losses should change as the weights do"
    # Different reduction order across 2 ranks: equal to fp32 rounding, not bitwise.
    torch.testing.assert_close(torch.tensor(two["losses"]), torch.tensor(one["losses"]), rtol=1e-5, atol=1e-6)
    assert len(two["logprobs"]) == (len(rank_rows(0, 2)) if mode == "lora-tokens" else 0)
    for row, got in two["logprobs"].items():  # rank 0's rows
        torch.testing.assert_close(got, one["logprobs"][row], rtol=0, atol=1e-5)
    assert one["state"].keys() == two["state"].keys() and len(one["state"]) > 0
    worst = {name: float((two["state"][name] - w).abs().max()) for name, w in one["state"].items()}
    print(mode, "largest differences", sorted(worst.items(), key=lambda kv: -kv[1])[:4])
    for name, w in one["state"].items():
        if "k_proj.bias" in name:
            # Its true gradient is exactly zero (softmax ignores a per-query
            # constant), so Adam turns rounding noise into lr-sized steps.
            continue
        # Micro-batches are cut from length-sorted rows, which group differently
        # on 1 and 2 ranks: sums round differently and Adam's normalisation
        # lifts that to ~1e-5 here, against steps of lr = 1e-2.
        torch.testing.assert_close(two["state"][name], w, rtol=1e-4, atol=3e-5, msg=lambda m, n=name: f"{n}: {m}")
