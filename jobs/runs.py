"""Run directories and the scheduler facts jobs.status/resubmit/cancel read.

A run dir is keyed by run name (runs/<name>), not by job id: every job of a
run (first submission, requeues, resubmissions) writes into it. jobs.* own
run.json (job ids, submission times, a cancel marker); the trainer owns
status.json, metrics.jsonl and checkpoints/ (docs/CONTRACTS.md).
"""
from __future__ import annotations

import datetime as dt
import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn, Sequence

from grpo_core import cli
from grpo_core.exitcodes import EXIT_BAD_INPUT, EXIT_ENVIRONMENT
from grpo_core.rundir import read_json

RUNS_ENV = "GRPO_RUNS_DIR"
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
ACTIVE = {"PENDING", "RUNNING", "REQUEUED", "REQUEUE_FED", "REQUEUE_HOLD", "CONFIGURING", "COMPLETING",
          "SUSPENDED", "RESIZING", "SIGNALING", "STAGE_OUT", "STOPPED", "RESV_DEL_HOLD"}
FAILED = {"FAILED", "NODE_FAIL", "OUT_OF_MEMORY", "TIMEOUT", "BOOT_FAIL", "DEADLINE"}


class JobsError(Exception):
    """A user-facing problem; the CLIs print its one-line message and exit with `code`."""

    def __init__(self, message: str, code: int = EXIT_BAD_INPUT) -> None:
        super().__init__(message)
        self.code = code


def fail(message: str, code: int = EXIT_BAD_INPUT) -> NoReturn:
    cli.fail(message, code)


def fail_on(exc: BaseException) -> NoReturn:
    """The one line for an error an entry point expects (bad input, a full disk, ...)."""
    if isinstance(exc, OSError):
        where = f" {exc.filename}" if getattr(exc, "filename", None) else ""
        fail(f"cannot write or read{where}: {exc.strerror or exc}", EXIT_ENVIRONMENT)
    fail(str(exc), getattr(exc, "code", EXIT_BAD_INPUT))


def now_iso() -> str:
    return dt.datetime.now(dt.timezone.utc).astimezone().isoformat(timespec="seconds")


def runs_root(explicit: str | None = None) -> Path:
    """--runs-dir, else $GRPO_RUNS_DIR, else ./runs; never a file (that is bad input, not a disk fault)."""
    from grpo_core.rundir import unusable_run_dir

    root = Path(explicit or os.environ.get(RUNS_ENV) or "runs").expanduser().absolute()
    why = unusable_run_dir(root)
    if why:
        raise JobsError(f"runs dir {root} {why}")
    return root


def resolve_run(name_or_path: str, root: Path) -> Path:
    """A run name under `root`, or a path (with a '/') to a run dir; never a name that leaves `root`."""
    if NAME_RE.match(name_or_path) and (root / name_or_path / "run.json").is_file():
        return (root / name_or_path).absolute()
    if os.sep in name_or_path and not cli_text_bad(name_or_path):
        candidate = Path(name_or_path).expanduser()
        try:
            if (candidate / "run.json").is_file():
                return candidate.absolute()
        except OSError:  # e.g. a component longer than the filesystem allows
            pass
        raise JobsError(f"{name_or_path[:200]}: not a run dir (no run.json there)")
    if not NAME_RE.match(name_or_path):
        raise JobsError(f"run {name_or_path[:200]!r}: not a run name (letters, digits, '.', '_', '-'; "
                        "at most 128) nor a path to a run dir")
    from jobs import sweep  # it imports this module

    known = ", ".join(p.name for p in recent_runs(root, limit=8)) or "(none)"
    sweeps = ", ".join(p.name for p in sweep.recent(root, limit=8))
    raise JobsError(f"no run or sweep '{name_or_path}' under {root}; recent runs: {known}"
                    + (f"; sweeps: {sweeps}" if sweeps else ""))


def cli_text_bad(text: str) -> bool:
    from grpo_core.strictconf import has_control_chars

    return not text or has_control_chars(text)


def recent_runs(root: Path, limit: int = 20) -> list[Path]:
    if not root.is_dir():
        return []
    def mtime(p: Path) -> float:
        try:
            return (p / "run.json").stat().st_mtime
        except OSError:
            return 0.0  # removed while listing

    dirs = [p for p in root.iterdir() if (p / "run.json").is_file()]
    return sorted(dirs, key=mtime, reverse=True)[:limit]


def read_status(run_dir: Path) -> dict[str, Any]:
    """The trainer's status.json, or {} before the trainer first writes it or if it is not the trainer's."""
    return read_json(run_dir / "status.json", strict=False)


def last_job(info: dict[str, Any]) -> dict[str, Any]:
    jobs = info.get("jobs") or []
    return jobs[-1] if jobs else {}


# ---------------------------------------------------------------- scheduler

def _run(cmd: Sequence[str], timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(cmd), capture_output=True, text=True, timeout=timeout, check=False)


def one_line(text: str) -> str:
    """The most telling line of a Slurm tool's stderr."""
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    errors = [line for line in lines if "error" in line.lower()]
    return (errors or lines or ["(no message)"])[-1]


def require_tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        raise JobsError(f"'{name}' not found on PATH: run this on a Slurm login node "
                        "(or use --profile local to train on this machine)")
    return path


