"""The one definition of "a resumed run equals the uninterrupted one"."""
from __future__ import annotations

from pathlib import Path

import torch

from grpo_core.checkpoint import load_trainable
from grpo_core.rundir import read_metrics
from grpo_core.train import TIMING_KEYS


def assert_same_run(straight: Path, resumed: Path, steps: int) -> None:
    """Bit-identical final trainable weights and identical per-step metrics
    (wall-clock timings aside), every step exactly once."""
    a = load_trainable(straight / "checkpoints" / f"step_{steps:06d}")
    b = load_trainable(resumed / "checkpoints" / f"step_{steps:06d}")
    assert a.keys() == b.keys() and len(a) > 0
    differing = [name for name in a if not torch.equal(a[name], b[name])]
    assert differing == [], f"trainable tensors differ after resume: {differing[:5]}"
    strip = lambda recs: [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in recs]  # noqa: E731
    ma, mb = strip(read_metrics(straight)), strip(read_metrics(resumed))
    assert [r["step"] for r in mb] == list(range(1, steps + 1))
    assert ma == mb, "per-step metrics differ between the straight and the resumed run"
