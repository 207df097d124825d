"""The GRPO loop, top to bottom.

    rollout (vLLM) -> reward -> group advantages -> reference log-probs
    -> policy update (mini-batches of micro-batches) -> weight sync -> log
    -> validate every k steps -> checkpoint every k steps or on preemption

    python -m grpo_core.train --config FILE [dotted.key=value ...]
"""
from __future__ import annotations

import argparse
import contextlib
import os
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import yaml

from . import algorithm, checkpoint, config, distributed, rundir
from .cli import ArgumentParser
from .exitcodes import EXIT_BAD_INPUT, EXIT_CONFLICT, EXIT_ENVIRONMENT, EXIT_OK, EXIT_PREEMPTED
from .batch import RolloutBatch, lay_out, pack, unit_lengths
from .config import ConfigError, TrainConfig, TrainerConfig
from .data import DataError
from .keyref import format_keys
from .microbatch import Cut, Slots, even_out, longest_first, unit_rows
from .model_path import ModelPathError
from .plots import write_curves
from .preemption import WALLTIME, Preemption
from .progress import Progress
from .stages import STAGES, StageClock, StageListener
from .trainer import Trainer, build_trainer, resume_or_start, save
from .engine import Engine
from .tasks import Prompts, Task
from .tracking import Tracker
from .walltime import WalltimeGuard, job_end_time

TIMING_KEYS = tuple(f"time_{s}" for s in STAGES) + ("time_step", "tokens_per_s", "time_validation")


@dataclass
class TrainResult:
    status: str  # "finished" | "preempted"
    step: int
    run_dir: Path
    mlflow_run_id: str | None


def rollout_seeds(seed: int, step: int, prompt_ids: list[int]) -> list[int]:
    """Per-prompt sampling seeds: a replayed step samples the same tokens."""
    return [(seed * 1_000_003 + step * 10_007 + i) % (2**31 - 1) for i in prompt_ids]


def forward_backward(policy, mb: RolloutBatch, cfg: TrainConfig, loss_scale: float) -> dict[str, float]:
    """One micro-batch: loss, backward, stats. `loss_scale` turns the
    micro-batch's own aggregate into its share of the mini-batch's."""
    a = cfg.algorithm
    logprobs, entropy = policy.forward_logprobs(
        mb.input_ids, mb.attention_mask, cfg.rollout.temperature, with_entropy=True, entropy_grad=a.entropy_coef != 0,
        layout=lay_out(mb, cfg.trainer.pack_sequences, prompt_group(cfg)),
    )
    old = mb.old_logprobs if mb.old_logprobs is not None else logprobs.detach()
    # Dr.GRPO's divisor is a constant (the longest response allowed), not the
    # micro-batch's padded width, which depends on how rows were grouped.
    norm = cfg.rollout.max_tokens
    loss, stats = algorithm.policy_loss(
        logprobs, old, mb.advantages, mb.response_mask,
        clip_low=a.clip_low, clip_high=a.clip_high, loss_agg=a.loss_agg, norm_length=norm,
    )
    out = {"policy_loss": float(loss.detach()), "clip_fraction": float(stats["clip_fraction"])}
    if mb.ref_logprobs is not None:
        kl_tokens = algorithm.kl_penalty(logprobs, mb.ref_logprobs, a.kl_estimator)
        kl = algorithm.aggregate_loss(kl_tokens, mb.response_mask, a.loss_agg, norm_length=norm)
        loss = loss + a.kl_coef * kl
        out["kl"] = float(kl.detach())
    ent = algorithm.aggregate_loss(entropy, mb.response_mask, a.loss_agg, norm_length=norm)
    out["entropy"] = float(ent.detach())
    if a.entropy_coef:
        loss = loss - a.entropy_coef * ent
    (loss * loss_scale).backward()
    return out


def prompt_group(cfg: TrainConfig) -> int:
    """Rows per unit of a pass: a prompt's rollout.n rows with trainer.share_prompts, else one."""
    return cfg.rollout.n if cfg.trainer.share_prompts else 1


