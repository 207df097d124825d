"""Sweeps against fake Slurm tools on PATH and the local launcher's fake trainer
(tests/test_submit_unit.py's fixtures); the real-Slurm proof is tests/test_slurm_sweeps.py."""
from __future__ import annotations

import json
import time

import pytest

from grpo_core.rundir import provenance_tags
from jobs import cancel, resubmit, runs, status, sweep
from jobs.render import render_array
from jobs.runs import JobsError
from tests.test_submit_unit import _one_line_error, _set_job, _status, _submit, fake  # noqa: F401 - fixture

GRID = ["--sweep", "optim.lr=1e-5,3e-5", "--sweep", "train.rollout.n=5,8"]


def test_axes_and_their_product() -> None:
    axes = sweep.parse_axes(["optim.lr=1e-5, 3e-5", "train.rollout.n=5,8,16"])
    assert axes == [sweep.Axis("optim.lr", ("1e-5", "3e-5")), sweep.Axis("rollout.n", ("5", "8", "16"))]
    combos = sweep.combinations(axes)
    assert len(combos) == 6 and combos[0] == {"optim.lr": "1e-5", "rollout.n": "5"}
    assert combos[-1] == {"optim.lr": "3e-5", "rollout.n": "16"}
    assert sweep.element_names("s", 3) == ["s-0", "s-1", "s-2"]
    assert sweep.element_names("s", 12)[:2] == ["s-00", "s-01"]
    for bad, says in (("optim.lr", "use KEY=V1,V2"), ("optim.lr=1,,2", "empty value"), ("optim.lr=1,1", "twice"),
                      ("cluster.partition=a,b", "shares its cluster"), ("=1,2", "use KEY=V1,V2")):
        with pytest.raises(JobsError, match=says):
            sweep.parse_axes([bad])
    with pytest.raises(JobsError, match="given twice"):
        sweep.parse_axes(["optim.lr=1", "train.optim.lr=2"])


@pytest.mark.parametrize("args, says", [
    (["--sweep", "optim.lrr=1,2"], "unknown key 'train.optim.lrr'; valid keys under 'train.optim'"),
    (["--sweep", "optim.lr=1e-5,fast"], "train.optim.lr: expected float, got 'fast'"),
    (["--sweep", "rollout.n=8,0"], "rollout.n=0 must be >= 1"),
    (["--sweep", "optim.lr=1e-5,0.00001"], "optim.lr=1e-5 and optim.lr=0.00001 give the same config"),
    (["--sweep", "rollout.n=5,8", "train.rollout.n=3"], "train.rollout.n is both swept and set"),
    (["--sweep", "rollout.n=5,8", "--name", "x"], "a sweep's name is --sweep-name"),
    (["--sweep", "rollout.n=5,8", "--sweep-name", "../up"], "sweep name '../up'"),
    (["--sweep", "rollout.n=5,8", "--max-parallel", "-1"], "--max-parallel -1"),
])
def test_bad_sweeps_are_refused_before_anything_exists(fake, capsys, args, says) -> None:
    code, _, err = _submit(capsys, "--profile", "slurm-cpu", *args)
    assert code == 2 and says in _one_line_error(err)
    assert not fake.runs.exists() and not list(fake.state.glob("script_*"))


def test_dry_run_prints_the_array_script_and_the_elements(fake, capsys) -> None:
    code, out, err = _submit(capsys, "--profile", "slurm-cpu", *GRID, "--sweep-name", "g", "--max-parallel", "3",
                             "--dry-run")
    assert code == 0, err
    assert "#SBATCH --array=0-3%3\n" in out and "#SBATCH --job-name=g\n" in out
    assert "/runs/g/slurm/%A_%a_0_log.out" in out
    assert "# sweep g: 4 elements, as one job array, 3 at once" in out
    assert "# g-3      3e-5      8" in out
    assert not fake.runs.exists() and not list(fake.state.glob("script_*"))
    assert err == "note: no --partition in the script: Slurm picks the cluster's default partition " \
                  "(set one with cluster.partition=NAME)\n"


