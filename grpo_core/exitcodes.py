"""Exit codes of every entry point (the README's table): the one definition.

jobs.* import these from here; grpo_core never imports jobs.
"""
from __future__ import annotations

EXIT_OK = 0  # finished / done
EXIT_FAILED = 1  # ran, but the outcome is "no": the run failed or stopped, the plan does not fit, MLflow did not answer
EXIT_BAD_INPUT = 2  # profile, override, YAML, data, model, run name or unknown run: nothing was created
EXIT_CONFLICT = 3  # the run's state forbids it: name in use or being submitted, run active or finished, no loadable checkpoint
EXIT_ENVIRONMENT = 4  # around the job: sbatch/srun missing or failing, a disk full or unwritable
EXIT_PREEMPTED = 75  # EX_TEMPFAIL: saved a checkpoint and stopped; run it again to continue
EXIT_INTERRUPTED = 130  # Ctrl-C while following a run (the job goes on)

TABLE = (
    (EXIT_OK, "finished / done"),
    (EXIT_FAILED, "the run failed or stopped, the plan does not fit, or MLflow did not answer"),
    (EXIT_BAD_INPUT, "bad input (profile, override, YAML, data, model, run name, unknown run); nothing created"),
    (EXIT_CONFLICT, "the run's state forbids it (name in use, run active or finished, no loadable checkpoint)"),
    (EXIT_ENVIRONMENT, "the environment failed (sbatch/srun missing or failing, disk full or unwritable)"),
    (EXIT_PREEMPTED, "preempted: a checkpoint was saved; run again to continue"),
    (EXIT_INTERRUPTED, "interrupted while following (the job goes on)"),
)
