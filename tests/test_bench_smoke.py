"""The GPU benchmarks, run end to end on CPU with a tiny model (--tiny), as
bench/run_all.sh runs them on the device: every figure gets its JSON record
with the required fields and a measured value (no error records)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench import common, grpo_step, planner_check, rollout, sync  # noqa: E402

EXPECTED = (
    ["train_step_tokens_per_s", "train_step_mfu", "train_step_peak_gib"]
    + [f"planner_{name}" for name in planner_check.CONFIGS]
    + [m for m, _ in rollout.METRICS + sync.LORA_METRICS + sync.FULL_METRICS + grpo_step.METRICS]
    + ["train_step_tokens_per_s_nockpt", "train_step_mfu_nockpt", "train_step_peak_gib_nockpt"]
    + [f"{m}_nockpt" for m, _ in grpo_step.METRICS]  # the suite's variant without recomputation
    + ["synccheck_lora_bf16_max_abs_diff", "synccheck_full_bf16_max_abs_diff", "sync_full_14b_s"]  # gpu_checks
    + ["fullft_step_tokens_per_s_per_gpu", "fullft_sync_s", "fullft_planner_error", "fullft_peak_gib",  # fullft
       "fullft_host_peak_gib", "fullft_host_peak_gib_checkpoint_save", "fullft_resume_loss_equal"]
    + [f"fullft_48l_4gpu_predicted_{k}" for k in ("peak_gib", "host_per_node_gib", "step_s", "tokens_per_s_per_gpu",
                                                  "fits_80gib")]
    + ["gpu_learning_final_reward", "gpu_learning_start_reward", "gpu_learning_final_reward_full"]  # learning
)
ONLY = "train_step train_step_nockpt planner_check suite gpu_checks fullft learning learning_full"


@pytest.mark.vllm
def test_run_all_tiny_writes_every_record(tmp_path):
    env = {**os.environ, "OUT": str(tmp_path), "PYTHON": sys.executable, "BENCH_DATA": "none",
           "BENCH_SHAPES": str(tmp_path / "shapes"), "BENCH_DEADLINE_S": "1800", "BENCH_ONLY": ONLY}
    proc = subprocess.run(["bash", str(REPO / "bench" / "run_all.sh"), "--tiny"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=2100)
    results = tmp_path / "tiny"
    log = (results / "run_all.log").read_text() if (results / "run_all.log").exists() else proc.stdout + proc.stderr
    assert proc.returncode == 0, f"run_all.sh failed ({proc.returncode}):\n{log[-6000:]}"
    for metric in EXPECTED:
        path = results / f"{metric}.json"
        assert path.is_file(), f"no record for {metric}:\n{log[-3000:]}"
        rec = json.loads(path.read_text())
        missing = [f for f in common.REQUIRED_FIELDS if f not in rec]
        assert not missing, f"{metric}: missing fields {missing}"
        assert rec["metric"] == metric
        if metric.endswith("_nockpt") and "setting" in rec:
            assert rec["setting"]["gradient_checkpointing"] is False, rec["setting"]
        assert "error" not in rec, f"{metric} failed: {rec['error']}"
        assert isinstance(rec["value"], (int, float)), f"{metric}: value {rec['value']!r}"
        assert rec["hardware"].startswith("cpu"), rec["hardware"]
        assert "bench." in rec["command"]
    # the sync check on CPU (fp32): engine == trainer, and the sync moved the engine
    for kind in ("lora", "full"):
        check = json.loads((results / f"synccheck_{kind}_max_abs_diff.json").read_text())["check"]
        assert check["max_abs_diff"] < 1e-3, check
        assert check["max_change_since_before"] > 100 * check["max_abs_diff"], check
    # the resumed full-FT step replays the uninterrupted one from the restored state
    resume = json.loads((results / "fullft_resume_loss_equal.json").read_text())
    assert resume["value"] == 1.0 and resume["state_restored_exactly"] and resume["weights_moved_in_step_2"], resume
    assert (results / "fullft_48l_4gpu_prediction.md").is_file()
    assert len(json.loads((results / "gpu_learning_final_reward.json").read_text())["curve"]) == 6
    assert (results / "SUMMARY.md").is_file()
    assert (results / "logs" / "suite.log").is_file()
