"""Checkpoints: complete or invisible.

A checkpoint is written into a hidden temporary folder next to its final
place and renamed into `checkpoints/step_NNNNNN` once every file is flushed,
so a reader never sees a half-written one; stale temporaries are ignored and
swept. This module alone decides what a checkpoint contains.
"""
from __future__ import annotations

import os
import random
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

STEP_DIR = re.compile(r"^step_(\d{6,})$")
CORRUPT_PREFIX = ".corrupt-"  # an unloadable checkpoint, set aside (never loaded, never pruned)


class CheckpointError(RuntimeError):
    """No checkpoint of a run that has some can be loaded; one-line message."""

TRAINABLE = "trainable.pt"
STATE = "state.pt"


@dataclass
class TrainState:
    """What the loop needs besides weights and optimizer to continue exactly."""

    step: int = 0
    mlflow_run_id: str | None = None
    sampler: dict[str, int] | None = None
    scheduler: dict[str, Any] | None = None


def rng_state() -> dict[str, Any]:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])


def checkpoint_root(run_dir: Path) -> Path:
    return Path(run_dir) / "checkpoints"


def complete_checkpoints(run_dir: Path) -> list[tuple[int, Path]]:
    root = checkpoint_root(run_dir)
    if not root.is_dir():
        return []
    found = []
    for child in root.iterdir():
        match = STEP_DIR.match(child.name)
        if match and (child / STATE).is_file() and (child / TRAINABLE).is_file():
            found.append((int(match.group(1)), child))
    return sorted(found)


def latest_checkpoint(run_dir: Path) -> Path | None:
    found = complete_checkpoints(run_dir)
    return found[-1][1] if found else None


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_checkpoint(
    run_dir: Path, state: TrainState, trainable: dict[str, torch.Tensor], optimizer: dict[str, Any], keep: int
) -> Path:
    """Write and publish atomically (call on rank 0 only); returns the final path."""
    root = checkpoint_root(run_dir)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step_{state.step:06d}"
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{final.name}-", dir=root))
    try:
        torch.save(trainable, tmp / TRAINABLE)
        torch.save({"train_state": state.__dict__, "optimizer": optimizer, "rng": rng_state()}, tmp / STATE)
        for f in tmp.iterdir():
            with open(f, "rb") as handle:
                os.fsync(handle.fileno())
        if final.exists():  # the same step saved again (e.g. preempted right after a periodic save)
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_dir(root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _prune(root, keep)
    return final


def _prune(root: Path, keep: int) -> None:
    complete = complete_checkpoints(root.parent)
    for _, path in complete[: max(0, len(complete) - max(1, keep))]:
        shutil.rmtree(path, ignore_errors=True)
    for child in root.iterdir():
        # Only rank 0 writes, one save at a time: any other temporary was
        # left by a writer that died. It was never loaded; sweep it.
        if child.name.startswith(".tmp-"):
            shutil.rmtree(child, ignore_errors=True)


def load_checkpoint(path: Path) -> tuple[TrainState, dict[str, torch.Tensor], dict[str, Any], dict[str, Any]]:
    """-> (train state, trainable tensors, optimizer state, rng state)."""
    trainable = torch.load(path / TRAINABLE, map_location="cpu", weights_only=True)
    blob = torch.load(path / STATE, map_location="cpu", weights_only=False)
    return TrainState(**blob["train_state"]), trainable, blob["optimizer"], blob["rng"]


def load_newest(run_dir: Path, say, start_over: bool = False):
    """The newest complete checkpoint that loads: (path, loaded) or None (fresh run).

    A newer one that does not load (torn by a full disk, bit rot) is reported
    through `say` and skipped; if checkpoints exist but none loads, raise
    CheckpointError instead of silently starting from step 0, unless
    `start_over`. Returns the unloadable paths too, for set_aside()."""
    found = complete_checkpoints(run_dir)
    bad: list[Path] = []
    for _, path in reversed(found):
        try:
            loaded = load_checkpoint(path)
        except Exception as exc:  # noqa: BLE001 - torch.load raises many types on a torn file
            bad.append(path)
            reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
            say(f"checkpoint {path.name} cannot be loaded ({type(exc).__name__}: {reason}); trying an older one")
            continue
        if bad:
            say(f"resuming from {path.name}, the newest loadable checkpoint ({len(bad)} newer unloadable)")
        return path, loaded, bad
    if bad and not start_over:
        raise CheckpointError(
            f"no loadable checkpoint in {checkpoint_root(run_dir)} ({len(bad)} unloadable: "
            f"{', '.join(p.name for p in bad)}); to start over from step 0 set checkpoint.start_over=true")
    if bad:
        say(f"no loadable checkpoint ({len(bad)} unloadable); starting over from step 0 (checkpoint.start_over)")
    return None, None, bad


def set_aside(paths: list[Path]) -> None:
    """Rename unloadable checkpoints out of sight: keep-N pruning must never
    count them as newer than the good one and delete that (rank 0 only)."""
    for path in paths:
        try:
            os.replace(path, path.with_name(f"{CORRUPT_PREFIX}{path.name}"))
        except OSError:
            pass


def load_trainable(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(Path(path) / TRAINABLE, map_location="cpu", weights_only=True)
