"""One process-group set-up for 1 and N ranks (Slurm, torchrun or nothing).

World size 1 still gets a (gloo or NCCL) process group, so FSDP2 and the
rank-agreement collectives take exactly the path they take on N ranks.
"""
from __future__ import annotations

import os
import socket
import subprocess
from dataclasses import dataclass

import torch
import torch.distributed as dist

from grpo_core.launchenv import env_int, env_local_rank, env_rank, env_world_size


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _first_slurm_host() -> str | None:
    nodelist = os.environ.get("SLURM_JOB_NODELIST") or os.environ.get("SLURM_NODELIST")
    if not nodelist:
        return None
    try:
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True, timeout=30)
        hosts = out.stdout.split()
        return hosts[0] if hosts else None
    except (OSError, subprocess.SubprocessError):
        return None


def gpu_for_rank(visible: str | None, gpu_count: int, local_rank: int, world: int) -> str | None:
    """The CUDA_VISIBLE_DEVICES entry this rank should keep for itself, or
    None to leave the GPUs as they are (one rank, or one GPU visible)."""
    ids = [x.strip() for x in visible.split(",") if x.strip()] if visible is not None else [str(i) for i in range(gpu_count)]
    if world == 1 or len(ids) <= 1:
        return None
    if local_rank >= len(ids):
        raise RuntimeError(f"local rank {local_rank} has no GPU of its own: {len(ids)} visible ({','.join(ids)})")
    return ids[local_rank]


def init_distributed(device_pref: str = "auto", *, own_gpu: bool = True) -> DistInfo:
    """Join (or create) the process group; idempotent within a process.

    own_gpu: each rank keeps only its own GPU (it becomes cuda:0). vLLM's
    in-process engine always takes cuda:0 (its single-process executor reads
    no rank), so with every GPU visible all the ranks' engines would land on
    GPU 0. Engines with tensor_parallel_size > 1 need the other GPUs: False."""
    world, rank, local_rank = env_world_size(), env_rank(), env_local_rank()
    # device_count() asks NVML, which leaves CUDA uninitialised; is_available() would not.
    gpus = torch.cuda.device_count() if device_pref != "cpu" else 0
    mine = None
    if gpus and own_gpu and not dist.is_initialized():
        mine = gpu_for_rank(os.environ.get("CUDA_VISIBLE_DEVICES"), gpus, local_rank, world)
        if mine is not None:
            os.environ["CUDA_VISIBLE_DEVICES"] = mine
    use_cuda = device_pref == "cuda" or (device_pref == "auto" and torch.cuda.is_available())
    # A rank that sees one GPU (its own, or as Slurm bound it) finds it at cuda:0.
    index = 0 if mine is not None or gpus <= 1 else local_rank
    device = torch.device("cuda", index) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
        if mine is not None and torch.cuda.device_count() > 1:  # initialised now: the driver's own count
            raise RuntimeError("CUDA was initialised before init_distributed, so this rank still sees every GPU "
                               "and its vLLM engine would share GPU 0 with the other ranks'")
    if not dist.is_initialized():
        if "TORCHELASTIC_RUN_ID" in os.environ:
            init_method = "env://"  # torchrun: its agent's store
        elif world == 1:
            init_method = f"tcp://127.0.0.1:{_free_port()}"
        else:
            addr = os.environ.get("MASTER_ADDR") or _first_slurm_host() or "127.0.0.1"
            # A port derived from the job id keeps concurrent jobs on one node apart.
            port = os.environ.get("MASTER_PORT") or str(20000 + env_int("SLURM_JOB_ID", default=0) % 20000)
            init_method = f"tcp://{addr}:{port}"
        dist.init_process_group(
            backend="nccl" if use_cuda else "gloo", init_method=init_method, rank=rank, world_size=world,
            device_id=device if use_cuda else None,
        )
    return DistInfo(rank=rank, world_size=world, local_rank=local_rank, device=device)


def any_rank(flag: bool) -> bool:
    """True on every rank if `flag` is true on any rank (preemption agreement)."""
    t = torch.tensor([1 if flag else 0], dtype=torch.int32, device=_collective_device())
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def all_mean(values: dict[str, float]) -> dict[str, float]:
    if dist.get_world_size() == 1:
        return values
    keys = sorted(values)
    t = torch.tensor([values[k] for k in keys], dtype=torch.float64, device=_collective_device())
    dist.all_reduce(t)
    return {k: float(v) / dist.get_world_size() for k, v in zip(keys, t.tolist())}


def all_sum(value: float) -> float:
    if dist.get_world_size() == 1:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=_collective_device())
    dist.all_reduce(t)
    return float(t.item())


def all_max(value: int) -> int:
    """The largest `value` over the ranks (e.g. micro-batch counts every rank must run)."""
    if dist.get_world_size() == 1:
        return value
    t = torch.tensor([value], dtype=torch.int64, device=_collective_device())
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item())


def _collective_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