def pass_cut(rows: int, tokens: int, packed: bool, group: int) -> Cut:
    """A pass's cut in units: `rows` rows make rows // group units (at least one)."""
    return Cut(max(1, rows // group), tokens, packed)


def micro_batches(cut: Cut, order: list[int], lengths: list[int]) -> list[list[int]]:
    """This rank's passes over `order` (units), as many as the rank with the most
    (FSDP's collectives pair up pass by pass); an empty one is a filler."""
    bins = cut.bins(order, lengths)
    return even_out(bins, distributed.all_max(len(bins)), lengths, cut.packed)


def rows_per_mini(rows: int, t: TrainerConfig) -> int:
    """This rank's rows in one mini-batch (mini_batch_prompts of prompts_per_step)."""
    return rows * t.mini_batch_prompts // t.prompts_per_step


def rows_needing_old_logprobs(rows: int, t: TrainerConfig) -> list[int]:
    """The rows whose mini-batch runs after an optimizer step. The first mini-batch of a one-epoch
    update sees the weights that sampled it: its old log-probs are the detached current ones
    (exact), so it needs no pass of its own (train_step's first_mini_on_policy)."""
    return list(range(rows_per_mini(rows, t) if t.ppo_epochs == 1 else 0, rows))


@torch.no_grad()
def batched_logprobs(policy, batch: RolloutBatch, micro: int, temperature: float, *, reference: bool,
                     packed: bool = False, group: int = 1, tokens: int = 0, slots: Slots | None = None,
                     only: list[int] | None = None) -> torch.Tensor:
    """Log-probs of every row (or of the rows `only`, whole groups; the others stay 0), `micro` rows
    (or `tokens` token slots) per pass, in units of `group` rows; `slots` tallies the passes."""
    out = torch.zeros_like(batch.response_mask)
    lengths = unit_lengths(batch, group)
    order = longest_first(range(len(lengths)) if only is None else sorted({r // group for r in only}), lengths)
    for units in micro_batches(pass_cut(micro, tokens, packed, group), order, lengths):
        run = units or order[-1:]  # a filler runs the shortest unit and keeps nothing
        rows = unit_rows(run, group)
        mb = batch.select(rows).to(policy.info.device)
        lp, _ = policy.forward_logprobs(mb.input_ids, mb.attention_mask, temperature, reference=reference,
                                        layout=lay_out(mb, packed, group))
        if slots is not None:
            slots.add(run, lengths, packed, counts=bool(units))
        if units:
            out[rows, : lp.shape[1]] = lp.float().cpu()
    policy.end_no_grad_passes()
    return out


def train_step(policy, optimizer, scheduler, batch: RolloutBatch, cfg: TrainConfig,
               first_mini_on_policy: bool = False) -> dict[str, float]:
    """Mini-batches of micro-batches with gradient accumulation. With first_mini_on_policy the first
    mini-batch ignores batch.old_logprobs (rows_needing_old_logprobs left its rows out).

    Each rank holds its share of the rows. The loss is normalised by the
    global denominator (all ranks' tokens or sequences) and multiplied by
    the world size, which FSDP's gradient averaging divides out again: the
    update is the same for 1 and N ranks."""
    t = cfg.trainer
    world = policy.info.world_size
    per_mini, group = rows_per_mini(len(batch), t), prompt_group(cfg)  # whole groups: config.check_layout
    cut = pass_cut(t.micro_batch_size, t.micro_batch_tokens, t.pack_sequences, group)
    lengths = unit_lengths(batch, group)
    tally = Slots()
    stats: dict[str, list[float]] = {}
    for _epoch in range(t.ppo_epochs):
        for mini_start in range(0, len(batch), per_mini):
            mini_units = longest_first(range(mini_start // group, (mini_start + per_mini) // group), lengths)
            denominator = distributed.all_sum(algorithm.aggregate_weight(
                batch.response_mask[unit_rows(mini_units, group)], cfg.algorithm.loss_agg))
            optimizer.zero_grad(set_to_none=True)
            for units in micro_batches(cut, mini_units, lengths):
                ran = units or mini_units[-1:]  # a filler (another rank has more passes): the shortest unit, weight 0
                rows, run = unit_rows(units, group), unit_rows(ran, group)
                weight = algorithm.aggregate_weight(batch.response_mask[rows], cfg.algorithm.loss_agg) if rows else 0.0
                tally.add(ran, lengths, cut.packed, counts=bool(units))
                scale = world * weight / max(denominator, 1.0)
                mb = batch.select(run).to(policy.info.device)
                if first_mini_on_policy and _epoch == 0 and mini_start == 0:
                    mb.old_logprobs = None
                for key, value in forward_backward(policy, mb, cfg, scale).items():
                    # x world, so that all_mean over ranks yields the global aggregate
                    stats.setdefault(key, []).append(value * scale)
            stats.setdefault("grad_norm", []).append(policy.clip_grad_norm(cfg.optim.grad_clip))
            stats.setdefault("lr", []).append(scheduler.get_last_lr()[0])
            optimizer.step()
            scheduler.step()
            # Freed now, not at the next step's first mini-batch: the rollout, log-prob and
            # sync stages (and a checkpoint) then hold no gradients (grpo_core.memory's stages).
            optimizer.zero_grad(set_to_none=True)
    minis = t.ppo_epochs * (len(batch) // per_mini)
    out = {k: (sum(v) / minis if k not in ("grad_norm", "lr") else sum(v) / len(v)) for k, v in stats.items()}
    return out | {"update_padding_fraction": tally.padding_fraction}


def validate(engine: Engine, task: Task, prompts: Prompts, cfg: TrainConfig) -> float:
    """Greedy accuracy on the test split: the task's own score == 1."""
    chosen = prompts.test[: cfg.trainer.val_prompts or None]
    samples = engine.greedy(chosen, cfg.rollout.val_max_tokens)
    return float(np.mean([task.score(s.text, truth) == 1.0 for s, truth in zip(samples, prompts.test_truths)]))


def grpo_step(tr: Trainer, on_stage: StageListener | None = None) -> dict[str, float]:
    """One GRPO step on this rank's share of the step's prompts.

    The stages' seconds (grpo_core.stages) are the metrics' time_<stage>;
    on_stage(name), if given, hears the same boundaries ("rollout", then
    "reference", "update", "sync", "end"): a benchmark's memory meter."""
    cfg, task, n, world = tr.cfg, tr.task, tr.cfg.rollout.n, tr.info.world_size
    step_start = time.perf_counter()
    stage = StageClock(tr.info.device, on_stage)
    # ---- rollout (its stage runs to the reference pass: rewards and packing are in it)
    stage("rollout")
    batch_ids = tr.sampler.next_batch()[tr.info.rank :: world]
    prompts = [tr.prompts.train[i] for i in batch_ids]
    tr.engine.wake_up()
    samples = tr.engine.generate(
        prompts, n=n, temperature=cfg.rollout.temperature, top_p=cfg.rollout.top_p,
        max_tokens=cfg.rollout.max_tokens, seeds=rollout_seeds(cfg.trainer.seed, tr.state.step, batch_ids),
    )
    tr.engine.sleep()
    # ---- reward and group advantages
    flat = [(p, s, tr.prompts.train_truths[i]) for p, i, group in zip(prompts, batch_ids, samples) for s in group]
    a = cfg.algorithm
    rewards = torch.tensor([float(tr.reward(s.text, truth)) for _, s, truth in flat])
    # Accuracy is the task's own verdict, also under a user's reward.
    scores = rewards if tr.reward == task.score else torch.tensor([task.score(s.text, truth) for _, s, truth in flat])
    correct = (scores == 1.0).float()
    adv = algorithm.group_advantages(rewards, n, eps=a.adv_eps, norm_by_std=a.norm_adv_by_std)
    batch = pack([p for p, _, _ in flat], [list(s.token_ids) for _, s, _ in flat], adv, tr.tokenizer.pad_token_id)
    # ---- old log-probs only for rows the update reaches after the policy has moved
    # (before that the detached current ones are exact), reference for KL
    stage("reference")
    t, lp_slots = cfg.trainer, Slots()
    cut = dict(packed=t.pack_sequences, group=prompt_group(cfg), tokens=t.logprob_micro_batch_tokens, slots=lp_slots)
    moved_rows = rows_needing_old_logprobs(len(batch), t)
    if moved_rows:
        batch.old_logprobs = batched_logprobs(tr.policy, batch, t.logprob_micro, cfg.rollout.temperature,
                                              reference=False, only=moved_rows, **cut)
    if a.kl_coef > 0:
        batch.ref_logprobs = batched_logprobs(tr.policy, batch, t.logprob_micro, cfg.rollout.temperature,
                                              reference=True, **cut)
    # ---- policy update, then the new weights into the engine
    stage("update")
    update_stats = train_step(tr.policy, tr.optimizer, tr.scheduler, batch, cfg,
                              first_mini_on_policy=0 not in moved_rows)
    stage("sync")
    tr.sync.push(tr.engine)
    stage("end")
    lengths = torch.tensor([len(s.token_ids) for _, s, _ in flat], dtype=torch.float32)
    metrics = distributed.all_mean({
        "reward_mean": float(rewards.mean()), "reward_std": float(rewards.std()) if len(rewards) > 1 else 0.0,
        "accuracy": float(correct.mean()), "response_length_mean": float(lengths.mean()),
        "response_length_max": float(lengths.max()),
        "response_clip_ratio": float(np.mean([s.truncated for _, s, _ in flat])), **update_stats,
        **({"logprob_padding_fraction": lp_slots.padding_fraction} if lp_slots.total else {}),
    })
    time_step = time.perf_counter() - step_start
    metrics.update(stage.metrics(), time_step=time_step,
                   tokens_per_s=float(batch.attention_mask.sum()) * world / time_step)
    return metrics


def train(cfg: TrainConfig, preemption: Preemption | None = None) -> TrainResult:
    tr = build_trainer(cfg)
    try:
        return run(tr, preemption)
    except BaseException:
        with contextlib.suppress(Exception):  # the error that got us here is the one to report
            tr.close()
        raise


def run(tr: Trainer, preemption: Preemption | None = None) -> TrainResult:
    """Resume or start, then the loop; closes the engine when the loop ends."""
    cfg, run_dir, info = tr.cfg, tr.run_dir, tr.info
    run_dir.mkdir(parents=True, exist_ok=True)
    if info.is_main:
        (run_dir / "train.yaml").write_text(yaml.safe_dump(config.to_dict(cfg), sort_keys=False))
    latest = resume_or_start(tr)
    restarts = int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0)
    tracker = Tracker(
        cfg.tracking, run_dir, active=info.is_main, run_id=tr.state.mlflow_run_id,
        params=config.flatten(config.to_dict(cfg)),
        tags={"git_sha": rundir.git_sha(), "host": socket.gethostname(), "run_dir": str(run_dir)},
    )
    tracker.set_tags(rundir.provenance_tags(run_dir, restarts))
    for name in ("profile.yaml", "train.yaml", "job.sbatch", "job.sh"):
        if info.is_main and (run_dir / name).is_file():
            tracker.log_artifact(run_dir / name, "run")
    tr.state.mlflow_run_id = tracker.run_id
    if info.is_main:
        rundir.truncate_metrics(run_dir, tr.state.step)
        rundir.write_status(
            run_dir, state="running", step=tr.state.step, total_steps=cfg.trainer.total_steps, restarts=restarts,
            mlflow_run_id=tracker.run_id, mlflow_tracking_uri=tracker.tracking_uri,
            latest_checkpoint=str(latest) if latest else None, error=None, exit_code=None,
        )
    status = "finished"
    preemption = preemption or Preemption()  # the walltime guard requests through it too
    guard = WalltimeGuard(job_end_time() if cfg.checkpoint.walltime_save else None, cfg.checkpoint.walltime_margin_s)
    progress = Progress(cfg.trainer.total_steps, tr.state.step) if info.is_main else None
    if info.is_main and guard.end is not None:
        print(f"[grpo] the job's time limit is in {guard.left_s(time.time()):.0f}s: it saves and requeues "
              "itself before then", flush=True)
    while tr.state.step < cfg.trainer.total_steps:
        tr.state.step += 1
        metrics = grpo_step(tr)
        if cfg.trainer.val_every and tr.state.step % cfg.trainer.val_every == 0:
            t0 = time.perf_counter()
            metrics["val_accuracy"] = distributed.all_mean({"v": validate(tr.engine, tr.task, tr.prompts, cfg)})["v"]
            metrics["time_validation"] = time.perf_counter() - t0
        if info.is_main:
            rundir.append_metrics(run_dir, {"step": tr.state.step, **metrics})
            tracker.log_metrics(metrics, step=tr.state.step)
            progress.step(tr.state.step, metrics)
            rundir.write_status(run_dir, step=tr.state.step, last_reward=metrics["reward_mean"],
                                eta_s=progress.eta(tr.state.step))
        guard.observe_step(metrics["time_step"] + metrics.get("time_validation", 0.0))
        last = tr.state.step == cfg.trainer.total_steps
        # Every rank asks, so all of them name the same reason (rank 0 requeues the job).
        if not last and distributed.any_rank(guard.should_stop(time.time())) and not preemption.requested:
            if info.is_main:
                print(f"[grpo] {guard.left_s(time.time()):.0f}s left before the time limit: not enough for "
                      "another step and a checkpoint", file=sys.stderr, flush=True)
            preemption.request(WALLTIME)
        # Checkpoint on schedule, at the end, or on preemption (all ranks agree).
        preempted = distributed.any_rank(preemption.requested)
        every = cfg.checkpoint.every
        if preempted or (every and tr.state.step % every == 0) or (last and cfg.checkpoint.save_final):
            guard.observe_checkpoint(save(tr, tracker))
        if preempted and not last:
            status = "preempted"
            break
    if progress is not None:
        progress.close()
    tr.close()
    if info.is_main:
        rundir.write_status(run_dir, state=status)
        if status == "finished":
            curves = write_curves(rundir.read_metrics(run_dir), run_dir / "curves.png", run_dir.name)
            if curves is not None:
                tracker.log_artifact(curves, "plots")
    tracker.finish("FINISHED" if status == "finished" else "KILLED")
    return TrainResult(status=status, step=tr.state.step, run_dir=run_dir, mlflow_run_id=tracker.run_id)


def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(
        prog="python -m grpo_core.train", description="GRPO training run (resumes from RUN_DIR's newest checkpoint).",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="overrides: dotted keys, e.g. rollout.n=8 optim.lr=1e-5 trainer.run_dir=runs/x\n\n"
        "keys (KEY = DEFAULT  (TYPE; allowed values)):\n\n" + format_keys(TrainConfig, choices=config.CHOICES),
    )
    parser.add_argument("--config", help="YAML file with a TrainConfig (sections as below)")
    parser.add_argument("--show-config", action="store_true",
                        help="print the resolved config (file + overrides + defaults) as YAML and exit")
    parser.add_argument("overrides", nargs="*", help="dotted key=value overrides")
    args = parser.parse_args(argv)
    try:
        cfg = config.load(args.config, args.overrides)
        if args.show_config:
            print(yaml.safe_dump(config.to_dict(cfg), sort_keys=False), end="")
            return 0
        result = train(cfg, preemption=Preemption.install())
    except (ConfigError, DataError, ModelPathError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except checkpoint.CheckpointError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_CONFLICT
    except OSError as exc:  # e.g. a full disk while writing the run dir
        print(f"error: {exc.filename or 'run dir'}: {exc.strerror or exc}", file=sys.stderr)
        return EXIT_ENVIRONMENT
    finally:
        distributed.shutdown()
    return EXIT_PREEMPTED if result.status == "preempted" else EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
