"""The job's entry point: what submitit pickles and the local launcher runs.

`Launch` holds only the run dir. Everything else is on disk (train.yaml,
checkpoints), so a requeue, a Slurm-side requeue and a manual resubmit all
resume the same way: the trainer starts from the newest complete checkpoint.

Signals: Preemption.install() replaces submitit's handlers once the trainer
is about to start. USR2 is submitit's warning before the time limit (sbatch
--signal) or a manual `scancel --signal=USR2`: the trainer checkpoints and
this process requeues the job itself; so it does when the trainer saved
because the next step would not fit before the time limit (walltime.py).
SIGTERM comes with preemption,
`scontrol requeue` and `scancel`: the trainer checkpoints if it has the time,
and Slurm decides whether the job comes back. A USR2 that arrives while
Python is still importing is handled by submitit, which calls checkpoint()
and requeues the same way.
"""
from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from submitit.helpers import DelayedSubmission

from grpo_core import rundir  # light (no torch): unpickling the job stays cheap
from grpo_core.exitcodes import EXIT_BAD_INPUT, EXIT_CONFLICT, EXIT_ENVIRONMENT, EXIT_FAILED, EXIT_OK, EXIT_PREEMPTED
from grpo_core.launchenv import env_rank


def _log(message: str) -> None:
    print(f"[grpo-launch] {message}", file=sys.stderr, flush=True)


def _cancel_requested(run_dir: Path) -> bool:
    # An unreadable marker must not stop a requeue: not strict.
    return bool(rundir.read_json(run_dir / "run.json", strict=False).get("cancel_requested"))


def failure_code(exc: BaseException) -> int:
    from grpo_core.config import ConfigError
    from grpo_core.data import DataError
    from grpo_core.model_path import ModelPathError

    from grpo_core.checkpoint import CheckpointError

    if isinstance(exc, (ConfigError, DataError, ModelPathError)):
        return EXIT_BAD_INPUT
    if isinstance(exc, CheckpointError):
        return EXIT_CONFLICT
    return EXIT_ENVIRONMENT if isinstance(exc, OSError) else EXIT_FAILED


def failure_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    text = lines[0] if lines else ""
    return text if failure_code(exc) in (EXIT_BAD_INPUT, EXIT_CONFLICT) else f"{type(exc).__name__}: {text}".rstrip(": ")


def _record_failure(run_dir: Path, exc: BaseException) -> None:
    """The reason goes into status.json, so jobs.status and a following jobs.submit can say it."""
    if env_rank() != 0:
        return
    try:
        rundir.write_status(run_dir, state="failed", error=failure_line(exc), exit_code=failure_code(exc))
    except OSError:
        pass  # e.g. the disk is full: the log still has the reason


def _requeue(job_id: str) -> bool:
    try:
        out = subprocess.run(["scontrol", "requeue", job_id], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as exc:
        _log(f"scontrol requeue {job_id} failed: {exc}")
        return False
    if out.returncode != 0:
        _log(f"scontrol requeue {job_id} failed: {out.stderr.strip()}")
        return False
    _log(f"requeued job {job_id}; it resumes from the checkpoint just saved")
    return True


@dataclass(frozen=True)
class Launch:
    run_dir: str

    def __call__(self) -> dict[str, Any]:
        from grpo_core.config import load
        from grpo_core.preemption import Preemption
        from grpo_core.train import train

        run_dir = Path(self.run_dir)
        if _cancel_requested(run_dir):
            _log("run was cancelled (jobs.cancel); not training. Resume with: python -m jobs.resubmit "
                 + run_dir.name)
            return {"status": "cancelled"}
        try:
            cfg = load(run_dir / "train.yaml")
            flag = Preemption.install()
            # The trainer tags the MLflow run with SLURM_RESTART_COUNT and SLURM_JOB_ID itself.
            result = train(cfg, preemption=flag)
        except Exception as exc:
            _record_failure(run_dir, exc)
            raise
        summary = {"status": result.status, "step": result.step, "mlflow_run_id": result.mlflow_run_id}
        if result.status != "preempted":
            return summary
        job_id = os.environ.get("SLURM_JOB_ID")
        if flag.requeue_self and job_id and env_rank() == 0 and not _cancel_requested(run_dir):
            # The time-limit warning or the trainer's own walltime save: nobody else brings the job back.
            if _requeue(job_id):
                sys.exit(EXIT_PREEMPTED)  # no result pickle: the requeued job writes the real one
        return summary

    def checkpoint(self, *args: Any, **kwargs: Any) -> DelayedSubmission:
        """submitit's requeue hook: a fresh copy; the state that matters is on disk."""
        return DelayedSubmission(Launch(self.run_dir))


def main(argv: list[str] | None = None) -> int:
    """`python -m jobs.launch RUN_DIR`: the local launcher's process."""
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m jobs.launch RUN_DIR", file=sys.stderr)
        return EXIT_BAD_INPUT
    try:
        summary = Launch(str(Path(args[0]).absolute()))()
    except Exception as exc:
        if failure_code(exc) == EXIT_FAILED:
            raise  # a bug: the traceback belongs in the log
        print(f"error: {failure_line(exc)}", file=sys.stderr)
        return failure_code(exc)
    return EXIT_PREEMPTED if summary.get("status") == "preempted" else EXIT_OK


if __name__ == "__main__":
    raise SystemExit(main())
