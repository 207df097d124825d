"""A whole run whose MLflow server dies, or loses its database, mid-run
(grpo_core/tracking.py's policy): training and checkpoints go on, every
step is in metrics.jsonl, one line says tracking is lost and where the
metrics are, and the run exits 0. The pure-torch engine stands in for vLLM:
this is about the loop and the tracker, not the rollouts."""
from __future__ import annotations

import subprocess
import time
from pathlib import Path

import pytest

from grpo_core.rundir import read_metrics
from tests.mlflow_server import MlflowServer
from tests.test_train_e2e import FAKE_ENGINE, REPO, trainer_cmd

STEPS = 5
LOST_AT = 2  # the server goes once this step is in metrics.jsonl


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("models") / "tiny"


def _remove_db(server: MlflowServer) -> None:
    for suffix in ("", "-wal", "-shm", "-journal"):
        (server.root / f"mlflow.db{suffix}").unlink(missing_ok=True)


@pytest.mark.parametrize("fault", ["killed", "db-removed"])
def test_tracking_lost_mid_run_the_run_goes_on(model: Path, tmp_path: Path, fault: str) -> None:
    server = MlflowServer(tmp_path / "mlflow")
    uri = server.start()
    run = tmp_path / "run"
    proc = subprocess.Popen(
        trainer_cmd(f"model.path={model}", f"rollout.engine={FAKE_ENGINE}", f"trainer.run_dir={run}",
                    f"trainer.total_steps={STEPS}", "checkpoint.every=2", "trainer.prompts_per_step=4",
                    "trainer.mini_batch_prompts=4", "rollout.n=4", f"tracking.tracking_uri={uri}"),
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        deadline = time.monotonic() + 300
        while not any(r["step"] >= LOST_AT for r in read_metrics(run)):
            assert proc.poll() is None, proc.stderr.read()[-3000:]
            assert time.monotonic() < deadline, f"no step {LOST_AT} within 300 s"
            time.sleep(0.05)
        if fault == "killed":
            server.kill()
        else:
            _remove_db(server)
        at_fault = max(r["step"] for r in read_metrics(run))
        out, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
        server.stop()
    assert at_fault < STEPS - 1, f"the fault came at step {at_fault}: too late to test anything"
    assert proc.returncode == 0, err[-3000:]
    assert [r["step"] for r in read_metrics(run)] == list(range(1, STEPS + 1))
    assert sorted(p.name for p in (run / "checkpoints").glob("step_*")) == ["step_000004", "step_000005"]
    assert "Traceback" not in err, err[-3000:]
    mlflow_lines = [line for line in err.splitlines() if line.startswith("mlflow:")]
    # Said once when lost and once at the end, each naming where the metrics are; nothing else.
    assert len(mlflow_lines) == 2, mlflow_lines
    assert "not reachable; buffering metrics" in mlflow_lines[0], mlflow_lines
    assert "still not reachable" in mlflow_lines[1], mlflow_lines
    assert all(str(run / "metrics.jsonl") in line for line in mlflow_lines), mlflow_lines
    stray = [line for line in err.splitlines() if not line.startswith(("[grpo]", "mlflow:"))
             and line.strip() and "it/s]" not in line]
    assert not stray, stray[:20]
