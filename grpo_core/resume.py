"""A trainer's checkpoint, end to end: what save() gathers from every rank (weights,
optimizer, scheduler, sampler, MLflow run id) and how resume_or_start() puts it back
(then the engine gets the weights). grpo_core.checkpoint writes and reads the files."""
from __future__ import annotations

import random
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from . import checkpoint, distributed, rundir

if TYPE_CHECKING:
    from .tracking import Tracker
    from .train import Trainer


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def resume_or_start(tr: Trainer) -> Path | None:
    """Load the newest complete checkpoint, if any. vLLM's constructor
    reseeded the global RNGs, so seeding comes after it."""
    def say(text: str) -> None:
        if tr.info.is_main:
            print(f"[grpo] {text}", file=sys.stderr, flush=True)

    latest, loaded, bad = checkpoint.load_newest(tr.run_dir, say, tr.cfg.checkpoint.start_over)
    distributed.barrier()  # every rank has read before rank 0 moves anything
    if bad and tr.info.is_main:
        checkpoint.set_aside(bad)
    if latest is None:
        _seed_everything(tr.cfg.trainer.seed)
    else:
        tr.state, trainable, optim_state, rng = loaded
        tr.policy.load_trainable_state_dict(trainable)
        tr.policy.load_optimizer_state_dict(tr.optimizer, optim_state)
        tr.scheduler.load_state_dict(tr.state.scheduler)
        tr.sampler.load_state_dict(tr.state.sampler)
        checkpoint.set_rng_state(rng)
        print(f"[grpo] resuming from {latest} (step {tr.state.step})", flush=True)
    if latest is not None or tr.policy.is_lora:
        tr.sync.push(tr.engine)
    return latest


def save(tr: Trainer, tracker: Tracker) -> float:
    """Write a checkpoint (all ranks take part); returns the seconds it took."""
    start = time.perf_counter()
    tr.state.sampler, tr.state.scheduler = tr.sampler.state_dict(), tr.scheduler.state_dict()
    tr.state.mlflow_run_id = tracker.run_id
    # Both gathers are collectives: every rank takes part, rank 0 writes.
    trainable, optim_state = tr.policy.trainable_state_dict(), tr.policy.optimizer_state_dict(tr.optimizer)
    if tr.info.is_main:
        path = checkpoint.save_checkpoint(tr.run_dir, tr.state, trainable, optim_state, tr.cfg.checkpoint.keep)
        rundir.write_status(tr.run_dir, latest_checkpoint=str(path))
    distributed.barrier()
    return time.perf_counter() - start
