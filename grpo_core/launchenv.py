"""Which rank this process is, as its launcher (torchrun, Slurm) said: the one reading.

torchrun's variables win over Slurm's: torchrun may run inside an allocation,
where every worker shares one SLURM_PROCID. No torch here, so jobs.launch
reads the same answer before the trainer's imports.
"""
from __future__ import annotations

import os

RANK_VARS = ("RANK", "SLURM_PROCID")
LOCAL_RANK_VARS = ("LOCAL_RANK", "SLURM_LOCALID")
WORLD_SIZE_VARS = ("WORLD_SIZE", "SLURM_NTASKS")


def env_int(*names: str, default: int) -> int:
    """The first of `names` set (non-blank) in the environment, else `default`."""
    for name in names:
        if os.environ.get(name, "").strip():
            return int(os.environ[name])
    return default


def env_rank() -> int:
    return env_int(*RANK_VARS, default=0)


def env_local_rank() -> int:
    return env_int(*LOCAL_RANK_VARS, default=0)


def env_world_size() -> int:
    """The job's rank count, before any process group exists."""
    return env_int(*WORLD_SIZE_VARS, default=1)
