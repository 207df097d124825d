"""The whole trainer at world size 2 (torchrun, gloo, one engine per rank:
the pure-torch fake, as the loop is under test): a run SIGKILLed after a checkpoint and resumed ends bit-identical to
an uninterrupted one."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from grpo_core.rundir import read_metrics
from tests.equivalence import assert_same_run

REPO = Path(__file__).resolve().parents[1]
RECIPE = REPO / "tests" / "recipes" / "tiny_synthetic.yaml"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(run_dir: Path, model: Path) -> list[str]:
    return [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
        "-m", "grpo_core.train", "--config", str(RECIPE), f"model.path={model}", f"trainer.run_dir={run_dir}",
        "trainer.total_steps=4", "checkpoint.every=2", "trainer.prompts_per_step=16", "trainer.mini_batch_prompts=8",
        "trainer.micro_batch_size=32", "rollout.n=8", "trainer.num_threads=1", "tracking.enabled=false",
        "rollout.engine=tests.fake_engine:FakeEngine",
    ]


def test_world_two_resume_is_bit_exact(tmp_path):
    model = tmp_path / "tiny"
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    out = subprocess.run(torchrun(straight, model), cwd=REPO, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]

    proc = subprocess.Popen(torchrun(resumed, model), cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    deadline = time.monotonic() + 300
    while not (resumed / "checkpoints" / "step_000002" / "state.pt").exists():
        assert proc.poll() is None, "the world-2 run exited before step 2's checkpoint"
        assert time.monotonic() < deadline
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)  # the launcher and both ranks, at once
    proc.wait()
    assert max(r["step"] for r in read_metrics(resumed)) < 4, "the kill came too late to test a resume"
    out = subprocess.run(torchrun(resumed, model), cwd=REPO, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "resuming from" in out.stdout

    assert_same_run(straight, resumed, 4)
