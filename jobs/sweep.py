"""Sweeps: `--sweep KEY=V1,V2,...` lists, their cartesian product as one Slurm job array.

    python -m jobs.submit --profile slurm-cpu --sweep optim.lr=1e-5,3e-5 --sweep rollout.n=5,8 [--max-parallel 2]

Each element is a run of its own (runs/<sweep>-<i>: run dir, checkpoints,
MLflow run, resume, jobs.status/cancel/resubmit by run name), so preemption
and resume work per element exactly as for a single run. The sweep itself
is runs/<sweep>/sweep.json (its axes, elements and jobs) beside the array's
script and submitit folder. The `local` launcher runs the elements one
after another (`python -m jobs.sweep run-local`, started by jobs.submit).

Sweep keys are train keys (`optim.lr` or `train.optim.lr`); values are parsed
with the key's declared type by the same code as every override, and every
element is built and validated before anything is written or submitted.
"""
from __future__ import annotations

import datetime as dt
import itertools
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from grpo_core.config import to_dict
from grpo_core import rundir
from jobs import runs
from jobs.profiles import Profile, load_profile, load_resolved
from jobs.runs import JobsError
from jobs.render import RunSpec

SWEEP_FILE = "sweep.json"
TAG = "sweep"  # the MLflow tag every element carries (its value: the sweep's name)


@dataclass(frozen=True)
class Axis:
    key: str  # without the "train." prefix: optim.lr
    values: tuple[str, ...]  # as typed; parsed by the profile loader


@dataclass(frozen=True)
class Element:
    name: str
    values: dict[str, str]  # key -> value text, one per axis
    profile: Profile
    run: RunSpec


PER_RUN_KEYS = ("trainer.run_dir",)  # jobs.submit sets it from --runs-dir and the run's name


def parse_axes(specs: Sequence[str]) -> list[Axis]:
    axes: list[Axis] = []
    for spec in specs:
        key, sep, text = spec.partition("=")
        key = key.strip()
        if not sep or not key:
            raise JobsError(f"--sweep {spec!r}: use KEY=V1,V2,... (e.g. --sweep optim.lr=1e-5,3e-5)")
        if key.startswith("cluster."):
            raise JobsError(f"--sweep {key}: one job array shares its cluster.* settings; sweep train keys")
        key = key.removeprefix("train.")
        if key in PER_RUN_KEYS:
            raise JobsError(f"--sweep {key}: each element's run dir is its own (runs/NAME-i); sweep another key")
        values = tuple(v.strip() for v in text.split(","))
        if not values or any(not v for v in values):
            raise JobsError(f"--sweep {spec!r}: empty value; give values separated by commas")
        if len(set(values)) != len(values):
            raise JobsError(f"--sweep {spec!r}: a value appears twice")
        if key in (a.key for a in axes):
            raise JobsError(f"--sweep {key} given twice; put all its values in one list")
        axes.append(Axis(key, values))
    return axes


def combinations(axes: Sequence[Axis]) -> list[dict[str, str]]:
    return [dict(zip((a.key for a in axes), combo)) for combo in itertools.product(*(a.values for a in axes))]


def default_name(profile: str) -> str:
    return f"{profile}-sweep-{dt.datetime.now().strftime('%Y%m%d-%H%M%S')}"


def element_names(sweep: str, count: int) -> list[str]:
    width = len(str(count - 1))
    return [f"{sweep}-{i:0{width}d}" for i in range(count)]


def build_elements(profile_name: str, overrides: Sequence[str], axes: Sequence[Axis], sweep: str,
                   root: Path) -> list[Element]:
    """Every element's validated profile, bound to its run dir; raises before anything exists."""
    from jobs.submit import prepare

    swept = {f"train.{a.key}" for a in axes}
    both = [o for o in overrides if o.partition("=")[0].strip() in swept]
    if both:
        raise JobsError(f"{both[0].partition('=')[0]} is both swept and set; drop one")
    out: list[Element] = []
    combos = combinations(axes)
    seen: dict[str, dict[str, str]] = {}
    for name, values in zip(element_names(sweep, len(combos)), combos):
        profile = load_profile(profile_name, [*overrides, *(f"train.{k}={v}" for k, v in values.items())])
        key = repr(to_dict(profile.train))
        if key in seen:  # e.g. 1e-5 and 0.00001
            same = " and ".join(" ".join(f"{k}={v}" for k, v in vals.items()) for vals in (seen[key], values))
            raise JobsError(f"sweep values {same} give the same config; drop one")
        seen[key] = values
        bound, run = prepare(profile, name, root)
        out.append(Element(name, values, bound, run))
    return out


