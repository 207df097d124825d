"""jobs.* against a real local Slurm (tests/slurm_harness.py; root, scripts/install_slurm.sh).

- The rendered GPU scripts pass `sbatch --test-only` on a fake-GPU node; bad
  environments (no sbatch, an unreachable controller, a value with shell
  metacharacters) fail with one line and leave nothing behind.
- The slurm-cpu tiny recipe runs to the end through Slurm with real vLLM
  (the one real-vLLM end-to-end Slurm run), and the same run interrupted
  three ways (USR2 warning, `scontrol requeue`, preemption by a job on the
  higher-priority partition) ends with the same final step, bit-identical
  trainable weights, the same metrics steps and one MLflow run without
  duplicate steps; so does one stopped with jobs.cancel and started again
  with jobs.resubmit, and a world-2 run requeued by Slurm. Requeue and resume
  are the job's, the loop's and the checkpoint's business, not vLLM's: those
  runs use the pure-torch engine (tests/fake_engine.py), as tests/test_train_e2e.py's
  SIGKILL test does.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

import pytest

from jobs.profiles import load_profile
from tests.test_injection import hostile_overrides
from tests.slurm_harness import LocalSlurm  # the `slurm_cluster` session fixture comes from conftest.py

pytestmark = pytest.mark.slurm
REPO = Path(__file__).resolve().parent.parent
GPU_PROFILES = ("h100x2", "h800x4")


def _cli(module: str, *args: str, env: dict[str, str], timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", module, *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=timeout)


def _one_line_error(err: str) -> str:
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


def _cpus_needed(name: str) -> int:
    c = load_profile(name).cluster
    return c.nodes * c.tasks_per_node * max(1, c.cpus_per_task)


@pytest.fixture(scope="module")
def gpu_node(slurm_cluster: LocalSlurm) -> Iterator[LocalSlurm]:
    """A fake-GPU node big enough for the GPU profiles' CPU requests.

    The session cluster's node may declare fewer CPUs than a real GPU node
    (it keeps preemption tests cheap); then a second local cluster with a
    GPU-node-sized declaration answers --test-only.
    """
    need = max(_cpus_needed(name) for name in GPU_PROFILES)
    if slurm_cluster.cpus >= need and slurm_cluster.gpus >= 4:
        yield slurm_cluster
        return
    node = LocalSlurm(cpus=max(64, need), gpus=8)
    node.start()
    try:
        yield node
    finally:
        node.stop()


@pytest.mark.parametrize("hostile", [False, True], ids=["plain", "hostile-values"])
@pytest.mark.parametrize("name", GPU_PROFILES)
def test_gpu_scripts_pass_sbatch_test_only(name: str, hostile: bool, gpu_node: LocalSlurm, tmp_path: Path) -> None:
    """hostile-values: every accepted shell payload in every field at once (tests/test_injection.py)."""
    env = gpu_node.full_env()
    extra = hostile_overrides(name, tmp_path / "PWNED") if hostile else []
    dry = _cli("jobs.submit", "--profile", name, "--name", "tt", "--runs-dir", str(tmp_path / "runs"), "--dry-run",
               *extra, env=env)
    assert dry.returncode == 0, dry.stderr
    assert not hostile or f"$(touch {tmp_path / 'PWNED'})" in dry.stdout  # the payloads are in it, as data
    script = tmp_path / f"{name}.sbatch"
    script.write_text(dry.stdout)
    out = gpu_node.run("sbatch", "--test-only", str(script), check=False)
    assert out.returncode == 0 and "to start at" in out.stderr, out.stderr
    assert not (tmp_path / "runs").exists() and not (tmp_path / "PWNED").exists()


def test_shell_metacharacters_reach_slurm_as_data(slurm_cluster: LocalSlurm, tmp_path: Path) -> None:
    """A partition with `;` is refused at submit, before sbatch, naming the key; a comment with `$(...)`
    reaches Slurm verbatim; an env value with commands is exported as data."""
    env, runs_dir = slurm_cluster.full_env(), str(tmp_path / "runs")
    out = _cli("jobs.submit", "--profile", "slurm-cpu", "--name", "evil", "--runs-dir", runs_dir,
               "cluster.partition=cpu; touch pwned", env=env)
    error = _one_line_error(out.stderr)
    assert out.returncode == 2 and "cluster.partition='cpu; touch pwned'" in error and "sbatch cannot take" in error
    assert not (tmp_path / "runs" / "evil").exists()
    # An #SBATCH value cannot hold spaces (refused at submit), so the commands use ${IFS}; the env value may.
    comment = "x;touch${IFS}pwned2;`touch${IFS}pwned3`$(touch${IFS}pwned4)"
    out = _cli("jobs.submit", "--profile", "slurm-cpu", "--name", "held", "--runs-dir", runs_dir,
               f"cluster.sbatch.comment={comment}", "cluster.sbatch.hold=true",
               "cluster.env.X=x; touch pwned5 `touch pwned6` $(touch pwned7)", env=env)
    assert out.returncode == 0, out.stderr
    job_id = re.search(r"job:\s+(\d+) \(Slurm job\)", out.stdout).group(1)  # type: ignore[union-attr]
    assert slurm_cluster.run("squeue", "-h", "-j", job_id, "-o", "%k").stdout.strip() == comment
    status = _cli("jobs.status", "held", "--runs-dir", runs_dir, env=env)
    assert "state:        pending" in status.stdout, status.stdout + status.stderr
    cancel = _cli("jobs.cancel", "held", "--runs-dir", runs_dir, env=env)
    assert cancel.returncode == 0 and f"cancelled run held (job {job_id})" in cancel.stdout, cancel.stderr
    slurm_cluster.wait_state(job_id, "CANCELLED", timeout=30)
    assert "state:        cancelled" in _cli("jobs.status", "held", "--runs-dir", runs_dir, env=env).stdout
    assert not list(REPO.glob("pwned*")) and not list(tmp_path.rglob("pwned*"))


def test_unreachable_controller(slurm_cluster: LocalSlurm, tmp_path: Path) -> None:
    conf = tmp_path / "slurm.conf"
    text = slurm_cluster.conf_path.read_text()
    conf.write_text(re.sub(r"(?m)^SlurmctldPort=\d+$", "SlurmctldPort=1", text))  # nothing listens on port 1
    env = {**slurm_cluster.full_env(), "SLURM_CONF": str(conf)}
    out = _cli("jobs.submit", "--profile", "slurm-cpu", "--name", "down", "--runs-dir", str(tmp_path / "runs"), env=env)
    assert out.returncode == 2
    assert "Unable to contact slurm controller" in _one_line_error(out.stderr)
    assert not (tmp_path / "runs" / "down").exists()


def test_no_sbatch_on_path(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "SLURM_CONF"}
    env["PATH"] = str(tmp_path / "empty")
    out = _cli("jobs.submit", "--profile", "slurm-cpu", "--runs-dir", str(tmp_path / "runs"), env=env)
    assert out.returncode == 2 and "'sbatch' not found on PATH" in _one_line_error(out.stderr)
    assert not (tmp_path / "runs").exists()


# ---------------------------------------------------------------- end to end, through the trainer

# A tiny step takes ~0.15 s on CPU: 40 of them leave the scheduler a few seconds
# to act on a preemption after step 3, while a whole run stays well under a minute.
# One CPU per job, so the straight, USR2, requeue and cancel+resubmit runs
# proceed side by side on the node's 4 CPUs (the real-vLLM run goes alone).
STEPS = 40
TINY = [f"train.trainer.total_steps={STEPS}", "train.checkpoint.every=4", "train.trainer.num_threads=1",
        "cluster.cpus_per_task=1", "train.trainer.prompts_per_step=16", "train.trainer.mini_batch_prompts=16",
        "train.trainer.micro_batch_size=32", "train.rollout.n=8", "train.trainer.val_every=0"]
INTERRUPT_AT = 3
RUN_TIMEOUT_S = 420
REAL_VLLM_RUN = "straight-vllm"
FAKE_ENGINE = ["train.rollout.engine=tests.fake_engine:FakeEngine"]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One workdir for all runs: the tiny model (runs/tiny-model) is built once and shared."""
    return tmp_path_factory.mktemp("e2e")


