"""Profile + run -> the job script, as a pure function.

For Slurm the script is submitit's own: our Jinja template renders only the
setup lines (cd, exports, module loads) and submitit's `_make_sbatch_string`
wraps them with its #SBATCH lines (it owns output, error, open-mode, signal
and array) and its `srun ... python -m submitit.core._submit FOLDER` line.
submit.py hands submitit exactly `submitit_parameters(...)`, and a test checks
that submitit's executor writes byte for byte what `render_sbatch` returns,
so `--dry-run` prints the real text. The local launcher runs the same setup
lines from a small bash script of its own.
"""
from __future__ import annotations

import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jinja2
from submitit.slurm import slurm as submitit_slurm

from grpo_core.strictconf import has_control_chars
from grpo_core.secrecy import secret_in
from jobs.profiles import SLURM_PATH_RE, TEMPLATES_DIR, Profile
from jobs.runs import NAME_RE, JobsError


@dataclass(frozen=True)
class RunSpec:
    """Where a run lives; everything about it that reaches the script besides the profile."""

    name: str
    run_dir: str  # absolute
    workdir: str  # absolute; the job cds here
    python: str = "python3"  # the interpreter's path (or a name on PATH); quoted where rendered

    def __post_init__(self) -> None:
        # The name also lands in a comment line and in #SBATCH --job-name: one plain word.
        if not NAME_RE.match(self.name):
            raise JobsError(f"run name {self.name!r}: use letters, digits, '.', '_' and '-' "
                            "(starting with a letter or digit, at most 128)")
        for what, value in (("run dir", self.run_dir), ("workdir", self.workdir), ("python", self.python)):
            if not value or has_control_chars(value):
                raise JobsError(f"{what} {value!r}: empty or holds control characters (newline, tab, ...)")

    @property
    def slurm_dir(self) -> str:
        return str(Path(self.run_dir) / "slurm")


def _env() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(TEMPLATES_DIR)),
        undefined=jinja2.StrictUndefined,  # a typo in a template fails loudly, not as ""
        keep_trailing_newline=False,
        autoescape=False,
    )
    env.filters["q"] = lambda value: shlex.quote(str(value))
    return env


def python_command(profile: Profile, run: RunSpec) -> str:
    """The interpreter as one shell word: a path is data, never code ($(...) stays text)."""
    return shlex.quote(profile.cluster.python or run.python)


def check_run(profile: Profile, run: RunSpec) -> None:
    """What the template's quoting cannot protect: paths in submitit's #SBATCH lines."""
    if profile.cluster.launcher == "slurm" and not SLURM_PATH_RE.match(run.slurm_dir):
        raise JobsError(f"run dir {run.run_dir!r}: sbatch reads it unquoted (#SBATCH --output=...); "
                        "use a runs folder whose path has only letters, digits and _./+@:,=~-")


def setup_lines(profile: Profile, run: RunSpec) -> list[str]:
    """The template's output, one shell line per item."""
    text = _env().get_template(f"{profile.cluster.template}.sbatch.j2").render(
        profile=profile, cluster=profile.cluster, run=run, env=sorted(profile.cluster.env_map().items())
    )
    return text.strip("\n").split("\n")


def submitit_command(profile: Profile, run: RunSpec) -> str:
    """What SlurmExecutor._submitit_command_str is for the same python and folder."""
    return " ".join([python_command(profile, run), "-u -m submitit.core._submit", shlex.quote(run.slurm_dir)])


def submitit_parameters(profile: Profile, run: RunSpec) -> dict[str, Any]:
    """Keyword arguments for SlurmExecutor.update_parameters."""
    c = profile.cluster
    params: dict[str, Any] = {
        "job_name": run.name,
        "time": c.time_min,
        "nodes": c.nodes,
        "ntasks_per_node": c.tasks_per_node,
        "signal_delay_s": c.signal_lead_s,
        "setup": setup_lines(profile, run),
        # --requeue: Slurm may requeue the job (preemption, scontrol requeue) even
        # where the site default is JobRequeue=0; the trainer resumes either way.
        "additional_parameters": {**c.sbatch_map(), "requeue": True},
        "use_srun": True,  # without srun, Slurm's USR2 would not reach Python
    }
    optional = {"partition": c.partition, "account": c.account, "qos": c.qos, "mem": c.mem,
                "cpus_per_task": c.cpus_per_task, "gpus_per_node": c.gpus_per_node}
    params.update({k: v for k, v in optional.items() if v})
    return params


def partition_note(profile: Profile) -> str | None:
    """What --dry-run says (on stderr) when the script names no partition, so none is a choice seen."""
    if profile.cluster.launcher == "slurm" and not profile.cluster.partition:
        return ("note: no --partition in the script: Slurm picks the cluster's default partition "
                "(set one with cluster.partition=NAME)")
    return None


def render_sbatch(profile: Profile, run: RunSpec) -> str:
    """The exact script that is submitted (Slurm) or run (local)."""
    check_run(profile, run)
    if profile.cluster.launcher == "local":
        text = render_local(profile, run)
    else:
        text = submitit_slurm._make_sbatch_string(
            command=submitit_command(profile, run), folder=run.slurm_dir, **submitit_parameters(profile, run)
        )
    return _no_secrets(text)


def _no_secrets(text: str) -> str:
    found = secret_in(text)
    if found:  # e.g. a path or setup line that spells out a token
        raise JobsError(f"the job script would hold {found}; keep secrets in the environment only")
    return text


def array_parameters(count: int, max_parallel: int) -> dict[str, Any]:
    """What submitit's batch submission adds for `count` jobs: --array=0-(count-1)%max_parallel.

    One job is no array (submitit submits it plainly); 0 = no throttle."""
    if count < 2:
        return {}
    return {"map_count": count, "array_parallelism": max_parallel or count}


def render_array(profile: Profile, run: RunSpec, count: int, max_parallel: int = 0) -> str:
    """The job-array script of a sweep (`run` is the sweep's folder): what
    `executor.batch()` submits for `count` elements, byte for byte."""
    check_run(profile, run)
    return _no_secrets(submitit_slurm._make_sbatch_string(
        command=submitit_command(profile, run), folder=run.slurm_dir, **submitit_parameters(profile, run),
        **array_parameters(count, max_parallel),
    ))


def render_local(profile: Profile, run: RunSpec) -> str:
    setup = "\n".join(setup_lines(profile, run))
    text = _env().get_template("local.sh.j2").render(setup=setup, run=run, python=python_command(profile, run))
    return text.rstrip("\n") + "\n"
