"""What a run holds between steps (Trainer), how it is built (data, model, engine,
optimizer; bad input fails there, before the run directory exists), and its checkpoint
end to end: what save() gathers from every rank, how resume_or_start() puts it back.
grpo_core.checkpoint writes and reads the files."""
from __future__ import annotations

import contextlib
import os
import random
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from . import checkpoint, config, distributed, rundir
from .config import ConfigError, TrainConfig
from .data import PromptSampler
from .engine import Engine, make_engine
from .model_path import ModelPathError, resolve_model
from .tasks import Prompts, Reward, Task, make_reward, make_task, tokenize
from .weightsync import WeightSync

if TYPE_CHECKING:
    from .tracking import Tracker


@dataclass
class Trainer:
    """Everything a run holds between steps; `state` is what a checkpoint adds."""

    cfg: TrainConfig
    info: distributed.DistInfo
    task: Task
    prompts: Prompts  # the task's rows, tokenized
    reward: Reward  # data.reward, else the task's score
    tokenizer: object
    engine: Engine
    policy: object
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    sampler: PromptSampler
    run_dir: Path
    sync: WeightSync  # the policy's weights -> the engine
    state: checkpoint.TrainState = field(default_factory=checkpoint.TrainState)
    closed: bool = False

    def close(self) -> None:
        """The engine down (while the process group it joined exists) and the adapter dir gone; once."""
        if not self.closed:
            self.closed = True
            shutil.rmtree(self.sync.adapter_dir, ignore_errors=True)
            self.engine.close()


def build_trainer(cfg: TrainConfig) -> Trainer:
    """Data, model, engine, optimizer. Bad input fails here, before the run
    directory is created."""
    config.check_layout(cfg, distributed.env_world_size())  # before any rank waits for the others
    why = rundir.unusable_run_dir(Path(cfg.trainer.run_dir))
    if why:
        raise ConfigError(f"trainer.run_dir={cfg.trainer.run_dir} {why}")
    info = distributed.init_distributed(cfg.trainer.device, own_gpu=cfg.rollout.tensor_parallel_size == 1)
    if cfg.model.share_base_weights and info.device.type != "cuda":
        raise ConfigError(f"model.share_base_weights=true needs a CUDA device (this run is on {info.device.type})")
    if cfg.trainer.num_threads:
        torch.set_num_threads(cfg.trainer.num_threads)  # before vLLM, which freezes it
    task = make_task(cfg.data, cfg.trainer.seed)
    model_path = resolve_model(cfg, task, info)

    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(model_path)
    except OSError as exc:  # a hub id that is unreachable or wrong
        raise ModelPathError(f"cannot load model.path={cfg.model.path}: {str(exc).strip().splitlines()[0]}") from None
    prompts = tokenize(task, tokenizer, cfg.data.max_prompt_tokens, cfg.data.task)
    engine = make_engine(
        model_path, cfg.rollout, dtype=cfg.model.dtype, seed=cfg.trainer.seed, lora_rank=cfg.model.lora_rank,
        max_model_len=cfg.data.max_prompt_tokens + max(cfg.rollout.max_tokens, cfg.rollout.val_max_tokens),
        on_cpu=info.device.type == "cpu", load_format=cfg.model.load_format,
    )
    try:
        return _with_engine(cfg, info, task, prompts, tokenizer, model_path, engine)
    except BaseException:
        with contextlib.suppress(Exception):  # the error that got us here is the one to report
            engine.close()
        raise


def _with_engine(cfg: TrainConfig, info: distributed.DistInfo, task: Task, prompts: Prompts, tokenizer: object,
                 model_path: str, engine: Engine) -> Trainer:
    """The rest of build_trainer, once the engine exists (which it closes if this fails)."""
    from .policy import Policy

    shared_base = None
    if cfg.model.share_base_weights:
        if not hasattr(engine, "share_weights"):
            raise ConfigError(f"model.share_base_weights=true needs an engine that lends its weights; "
                              f"rollout.engine={cfg.rollout.engine} does not")
        shared_base = engine.share_weights
    policy = Policy(
        model_path, cfg.model, cfg.trainer, info, needs_reference=cfg.algorithm.kl_coef > 0, shared_base=shared_base,
    )
    o = cfg.optim
    optimizer = torch.optim.AdamW(
        policy.trainable_parameters(), lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps, weight_decay=o.weight_decay
    )
    warmup = max(1, o.warmup_steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / warmup))
    sampler = PromptSampler(len(prompts.train), cfg.trainer.prompts_per_step, cfg.trainer.seed, cfg.data.shuffle)
    shm = "/dev/shm" if os.path.isdir("/dev/shm") else None  # adapters travel through memory, not disk
    return Trainer(
        cfg, info, task, prompts, make_reward(cfg.data, task), tokenizer, engine, policy, optimizer, scheduler, sampler,
        run_dir=Path(cfg.trainer.run_dir).resolve(),
        sync=WeightSync(policy, Path(tempfile.mkdtemp(prefix="grpo-adapter-", dir=shm))),
    )


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
