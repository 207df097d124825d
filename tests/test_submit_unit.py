"""submit / status / cancel / resubmit / launch against fake Slurm tools on PATH."""
from __future__ import annotations

import json
import stat
import subprocess
import sys
import time
import types
from pathlib import Path

import pytest

from grpo_core import rundir
from jobs import cancel, launch, profiles, resubmit, runs, status, submit
from jobs.profiles import load_profile

REPO = Path(__file__).resolve().parent.parent

FAKES = {
    "sbatch": """
if [ -f "$FAKE_SLURM/sbatch_error" ]; then cat "$FAKE_SLURM/sbatch_error" >&2; exit 1; fi
n=$(( $(cat "$FAKE_SLURM/next_id" 2>/dev/null || echo 4241) + 1 ))
echo $n > "$FAKE_SLURM/next_id"; cp "$1" "$FAKE_SLURM/script_$n.sh"; echo PENDING > "$FAKE_SLURM/squeue_$n"
echo "Submitted batch job $n"
""",
    "squeue": """
while [ $# -gt 0 ]; do [ "$1" = -j ] && id="$2"; shift; done
if [ -f "$FAKE_SLURM/down" ]; then echo "slurm_load_jobs error: Unable to contact slurm controller (connect failure)" >&2; exit 1; fi
if [ -f "$FAKE_SLURM/squeue_$id" ]; then cat "$FAKE_SLURM/squeue_$id"; exit 0; fi
echo "slurm_load_jobs error: Invalid job id specified" >&2; exit 1
""",
    "sacct": """
while [ $# -gt 0 ]; do [ "$1" = -j ] && id="$2"; shift; done
cat "$FAKE_SLURM/sacct_$id" 2>/dev/null; exit 0
""",
    "scancel": """
echo "$@" >> "$FAKE_SLURM/scancel.log"
rm -f "$FAKE_SLURM/squeue_$1"; echo "CANCELLED by 0" > "$FAKE_SLURM/sacct_$1"
""",
    "scontrol": 'echo "$@" >> "$FAKE_SLURM/scontrol.log"\n',
    "srun": "exit 0\n",
}

# Stands in for the trainer under the local launcher (cluster.python is its path, in place of python).
FAKE_TRAINER = r'''
import json, os, signal, sys, time
run_dir = sys.argv[-1]
steps, delay = int(os.environ.get("FAKE_STEPS", "3")), float(os.environ.get("FAKE_DELAY", "0"))
stop = []
signal.signal(signal.SIGTERM, lambda *a: stop.append(1))
def write(state, step):
    tmp = os.path.join(run_dir, ".status.tmp")
    json.dump({"state": state, "step": step, "total_steps": steps, "last_reward": step / 10,
               "latest_checkpoint": os.path.join(run_dir, "checkpoints", f"step_{step:06d}") if step else None,
               "mlflow_run_id": "abc123", "mlflow_tracking_uri": "sqlite:///x.db", "restarts": 0,
               "updated": "now"}, open(tmp, "w"))
    os.replace(tmp, os.path.join(run_dir, "status.json"))
start = json.load(open(os.path.join(run_dir, "status.json")))["step"] if os.path.exists(os.path.join(run_dir, "status.json")) else 0
print(f"[grpo] fake trainer starts after step {start}", flush=True)
for step in range(start + 1, steps + 1):
    time.sleep(delay)
    with open(os.path.join(run_dir, "metrics.jsonl"), "a") as f:
        f.write(json.dumps({"step": step, "reward_mean": step / 10, "policy_loss": 1.0, "time_step": 2.0,
                            "time_rollout": 1.5, "time_update": 0.25, "tokens_per_s": 640.0}) + "\n")
    write("running", step)
    if stop:
        write("preempted", step); sys.exit(75)
write("finished", steps)
'''


