"""Rendering: golden scripts, submitit's own text, quoting, no secrets."""
from __future__ import annotations

import dataclasses
import os
import stat
import subprocess
from pathlib import Path

import jinja2
import pytest
from submitit.slurm import slurm as submitit_slurm

from jobs import render
from jobs.profiles import BUILTIN_DIR, dump_profile, list_profiles, load_profile
from jobs.render import RunSpec, render_sbatch, submitit_parameters

GOLDEN = Path(__file__).parent / "golden"
SHIPPED = tuple(list_profiles([BUILTIN_DIR]))  # a new shipped profile needs its golden file
# Fixed, machine-independent paths: golden files must not depend on where they were made.
RUN = RunSpec(name="example", run_dir="/shared/runs/example", workdir="/shared/grpo", python="python3")


@pytest.mark.parametrize("name", SHIPPED)
def test_golden_scripts(name: str) -> None:
    """UPDATE_GOLDEN=1 rewrites tests/golden/<profile>.sbatch; review the diff."""
    text = render_sbatch(load_profile(name), RUN)
    path = GOLDEN / f"{name}.sbatch"
    if os.environ.get("UPDATE_GOLDEN") == "1":
        path.write_text(text)
    assert path.is_file(), f"missing {path}; run with UPDATE_GOLDEN=1"
    assert text == path.read_text()


@pytest.mark.parametrize("path", sorted(GOLDEN.glob("*.sbatch")), ids=lambda p: p.name)
def test_golden_scripts_are_valid_bash(path: Path) -> None:
    check = subprocess.run(["bash", "-n", str(path)], capture_output=True, text=True, timeout=30)
    assert check.returncode == 0 and not check.stderr, check.stderr


@pytest.mark.parametrize("name", ("slurm-cpu", "h100x2", "h800x4"))
def test_render_is_what_submitit_writes(name: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """The promise behind --dry-run: submitit's executor, given our parameters, writes our text."""
    monkeypatch.setattr(submitit_slurm.SlurmExecutor, "affinity", classmethod(lambda cls: 2))  # no srun needed
    profile = load_profile(name, ["cluster.partition=gpu,debug", "cluster.env.X=$(id)"])
    run = dataclasses.replace(RUN, run_dir=str(tmp_path / "run"))
    executor = submitit_slurm.SlurmExecutor(folder=run.slurm_dir, python=render.python_command(profile, run))
    executor.update_parameters(**submitit_parameters(profile, run))
    submitted = executor._make_submission_file_text(executor._submitit_command_str, "uid")
    assert submitted == render_sbatch(profile, run)


def test_submitit_owns_its_options_and_the_lead_time_is_the_profile_s() -> None:
    text = render_sbatch(load_profile("h800x4"), RUN)
    lead = load_profile("h800x4").cluster.signal_lead_s
    assert f"#SBATCH --signal=USR2@{lead}\n" in text and lead != 90
    assert "#SBATCH --output=/shared/runs/example/slurm/%j_0_log.out\n" in text
    assert "#SBATCH --open-mode=append\n" in text and "#SBATCH --requeue\n" in text
    assert "#SBATCH --time=1440\n" in text and "\nsrun --unbuffered " in text
    assert text.count("#SBATCH --signal") == 1 and "--array" not in text


def test_user_options_travel_through_additional_parameters() -> None:
    p = load_profile("h100x2", ["cluster.sbatch.constraint=h100&ib", "cluster.sbatch.exclusive=true",
                                "cluster.account=lab", "cluster.qos=high"])
    text = render_sbatch(p, RUN)
    assert "#SBATCH --constraint='h100&ib'\n" in text and "#SBATCH --exclusive\n" in text
    assert "#SBATCH --account=lab\n" in text and "#SBATCH --qos=high\n" in text


def _fake_srun(bin_dir: Path, out: Path) -> None:
    bin_dir.mkdir()
    srun = bin_dir / "srun"
    srun.write_text(f"#!/bin/bash\nprintf '%s' \"$X\" > {out}\n")
    srun.chmod(srun.stat().st_mode | stat.S_IEXEC)


@pytest.mark.parametrize("name", ("slurm-cpu", "local"))
def test_shell_metacharacters_are_quoted_never_run(name: str, tmp_path: Path) -> None:
    """Run the rendered script with bash (a stub srun/python): nothing injected executes."""
    evil = "gpu; touch pwned1 `touch pwned2` $(touch pwned3) 'q\" touch pwned4"
    overrides = [f"cluster.env.X={evil}"]
    work = tmp_path / "work"
    work.mkdir()
    out = tmp_path / "x.txt"
    _fake_srun(tmp_path / "bin", out)
    profile = load_profile(name, overrides + [f"cluster.python={tmp_path / 'bin' / 'srun'}"])
    run = RunSpec(name="evil", run_dir=str(tmp_path / ("run; touch pwned7" if name == "local" else "run")), workdir=str(work))
    script = tmp_path / "job.sh"
    script.write_text(render_sbatch(profile, run))
    env = {"PATH": f"{tmp_path / 'bin'}:/usr/bin:/bin"}
    subprocess.run(["bash", str(script)], cwd=tmp_path, env=env, check=True, timeout=30)
    assert out.read_text() == evil  # the value arrived intact
    assert not [p.name for d in (tmp_path, work) for p in d.iterdir() if p.name.startswith("pwned")]


def test_strict_undefined(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    (tmp_path / "bad.sbatch.j2").write_text("echo {{ run.nmae }}\n")
    monkeypatch.setattr(render, "TEMPLATES_DIR", tmp_path)
    profile = load_profile("slurm-cpu")
    profile = dataclasses.replace(profile, cluster=dataclasses.replace(profile.cluster, template="bad"))
    with pytest.raises(jinja2.UndefinedError):
        render_sbatch(profile, RUN)


def test_render_is_pure() -> None:
    profile = load_profile("h100x2")
    assert render_sbatch(profile, RUN) == render_sbatch(profile, RUN)


@pytest.mark.parametrize("name", SHIPPED)
def test_secrets_from_the_environment_stay_out(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("MLFLOW_TRACKING_TOKEN", "HF_TOKEN", "MLFLOW_TRACKING_PASSWORD"):
        monkeypatch.setenv(var, "s3cr3t-value")
    profile = load_profile(name)
    assert "s3cr3t" not in render_sbatch(profile, RUN) + dump_profile(profile)
