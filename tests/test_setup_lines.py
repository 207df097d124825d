"""cluster.setup: list overrides keep commas, and a failing setup line stops the
rendered script (run with bash, a stub srun/python in place of the trainer)."""
from __future__ import annotations

import stat
import subprocess
from pathlib import Path

import pytest

from grpo_core.config import ConfigError
from jobs.profiles import load_profile, profile_from_data
from jobs.render import RunSpec, render_sbatch

NCCL = "export NCCL_IB_HCA=mlx5_0,mlx5_1"


@pytest.mark.parametrize("overrides, want", [
    ([f"cluster.setup={NCCL}"], (NCCL,)),  # one item, commas and all
    ([f'cluster.setup=["{NCCL}", "module load cuda/12.4"]'], (NCCL, "module load cuda/12.4")),
    (["cluster.setup=[]"], ()),
    (["cluster.setup="], ()),
    (["cluster.setup=module load a,b", "cluster.setup+=[ -f /x ] && . /x", f"cluster.setup+={NCCL}"],
     ("module load a,b", "[ -f /x ] && . /x", NCCL)),
])
def test_list_overrides_keep_commas(overrides: list[str], want: tuple[str, ...]) -> None:
    assert load_profile("slurm-cpu", overrides).cluster.setup == want


def test_append_extends_the_profile_s_own_lines() -> None:
    data = {"cluster": {"setup": ["module load x"]}, "train": {"model": {"path": "m"}}}
    assert profile_from_data("p", data, [f"cluster.setup+={NCCL}"]).cluster.setup == ("module load x", NCCL)
    data["cluster"]["setup"] = NCCL  # a YAML string is one line, not split at its commas
    assert profile_from_data("p", data).cluster.setup == (NCCL,)


@pytest.mark.parametrize("override, needle", [
    ("cluster.setup=[ -f /x ] && . /x", "cluster.setup+=LINE for one item"),
    ('cluster.setup=["a", ', "is a YAML list"),
    ("cluster.nodes+=2", "'+=' appends to a list key"),
])
def test_bad_list_overrides_are_one_line(override: str, needle: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_profile("slurm-cpu", [override])
    assert needle in str(err.value) and "\n" not in str(err.value)


def _stub(path: Path, out: Path) -> str:
    """srun (Slurm) or the python (local): records that it ran and what $NCCL_IB_HCA was."""
    path.write_text(f"#!/bin/bash\necho ran >> {out}\nprintf '%s\\n' \"$NCCL_IB_HCA\" >> {out}\n")
    path.chmod(path.stat().st_mode | stat.S_IEXEC)
    return str(path)


def _run_script(name: str, setup: list[str], tmp_path: Path) -> tuple[subprocess.CompletedProcess, str]:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    out = tmp_path / "ran.txt"
    stub = _stub(bin_dir / "srun", out)
    quoted = ", ".join('"' + line.replace('"', '\\"') + '"' for line in setup)
    profile = load_profile(name, [f"cluster.setup=[{quoted}]", f"cluster.python={stub}"])
    run = RunSpec(name="s", run_dir=str(tmp_path / "run"), workdir=str(tmp_path))
    script = tmp_path / "job.sh"
    script.write_text(render_sbatch(profile, run))
    done = subprocess.run(["bash", str(script)], cwd=tmp_path, env={"PATH": f"{bin_dir}:/usr/bin:/bin"},
                          capture_output=True, text=True, timeout=30)
    return done, out.read_text() if out.exists() else ""


@pytest.mark.parametrize("name", ("slurm-cpu", "local"))
def test_a_failing_setup_line_stops_the_job_with_a_clear_message(name: str, tmp_path: Path) -> None:
    done, ran = _run_script(name, ["echo first", "test -d /no/such/dir", "echo after"], tmp_path)
    assert done.returncode == 1
    assert "[grpo] cluster.setup line failed (exit 1): test -d /no/such/dir; the job stops" in done.stderr
    assert "first" in done.stdout and "after" not in done.stdout
    assert ran == ""  # the trainer never started


@pytest.mark.parametrize("name", ("slurm-cpu", "local"))
def test_a_failing_pipeline_stops_it_too(name: str, tmp_path: Path) -> None:
    done, ran = _run_script(name, [NCCL, "true | false | cat"], tmp_path)
    assert done.returncode == 1 and "cluster.setup line failed" in done.stderr and ran == ""


@pytest.mark.parametrize("name", ("slurm-cpu", "local"))
def test_setup_with_commas_reaches_the_trainer_and_set_e_ends_with_the_setup(name: str, tmp_path: Path) -> None:
    done, ran = _run_script(name, [NCCL, "echo ok"], tmp_path)
    assert done.returncode == 0, done.stderr
    assert ran == "ran\nmlx5_0,mlx5_1\n"  # one setup line, its comma intact
    script = (tmp_path / "job.sh").read_text()
    assert "set +eE +o pipefail\ntrap - ERR\n" in script  # set -e ends with the setup lines
