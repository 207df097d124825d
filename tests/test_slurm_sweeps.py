"""Sweeps and walltime-aware saves on the real local Slurm (tests/slurm_harness.py).

- A 2-element sweep is one job array logging to the real MLflow server; one
  element is requeued by Slurm mid-run and resumes from its checkpoint, the
  other runs straight through; jobs.status shows the sweep as a table and
  jobs.compare --sweep finds both MLflow runs by their tags.
- A job with a short --time and no --signal at all: the trainer sees the
  limit coming, saves, requeues itself and finishes in its next run.
"""
from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.slurm_harness import LocalSlurm
from tests.test_slurm_jobs import RUN_TIMEOUT_S, STEPS, TINY, _cli

pytestmark = pytest.mark.slurm
REPO = Path(__file__).resolve().parent.parent


def _status(run_dir: Path) -> dict:
    from jobs.runs import read_status

    return read_status(run_dir)


def _logs(paths: list[Path], lines: int = 30) -> str:
    return "\n".join(f"--- {p.name}\n" + "\n".join(p.read_text(errors="replace").splitlines()[-lines:])
                     for p in paths if p.is_file())


def _wait_ended(run_dir: Path, logs: list[Path]) -> None:
    from jobs.runs import ACTIVE, view

    deadline = time.monotonic() + RUN_TIMEOUT_S
    while (v := view(run_dir)).state not in ("finished", "stopped", "cancelled", "failed") or v.job_state in ACTIVE:
        assert time.monotonic() < deadline, f"timed out: {v}\n{_status(run_dir)}\n{_logs(logs)}"
        time.sleep(0.3)


