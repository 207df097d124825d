"""jobs: the user side: Slurm profiles, sbatch rendering, submit/status/resubmit/cancel."""
