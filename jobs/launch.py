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

EXIT_PREEMPTED = 75  # the trainer CLI's code for "stopped after saving a checkpoint"


def _log(message: str) -> None:
    print(f"[grpo-launch] {message}", file=sys.stderr, flush=True)


def _cancel_requested(run_dir: Path) -> bool:
    from jobs.runs import read_json  # jobs.runs is light; kept lazy so unpickling stays cheap

    try:
        return bool(read_json(run_dir / "run.json").get("cancel_requested"))
    except Exception:  # noqa: BLE001 - an unreadable marker must not stop a requeue
        return False


def _rank() -> int:
    return int(os.environ.get("SLURM_PROCID", os.environ.get("RANK", "0")))


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
        cfg = load(run_dir / "train.yaml")
        flag = Preemption.install()
        # The trainer tags the MLflow run with SLURM_RESTART_COUNT and SLURM_JOB_ID itself.
        result = train(cfg, preemption=flag)
        summary = {"status": result.status, "step": result.step, "mlflow_run_id": result.mlflow_run_id}
        if result.status != "preempted":
            return summary
        job_id = os.environ.get("SLURM_JOB_ID")
        if flag.requeue_self and job_id and _rank() == 0 and not _cancel_requested(run_dir):
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
        return 2
    from grpo_core.config import ConfigError

    try:
        summary = Launch(str(Path(args[0]).absolute()))()
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return EXIT_PREEMPTED if summary.get("status") == "preempted" else 0


if __name__ == "__main__":
    raise SystemExit(main())
