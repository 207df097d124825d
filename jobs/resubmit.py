"""`python -m jobs.resubmit RUN [cluster.key=value ...]`: start a run again.

For a stopped, failed or cancelled run: a new job on the same run dir, from
the resolved profile it was submitted with. The trainer resumes from the
newest complete checkpoint, and the MLflow run id stored in it keeps the
same MLflow run. Only cluster.* may change (more time, another partition):
the training recipe of a run is fixed once it started.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

from grpo_core.cli import ArgumentParser
from grpo_core.config import ConfigError
from jobs import runs, sweep
from jobs.profiles import Profile, load_resolved
from jobs.render import RunSpec
from jobs.runs import JobsError
from grpo_core.rundir import RunFileError
from grpo_core import rundir
from jobs.submit import print_started, start_job, write_run_files

RESUMABLE = ("stopped", "failed", "cancelled")


def resubmit(run_dir: Path, overrides: Sequence[str] = ()) -> tuple[Profile, RunSpec, dict]:
    bad = [o for o in overrides if not o.strip().startswith("cluster.")]
    if bad:
        raise JobsError(f"override {bad[0]!r}: only cluster.* can change when resuming a run")
    info = runs.read_json(run_dir / "run.json")
    v = runs.view(run_dir)
    if v.state not in RESUMABLE:
        hint = {"finished": "nothing to resume", "unknown": "Slurm did not answer; try again",
                "unreadable": f"its files are unreadable: {v.error}"}.get(
            v.state, f"cancel it first: python -m jobs.cancel {v.name}")
        raise JobsError(f"run {v.name} is {v.state} (job {v.job_id} {v.job_state}); {hint}")
    profile = load_resolved(run_dir / "profile.yaml", overrides)
    run = RunSpec(name=str(info["name"]), run_dir=str(run_dir), workdir=str(info["workdir"]),
                  python=str(info["python"]))
    if profile.cluster.launcher == "slurm":
        runs.require_tool("sbatch")
        runs.require_tool("srun")
    # Clear the marker before the job can start and read it; put it back if submission fails.
    rundir.write_json_atomic(run_dir / "run.json", {**info, "cancel_requested": None})
    try:
        info = start_job(profile, run, {**info, "cancel_requested": None}, how="resubmit")
    except BaseException:
        rundir.write_json_atomic(run_dir / "run.json", info)
        raise
    if overrides:
        write_run_files(profile, run)  # the job reads only train.yaml, which cluster.* cannot change
    return profile, run, info


def main(argv: Sequence[str] | None = None) -> int:
    p = ArgumentParser(prog="python -m jobs.resubmit", description="Resume a GRPO run from its newest checkpoint.")
    p.add_argument("run", help="run or sweep name, or run dir (a sweep: its stopped, failed and cancelled elements)")
    p.add_argument("overrides", nargs="*", metavar="cluster.KEY=VALUE", help="e.g. cluster.time=10:00:00")
    p.add_argument("--runs-dir", help=f"where run dirs live (default: ${runs.RUNS_ENV} or ./runs)")
    p.add_argument("--follow", dest="follow", action="store_true", default=None,
                   help="stream progress until the job ends (default for local runs)")
    p.add_argument("--no-follow", dest="follow", action="store_false")
    args = p.parse_args(argv)
    try:
        root = runs.runs_root(args.runs_dir)
        swept = sweep.find(args.run, root)
        if swept is not None:
            from jobs import sweep_cli

            print("\n".join(sweep_cli.resubmit(swept, args.overrides)))
            follow = args.follow if args.follow is not None else sweep.read(swept).get("launcher") == "local"
            return sweep_cli.follow_sweep(swept) if follow else 0
        run_dir = runs.resolve_run(args.run, root)
        profile, run, info = resubmit(run_dir, args.overrides)
    except (JobsError, RunFileError, ConfigError, OSError) as exc:
        runs.fail_on(exc)
    print_started(profile, run, info)
    follow = args.follow if args.follow is not None else info.get("launcher") == "local"
    if follow:
        from jobs.status import follow as follow_run

        return follow_run(run_dir)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