def spec(elements: Sequence[Element], root: Path, name: str) -> RunSpec:
    """The sweep's own folder: the array's script and submitit folder (logs: slurm/<array>_<i>_0_log.out)."""
    first = elements[0].run
    return RunSpec(name=name, run_dir=str(root / name), workdir=first.workdir, python=first.python)


def describe_elements(axes: Sequence[Axis], elements: Sequence[Element]) -> str:
    rows = [("ELEMENT", *(a.key for a in axes))] + [(e.name, *e.values.values()) for e in elements]
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)


# ---------------------------------------------------------------- the record

def find(name_or_path: str, root: Path) -> Path | None:
    """A sweep's dir by name under `root` (or a path with a '/'); None when there is none.

    Only what could name a run is looked up (runs.resolve_run then says why
    the rest is not one): an over-long name must not become an OSError."""
    if runs.NAME_RE.match(name_or_path):
        candidates = [root / name_or_path, Path(name_or_path)]
    elif os.sep in name_or_path and not runs.cli_text_bad(name_or_path):
        candidates = [Path(name_or_path).expanduser()]
    else:
        return None
    for candidate in candidates:
        try:
            if (candidate / SWEEP_FILE).is_file():
                return candidate.absolute()
        except OSError:  # e.g. a path component longer than the filesystem allows
            return None
    return None


def read(sweep_dir: Path) -> dict[str, Any]:
    return runs.read_json(sweep_dir / SWEEP_FILE)


def element_dirs(sweep_dir: Path) -> list[Path]:
    info = read(sweep_dir)
    return [sweep_dir.parent / e["name"] for e in info.get("elements", [])]


def recent(root: Path, limit: int = 20) -> list[Path]:
    if not root.is_dir():
        return []
    dirs = [p for p in root.iterdir() if (p / SWEEP_FILE).is_file()]
    return sorted(dirs, key=lambda p: (p / SWEEP_FILE).stat().st_mtime, reverse=True)[:limit]


def add_job(sweep_dir: Path, entry: dict[str, Any]) -> None:
    info = read(sweep_dir)
    rundir.write_json_atomic(sweep_dir / SWEEP_FILE, {**info, "jobs": [*info.get("jobs", []), entry]})


# ---------------------------------------------------------------- starting

def submit_array(profile: Profile, sweep_run: RunSpec, elements: Sequence[tuple[Profile, RunSpec]],
                 max_parallel: int, how: str) -> dict[str, Any]:
    """One Slurm job array for `elements` (one plain job for one); records each element's job."""
    import contextlib
    import io

    import submitit

    from jobs.launch import Launch
    from jobs.render import python_command, render_array, submitit_parameters

    runs.require_tool("sbatch")
    runs.require_tool("srun")
    executor = submitit.SlurmExecutor(folder=sweep_run.slurm_dir, max_num_timeout=profile.cluster.max_requeues,
                                      python=python_command(profile, sweep_run))
    executor.update_parameters(**submitit_parameters(profile, sweep_run), array_parallelism=max_parallel or len(elements))
    stderr = io.StringIO()
    try:
        with contextlib.redirect_stderr(stderr):
            with executor.batch():
                jobs = [executor.submit(Launch(run.run_dir)) for _, run in elements]
    except Exception as exc:  # noqa: BLE001 - submitit wraps sbatch failures in several types
        raise JobsError(f"sbatch failed: {runs.one_line(str(exc) or stderr.getvalue())}") from None
    submitted = Path(jobs[0].paths.submission_file).read_text()
    if submitted != render_array(profile, sweep_run, len(elements), max_parallel):
        print("warning: submitit wrote a different script than --dry-run shows; kept in job.sbatch", file=sys.stderr)
    (Path(sweep_run.run_dir) / "job.sbatch").write_text(submitted)
    stamp, array_id = runs.now_iso(), str(jobs[0].job_id).split("_")[0]
    for job, (_, run) in zip(jobs, elements):
        info = runs.read_json(Path(run.run_dir) / "run.json")
        entry = {"id": str(job.job_id), "submitted": stamp, "how": how, "slurm_dir": sweep_run.slurm_dir,
                 "sweep_job": array_id}
        rundir.write_json_atomic(Path(run.run_dir) / "run.json", {**info, "jobs": [*info.get("jobs", []), entry]})
    entry = {"id": array_id, "submitted": stamp, "how": how,
             "elements": [Path(run.run_dir).name for _, run in elements]}
    add_job(Path(sweep_run.run_dir), entry)
    return entry


