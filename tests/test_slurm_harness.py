"""The local Slurm of tests/slurm_harness.py is a real cluster: jobs run, sacct
accounts for them, requeue and partition preemption work, fake GPUs schedule,
and submitit works against it (including noticing a job that died).

Needs root and the packages of scripts/install_slurm.sh; the `slurm_cluster`
session fixture comes from tests/conftest.py and FAILS (never skips) without
them.
"""
from __future__ import annotations

import concurrent.futures
import os
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.slurm_harness import LocalSlurm

pytestmark = pytest.mark.slurm


@pytest.fixture(autouse=True)
def _no_leftover_jobs(slurm_cluster: LocalSlurm):
    """Each test starts and ends with an empty queue (preemption needs a free node)."""
    slurm_cluster.cancel_all(wait=30)
    yield
    slurm_cluster.cancel_all(wait=30)


def _script(path: Path, body: str) -> Path:
    path.write_text("#!/bin/bash\n" + body)
    path.chmod(path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return path


def _wait_for(what: str, cond, timeout: float, cluster: LocalSlurm | None = None):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = cond()
        if value:
            return value
        time.sleep(0.25)
    extra = ""
    if cluster is not None:
        extra = "\n" + cluster.run("squeue", "-a", "-o", "%i %P %T %r %C", check=False).stdout
    raise AssertionError(f"timed out after {timeout}s waiting for {what}{extra}")


def _read(path: Path) -> str:
    try:
        return path.read_text()
    except OSError:
        return ""


def test_harness_env_and_logs(slurm_cluster: LocalSlurm) -> None:
    assert os.environ["SLURM_CONF"] == str(slurm_cluster.conf_path)
    assert slurm_cluster.env() == {"SLURM_CONF": str(slurm_cluster.conf_path)}
    assert slurm_cluster.conf_path.is_file()
    assert all(p.is_file() for p in slurm_cluster.log_paths.values()), slurm_cluster.log_paths
    nodes = slurm_cluster.run("sinfo", "-h", "-o", "%P %T %c %G").stdout.split("\n")
    assert any(line.startswith("cpu* idle 4 gpu:4") for line in nodes), nodes
    assert any(line.startswith("high idle 4 gpu:4") for line in nodes), nodes
    # the client tools find the cluster through os.environ alone
    out = subprocess.run(["scontrol", "show", "config"], capture_output=True, text=True, check=True).stdout
    conf = {k.strip(): v.strip() for k, _, v in (ln.partition("=") for ln in out.splitlines()) if _}
    assert conf["ClusterName"] == slurm_cluster.cluster_name
    assert conf["PreemptType"] == "preempt/partition_prio" and conf["JobRequeue"] == "1"


def test_plain_job_runs_and_sacct_says_completed(slurm_cluster: LocalSlurm, tmp_path: Path) -> None:
    out = tmp_path / "out.txt"
    job = slurm_cluster.sbatch("-o", str(out), "--gres=gpu:2", "--wrap",
                               'echo "hello from $SLURM_JOB_ID on $SLURM_JOB_PARTITION gpus=$CUDA_VISIBLE_DEVICES"')
    assert slurm_cluster.wait_state(job, "COMPLETED", timeout=60) == "COMPLETED"
    assert out.read_text().strip() == f"hello from {job} on cpu gpus=0,1"
    rows = slurm_cluster.run("sacct", "-n", "-P", "-j", job, "-o", "JobID,State,ExitCode").stdout.split()
    assert f"{job}|COMPLETED|0:0" in rows and f"{job}.batch|COMPLETED|0:0" in rows, rows


def test_scancel_is_reported_cancelled(slurm_cluster: LocalSlurm, tmp_path: Path) -> None:
    job = slurm_cluster.sbatch("-o", str(tmp_path / "out.txt"), "--wrap", "sleep 300")
    slurm_cluster.wait_state(job, "RUNNING", timeout=60)
    slurm_cluster.run("scancel", job)
    assert slurm_cluster.wait_state(job, "CANCELLED", timeout=60) == "CANCELLED"


def test_scontrol_requeue_runs_the_job_again(slurm_cluster: LocalSlurm, tmp_path: Path) -> None:
    log = tmp_path / "runs.log"
    script = _script(tmp_path / "job.sh", f"""
echo "run SLURM_RESTART_COUNT=${{SLURM_RESTART_COUNT:-unset}} $(date +%s.%N)" >> {log}
trap 'echo "signal TERM $(date +%s.%N)" >> {log}; exit 0' TERM
[ -n "$SLURM_RESTART_COUNT" ] && exit 0
for i in $(seq 1 1500); do sleep 0.2; done
""")
    job = slurm_cluster.sbatch("-o", str(tmp_path / "out.txt"), str(script))
    _wait_for("first run", lambda: "run" in _read(log), 60, slurm_cluster)
    t0 = time.monotonic()
    slurm_cluster.run("scontrol", "requeue", job)
    _wait_for("second run", lambda: "SLURM_RESTART_COUNT=1" in _read(log), 60, slurm_cluster)
    delay = time.monotonic() - t0
    lines = _read(log).splitlines()
    print(f"requeue -> rerun after {delay:.1f}s; job saw: {lines}")
    assert lines[0].startswith("run SLURM_RESTART_COUNT=unset")
    assert lines[1].startswith("signal TERM")  # scontrol requeue TERMs the batch shell first
    assert lines[2].startswith("run SLURM_RESTART_COUNT=1")
    # cred_expire (10 s) bounds the wait; with the default 120 s this would take minutes
    assert delay < slurm_cluster.cred_expire + 15
    assert slurm_cluster.wait_state(job, "COMPLETED", timeout=60) == "COMPLETED"


def test_high_partition_preempts_cpu_jobs(slurm_cluster: LocalSlurm, tmp_path: Path) -> None:
    """A `high` job needing the whole node preempts the `cpu` jobs (GraceTime, then requeue).

    Three `cpu` jobs, one CPU each, trap every signal into a file:
      batch  -- --signal=B:USR2@600, the trap in the batch shell requeues itself
      srun   -- a task under srun, no --signal, requeues itself on the signal
      plain  -- a task under srun that just exits on the signal (no self-requeue)
    """
    cl = slurm_cluster
    trap_all = 'rec() { echo "sig $1 $(date +%s.%N)" >> $LOG; }\nfor s in TERM USR1 USR2 INT HUP CONT; do trap "rec $s; on_$s" $s; done'

    def body(name: str, handler: str) -> str:
        # on_<SIG> functions: CONT just records, the others run `handler`
        return f"""
LOG={tmp_path}/{name}.log
echo "start restart=${{SLURM_RESTART_COUNT:-0}} $(date +%s.%N)" >> $LOG
[ "${{SLURM_RESTART_COUNT:-0}}" != 0 ] && exit 0
on_CONT() {{ :; }}
handle() {{ {handler}; }}
on_TERM() {{ handle; }}; on_USR1() {{ handle; }}; on_USR2() {{ handle; }}; on_INT() {{ handle; }}; on_HUP() {{ handle; }}
{trap_all}
for i in $(seq 1 3000); do sleep 0.2; done
"""
    requeue_self = ('scontrol requeue "$SLURM_JOB_ID" >> $LOG 2>&1; echo "requeue rc=$?" >> $LOG; exit 0')
    batch = _script(tmp_path / "batch.sh", body("batch", requeue_self))
    task_requeue = _script(tmp_path / "task_requeue.sh", body("srun", requeue_self))
    task_plain = _script(tmp_path / "task_plain.sh", body("plain", "exit 0"))
    wrapper = _script(tmp_path / "wrap.sh", 'srun "$TASK"; echo "srun rc=$?"\n')

    common = ("-p", "cpu", "-c", "1", "-o", str(tmp_path / "%j.out"))
    env = cl.full_env()

    def sbatch_task(task: Path) -> str:
        return subprocess.run(["sbatch", "--parsable", *common, str(wrapper)], env={**env, "TASK": str(task)},
                              capture_output=True, text=True, check=True).stdout.strip()

    jobs = {"batch": cl.sbatch(*common, "--signal=B:USR2@600", str(batch)),
            "srun": sbatch_task(task_requeue),
            "plain": sbatch_task(task_plain)}
    logs = {name: tmp_path / f"{name}.log" for name in jobs}
    _wait_for("cpu jobs started", lambda: all("start" in _read(p) for p in logs.values()), 60, cl)

    high_out = tmp_path / "high.out"
    t0 = time.time()
    high = cl.sbatch("-p", "high", f"--cpus-per-task={cl.cpus}", "-o", str(high_out), "--wrap",
                     'echo "high ran $(date +%s.%N)"')
    assert cl.wait_state(high, "COMPLETED", timeout=60) == "COMPLETED"
    high_at = float(high_out.read_text().split()[-1])
    _wait_for("requeued cpu jobs rerun",
              lambda: all("start restart=1" in _read(logs[n]) for n in ("batch", "srun")), 60, cl)

    seen = {name: [ln for ln in _read(p).splitlines() if ln.startswith("sig ")] for name, p in logs.items()}
    print(f"high job ran {high_at - t0:.1f}s after submission")
    for name, path in logs.items():
        print(f"--- {name} (job {jobs[name]}):\n{_read(path)}")
    # What Slurm 22.05 delivers at preemption with GraceTime=60 and preempt_send_user_signal:
    assert [s.split()[1] for s in seen["batch"]][:1] == ["USR2"]  # the --signal=B: signal, to the batch shell
    assert "TERM" not in [s.split()[1] for s in seen["batch"]]
    assert [s.split()[1] for s in seen["srun"]][:1] == ["TERM"]  # step tasks: SIGTERM (+SIGCONT)
    assert [s.split()[1] for s in seen["plain"]][:1] == ["TERM"]
    for name in jobs:  # promptly, not at the end of GraceTime
        assert float(seen[name][0].split()[2]) - t0 < 10, seen
    assert high_at - t0 < 20  # the high job did not wait for GraceTime to run out
    # the self-requeued jobs ran again, after the high job
    for name in ("batch", "srun"):
        rerun = [ln for ln in _read(logs[name]).splitlines() if ln.startswith("start restart=1")]
        assert len(rerun) == 1 and float(rerun[0].split()[2]) > high_at
        assert cl.wait_state(jobs[name], "COMPLETED", timeout=30) == "COMPLETED"
    # a preempted job that exits during GraceTime is NOT requeued by Slurm: it simply ended
    assert "start restart=1" not in _read(logs["plain"])
    assert cl.wait_state(jobs["plain"], ("COMPLETED", "FAILED"), timeout=30)
    history = cl.run("sacct", "-n", "-P", "-X", "-D", "-j", jobs["batch"], "-o", "JobID,State").stdout.split()
    assert history[0] == f"{jobs['batch']}|REQUEUED", history


def test_fake_gpus_pass_sbatch_test_only(slurm_cluster: LocalSlurm) -> None:
    for args in (("--gres=gpu:2", "--partition=cpu"), ("--gres=gpu:4", "--partition=high"),
                 ("--gpus-per-node=4", "--partition=cpu", f"--cpus-per-task={slurm_cluster.cpus}")):
        cp = slurm_cluster.run("sbatch", "--test-only", *args, "--wrap", "true", check=False)
        assert cp.returncode == 0 and "to start at" in cp.stderr, (args, cp.stderr)
    cp = slurm_cluster.run("sbatch", "--test-only", "--gres=gpu:5", "--wrap", "true", check=False)
    assert cp.returncode != 0, cp.stderr


def test_submitit_returns_the_result(slurm_cluster: LocalSlurm, tmp_path: Path) -> None:
    import submitit

    def job_info(x: int) -> tuple[int, str, str]:
        import os as _os
        import sys as _sys
        return x * 2, _sys.executable, _os.environ["SLURM_JOB_PARTITION"]

    ex = submitit.AutoExecutor(folder=tmp_path / "submitit", cluster="slurm")
    ex.update_parameters(slurm_partition="cpu", timeout_min=5, cpus_per_task=1)
    job = ex.submit(job_info, 21)
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        result = pool.submit(job.result).result(timeout=120)
    assert result == (42, sys.executable, "cpu")
    assert slurm_cluster.wait_state(job.job_id, "COMPLETED", timeout=30) == "COMPLETED"


def test_submitit_notices_a_job_that_died_without_a_result(slurm_cluster: LocalSlurm, tmp_path: Path) -> None:
    """Needs accounting: submitit asks sacct; without it job.result() would wait forever."""
    import submitit
    from submitit.core.utils import UncompletedJobError

    def die() -> None:
        import os as _os
        import signal as _signal
        _os.kill(_os.getpid(), _signal.SIGKILL)

    def sleep_long() -> None:
        import time as _time
        _time.sleep(600)

    ex = submitit.AutoExecutor(folder=tmp_path / "submitit", cluster="slurm")
    ex.update_parameters(slurm_partition="cpu", timeout_min=5, cpus_per_task=1)
    killed_itself = ex.submit(die)
    cancelled = ex.submit(sleep_long)
    slurm_cluster.wait_state(cancelled.job_id, "RUNNING", timeout=60)
    slurm_cluster.run("scancel", cancelled.job_id)

    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        t0 = time.monotonic()
        futures = {name: pool.submit(job.result) for name, job in
                   (("killed", killed_itself), ("cancelled", cancelled))}
        for name, fut in futures.items():
            try:
                fut.result(timeout=90)
            except UncompletedJobError as e:
                print(f"{name}: raised after {time.monotonic() - t0:.1f}s: {str(e).splitlines()[0]}")
            except concurrent.futures.TimeoutError:
                pytest.fail(f"submitit's job.result() hung on the {name} job")
            else:
                pytest.fail(f"the {name} job returned a result")
    assert slurm_cluster.sacct_state(killed_itself.job_id) == "FAILED"
    assert slurm_cluster.sacct_state(cancelled.job_id) == "CANCELLED"


def test_second_cluster_runs_alongside(slurm_cluster: LocalSlurm, tmp_path: Path) -> None:
    """Fresh ports and dirs: a second instance starts, runs a job and stops by PID, leaving the first alone."""
    other = LocalSlurm(cpus=2, gpus=0, cluster_name="second")
    other.start()
    try:
        assert other.conf_path != slurm_cluster.conf_path
        out = tmp_path / "o.txt"
        job = other.sbatch("-o", str(out), "--wrap", "echo second")
        assert other.wait_state(job, "COMPLETED", timeout=60) == "COMPLETED"
        assert out.read_text().strip() == "second"
        pids = list(other.pids.values())
    finally:
        other.stop()
    assert not other.root.exists()
    for pid in pids:
        assert not Path(f"/proc/{pid}").exists() or "zombie" in _read(Path(f"/proc/{pid}/status")).lower()
    assert slurm_cluster.run("sinfo", "-h", "-o", "%T").stdout.split()[0] == "idle"