@pytest.fixture
def fake(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> types.SimpleNamespace:
    bin_dir, state = tmp_path / "fakebin", tmp_path / "fakeslurm"
    bin_dir.mkdir()
    state.mkdir()
    for name, body in FAKES.items():
        path = bin_dir / name
        path.write_text("#!/bin/bash\n" + body)
        path.chmod(path.stat().st_mode | stat.S_IEXEC)
    trainer = tmp_path / "fake_trainer.py"  # an interpreter path of its own: cluster.python is one quoted word
    trainer.write_text(f"#!{sys.executable}\n" + FAKE_TRAINER)
    trainer.chmod(trainer.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{bin_dir}:/usr/bin:/bin")
    monkeypatch.setenv("FAKE_SLURM", str(state))
    monkeypatch.delenv(runs.RUNS_ENV, raising=False)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(status, "POLL_S", 0.1)
    return types.SimpleNamespace(bin=bin_dir, state=state, runs=tmp_path / "runs", trainer=trainer, tmp=tmp_path)


def _set_job(fake: types.SimpleNamespace, job_id: str, queued: str | None = None, final: str | None = None) -> None:
    queue = fake.state / f"squeue_{job_id}"
    queue.write_text(queued + "\n") if queued else queue.unlink(missing_ok=True)
    if final:
        (fake.state / f"sacct_{job_id}").write_text(final + "\n")


def _status(run_dir: Path, state: str, step: int, total: int = 30) -> None:
    (run_dir / "status.json").write_text(json.dumps({
        "state": state, "step": step, "total_steps": total, "last_reward": 0.25, "restarts": 1,
        "latest_checkpoint": str(run_dir / "checkpoints" / f"step_{step:06d}"), "mlflow_run_id": "r1",
        "mlflow_tracking_uri": "sqlite:///db"}))


def _submit(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    try:
        code = submit.main(list(args))
    except SystemExit as exc:
        code = int(exc.code or 0)
    out, err = capsys.readouterr()
    return code, out, err


def _one_line_error(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


# ---------------------------------------------------------------- submit

def test_submit_creates_the_run_dir_and_submits_the_dry_run_text(fake, capsys) -> None:
    code, dry, _ = _submit(capsys, "--profile", "slurm-cpu", "--name", "r1", "--dry-run", "train.rollout.n=4")
    assert code == 0 and not fake.runs.exists()  # dry run: nothing created
    code, out, err = _submit(capsys, "--profile", "slurm-cpu", "--name", "r1", "train.rollout.n=4")
    assert code == 0, err
    run_dir = fake.runs / "r1"
    assert f"run:      r1\nrun dir:  {run_dir}\njob:      4242 (Slurm job)" in out
    assert "mlflow:   experiment 'grpo', run 'r1' at sqlite:///" in out and "mlflow ui --backend-store-uri" in out
    submitted = (fake.state / "script_4242.sh").read_text()
    script, _, config = dry.partition("# ---- ")
    assert submitted == script == (run_dir / "job.sbatch").read_text()
    assert "".join(line[2:] + "\n" for line in config.splitlines()[1:]) == (run_dir / "train.yaml").read_text()
    info = json.loads((run_dir / "run.json").read_text())
    assert info["jobs"][0]["id"] == "4242" and info["profile"] == "slurm-cpu" and info["launcher"] == "slurm"
    train = (run_dir / "train.yaml").read_text()
    assert f"run_dir: {run_dir}" in train and "run_name: r1" in train and "n: 4" in train
    assert (run_dir / "profile.yaml").is_file() and (run_dir / "slurm" / "4242_submitted.pkl").is_file()


NO_PARTITION = ("note: no --partition in the script: Slurm picks the cluster's default partition "
                "(set one with cluster.partition=NAME)\n")


@pytest.mark.parametrize("args, note", [
    (["--profile", "slurm-cpu"], True),                         # partition: "" (the cluster's default)
    (["--profile", "h100x2"], True),
    (["--profile", "slurm-cpu", "cluster.partition=gpu"], False),
    (["--profile", "local"], False),                            # no Slurm: no partition to name
])
def test_dry_run_says_when_the_script_names_no_partition(fake, capsys, args: list[str], note: bool) -> None:
    code, out, err = _submit(capsys, *args, "--name", "p", "--dry-run")
    assert code == 0, err
    assert ("#SBATCH --partition=" in out) == (not note and "local" not in args)
    assert err == (NO_PARTITION if note else "")  # stderr: stdout stays the script


def test_submitted_pickle_is_the_launch_callable(fake, capsys) -> None:
    from submitit.core.utils import DelayedSubmission

    assert _submit(capsys, "--profile", "slurm-cpu", "--name", "p")[0] == 0
    delayed = DelayedSubmission.load(fake.runs / "p" / "slurm" / "4242_submitted.pkl")
    assert delayed.function == launch.Launch(str(fake.runs / "p"))
    assert delayed._timeout_countdown == load_profile("slurm-cpu").cluster.max_requeues


@pytest.mark.parametrize("args, needle", [
    (["--profile", "nope"], f"unknown profile 'nope'; known profiles: {', '.join(profiles.list_profiles([profiles.BUILTIN_DIR]))}"),
    (["--profile", "slurm-cpu", "cluster.partitionn=x"], "valid keys under 'cluster'"),
    (["--profile", "slurm-cpu", "train.rollout.n=many"], "train.rollout.n: expected int"),
    (["--profile", "slurm-cpu", "partition=x"], "keys start with 'cluster.' or 'train.'"),
    (["--profile", "slurm-cpu", "--name", "a b"], "run name 'a b'"),
])
def test_bad_input_is_one_line_and_creates_nothing(fake, capsys, args, needle) -> None:
    code, out, err = _submit(capsys, *args)
    assert code == 2 and needle in _one_line_error(err) and not fake.runs.exists()


def test_no_sbatch_on_path(fake, capsys, monkeypatch) -> None:
    monkeypatch.setenv("PATH", str(fake.tmp / "empty"))
    code, _, err = _submit(capsys, "--profile", "slurm-cpu")
    assert code == 2 and "'sbatch' not found on PATH" in _one_line_error(err) and not fake.runs.exists()
    code, out, _ = _submit(capsys, "--profile", "slurm-cpu", "--dry-run")  # rendering needs no Slurm
    assert code == 0 and out.startswith("#!/bin/bash")


def test_unreachable_controller(fake, capsys) -> None:
    (fake.state / "sbatch_error").write_text(
        "sbatch: error: Batch job submission failed: Unable to contact slurm controller (connect failure)\n")
    code, _, err = _submit(capsys, "--profile", "slurm-cpu", "--name", "x")
    line = _one_line_error(err)
    assert code == 2 and "Unable to contact slurm controller (connect failure)" in line
    assert not (fake.runs / "x").exists()


def test_shell_metacharacters_reach_sbatch_quoted(fake, capsys) -> None:
    code, _, err = _submit(capsys, "--profile", "slurm-cpu", "--name", "q",
                           "cluster.env.X=$(touch pwned2)")
    assert code == 0, err
    script = (fake.state / "script_4242.sh").read_text()
    assert "export X='$(touch pwned2)'\n" in script


def test_existing_run_name_is_refused(fake, capsys) -> None:
    assert _submit(capsys, "--profile", "slurm-cpu", "--name", "twice")[0] == 0
    code, _, err = _submit(capsys, "--profile", "slurm-cpu", "--name", "twice")
    assert code == 3 and "python -m jobs.resubmit twice" in _one_line_error(err)


def test_list_profiles_one_line_each(fake, capsys, monkeypatch) -> None:
    mine = fake.tmp / "mine"
    mine.mkdir()
    (mine / "lab.yaml").write_text("description: our lab's cluster\nextends: slurm-cpu\n")
    monkeypatch.setenv("GRPO_PROFILES_DIR", str(mine))
    code, out, _ = _submit(capsys, "--list-profiles")
    rows = [line.split() for line in out.splitlines()[:-1]]
    shipped = list(profiles.list_profiles([profiles.BUILTIN_DIR]))
    assert code == 0 and [row[0] for row in rows] == sorted([*shipped, "lab"]) and "h100x2" in shipped
    assert ["lab", "our", "lab's", "cluster"] in rows


def test_cli_subprocess_unknown_profile_exit_code() -> None:
    out = subprocess.run([sys.executable, "-m", "jobs.submit", "--profile", "nope"], cwd=REPO,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and out.stdout == "" and "known profiles:" in _one_line_error(out.stderr)


# ---------------------------------------------------------------- status

@pytest.mark.parametrize("trainer, sched, cancelled, want", [
    ({}, "PENDING", False, "pending"),
    ({"state": "running"}, "RUNNING", False, "running"),
    ({"state": "preempted"}, "PENDING", False, "requeued"),
    ({"state": "finished"}, "COMPLETED", False, "finished"),
    ({"state": "preempted"}, "COMPLETED", False, "stopped"),
    ({"state": "preempted"}, "ENDED", True, "cancelled"),
    ({"state": "running"}, "CANCELLED", False, "cancelled"),
    ({"state": "running"}, "FAILED", False, "failed"),
    ({}, "FAILED", False, "failed"),
    ({"state": "running"}, "TIMEOUT", False, "failed"),
    ({"state": "running"}, "UNKNOWN", False, "unknown"),
])
def test_derive_state(trainer, sched, cancelled, want) -> None:
    info = {"cancel_requested": "t" if cancelled else None}
    assert runs.derive_state(info, trainer, sched) == want


def test_status_one_run_and_all(fake, capsys) -> None:
    assert _submit(capsys, "--profile", "slurm-cpu", "--name", "a")[0] == 0
    assert _submit(capsys, "--profile", "slurm-cpu", "--name", "b")[0] == 0
    _set_job(fake, "4242", queued="RUNNING")
    _status(fake.runs / "a", "running", 7)
    assert status.main(["a"]) == 0
    out = capsys.readouterr().out
    for needle in ("state:        running", "step:         7/30", "last reward:  0.2500", "restarts:     1",
                   "checkpoint:   " + str(fake.runs / "a" / "checkpoints" / "step_000007"), "job:          4242 (RUNNING)",
                   "run r1; open: mlflow ui --backend-store-uri sqlite:///db"):
        assert needle in out
    assert status.main([]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].split() == ["RUN", "STATE", "STEP", "REWARD", "RESTARTS", "CHECKPOINT", "JOB"]
    assert table[1].split()[:2] == ["b", "pending"] and table[2].split()[:6] == ["a", "running", "7/30", "0.2500", "1", "step_000007"]


def test_status_survives_an_unreachable_controller(fake, capsys) -> None:
    assert _submit(capsys, "--profile", "slurm-cpu", "--name", "a")[0] == 0
    (fake.state / "down").write_text("")
    assert status.main(["a"]) == 0 and "state:        unknown" in capsys.readouterr().out


def test_status_unknown_run(fake, capsys) -> None:
    with pytest.raises(SystemExit):
        status.main(["nope"])
    assert "no run or sweep 'nope'" in _one_line_error(capsys.readouterr().err)


# ---------------------------------------------------------------- cancel / resubmit

def test_cancel_then_resubmit(fake, capsys) -> None:
    assert _submit(capsys, "--profile", "slurm-cpu", "--name", "c")[0] == 0
    run_dir = fake.runs / "c"
    _set_job(fake, "4242", queued="RUNNING")
    assert cancel.main(["c"]) == 0
    assert "cancelled run c (job 4242)" in capsys.readouterr().out
    assert (fake.state / "scancel.log").read_text().split() == ["4242"]
    assert json.loads((run_dir / "run.json").read_text())["cancel_requested"]
    _status(run_dir, "preempted", 4)
    assert runs.view(run_dir).state == "cancelled"
    with pytest.raises(SystemExit):
        cancel.main(["c"])
    assert "already ended" in _one_line_error(capsys.readouterr().err)

    with pytest.raises(SystemExit):
        resubmit.main(["c", "train.rollout.n=2"])
    assert "only cluster.* can change" in _one_line_error(capsys.readouterr().err)
    assert resubmit.main(["c", "cluster.time=0:45:00"]) == 0
    out = capsys.readouterr().out
    assert "job:      4243 (Slurm job)" in out
    info = json.loads((run_dir / "run.json").read_text())
    assert [j["id"] for j in info["jobs"]] == ["4242", "4243"] and info["cancel_requested"] is None
    assert "#SBATCH --time=45\n" in (fake.state / "script_4243.sh").read_text()
    assert "time: 0:45:00" in (run_dir / "profile.yaml").read_text()
    with pytest.raises(SystemExit):  # now pending again: refuse a second job on the same run dir
        resubmit.main(["c"])
    assert "(job 4243 PENDING); cancel it first" in _one_line_error(capsys.readouterr().err)


def test_resubmit_refuses_finished_and_keeps_state_on_failure(fake, capsys) -> None:
    assert _submit(capsys, "--profile", "slurm-cpu", "--name", "f")[0] == 0
    run_dir = fake.runs / "f"
    _set_job(fake, "4242", final="COMPLETED")
    _status(run_dir, "finished", 30)
    with pytest.raises(SystemExit):
        resubmit.main(["f"])
    assert "is finished" in _one_line_error(capsys.readouterr().err)
    _status(run_dir, "preempted", 12)
    before = (run_dir / "run.json").read_text()
    (fake.state / "sbatch_error").write_text("sbatch: error: Batch job submission failed: Invalid partition name specified\n")
    with pytest.raises(SystemExit):
        resubmit.main(["f"])
    assert "Invalid partition name specified" in _one_line_error(capsys.readouterr().err)
    assert (run_dir / "run.json").read_text() == before


# ---------------------------------------------------------------- local launcher

def test_local_profile_runs_here_and_follows(fake, capsys, monkeypatch) -> None:
    code, out, err = _submit(capsys, "--profile", "local", "--name", "l",
                             f"cluster.python={fake.trainer}")
    assert code == 0, out + err + (fake.runs / "l" / "local.log").read_text()
    assert "job:      local-" in out and "l: finished at step 3/3" in out
    # The trainer's progress line, rebuilt from metrics.jsonl: elapsed and ETA from the steps' own times.
    assert ("[grpo] step 2/3 ( 67%) elapsed 0:00:04 eta 0:00:02 | 640 tok/s | reward 0.200 | loss +1.0000 | "
            "slowest rollout 1.50s") in out
    assert "[grpo] fake trainer starts after step 0" in out  # the log's own messages come along
    assert runs.view(fake.runs / "l").state == "finished"


def test_local_cancel_and_resubmit(fake, capsys, monkeypatch) -> None:
    monkeypatch.setenv("FAKE_STEPS", "40")
    monkeypatch.setenv("FAKE_DELAY", "0.1")
    code, _, err = _submit(capsys, "--profile", "local", "--name", "lc", "--no-follow",
                           f"cluster.python={fake.trainer}")
    assert code == 0, err
    run_dir = fake.runs / "lc"
    deadline = time.time() + 20
    while not (run_dir / "status.json").exists() and time.time() < deadline:
        time.sleep(0.05)
    assert cancel.main(["lc"]) == 0
    while runs.view(run_dir).state not in status.DONE and time.time() < deadline:
        time.sleep(0.05)
    v = runs.view(run_dir)
    assert v.state == "cancelled" and 0 < (v.step or 0) < 40
    monkeypatch.setenv("FAKE_DELAY", "0")
    assert resubmit.main(["lc", "--follow"]) == 0
    assert runs.view(run_dir).state == "finished"
    steps = [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 41))


# ---------------------------------------------------------------- the job's callable

def _fake_train_module(monkeypatch, status_: str, signal_name: str | None) -> list:
    calls: list = []

    def train(cfg, preemption=None):
        calls.append(cfg)
        if signal_name:
            preemption.request(signal_name)
        return types.SimpleNamespace(status=status_, step=4, run_dir=Path(cfg.trainer.run_dir), mlflow_run_id=None)

    monkeypatch.setitem(sys.modules, "grpo_core.train", types.SimpleNamespace(train=train))
    return calls


def _run_dir_for_launch(fake, capsys) -> Path:
    assert _submit(capsys, "--profile", "slurm-cpu", "--name", "j")[0] == 0
    return fake.runs / "j"


def test_launch_finished(fake, capsys, monkeypatch) -> None:
    run_dir = _run_dir_for_launch(fake, capsys)
    calls = _fake_train_module(monkeypatch, "finished", None)
    assert launch.Launch(str(run_dir))()["status"] == "finished"
    assert calls[0].trainer.run_dir == str(run_dir) and calls[0].rollout.n == 16


def test_launch_requeues_itself_after_the_usr2_warning(fake, capsys, monkeypatch) -> None:
    run_dir = _run_dir_for_launch(fake, capsys)
    _fake_train_module(monkeypatch, "preempted", "SIGUSR2")
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    monkeypatch.setenv("SLURM_PROCID", "0")
    with pytest.raises(SystemExit) as info:
        launch.Launch(str(run_dir))()
    assert info.value.code == launch.EXIT_PREEMPTED
    assert (fake.state / "scontrol.log").read_text().split() == ["requeue", "4242"]


@pytest.mark.parametrize("signal_name, cancelled, rank", [("SIGTERM", False, "0"), ("SIGUSR2", True, "0"),
                                                          ("SIGUSR2", False, "1")])
def test_launch_leaves_requeue_to_slurm_cancel_and_rank0(fake, capsys, monkeypatch, signal_name, cancelled, rank) -> None:
    run_dir = _run_dir_for_launch(fake, capsys)
    _fake_train_module(monkeypatch, "preempted", signal_name)
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    monkeypatch.setenv("SLURM_PROCID", rank)
    if cancelled:
        info = json.loads((run_dir / "run.json").read_text())
        rundir.write_json_atomic(run_dir / "run.json", {**info, "cancel_requested": "now"})
        assert launch.Launch(str(run_dir))() == {"status": "cancelled"}  # does not even start
    else:
        assert launch.Launch(str(run_dir))()["status"] == "preempted"
    assert not (fake.state / "scontrol.log").exists()


def test_launch_checkpoint_is_a_fresh_copy() -> None:
    job = launch.Launch("/x/run")
    delayed = job.checkpoint()
    assert delayed.function == job and delayed.function is not job and delayed.args == ()


# ---------------------------------------------------------------- faults

def test_one_truncated_run_json_does_not_hide_the_other_runs(fake, capsys) -> None:
    for name in ("good", "torn", "alsogood"):
        assert _submit(capsys, "--profile", "slurm-cpu", "--name", name)[0] == 0
    torn = fake.runs / "torn" / "run.json"
    torn.write_text(torn.read_text()[:40])
    (fake.runs / "alsogood" / "status.json").write_text('{"state": "runn')  # torn too: shown without it
    assert status.main(["--runs-dir", str(fake.runs)]) == 0
    out = capsys.readouterr().out
    rows = {line.split()[0]: line.split()[1] for line in out.splitlines()[1:4]}
    assert rows == {"good": "pending", "torn": "unreadable", "alsogood": "pending"}, out
    assert "torn: unreadable:" in out and "run.json" in out
    assert status.main(["torn", "--runs-dir", str(fake.runs), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)[0]["state"] == "unreadable"


def test_two_submits_of_one_name_at_once(fake) -> None:
    """Real processes racing: exactly one creates the run; the other refuses in one line (exit 3)."""
    env = {**__import__("os").environ}
    for attempt in range(4):
        name = f"race{attempt}"
        procs = [subprocess.Popen([sys.executable, "-m", "jobs.submit", "--profile", "slurm-cpu", "--name", name,
                                   "--runs-dir", str(fake.runs)], cwd=REPO, env=env, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True) for _ in range(2)]
        results = [(p.wait(timeout=120), p.stderr.read()) for p in procs]
        codes = sorted(code for code, _ in results)
        assert codes == [0, 3], results
        loser = next(err for code, err in results if code == 3)
        assert len(loser.strip().splitlines()) == 1 and "exists" in loser and "Traceback" not in loser, loser
        info = json.loads((fake.runs / name / "run.json").read_text())
        assert info["name"] == name and len(info["jobs"]) == 1  # the winner's run, whole
        assert (fake.runs / name / "train.yaml").is_file() and (fake.runs / name / "job.sbatch").is_file()


def test_local_run_with_a_missing_model_says_why_on_stderr(tmp_path) -> None:
    """The real launcher and trainer: the reason reaches the user, not only local.log."""
    env = {k: v for k, v in __import__("os").environ.items() if k != "MLFLOW_TRACKING_URI"}
    out = subprocess.run([sys.executable, "-m", "jobs.submit", "--profile", "local", "--name", "nomodel",
                          "--runs-dir", str(tmp_path / "runs"), "train.model.tiny=false",
                          f"train.model.path={tmp_path / 'missing'}"], cwd=REPO, env=env, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 2, (out.stdout, out.stderr)
    lines = out.stderr.strip().splitlines()
    assert len(lines) <= 3 and "Traceback" not in out.stderr, out.stderr
    assert lines[0] == f"error: model.path={tmp_path / 'missing'} does not exist " \
        "(set model.tiny=true to build a tiny test model there)", out.stderr
    st = subprocess.run([sys.executable, "-m", "jobs.status", "nomodel", "--runs-dir", str(tmp_path / "runs")],
                        cwd=REPO, capture_output=True, text=True, timeout=120)
    assert "state:        failed" in st.stdout and "does not exist" in st.stdout, st.stdout
