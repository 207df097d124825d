"""Secrets end to end: with tokens in the environment, a whole local run
(jobs.submit, the launcher, the trainer, a real MLflow server) and a Slurm
profile's dry-run leave no trace of them anywhere: not in the run dir's
files (script, logs, YAML copies, run.json, status, metrics), not in MLflow's
params and tags, not in the server's database or artifact store. A profile
that names or holds one is refused without echoing it. The pure-torch engine
stands in for vLLM (this is about what is written, not the rollouts)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.mlflow_server import MlflowServer
from tests.test_train_e2e import FAKE_ENGINE, REPO

SECRETS = {"HF_TOKEN": "hf_secret123XYZ", "WANDB_API_KEY": "wandb0secret0456", "MLFLOW_TRACKING_PASSWORD": "pw-secret-789",
           "AWS_SECRET_ACCESS_KEY": "aws/secret+key000"}


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    return {**env, **SECRETS}


def _cli(module: str, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", module, *args], cwd=REPO, env=_env(), capture_output=True,
                          text=True, timeout=timeout)


def _leaks(root: Path) -> list[str]:
    """Every file under root (binary ones too) that holds a secret's bytes."""
    found = []
    for path in root.rglob("*"):
        if path.is_file() and not path.is_symlink():
            data = path.read_bytes()
            found += [f"{path}: {name}" for name, value in SECRETS.items() if value.encode() in data]
    return found


def test_a_whole_local_run_leaves_no_secret_anywhere(tmp_path: Path) -> None:
    server = MlflowServer(tmp_path / "mlflow")
    uri = server.start()
    runs = tmp_path / "runs"
    try:
        proc = _cli("jobs.submit", "--profile", "local", "--name", "s", "--runs-dir", str(runs),
                    f"train.model.path={tmp_path / 'tiny'}", f"train.rollout.engine={FAKE_ENGINE}",
                    "train.trainer.total_steps=2", "train.trainer.prompts_per_step=4", "train.trainer.mini_batch_prompts=4",
                    "train.rollout.n=4", "train.trainer.val_every=1", "train.checkpoint.every=1",
                    f"train.tracking.tracking_uri={uri}", "cluster.env.MY_SETTING=plain")
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
        run = runs / "s"
        assert (run / "job.sh").is_file() and (run / "local.log").is_file() and (run / "metrics.jsonl").is_file()
        assert (run / "checkpoints" / "step_000002").is_dir()
        status = _cli("jobs.status", "s", "--runs-dir", str(runs))
        assert "finished" in status.stdout, status.stdout
        for out in (proc, status):
            assert not [n for n, v in SECRETS.items() if v in out.stdout + out.stderr]

        from mlflow.tracking import MlflowClient

        client = MlflowClient(tracking_uri=uri)
        (mlflow_run,) = client.search_runs([client.get_experiment_by_name("grpo").experiment_id])
        seen = {**mlflow_run.data.params, **mlflow_run.data.tags}
        assert seen["rollout.n"] == "4" and seen["profile"] == "local"  # the run is the one we made
        assert {"run/train.yaml", "run/job.sh", "run/profile.yaml"} <= {
            a.path for a in client.list_artifacts(mlflow_run.info.run_id, "run")}
        assert not [k for k, v in seen.items() if any(s in f"{k}={v}" for s in SECRETS.values())]
    finally:
        server.stop()
    # The run dir (rendered script, logs, YAML copies, run.json, status, metrics, checkpoints)
    # and the server's database and artifact store.
    assert not _leaks(runs) and not _leaks(server.root)


@pytest.mark.parametrize("profile", ["slurm-cpu", "h100x2"])
def test_a_slurm_dry_run_with_secrets_in_the_environment(profile: str, tmp_path: Path) -> None:
    proc = _cli("jobs.submit", "--profile", profile, "--dry-run", "--runs-dir", str(tmp_path / "runs"), timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "#SBATCH" in proc.stdout
    assert not [n for n, v in SECRETS.items() if v in proc.stdout + proc.stderr]
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("override", [
    "cluster.env.MY_TOKEN=abcdef123456",  # a secret's name
    f"cluster.env.HUB={SECRETS['HF_TOKEN']}",  # a secret's value under a plain name
    f"train.tracking.run_name={SECRETS['WANDB_API_KEY']}",
    "cluster.setup=export MY_API_KEY=abcdef123456",
])
def test_a_profile_holding_a_secret_is_refused_without_echoing_it(override: str, tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    proc = _cli("jobs.submit", "--profile", "local", "--name", "x", "--runs-dir", str(runs), override, timeout=120)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "secret" in lines[0], proc.stderr
    assert "abcdef123456" not in proc.stderr + proc.stdout
    assert not [n for n, v in SECRETS.items() if v in proc.stderr + proc.stdout]
    assert not runs.exists()