def _job_env(cluster: LocalSlurm) -> dict[str, str]:
    """sbatch exports the submitter's environment to the job; PYTHONPATH lets every job of ours,
    resubmitted ones too, import tests.fake_engine whatever directory Slurm starts it in."""
    return {**cluster.full_env(), "PYTHONPATH": str(REPO)}


def _start(cluster: LocalSlurm, workdir: Path, name: str, *extra: str) -> tuple[Path, str]:
    # Each run its own runs dir, so each has its own mlflow.db: runs never share a SQLite file.
    engine = [] if name == REAL_VLLM_RUN else FAKE_ENGINE
    out = subprocess.run([sys.executable, "-m", "jobs.submit", "--profile", "slurm-cpu", "--name", name,
                          "--runs-dir", str(workdir / name), "--no-follow", *TINY, *engine, *extra],
                         cwd=workdir, env=_job_env(cluster), capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    job_id = re.search(r"job:\s+(\d+) \(Slurm job\)", out.stdout).group(1)  # type: ignore[union-attr]
    return workdir / name / name, job_id


def _logs(run_dir: Path, lines: int = 25) -> str:
    logs = sorted((run_dir / "slurm").glob("*_log.*"))
    return "\n".join(f"--- {p.name}\n" + "\n".join(p.read_text(errors="replace").splitlines()[-lines:]) for p in logs)


def _status(run_dir: Path) -> dict:
    from jobs.runs import read_status

    return read_status(run_dir)


def _state(run_dir: Path) -> str:
    from jobs.runs import view

    return view(run_dir).state


def _wait_finished(run_dir: Path) -> None:
    """Until the trainer says it ended and its job left the queue (MLflow is closed after status.json)."""
    from jobs.runs import ACTIVE, view

    deadline = time.monotonic() + RUN_TIMEOUT_S
    while (v := view(run_dir)).state not in ("finished", "stopped", "cancelled", "failed") or v.job_state in ACTIVE:
        assert time.monotonic() < deadline, f"timed out; status {_status(run_dir)}\n{_logs(run_dir)}"
        time.sleep(0.3)
    status = _status(run_dir)
    assert v.state == "finished" and status["step"] == STEPS, f"{v}\n{status}\n{_logs(run_dir)}"


def _interrupt(how: str, cluster: LocalSlurm, run_dir: Path, job_id: str) -> None:
    if how == "usr2":  # what submitit's --signal=USR2@lead sends before the time limit
        cluster.run("scancel", "--signal=USR2", job_id)
    elif how == "requeue":
        cluster.run("scontrol", "requeue", job_id)
    elif how == "cancel":  # the user's way: jobs.cancel now, jobs.resubmit once it has stopped
        out = _cli("jobs.cancel", run_dir.name, "--runs-dir", str(run_dir.parent), env=cluster.full_env())
        assert out.returncode == 0, out.stderr
    else:  # a job on `high` that needs every CPU preempts ours (PreemptMode=REQUEUE)
        cluster.sbatch("-p", "high", f"--cpus-per-task={cluster.cpus}", "--time=5", "--output=/dev/null",
                       "--wrap", "sleep 2")


def _run_all(cluster: LocalSlurm, workdir: Path, plan: dict[str, str | None]) -> dict[str, Path]:
    """Start every run of `plan` (name -> how to interrupt it, or None), interrupt each after
    step INTERRUPT_AT (resubmitting the cancelled ones), and wait for all to end."""
    started = {name: _start(cluster, workdir, name) for name in plan}
    todo = {name: how for name, how in plan.items() if how}
    cancelled: set[str] = set()
    deadline = time.monotonic() + RUN_TIMEOUT_S
    while todo or cancelled:
        for name, how in list(todo.items()):
            run_dir, job_id = started[name]
            status = _status(run_dir)
            assert status.get("state") != "finished", f"{name} finished before it could be interrupted"
            if (status.get("step") or 0) >= INTERRUPT_AT:
                _interrupt(how, cluster, run_dir, job_id)
                del todo[name]
                cancelled |= {name} if how == "cancel" else set()
        for name in list(cancelled):
            run_dir = started[name][0]
            if _state(run_dir) == "cancelled":
                out = _cli("jobs.resubmit", name, "--runs-dir", str(run_dir.parent), env=_job_env(cluster))
                assert out.returncode == 0, out.stdout + out.stderr
                cancelled.discard(name)
        assert time.monotonic() < deadline, f"runs stuck: to interrupt {sorted(todo)}, to resubmit {sorted(cancelled)}"
        time.sleep(0.1)
    for run_dir, _ in started.values():
        _wait_finished(run_dir)
    return {name: run_dir for name, (run_dir, _) in started.items()}


@pytest.fixture(scope="module")
def side_by_side(slurm_cluster: LocalSlurm, workdir: Path) -> dict[str, Path]:
    plan = {"straight": None, "int-usr2": "usr2", "int-requeue": "requeue", "int-cancel": "cancel"}
    return _run_all(slurm_cluster, workdir, plan)


def _trainable(run_dir: Path, step: int) -> dict:
    import torch

    return torch.load(run_dir / "checkpoints" / f"step_{step:06d}" / "trainable.pt", map_location="cpu")


def _engine_of(run_dir: Path) -> str:
    import yaml

    return yaml.safe_load((run_dir / "train.yaml").read_text())["rollout"]["engine"]


def _steps(run_dir: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _mlflow_run(run_dir: Path, name: str) -> tuple[list[int], dict[str, str], str]:
    """The one MLflow run of this run name: its reward_mean steps, tags and status."""
    from mlflow.tracking import MlflowClient

    status = _status(run_dir)
    client = MlflowClient(tracking_uri=status["mlflow_tracking_uri"])
    experiment = client.get_experiment_by_name("grpo")
    found = client.search_runs([experiment.experiment_id], filter_string=f"tags.`mlflow.runName` = '{name}'")
    assert [r.info.run_id for r in found] == [status["mlflow_run_id"]], "exactly one MLflow run per run name"
    history = client.get_metric_history(found[0].info.run_id, "reward_mean")
    return sorted(m.step for m in history), found[0].data.tags, found[0].info.status


def test_slurm_cpu_runs_to_the_end_with_vllm(slurm_cluster: LocalSlurm, workdir: Path) -> None:
    straight = _run_all(slurm_cluster, workdir, {REAL_VLLM_RUN: None})[REAL_VLLM_RUN]
    status = _status(straight)
    assert status["state"] == "finished" and status["step"] == status["total_steps"] == STEPS
    assert status["restarts"] == 0 and _steps(straight) == list(range(1, STEPS + 1))
    assert _engine_of(straight) == "vllm"
    steps, tags, mlflow_status = _mlflow_run(straight, REAL_VLLM_RUN)
    assert steps == list(range(1, STEPS + 1)) and mlflow_status == "FINISHED"
    assert tags["slurm_restart_count"] == "0" and tags["slurm_job_id"]


@pytest.mark.parametrize("how", ("usr2", "requeue", "preempt", "cancel"))
def test_interrupted_run_resumes_bit_identically(how: str, slurm_cluster: LocalSlurm, workdir: Path,
                                                 side_by_side: dict[str, Path]) -> None:
    import torch

    name = f"int-{how}"
    if how == "preempt":  # alone: the high-priority job would preempt any run beside it
        side_by_side = {**side_by_side, **_run_all(slurm_cluster, workdir, {name: how})}
    run_dir, straight = side_by_side[name], side_by_side["straight"]
    assert _engine_of(run_dir) == _engine_of(straight) == FAKE_ENGINE[0].partition("=")[2]
    status = _status(run_dir)
    if how == "cancel":  # a second job (resubmit), not a requeue of the first
        assert len(json.loads((run_dir / "run.json").read_text())["jobs"]) == 2
    else:
        assert status["restarts"] >= 1, f"the job was not requeued: {status}\n{_logs(run_dir)}"
    logs = "".join(p.read_text(errors="replace") for p in (run_dir / "slurm").glob("*_log.out"))
    assert "[grpo] resuming from" in logs, f"the requeued job did not resume from a checkpoint\n{_logs(run_dir)}"

    # Same final step, bit-identical trainable weights.
    ours, ref = _trainable(run_dir, STEPS), _trainable(straight, STEPS)
    assert sorted(ours) == sorted(ref)
    assert [k for k in ref if not torch.equal(ours[k], ref[k])] == []
    # Every step exactly once, as in the straight run; every kept checkpoint is complete and loads.
    assert _steps(run_dir) == _steps(straight) == list(range(1, STEPS + 1))
    for ckpt in sorted((run_dir / "checkpoints").iterdir()):
        assert ckpt.name.startswith("step_"), f"leftover {ckpt}"
        torch.load(ckpt / "trainable.pt", map_location="cpu")
        torch.load(ckpt / "state.pt", map_location="cpu", weights_only=False)
    # One MLflow run without duplicate steps, the restart count as a tag.
    steps, tags, mlflow_status = _mlflow_run(run_dir, name)
    assert steps == list(range(1, STEPS + 1)) and mlflow_status == "FINISHED"
    assert tags["slurm_restart_count"] == str(status["restarts"])


# ---------------------------------------------------------------- world size 2 through Slurm

WORLD2 = ("cluster.tasks_per_node=2",)


def test_world_two_through_slurm_requeue_resumes_bit_identically(slurm_cluster: LocalSlurm, workdir: Path) -> None:
    """slurm-cpu with 2 tasks (2 ranks: FSDP2 over gloo, one engine each),
    requeued by Slurm mid-run, ends bit-identical to the same run uninterrupted."""
    import torch

    straight, _ = _start(slurm_cluster, workdir, "w2-straight", *WORLD2)
    run_dir, job_id = _start(slurm_cluster, workdir, "w2-requeue", *WORLD2)
    deadline = time.monotonic() + RUN_TIMEOUT_S
    while (_status(run_dir).get("step") or 0) < INTERRUPT_AT:
        assert _status(run_dir).get("state") != "finished", "finished before it could be interrupted"
        assert time.monotonic() < deadline, f"no progress\n{_logs(run_dir)}"
        time.sleep(0.1)
    slurm_cluster.run("scontrol", "requeue", job_id)
    for rd in (straight, run_dir):
        _wait_finished(rd)
    assert _status(run_dir)["restarts"] >= 1
    ours, ref = _trainable(run_dir, STEPS), _trainable(straight, STEPS)
    assert sorted(ours) == sorted(ref) and len(ref) > 0
    assert [k for k in ref if not torch.equal(ours[k], ref[k])] == []
    assert _steps(run_dir) == _steps(straight) == list(range(1, STEPS + 1))
    logs = "".join(p.read_text(errors="replace") for p in (run_dir / "slurm").glob("*_log.*"))
    assert "resuming from" in logs
