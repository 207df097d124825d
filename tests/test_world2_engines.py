"""The multi-rank rollout layout: one engine per rank (data parallel), the full weights synced into
each. At world size 2 (torchrun, gloo, vLLM on CPU), full fine-tuning, after a real GRPO step every
rank's own engine gives the trainer's log-probs; a tensor-parallel engine per rank is refused."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RECIPE = REPO / "tests" / "recipes" / "tiny_synthetic.yaml"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_each_rank_engine_matches_the_trainer_after_a_full_ft_step(tmp_path):
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
        "-m", "grpo_core.synccheck", "--steps", "1", "--config", str(RECIPE), f"model.path={tmp_path / 'tiny'}",
        f"trainer.run_dir={tmp_path / 'run'}", "model.lora_rank=0", "trainer.prompts_per_step=8",
        "trainer.mini_batch_prompts=8", "trainer.micro_batch_size=32", "rollout.n=4", "trainer.num_threads=1",
        "tracking.enabled=false",
        # a random model rarely scores: the entropy bonus is what moves it in one step
        "algorithm.entropy_coef=0.05",
    ]
    out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    results = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{") and "max_abs_diff" in line]
    assert len(results) == 2, out.stdout[-2000:]  # one per rank, each about its own engine
    for r in results:
        assert r["mode"] == "full" and r["tokens"] > 0
        assert r["max_abs_diff"] < 1e-3, r  # fp32 on CPU: the engine holds the trainer's weights
        assert r["max_change_since_start"] > 100 * max(r["max_abs_diff"], 1e-6), r  # and the step moved them


def test_a_tensor_parallel_engine_per_rank_is_refused(tmp_path):
    env = {**os.environ, "WORLD_SIZE": "2", "RANK": "0"}
    out = subprocess.run(
        [sys.executable, "-m", "grpo_core.train", "--config", str(RECIPE), f"model.path={tmp_path / 'tiny'}",
         f"trainer.run_dir={tmp_path / 'run'}", "rollout.tensor_parallel_size=2", "tracking.enabled=false"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2, out.stderr[-2000:]
    assert out.stderr.strip().count("\n") == 0, out.stderr
    assert "2 training ranks" in out.stderr and "use rollout.tensor_parallel_size=1" in out.stderr
    assert not (tmp_path / "run").exists()  # refused before anything was written
