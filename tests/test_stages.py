"""grpo_core.stages.StageClock: the seconds between boundaries become the
step's time_<stage> metrics, and the listener hears every boundary, its own
time not counted in any stage."""
from __future__ import annotations

import pytest
import torch

from grpo_core import stages


def test_stage_seconds_and_listener_by_hand(monkeypatch) -> None:
    heard = []
    # perf_counter: at construction, then per boundary the end of the current stage
    # (none before "rollout") and, after the listener, the start of the next.
    ticks = iter([0.0, 1.0, 3.0, 3.25, 4.0, 4.5, 10.0, 10.0, 10.5, 99.0])
    monkeypatch.setattr(stages.time, "perf_counter", lambda: next(ticks))
    clock = stages.StageClock(torch.device("cpu"), heard.append)
    for name in (*stages.STAGES, "end"):
        clock(name)
    assert heard == ["rollout", "reference", "update", "sync", "end"]
    # rollout 1.0 -> 3.0; reference 3.25 -> 4.0; update 4.5 -> 10.0; sync 10.0 -> 10.5
    assert clock.metrics() == {"time_rollout": 2.0, "time_reference": 0.75, "time_update": 5.5, "time_sync": 0.5}


def test_unknown_stage_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown stage 'rollouts'; stages: rollout, reference, update, sync"):
        stages.StageClock(torch.device("cpu"))("rollouts")
