"""`python -m jobs.submit --profile NAME [cluster.x=v train.a.b=v ...]`

Loads a profile, creates the run dir (runs/<name>), writes profile.yaml,
train.yaml, the job script and run.json, then submits with submitit (Slurm)
or starts the trainer on this machine (`local`). `--dry-run` prints the
script exactly as it would be submitted and creates nothing. Any failure
before the job exists removes the run dir again: nothing half-created.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import io
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Sequence

import yaml

from grpo_core.cli import ArgumentParser
from grpo_core.config import ConfigError, to_dict
from grpo_core.exitcodes import EXIT_CONFLICT
from jobs import runs
from jobs.launch import Launch
from jobs.profiles import (BUILTIN_DIR, PROFILES_ENV, Profile, describe, dump_profile, key_reference, list_profiles,
                           load_profile, replace_train)
from jobs.render import RunSpec, partition_note, python_command, render_sbatch, submitit_parameters
from jobs.runs import JobsError
from grpo_core.rundir import RunFileError
from grpo_core import rundir


def default_name(profile: str) -> str:
    return f"{profile}-{dt.datetime.now().strftime('%Y%m%d-%H%M%S')}"


def prepare(profile: Profile, name: str, root: Path) -> tuple[Profile, RunSpec]:
    """Bind a profile to a run: the trainer writes into the run dir, MLflow names the run after it."""
    if not runs.NAME_RE.match(name):
        raise JobsError(f"run name {name!r}: use letters, digits, '.', '_' and '-' "
                        "(starting with a letter or digit, at most 128)")
    run_dir = root / name
    workdir = Path(profile.cluster.workdir or Path.cwd()).expanduser().absolute()
    tracking = {"run_name": profile.train.tracking.run_name or name}
    bound = replace_train(profile, trainer={"run_dir": str(run_dir)}, tracking=tracking)
    return bound, RunSpec(name=name, run_dir=str(run_dir), workdir=str(workdir), python=sys.executable)


def write_run_files(profile: Profile, run: RunSpec) -> None:
    run_dir = Path(run.run_dir)
    (run_dir / "profile.yaml").write_text(dump_profile(profile))
    (run_dir / "train.yaml").write_text(yaml.safe_dump(to_dict(profile.train), sort_keys=False))


def _submit_slurm(profile: Profile, run: RunSpec, script: str) -> str:
    import submitit

    runs.require_tool("sbatch")
    runs.require_tool("srun")  # submitit's executor refuses to start without it
    executor = submitit.SlurmExecutor(folder=run.slurm_dir, max_num_timeout=profile.cluster.max_requeues,
                                      python=python_command(profile, run))
    executor.update_parameters(**submitit_parameters(profile, run))
    stderr = io.StringIO()
    try:
        with contextlib.redirect_stderr(stderr):  # submitit echoes sbatch's stderr; we say it in one line
            job = executor.submit(Launch(run.run_dir))
    except Exception as exc:  # noqa: BLE001 - submitit wraps sbatch failures in several types
        raise JobsError(f"sbatch failed: {runs.one_line(str(exc) or stderr.getvalue())}") from None
    submitted = Path(job.paths.submission_file).read_text()
    if submitted != script:  # render.py's promise; cheap to check on every submission
        print("warning: submitit wrote a different script than --dry-run shows; kept in job.sbatch",
              file=sys.stderr)
    (Path(run.run_dir) / "job.sbatch").write_text(submitted)
    return str(job.job_id)


def _start_local(run: RunSpec, script: str) -> int:
    run_dir = Path(run.run_dir)
    (run_dir / "job.sh").write_text(script)
    with open(run_dir / "local.log", "ab") as log:
        # Own session: the trainer outlives this command with --no-follow, and a
        # Ctrl-C here reaches it only as the SIGTERM we choose to forward.
        proc = subprocess.Popen(["bash", str(run_dir / "job.sh")], cwd=run.workdir, stdin=subprocess.DEVNULL,
                                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    return proc.pid


def start_job(profile: Profile, run: RunSpec, info: dict, how: str) -> dict:
    """Submit (Slurm) or start (local) one job of the run; record it in run.json."""
    script = render_sbatch(profile, run)
    entry: dict = {"submitted": runs.now_iso(), "how": how}
    if profile.cluster.launcher == "local":
        pid = _start_local(run, script)
        entry.update(id=f"local-{pid}", pid=pid)
    else:
        entry["id"] = _submit_slurm(profile, run, script)
    info = {**info, "jobs": [*info.get("jobs", []), entry]}
    rundir.write_json_atomic(Path(run.run_dir) / "run.json", info)
    return info


def print_started(profile: Profile, run: RunSpec, info: dict) -> None:
    from grpo_core.tracking import default_tracking_uri

    run_dir = Path(run.run_dir)
    job = runs.last_job(info)
    kind = "local process" if profile.cluster.launcher == "local" else "Slurm job"
    tracking = profile.train.tracking
    print(f"run:      {run.name}")
    print(f"run dir:  {run_dir}")
    print(f"job:      {job['id']} ({kind}); log: {runs.log_path(info, run_dir)}")
    if tracking.enabled:
        uri = default_tracking_uri(tracking, run_dir)
        print(f"mlflow:   experiment '{tracking.experiment}', run '{tracking.run_name}' at {uri}")
        print(f"          {runs.mlflow_hint(uri, runs.read_status(run_dir).get('mlflow_run_id'), tracking.experiment)}")
    else:
        print("mlflow:   disabled (train.tracking.enabled=false)")
    print(f"watch:    python -m jobs.status {run.name}")


def print_dry_run(profile: Profile, run: RunSpec) -> None:
    """The script exactly as submitted, then the training config the job will run (its train.yaml)."""
    sys.stdout.write(render_sbatch(profile, run))
    # As comments, so that the output stays a script sbatch accepts (e.g. `sbatch --test-only`).
    print(f"# ---- {Path(run.run_dir) / 'train.yaml'}: the resolved training config this job runs ----")
    for line in yaml.safe_dump(to_dict(profile.train), sort_keys=False).splitlines():
        print(f"# {line}")
    note = partition_note(profile)
    if note:
        print(note, file=sys.stderr)


def print_profiles() -> None:
    found = list_profiles()
    width = max((len(n) for n in found), default=0)
    for name, path in found.items():
        print(f"{name:<{width}}  {describe(path)}")
    print(f"(folders: ${PROFILES_ENV}, then the profiles shipped in the package ({BUILTIN_DIR}); or --profile path/to/file.yaml)")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = ArgumentParser(prog="python -m jobs.submit", description="Submit a GRPO training run.",
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="keys (KEY = DEFAULT  (TYPE; allowed values)); the profile sets its own "
                                "values, --show-config prints them:\n\n" + key_reference())
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                   help="dotted overrides: cluster.partition=big train.rollout.n=8 cluster.env.NAME=value")
    p.add_argument("--profile", default="local", help="profile name or path to a YAML file (default: local)")
    p.add_argument("--name", help="run name (default: <profile>-<timestamp>); the run dir is RUNS/<name>")
    p.add_argument("--runs-dir", help=f"where run dirs live (default: ${runs.RUNS_ENV} or ./runs)")
    p.add_argument("--dry-run", action="store_true",
                   help="print the job script as it would be submitted and the training config it runs; create nothing")
    p.add_argument("--show-config", action="store_true",
                   help="print the resolved profile (cluster and train, after overrides) as YAML; create nothing")
    p.add_argument("--follow", dest="follow", action="store_true", default=None,
                   help="stream progress until the job ends (default for the local profile)")
    p.add_argument("--no-follow", dest="follow", action="store_false")
    p.add_argument("--list-profiles", action="store_true", help="list the profiles, one line each")
    p.add_argument("--sweep", action="append", metavar="KEY=V1,V2,...",
                   help="train key and its values (e.g. optim.lr=1e-5,3e-5); repeat for a grid: the cartesian "
                        "product is one Slurm job array, each element its own run (jobs/sweep.py)")
    p.add_argument("--sweep-name", help="the sweep's name (default: <profile>-sweep-<timestamp>); "
                                        "its runs are NAME-0, NAME-1, ...")
    p.add_argument("--max-parallel", type=int, default=0, metavar="N",
                   help="at most N elements of the array at once (sbatch --array=...%%N; default: all)")
    args = p.parse_args(argv)
    if not args.sweep and (args.sweep_name is not None or args.max_parallel):
        p.error("--sweep-name and --max-parallel go with --sweep")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.list_profiles:
        print_profiles()
        return 0
    per_run = [o for o in args.overrides if o.partition("=")[0].strip() == "train.trainer.run_dir"]
    if per_run:  # prepare() would silently replace it
        runs.fail(f"override {per_run[0]!r}: jobs.submit sets the run dir (RUNS/NAME: --runs-dir, --name)")
    if args.sweep:
        from jobs import sweep_cli

        try:
            return sweep_cli.submit(args)
        except (ConfigError, JobsError, RunFileError, OSError) as exc:
            runs.fail_on(exc)
    try:
        profile = load_profile(args.profile, args.overrides)
        root = runs.runs_root(args.runs_dir)
        profile, run = prepare(profile, default_name(profile.name) if args.name is None else args.name, root)
        if args.show_config:
            sys.stdout.write(dump_profile(profile))
            return 0
        if args.dry_run:
            print_dry_run(profile, run)
            return 0
        if profile.cluster.launcher == "slurm":  # before anything is created
            runs.require_tool("sbatch")
            runs.require_tool("srun")
        run_dir = Path(run.run_dir)
        taken = JobsError(f"run dir {run_dir} exists (an earlier run, or another submit of the same name "
                          f"just now); pick another --name, or resume it: python -m jobs.resubmit {run.name}",
                          EXIT_CONFLICT)
        if run_dir.exists():
            raise taken
        run_dir.parent.mkdir(parents=True, exist_ok=True)
        try:
            run_dir.mkdir()  # atomic: of two submits of one name, exactly one creates it
        except FileExistsError:
            raise taken from None
        try:
            write_run_files(profile, run)
            info = {"name": run.name, "profile": profile.name, "launcher": profile.cluster.launcher,
                    "run_dir": run.run_dir, "workdir": run.workdir, "python": run.python,
                    "created": runs.now_iso(), "cancel_requested": None, "jobs": []}
            info = start_job(profile, run, info, how="submit")
        except BaseException:
            shutil.rmtree(run_dir, ignore_errors=True)  # nothing half-created
            raise
    except (ConfigError, JobsError, RunFileError, OSError) as exc:
        runs.fail_on(exc)
    print_started(profile, run, info)
    follow = args.follow if args.follow is not None else profile.cluster.launcher == "local"
    if follow:
        from jobs.status import follow as follow_run

        return follow_run(Path(run.run_dir))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