def slurm_state(job_id: str) -> str:
    """RUNNING, PENDING, ... while queued; the final sacct state after; UNKNOWN if Slurm cannot say."""
    if shutil.which("squeue") is None:
        return "UNKNOWN"
    try:
        out = _run(["squeue", "-h", "-j", job_id, "-o", "%T"])
    except (OSError, subprocess.TimeoutExpired):
        return "UNKNOWN"
    if out.returncode == 0 and out.stdout.strip():
        return out.stdout.split()[0]
    if out.returncode != 0 and "invalid job id" not in out.stderr.lower():
        return "UNKNOWN"  # the controller did not answer
    if shutil.which("sacct") is None:
        return "ENDED"
    try:
        acct = _run(["sacct", "-n", "-X", "-P", "-j", job_id, "-o", "State"])
    except (OSError, subprocess.TimeoutExpired):
        return "ENDED"
    states = [line.split()[0] for line in acct.stdout.splitlines() if line.strip()]
    return states[-1] if acct.returncode == 0 and states else "ENDED"


def local_alive(pid: int, run_dir: Path) -> bool:
    """The local launcher's process is alive and still ours (pids get reused)."""
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, PermissionError):
        return False
    proc = Path(f"/proc/{pid}")
    if not proc.is_dir():
        return True  # no procfs: trust the signal probe
    try:
        if proc.joinpath("stat").read_text().rsplit(")", 1)[1].split()[0] in ("Z", "X"):
            return False  # exited, not yet reaped by its parent
        cmdline = proc.joinpath("cmdline").read_bytes().decode(errors="replace")
    except (OSError, IndexError):
        return False
    return not cmdline or str(run_dir) in cmdline  # empty while it execs the next program


def job_state(info: dict[str, Any], run_dir: Path) -> str:
    job = last_job(info)
    if not job:
        return "NONE"
    if info.get("launcher") == "local":
        return "RUNNING" if local_alive(int(job.get("pid", 0)), run_dir) else "ENDED"
    return slurm_state(str(job["id"]))


@dataclass(frozen=True)
class RunView:
    """What jobs.status shows for one run."""

    name: str
    run_dir: Path
    state: str  # pending | running | requeued | finished | stopped | cancelled | failed | unknown
    job_id: str
    job_state: str
    step: int | None
    total_steps: int | None
    last_reward: float | None
    restarts: int
    latest_checkpoint: str | None
    mlflow_run_id: str | None
    mlflow_uri: str | None
    log: str
    eta_s: float | None = None  # the trainer's estimate at its last step
    error: str | None = None  # the job's one-line reason, when it failed
    exit_code: int | None = None


def derive_state(info: dict[str, Any], status: dict[str, Any], sched: str) -> str:
    """One word from the scheduler's view and the trainer's view."""
    trainer = status.get("state")
    if trainer == "finished":
        return "finished"
    if sched == "NONE":  # a sweep's element that a local runner has not started yet
        return "cancelled" if info.get("cancel_requested") else "pending"
    if sched in ("PENDING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED"):
        return "requeued" if trainer in ("preempted", "running") else "pending"
    if sched in ACTIVE:
        return "running"
    if sched == "UNKNOWN":
        return "unknown"
    if info.get("cancel_requested") or sched.startswith("CANCELLED"):
        return "cancelled"
    if trainer == "preempted":
        return "stopped"
    return "failed"  # ended without finishing: crashed, timed out, never started


def log_path(info: dict[str, Any], run_dir: Path) -> str:
    job = last_job(info)
    if info.get("launcher") == "local":
        return str(run_dir / "local.log")
    # A sweep's elements log into the sweep's submitit folder (<array>_<index>_0_log.out).
    return str(Path(job.get("slurm_dir") or run_dir / "slurm") / f"{job.get('id', '%j')}_0_log.out")


def view(run_dir: Path) -> RunView:
    """One run's view; a run whose files are unreadable is shown as such, never fatal for a listing."""
    try:
        return _view(run_dir)
    except (JobsError, OSError, ValueError, TypeError, KeyError, AttributeError) as exc:  # RunFileError too
        return RunView(name=run_dir.name, run_dir=run_dir, state="unreadable", job_id="-", job_state="-",
                       step=None, total_steps=None, last_reward=None, restarts=0, latest_checkpoint=None,
                       mlflow_run_id=None, mlflow_uri=None, log="-", error=one_line(str(exc)) or type(exc).__name__)


def _view(run_dir: Path) -> RunView:
    info = read_json(run_dir / "run.json")
    # Scheduler first: a job seen ended has already written its last status.json.
    sched = job_state(info, run_dir)
    status = read_status(run_dir)
    reward = status.get("last_reward")
    return RunView(
        name=str(info.get("name", run_dir.name)), run_dir=run_dir, state=derive_state(info, status, sched),
        job_id=str(last_job(info).get("id", "-")), job_state=sched,
        step=status.get("step"), total_steps=status.get("total_steps"),
        last_reward=float(reward) if isinstance(reward, (int, float)) else None,
        restarts=int(status.get("restarts") or 0), latest_checkpoint=status.get("latest_checkpoint"),
        mlflow_run_id=status.get("mlflow_run_id"), mlflow_uri=status.get("mlflow_tracking_uri"),
        log=log_path(info, run_dir),
        eta_s=float(status["eta_s"]) if isinstance(status.get("eta_s"), (int, float)) else None,
        error=str(status["error"]) if status.get("error") and status.get("state") == "failed" else None,
        exit_code=status.get("exit_code") if isinstance(status.get("exit_code"), int) else None,
    )


def mlflow_hint(uri: str | None, run_id: str | None, experiment: str = "") -> str:
    """How to open the run: the server's URL, or the local UI command for a file database."""
    if not uri:
        return "-"
    where = f"run {run_id}" if run_id else "run id known once the job starts"
    if uri.startswith(("http://", "https://")):
        return f"{uri.rstrip('/')}  ({where}; experiment '{experiment}')" if experiment else f"{uri}  ({where})"
    return f"{where}; open: mlflow ui --backend-store-uri {uri}"
