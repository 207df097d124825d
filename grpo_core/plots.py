"""The run's own curves, drawn from metrics.jsonl at the end of a run."""
from __future__ import annotations

from pathlib import Path
from typing import Any

CURVES = (("reward_mean", "mean reward"), ("accuracy", "train accuracy"), ("val_accuracy", "validation accuracy"))


def write_curves(records: list[dict[str, Any]], path: Path, title: str) -> Path | None:
    """One PNG with a panel per curve that has data; None if none has."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [(key, label) for key, label in CURVES if any(key in r for r in records)]
    if not panels:
        return None
    fig, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 3.4), squeeze=False)
    for ax, (key, label) in zip(axes[0], panels):
        points = [(r["step"], r[key]) for r in records if key in r]
        ax.plot([s for s, _ in points], [v for _, v in points], marker="." if len(points) < 50 else None)
        ax.set_xlabel("step")
        ax.set_title(label)
        ax.set_ylim(-0.02, 1.02)
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
