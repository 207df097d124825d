"""Faults during a real run (tiny model, real vLLM on CPU): a corrupted newest
checkpoint, a torn metrics line, no loadable checkpoint, a full disk."""
from __future__ import annotations

import errno
import json
import subprocess
from pathlib import Path

import pytest
import torch

from grpo_core import checkpoint
from grpo_core.checkpoint import TrainState, complete_checkpoints, load_checkpoint, save_checkpoint
from grpo_core.rundir import read_metrics, truncate_metrics
from tests.equivalence import assert_same_run
from tests.test_train_e2e import FAKE_ENGINE, REPO, trainer_cmd

COMMON = ["checkpoint.every=2", "checkpoint.keep=3", "tracking.enabled=false", "trainer.prompts_per_step=8",
          "trainer.mini_batch_prompts=8", "trainer.micro_batch_size=64", "rollout.n=8"]


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("models") / "tiny"


def _train(model: Path, run_dir: Path, steps: int, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(trainer_cmd(f"model.path={model}", f"trainer.run_dir={run_dir}",
                                      f"trainer.total_steps={steps}", *COMMON, *extra),
                          cwd=REPO, capture_output=True, text=True, timeout=600)


def _ok(proc: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def test_corrupt_newest_checkpoint_and_torn_metrics_line(model: Path, tmp_path: Path) -> None:
    straight, run = tmp_path / "straight", tmp_path / "run"
    _ok(_train(model, straight, 6))
    _ok(_train(model, run, 4))
    newest = run / "checkpoints" / "step_000004"
    data = (newest / "trainable.pt").read_bytes()
    (newest / "trainable.pt").write_bytes(data[: len(data) // 2])  # torn on disk
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"step": 5, "reward_me')  # a kill mid-write
    proc = _ok(_train(model, run, 6))
    assert "checkpoint step_000004 cannot be loaded" in proc.stderr
    assert "resuming from step_000002, the newest loadable checkpoint" in proc.stderr
    assert (run / "checkpoints" / ".corrupt-step_000004").is_dir()  # set aside, never pruned as "newest"
    assert_same_run(straight, run, 6)  # replayed from step 2: the same run as never interrupted


def test_save_checkpoint_enospc_at_the_os_boundary(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """In addition to the real full disk: the second file's write fails."""
    weights = {"w": torch.ones(3)}
    first = save_checkpoint(tmp_path, TrainState(step=1), weights, {}, keep=1)
    real_save = torch.save

    def full(obj, path, *a, **k):
        if str(path).endswith(checkpoint.STATE):
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return real_save(obj, path, *a, **k)

    monkeypatch.setattr(torch, "save", full)
    with pytest.raises(OSError, match="No space left"):
        save_checkpoint(tmp_path, TrainState(step=2), {"w": torch.zeros(3)}, {}, keep=1)
    assert [p for _, p in complete_checkpoints(tmp_path)] == [first]
    assert torch.equal(load_checkpoint(first)[1]["w"], torch.ones(3))
    assert not list((tmp_path / "checkpoints").glob(".tmp-*"))


def test_torn_and_foreign_metrics_lines_are_skipped(tmp_path: Path) -> None:
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "a": 1}\n[1]\n\n{"step": 2, "a": 2}\n{"step": 3, "a"')
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2]
    truncate_metrics(tmp_path, 1)
    assert (tmp_path / "metrics.jsonl").read_text() == json.dumps({"step": 1, "a": 1}) + "\n"


def test_no_loadable_checkpoint_refuses_then_starts_over_on_request(model: Path, tmp_path: Path) -> None:
    """Every checkpoint torn: exit 3 with one error line and the real vLLM engine closed cleanly (no
    shutdown traceback); nothing set aside or deleted. checkpoint.start_over=true then runs from step 0
    (the pure-torch engine: that part is about the loop)."""
    run = tmp_path / "run"
    for step in (2, 4):
        ckpt = run / "checkpoints" / f"step_{step:06d}"
        ckpt.mkdir(parents=True)
        (ckpt / checkpoint.TRAINABLE).write_bytes(b"torn")
        (ckpt / checkpoint.STATE).write_bytes(b"torn")
    before = sorted(p.name for p in (run / "checkpoints").iterdir())
    proc = _train(model, run, 6)
    assert proc.returncode == 3, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert errors == [f"error: no loadable checkpoint in {run / 'checkpoints'} (2 unloadable: step_000004, "
                      "step_000002); to start over from step 0 set checkpoint.start_over=true"], proc.stderr[-3000:]
    assert proc.stderr.rstrip().endswith(errors[0]), proc.stderr[-3000:]  # nothing after it: a clean shutdown
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == before
    assert not (run / "metrics.jsonl").exists()
    proc = _ok(_train(model, run, 2, "checkpoint.start_over=true", f"rollout.engine={FAKE_ENGINE}"))
    assert "starting over from step 0 (checkpoint.start_over)" in proc.stderr
    assert [r["step"] for r in read_metrics(run)] == [1, 2]
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == [
        ".corrupt-step_000002", ".corrupt-step_000004", "step_000002"]
