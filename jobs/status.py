"""`python -m jobs.status [RUN]`: where runs stand; `--follow` streams one.

State comes from two places: the scheduler (squeue, then sacct once the job
left the queue; the process for `local`) and the trainer's status.json. One
word sums them up: pending, running, requeued, finished, stopped (saved and
exited, e.g. preempted and not requeued), cancelled, failed, unknown (Slurm
did not answer).
"""
from __future__ import annotations

import json
import os
import signal
import sys
import time
from collections import deque
from pathlib import Path
from typing import Any, Sequence

from grpo_core import progress
from grpo_core.cli import ArgumentParser
from grpo_core.exitcodes import EXIT_FAILED, EXIT_INTERRUPTED, EXIT_OK
from jobs import runs, sweep, sweep_cli
from jobs.runs import JobsError, RunView
from grpo_core.rundir import RunFileError

DONE = ("finished", "stopped", "cancelled", "failed")
POLL_S = 2.0


def _fmt_reward(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def _fmt_step(v: RunView) -> str:
    return f"{v.step if v.step is not None else '-'}/{v.total_steps if v.total_steps is not None else '-'}"


def _ckpt(v: RunView) -> str:
    return Path(v.latest_checkpoint).name if v.latest_checkpoint else "-"


def print_table(views: list[RunView]) -> None:
    rows = [("RUN", "STATE", "STEP", "REWARD", "RESTARTS", "CHECKPOINT", "JOB")]
    rows += [(v.name, v.state, _fmt_step(v), _fmt_reward(v.last_reward), str(v.restarts), _ckpt(v),
              f"{v.job_id} {v.job_state}") for v in views]
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip())
    for v in views:
        if v.state == "unreadable":
            print(f"{v.name}: unreadable: {v.error}")


def print_one(v: RunView) -> None:
    print(f"run:          {v.name}")
    print(f"state:        {v.state}")
    print(f"step:         {_fmt_step(v)}" + (f"  (eta {progress.hms(v.eta_s)})" if v.eta_s is not None
                                                and v.state == "running" else ""))
    print(f"last reward:  {_fmt_reward(v.last_reward)}")
    print(f"restarts:     {v.restarts}")
    print(f"checkpoint:   {v.latest_checkpoint or '-'}")
    print(f"job:          {v.job_id} ({v.job_state})")
    print(f"run dir:      {v.run_dir}")
    print(f"log:          {v.log}")
    if v.error:
        print(f"error:        {v.error}")
    print(f"mlflow:       {v.mlflow_uri or '-'}")
    print(f"              {runs.mlflow_hint(v.mlflow_uri, v.mlflow_run_id)}")
    if v.state in ("stopped", "cancelled", "failed"):
        print(f"resume:       python -m jobs.resubmit {v.name}")


# ---------------------------------------------------------------- follow

def _new_metrics(path: Path, offset: int) -> tuple[list[dict[str, Any]], int]:
    """Complete lines appended since `offset` (a half-written last line waits for the next poll)."""
    try:
        with open(path, "rb") as f:
            f.seek(offset)
            chunk = f.read()
    except FileNotFoundError:
        return [], 0
    if len(chunk) == 0 and path.stat().st_size < offset:
        return [], 0  # truncated on resume (steps after the checkpoint dropped): read again
    end = chunk.rfind(b"\n") + 1
    out = []
    for line in chunk[:end].splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict):
            out.append(row)
    return out, offset + end


class _Pace:
    """elapsed/ETA for --follow from the steps' own times (metrics.jsonl has no wall clock)."""

    def __init__(self) -> None:
        self.elapsed, self.recent = 0.0, deque(maxlen=progress.ETA_WINDOW)

    def line(self, row: dict[str, Any], total: Any) -> str:
        seconds = progress.step_seconds(row)
        self.elapsed += seconds
        self.recent.append(seconds)
        step, total = int(row["step"]), int(total) if isinstance(total, int) else int(row["step"])
        return progress.progress_line(step, total, self.elapsed, progress.eta_s(step, total, list(self.recent)), row)


def _new_log_lines(paths: list[Path], offsets: dict[Path, int]) -> list[str]:
    """The trainer's and launcher's own messages (resume, signals, time limit, errors) appended
    since the last poll; progress lines come from metrics.jsonl instead."""
    out = []
    for path in paths:
        lines, offsets[path] = _new_lines(path, offsets.get(path, 0))
        out += [line for line in lines if line.startswith(("[grpo", "error")) and not line.startswith("[grpo] step ")]
    return out


def _new_lines(path: Path, offset: int) -> tuple[list[str], int]:
    try:
        with open(path, "rb") as f:
            f.seek(offset)
            chunk = f.read()
    except FileNotFoundError:
        return [], 0
    end = chunk.rfind(b"\n") + 1
    return chunk[:end].decode(errors="replace").splitlines(), offset + end