def test_slurm_sweep_is_one_array_of_runs(fake, capsys) -> None:
    code, out, err = _submit(capsys, "--profile", "slurm-cpu", *GRID, "--sweep-name", "g", "--max-parallel", "2",
                             "train.trainer.total_steps=7")
    assert code == 0, err
    scripts = sorted(fake.state.glob("script_*"))
    assert [p.name for p in scripts] == ["script_4242.sh"]  # one sbatch call
    sweep_dir = fake.runs / "g"
    script = scripts[0].read_text()
    assert "#SBATCH --array=0-3%2\n" in script and (sweep_dir / "job.sbatch").read_text() == script
    record = json.loads((sweep_dir / "sweep.json").read_text())
    assert [e["name"] for e in record["elements"]] == ["g-0", "g-1", "g-2", "g-3"]
    assert record["jobs"][0]["id"] == "4242" and "job:      4242 (Slurm job array)" in out
    for i, name in enumerate(["g-0", "g-1", "g-2", "g-3"]):
        info = json.loads((fake.runs / name / "run.json").read_text())
        assert info["jobs"][0]["id"] == f"4242_{i}" and info["sweep"]["name"] == "g"
        train = (fake.runs / name / "train.yaml").read_text()
        assert f"run_dir: {fake.runs / name}\n" in train and "total_steps: 7\n" in train
        assert runs.view(fake.runs / name).log == str(sweep_dir / "slurm" / f"4242_{i}_0_log.out")
    assert "lr: 3.0e-05\n" in (fake.runs / "g-3" / "train.yaml").read_text()
    assert "n: 8\n" in (fake.runs / "g-3" / "train.yaml").read_text()
    # MLflow tags of an element: the sweep's name and what it varies.
    tags = provenance_tags(fake.runs / "g-1", 0)
    assert tags["sweep"] == "g" and tags["sweep.optim.lr"] == "1e-5" and tags["sweep.rollout.n"] == "8"
    assert "sweep" not in provenance_tags(fake.tmp, 0)
    # A second submit of the same sweep name refuses and leaves the first alone.
    code, _, err = _submit(capsys, "--profile", "slurm-cpu", *GRID, "--sweep-name", "g")
    assert code == 2 and "exists; pick another --sweep-name" in _one_line_error(err)
    assert json.loads((sweep_dir / "sweep.json").read_text()) == record

    # status: the sweep as a table
    _set_job(fake, "4242_0", queued="RUNNING")
    _set_job(fake, "4242_1", queued="PENDING")
    _set_job(fake, "4242_2", final="COMPLETED")
    _set_job(fake, "4242_3", final="FAILED")
    _status(fake.runs / "g-0", "running", 3, total=7)
    _status(fake.runs / "g-2", "finished", 7, total=7)
    _status(fake.runs / "g-3", "preempted", 4, total=7)
    assert status.main(["g"]) == 0
    table = capsys.readouterr().out
    assert "sweep g: profile slurm-cpu, 4 elements" in table
    lines = table.splitlines()
    assert lines[1].split() == ["RUN", "optim.lr", "rollout.n", "STATE", "STEP", "REWARD", "RESTARTS", "CHECKPOINT",
                                "JOB"]
    assert lines[2].split()[:5] == ["g-0", "1e-5", "5", "running", "3/7"]
    assert lines[3].split()[:4] == ["g-1", "1e-5", "8", "pending"]
    assert lines[4].split()[:4] == ["g-2", "3e-5", "5", "finished"] and lines[5].split()[3] == "stopped"
    assert "resume:   python -m jobs.resubmit g" in table
    assert status.main([]) == 0
    assert "sweep g: " in capsys.readouterr().out

    # cancel the sweep: the queued and running elements, by their own job ids
    assert cancel.main(["g"]) == 0
    said = capsys.readouterr().out
    assert "cancelled run g-0 (job 4242_0)" in said and "cancelled run g-1 (job 4242_1)" in said
    assert (fake.state / "scancel.log").read_text().split() == ["4242_0", "4242_1"]
    # resubmit the sweep: the stopped, failed and cancelled elements as one new array; the finished one stays
    assert resubmit.main(["g", "cluster.time_min=20"]) == 0
    said = capsys.readouterr().out
    assert "resubmitted 3 of sweep g as job 4243: g-0, g-1, g-3" in said and "left alone: g-2 (finished)" in said
    again = (fake.state / "script_4243.sh").read_text()
    assert "#SBATCH --array=0-2%2\n" in again and "#SBATCH --time=20\n" in again
    assert [j["id"] for j in json.loads((fake.runs / "g-3" / "run.json").read_text())["jobs"]] == ["4242_3", "4243_2"]
    assert json.loads((fake.runs / "g-0" / "run.json").read_text())["cancel_requested"] is None


