"""Which GPU each rank keeps (grpo_core.distributed.gpu_for_rank): vLLM's
in-process engine always takes cuda:0, so with N ranks each rank must see
only its own GPU. The decision is pure; the GPU run exercises the rest."""
from __future__ import annotations

import pytest

from grpo_core.distributed import gpu_for_rank


@pytest.mark.parametrize("visible, count, local_rank, world, expected", [
    (None, 2, 0, 2, "0"),
    (None, 2, 1, 2, "1"),
    ("4,5", 2, 1, 2, "5"),  # an allocation's GPUs: the local rank-th of them, not GPU 1
    ("GPU-aa, GPU-bb", 2, 1, 2, "GPU-bb"),  # UUIDs pass through
    ("3", 1, 1, 2, None),  # Slurm bound one GPU to the task already
    (None, 4, 0, 1, None),  # one rank: nothing to split
    (None, 8, 3, 16, "3"),  # several nodes: the local rank picks
])
def test_each_rank_keeps_its_own_gpu(visible, count, local_rank, world, expected):
    assert gpu_for_rank(visible, count, local_rank, world) == expected


def test_more_ranks_than_gpus_is_an_error():
    with pytest.raises(RuntimeError, match="local rank 2 has no GPU of its own: 2 visible"):
        gpu_for_rank("0,1", 2, 2, 3)