def test_sweep_array_with_one_element_requeued(slurm_cluster: LocalSlurm, mlflow_server: str,
                                               tmp_path: Path) -> None:
    from mlflow.tracking import MlflowClient

    # sbatch exports the environment to the jobs; PYTHONPATH: this checkout's code in every process
    env = {**slurm_cluster.full_env(), "MLFLOW_TRACKING_URI": mlflow_server, "PYTHONPATH": str(REPO)}
    runs_dir = tmp_path / "runs"
    out = subprocess.run([sys.executable, "-m", "jobs.submit", "--profile", "slurm-cpu", "--runs-dir", str(runs_dir),
                          "--sweep", "optim.lr=0.003,0.002", "--sweep-name", "sw", "--max-parallel", "2",
                          "--no-follow", *TINY, "train.tracking.experiment=sweeps"],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    array = re.search(r"job:\s+(\d+) \(Slurm job array\)", out.stdout).group(1)  # type: ignore[union-attr]
    sweep_dir, first, second = runs_dir / "sw", runs_dir / "sw-0", runs_dir / "sw-1"
    assert "#SBATCH --array=0-1%2\n" in (sweep_dir / "job.sbatch").read_text()
    logs = [sweep_dir / "slurm" / f"{array}_{i}_0_log.{ext}" for i in (0, 1) for ext in ("out", "err")]

    deadline = time.monotonic() + RUN_TIMEOUT_S
    while (_status(second).get("step") or 0) < 3:
        assert _status(second).get("state") != "finished", "finished before it could be requeued"
        assert time.monotonic() < deadline, f"no progress\n{_logs(logs)}"
        time.sleep(0.1)
    slurm_cluster.run("scontrol", "requeue", f"{array}_1")  # the array element by its own id
    for run_dir in (first, second):
        _wait_ended(run_dir, logs)

    for run_dir, restarted in ((first, False), (second, True)):
        status = _status(run_dir)
        assert status["state"] == "finished" and status["step"] == STEPS, f"{status}\n{_logs(logs)}"
        assert (status["restarts"] >= 1) is restarted, status
        steps = [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        assert steps == list(range(1, STEPS + 1))
    log = (sweep_dir / "slurm" / f"{array}_1_0_log.out").read_text()
    assert "[grpo] resuming from" in log and "[grpo] step" in log, _logs(logs)
    assert "resuming from" not in (sweep_dir / "slurm" / f"{array}_0_0_log.out").read_text()

    # jobs.status: the sweep as a table, with the swept values
    table = _cli("jobs.status", "sw", "--runs-dir", str(runs_dir), env=env)
    assert table.returncode == 0, table.stderr
    rows = {line.split()[0]: line.split() for line in table.stdout.splitlines()[2:]}
    assert rows["sw-0"][1:4] == ["0.003", "finished", f"{STEPS}/{STEPS}"]
    assert rows["sw-1"][1:3] == ["0.002", "finished"] and int(rows["sw-1"][5]) >= 1

    # MLflow: one run per element, grouped by the sweep tag, no step logged twice
    client = MlflowClient(mlflow_server)
    experiment = client.get_experiment_by_name("sweeps")
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    found = client.search_runs([experiment.experiment_id], "tags.sweep = 'sw'")
    by_name = {r.info.run_name: r for r in found}
    assert sorted(by_name) == ["sw-0", "sw-1"]
    for name, lr in (("sw-0", "0.003"), ("sw-1", "0.002")):
        run = by_name[name]
        assert run.info.status == "FINISHED" and run.data.tags["sweep.optim.lr"] == lr
        assert run.data.params["optim.lr"] == lr
        history = sorted(m.step for m in client.get_metric_history(run.info.run_id, "reward_mean"))
        assert history == list(range(1, STEPS + 1))
    assert by_name["sw-1"].data.tags["slurm_restart_count"] != "0"
    compare = _cli("jobs.compare", "--sweep", "sw", "--no-plots", "--format", "csv",
                   env={**env, "GRPO_RUNS_DIR": str(runs_dir)})
    assert compare.returncode == 0, compare.stderr
    assert "sw-0" in compare.stdout and "sw-1" in compare.stdout and "optim.lr" in compare.stdout


WALLTIME_STEPS = 400


def test_walltime_save_without_any_signal(slurm_cluster: LocalSlurm, tmp_path: Path) -> None:
    """--time=2 and no --signal: with a 110 s margin the trainer saves well before the limit,
    requeues itself (scontrol requeue of its own job), and after the limit is raised finishes."""
    from jobs.profiles import load_profile
    from jobs.submit import prepare, write_run_files

    workdir = tmp_path
    root = workdir / "runs"
    overrides = [o for o in TINY if "total_steps" not in o] + [
        f"train.trainer.total_steps={WALLTIME_STEPS}", "train.checkpoint.every=0",
        "train.checkpoint.walltime_margin_s=110", "train.tracking.enabled=false"]
    profile, run = prepare(load_profile("slurm-cpu", overrides), "wt", root)
    run_dir = Path(run.run_dir)
    run_dir.mkdir(parents=True)
    write_run_files(profile, run)
    log = run_dir / "job.log"
    # The job as plain sbatch: the launcher's entry point, no --signal, --requeue so it may come back.
    job = slurm_cluster.sbatch("--time=2", "--requeue", "-c", "1", "-o", str(log), "--open-mode=append",
                               f"--export=ALL,PYTHONPATH={REPO}",
                               "--chdir", str(workdir), "--wrap",
                               f"exec {sys.executable} -u -m jobs.launch {run_dir}")
    deadline = time.monotonic() + RUN_TIMEOUT_S
    while _status(run_dir).get("state") != "preempted":
        assert _status(run_dir).get("state") != "finished", f"finished inside the first 2 minutes\n{_logs([log])}"
        assert slurm_cluster.sacct_state(job) not in ("TIMEOUT", "FAILED", "CANCELLED"), _logs([log])
        assert time.monotonic() < deadline, f"never saved for the time limit\n{_logs([log])}"
        time.sleep(0.2)
    # A user raising the limit of the requeued job; the next run reads its new end.
    slurm_cluster.run("scontrol", "update", f"JobId={job}", "TimeLimit=10")
    while _status(run_dir).get("state") != "finished" or slurm_cluster.squeue_state(job):
        assert time.monotonic() < deadline, f"did not finish\n{_status(run_dir)}\n{_logs([log])}"
        assert slurm_cluster.sacct_state(job) not in ("TIMEOUT", "FAILED", "CANCELLED"), _logs([log])
        time.sleep(0.5)
    text = log.read_text()
    assert "[grpo] the job's time limit is in" in text, text[-3000:]  # squeue's %e or SLURM_JOB_END_TIME
    assert "left before the time limit: not enough for another step and a checkpoint" in text, text[-3000:]
    assert f"requeued job {job}" in text and "[grpo] resuming from" in text, text[-3000:]
    status = _status(run_dir)
    assert status["step"] == WALLTIME_STEPS and status["restarts"] >= 1
    steps = [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, WALLTIME_STEPS + 1))
    assert slurm_cluster.sacct_state(job) == "COMPLETED"