def _stop_local(info: dict[str, Any]) -> None:
    pid = int(runs.last_job(info).get("pid", 0))
    if pid:
        try:
            os.killpg(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass


def follow(run_dir: Path, poll_s: float | None = None, out: Any = None) -> int:
    """Print state changes and each finished step until the run ends; 0 if it finished."""
    out = out or sys.stdout
    poll_s = poll_s or POLL_S
    offset, last_state, seen_step, stopping, said_mlflow = 0, "", -1, False, False
    pace, log_offsets = _Pace(), {}
    while True:
        try:
            v = runs.view(run_dir)
            if v.state == "unreadable":
                print(f"error: {v.name}: {v.error}", file=sys.stderr, flush=True)
                return EXIT_FAILED
            log = Path(v.log)
            for line in _new_log_lines([log, log.with_suffix(".err")], log_offsets):
                print(line, file=out, flush=True)
            rows, offset = _new_metrics(run_dir / "metrics.jsonl", offset)
            for row in rows:
                step = row.get("step")
                if isinstance(step, int) and step > seen_step:  # replayed steps after a resume: once
                    seen_step = step
                    print(pace.line(row, v.total_steps), file=out, flush=True)
            if v.mlflow_run_id and not said_mlflow:
                said_mlflow = True
                print(f"mlflow: {runs.mlflow_hint(v.mlflow_uri, v.mlflow_run_id)}", file=out, flush=True)
            state = f"{v.state} (job {v.job_id} {v.job_state})"
            if state != last_state:
                print(f"[{time.strftime('%H:%M:%S')}] {state}", file=out, flush=True)
                last_state = state
            if v.state in DONE and v.job_state not in runs.ACTIVE:  # the job also closes MLflow: let it
                print(f"{v.name}: {v.state} at step {_fmt_step(v)}, checkpoint {v.latest_checkpoint or '-'}",
                      file=out, flush=True)
                if v.error:
                    print(f"error: {v.error}", file=sys.stderr, flush=True)
                if v.state != "finished":
                    print(f"resume: python -m jobs.resubmit {v.name}", file=out, flush=True)
                return EXIT_OK if v.state == "finished" else v.exit_code or EXIT_FAILED
            time.sleep(poll_s)
        except KeyboardInterrupt:
            info = runs.read_json(run_dir / "run.json")
            if info.get("launcher") != "local" or stopping:
                print(f"\nstopped following; the job goes on: python -m jobs.status {run_dir.name}", file=out)
                return EXIT_INTERRUPTED
            stopping = True  # the local trainer: ask it to checkpoint and stop, keep following
            print("\nstopping: the trainer saves a checkpoint first (Ctrl-C again to leave it running)", file=out)
            _stop_local(info)


def main(argv: Sequence[str] | None = None) -> int:
    p = ArgumentParser(prog="python -m jobs.status", description="Show the state of GRPO runs.")
    p.add_argument("run", nargs="?", help="run or sweep name, or run dir (default: all recent runs)")
    p.add_argument("--runs-dir", help=f"where run dirs live (default: ${runs.RUNS_ENV} or ./runs)")
    p.add_argument("--limit", type=int, default=20, help="how many recent runs to list")
    p.add_argument("--follow", action="store_true", help="stream the run's progress until it ends")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    args = p.parse_args(argv)
    if args.limit < 1:
        p.error(f"--limit {args.limit}: must be >= 1")
    if args.follow and args.run is None:
        p.error("--follow needs a RUN (or sweep) to follow")
    try:
        root = runs.runs_root(args.runs_dir)
        swept = sweep.find(args.run, root) if args.run is not None else None
        if swept is not None:  # a sweep: its elements as a table
            if args.follow:
                return sweep_cli.follow_sweep(swept)
            if args.json:
                print(json.dumps([{**v.__dict__, "run_dir": str(v.run_dir)}
                                  for v in map(runs.view, sweep.element_dirs(swept))], indent=2))
            else:
                sweep_cli.print_sweep(swept)
            return 0
        if args.run is not None:  # "" too: not a run, never "all runs"
            run_dir = runs.resolve_run(args.run, root)
            if args.follow:
                return follow(run_dir)
            views = [runs.view(run_dir)]
        else:
            views = [runs.view(d) for d in runs.recent_runs(root, args.limit)]
    except (JobsError, RunFileError, OSError) as exc:
        runs.fail_on(exc)
    if args.json:
        print(json.dumps([{**v.__dict__, "run_dir": str(v.run_dir)} for v in views], indent=2))
    elif args.run is not None:
        print_one(views[0])
    elif views:
        print_table(views)
        for line in sweep_cli.summary_lines(root, args.limit):
            print(line)
    else:
        print(f"no runs under {root}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