def test_array_script_is_what_submitit_submits(fake, capsys) -> None:
    from jobs.profiles import load_profile
    from jobs.submit import prepare

    assert _submit(capsys, "--profile", "slurm-cpu", "--sweep", "rollout.n=5,8", "--sweep-name", "h")[0] == 0
    profile, _ = prepare(load_profile("slurm-cpu", ["train.rollout.n=5"]), "h-0", fake.runs)
    spec = sweep.spec([sweep.Element("h-0", {}, profile, prepare(profile, "h-0", fake.runs)[1])], fake.runs, "h")
    assert (fake.state / "script_4242.sh").read_text() == render_array(profile, spec, 2)


def test_local_sweep_runs_elements_one_after_another(fake, capsys) -> None:
    code, out, err = _submit(capsys, "--profile", "local", "--sweep", "rollout.n=3,4", "--sweep-name", "loc",
                             f"cluster.python={fake.trainer}")
    assert code == 0, out + err + (fake.runs / "loc" / "local.log").read_text()
    assert "--- loc-0" in out and "--- loc-1" in out and out.index("loc-0: finished") < out.index("--- loc-1")
    assert "loc-1: finished at step 3/3" in out
    for name in ("loc-0", "loc-1"):
        assert runs.view(fake.runs / name).state == "finished"
    ends = [json.loads((fake.runs / n / "status.json").read_text()) for n in ("loc-0", "loc-1")]
    assert all(e["state"] == "finished" for e in ends)
    log = (fake.runs / "loc" / "local.log").read_text()
    assert log.index("loc-0: exit 0") < log.index("loc-1: starting")


def test_local_sweep_cancel_skips_the_rest(fake, capsys, monkeypatch) -> None:
    monkeypatch.setenv("FAKE_STEPS", "40")
    monkeypatch.setenv("FAKE_DELAY", "0.1")
    code, _, err = _submit(capsys, "--profile", "local", "--sweep", "rollout.n=3,4", "--sweep-name", "lc",
                           "--no-follow", f"cluster.python={fake.trainer}")
    assert code == 0, err
    deadline = time.time() + 30
    while not (fake.runs / "lc-0" / "status.json").exists() and time.time() < deadline:
        time.sleep(0.05)
    assert cancel.main(["lc"]) == 0
    said = capsys.readouterr().out
    assert "cancelled run lc-0 (job local-" in said and "cancelled run lc-1 (not started)" in said
    while sweep.runner_alive(fake.runs / "lc") and time.time() < deadline:
        time.sleep(0.05)
    assert runs.view(fake.runs / "lc-0").state == "cancelled" and runs.view(fake.runs / "lc-1").state == "cancelled"
    assert not (fake.runs / "lc-1" / "status.json").exists()  # never started
    monkeypatch.setenv("FAKE_DELAY", "0")
    assert resubmit.main(["lc"]) == 0  # local: follows by default
    assert "resubmitted 2 of sweep lc" in capsys.readouterr().out
    assert all(runs.view(fake.runs / n).state == "finished" for n in ("lc-0", "lc-1"))
