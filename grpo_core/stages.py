"""The GRPO step's stages, timed in one place.

grpo_step names each stage as it begins; StageClock turns the boundaries
into the step's `time_<stage>` metrics (metrics.jsonl, MLflow, the progress
line) and passes each name on to a listener, e.g. a benchmark's memory
meter. Trainer and listener thus see the same boundaries, and the
listener's own work between two stages is not in the trainer's figures.
"""
from __future__ import annotations

import time
from typing import TYPE_CHECKING, Callable

if TYPE_CHECKING:  # progress (and jobs.status with it) imports STAGES without torch
    import torch

STAGES = ("rollout", "reference", "update", "sync")  # in step order; "end" closes the last
StageListener = Callable[[str], None]  # called with each stage's name as it begins, then "end"


class StageClock:
    def __init__(self, device: torch.device, listener: StageListener | None = None) -> None:
        # On CUDA a boundary waits for the queued kernels: otherwise the update's
        # last optimizer step would be counted in the sync.
        if device.type == "cuda":
            import torch

            self._wait = lambda: torch.cuda.synchronize(device)
        else:
            self._wait = lambda: None
        self._listener = listener or (lambda _name: None)
        self._current: str | None = None
        self._t0 = time.perf_counter()
        self.seconds = {name: 0.0 for name in STAGES}

    def __call__(self, name: str) -> None:
        """End the current stage (if any) and begin `name` ("end": none)."""
        if name != "end" and name not in STAGES:
            raise ValueError(f"unknown stage {name!r}; stages: {', '.join(STAGES)}")
        self._wait()
        if self._current is not None:
            self.seconds[self._current] += time.perf_counter() - self._t0
        self._listener(name)
        self._current = None if name == "end" else name
        self._t0 = time.perf_counter()

    def metrics(self) -> dict[str, float]:
        return {f"time_{name}": s for name, s in self.seconds.items()}
