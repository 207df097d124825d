"""`python -m jobs.cancel RUN`: stop a run; `python -m jobs.resubmit RUN` resumes it.

The cancel marker goes into run.json first, so a job that is saving a
checkpoint when SIGTERM arrives does not requeue itself afterwards.
"""
from __future__ import annotations

import os
import signal
from pathlib import Path
from typing import Sequence

from grpo_core.cli import ArgumentParser
from grpo_core import rundir
from jobs import runs, sweep
from grpo_core.rundir import RunFileError
from jobs.runs import JobsError


def cancel(run_dir: Path) -> str:
    """Mark the run cancelled and signal its job; returns what was done."""
    info = runs.read_json(run_dir / "run.json")
    job = runs.last_job(info)
    if not job:
        raise JobsError(f"run {run_dir.name} has no job to cancel")
    try:
        state = runs.job_state(info, run_dir)
    except (ValueError, TypeError, KeyError) as exc:  # a hand-edited or foreign run.json
        raise JobsError(f"{run_dir / 'run.json'}: unreadable job record ({type(exc).__name__}: "
                        f"{runs.one_line(str(exc))}); nothing changed") from None
    if state == "UNKNOWN":
        raise JobsError(f"cannot reach Slurm to ask about job {job['id']}; nothing changed")
    if state not in runs.ACTIVE:
        raise JobsError(f"run {run_dir.name}: job {job['id']} already ended ({state}); nothing to cancel")
    if info.get("launcher") == "slurm":
        runs.require_tool("scancel")
    previous = info.get("cancel_requested")
    rundir.write_json_atomic(run_dir / "run.json", {**info, "cancel_requested": runs.now_iso()})
    try:
        if info.get("launcher") == "local":
            os.killpg(int(job["pid"]), signal.SIGTERM)  # the trainer checkpoints, then exits
        else:
            out = runs._run(["scancel", str(job["id"])])
            if out.returncode != 0:
                raise JobsError(f"scancel {job['id']} failed: {runs.one_line(out.stderr)}")
    except (JobsError, OSError) as exc:
        rundir.write_json_atomic(run_dir / "run.json", {**info, "cancel_requested": previous})  # undo
        raise JobsError(str(exc)) from None
    return f"cancelled run {run_dir.name} (job {job['id']}); resume with: python -m jobs.resubmit {run_dir.name}"


def main(argv: Sequence[str] | None = None) -> int:
    p = ArgumentParser(prog="python -m jobs.cancel", description="Cancel a GRPO run's job.")
    p.add_argument("run", help="run or sweep name, or run dir")
    p.add_argument("--runs-dir", help=f"where run dirs live (default: ${runs.RUNS_ENV} or ./runs)")
    args = p.parse_args(argv)
    try:
        root = runs.runs_root(args.runs_dir)
        swept = sweep.find(args.run, root)
        if swept is not None:
            from jobs import sweep_cli

            print("\n".join(sweep_cli.cancel(swept)))
            return 0
        print(cancel(runs.resolve_run(args.run, root)))
    except (JobsError, RunFileError, OSError) as exc:
        runs.fail_on(exc)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