def start_local(sweep_run: RunSpec, names: Sequence[str], how: str) -> dict[str, Any]:
    """The local runner: the elements one after another, in the background."""
    import subprocess

    sweep_dir = Path(sweep_run.run_dir)
    # The runner is this code, wherever the job's workdir is.
    here = str(Path(__file__).resolve().parent.parent)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (here, os.environ.get("PYTHONPATH")) if p)}
    with open(sweep_dir / "local.log", "ab") as log:
        proc = subprocess.Popen([sys.executable, "-m", "jobs.sweep", "run-local", str(sweep_dir), how, *names],
                                cwd=sweep_run.workdir, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True, env=env)
    entry = {"id": f"local-{proc.pid}", "pid": proc.pid, "submitted": runs.now_iso(), "how": how, "elements": list(names)}
    add_job(sweep_dir, entry)
    return entry


def run_local(sweep_dir: Path, how: str, names: Sequence[str]) -> int:
    """Each element in turn, as the local launcher runs one run; a cancelled element is skipped."""
    from jobs.launch import EXIT_PREEMPTED
    from jobs.submit import start_job

    for i, name in enumerate(names):
        run_dir = sweep_dir.parent / name
        info = runs.read_json(run_dir / "run.json")
        if info.get("cancel_requested"):
            print(f"[grpo-sweep] {name}: cancelled; skipped", flush=True)
            continue
        profile = load_resolved(run_dir / "profile.yaml")
        run = RunSpec(name=name, run_dir=str(run_dir), workdir=str(info["workdir"]), python=str(info["python"]))
        print(f"[grpo-sweep] {name}: starting", flush=True)
        info = start_job(profile, run, info, how=how)
        # Which sweep job started it: a follower tells this start from an earlier one.
        info["jobs"][-1]["sweep_job"] = f"local-{os.getpid()}"
        rundir.write_json_atomic(run_dir / "run.json", info)
        pid = int(runs.last_job(info)["pid"])
        _, status = os.waitpid(pid, 0)
        code = os.waitstatus_to_exitcode(status)
        print(f"[grpo-sweep] {name}: exit {code}", flush=True)
        if code == EXIT_PREEMPTED:  # stopped by a signal (Ctrl-C, jobs.cancel): the rest waits too
            for rest in names[i + 1:]:
                info = runs.read_json(sweep_dir.parent / rest / "run.json")
                rundir.write_json_atomic(sweep_dir.parent / rest / "run.json", {**info, "cancel_requested": runs.now_iso()})
            print(f"[grpo-sweep] stopped; resume with: python -m jobs.resubmit {sweep_dir.name}", flush=True)
            return code
    return 0


def runner_alive(sweep_dir: Path) -> bool:
    job = runs.last_job(read(sweep_dir))
    return bool(job.get("pid")) and runs.local_alive(int(job["pid"]), sweep_dir)


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) < 3 or args[0] != "run-local":
        print("usage: python -m jobs.sweep run-local SWEEP_DIR HOW ELEMENT... (started by jobs.submit)", file=sys.stderr)
        return 2
    return run_local(Path(args[1]), args[2], args[3:])


if __name__ == "__main__":
    raise SystemExit(main())
