"""What jobs.submit / status / cancel / resubmit do with a sweep (jobs/sweep.py holds the sweep itself)."""
from __future__ import annotations

import argparse
import math
import shutil
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any, Sequence

from grpo_core import rundir
from jobs import runs, sweep
from jobs.profiles import load_profile, load_resolved
from jobs.render import RunSpec
from jobs.runs import JobsError

RESUMABLE = ("stopped", "failed", "cancelled")


# ---------------------------------------------------------------- submit

def submit(args: argparse.Namespace) -> int:
    """`jobs.submit --sweep ...`: build and check every element, then create and submit them together."""
    from jobs.render import partition_note, render_array, render_local
    from jobs.submit import write_run_files

    if args.name is not None:
        raise JobsError("--name names one run; a sweep's name is --sweep-name (its elements are NAME-0, NAME-1, ...)")
    if args.max_parallel < 0:
        raise JobsError(f"--max-parallel {args.max_parallel}: must be >= 0 (0: no limit)")
    axes = sweep.parse_axes(args.sweep)
    base = load_profile(args.profile, args.overrides)
    root = runs.runs_root(args.runs_dir)
    name = sweep.default_name(base.name) if args.sweep_name is None else args.sweep_name
    last = sweep.element_names(name, math.prod(len(a.values) for a in axes))[-1]  # the longest run name
    if not runs.NAME_RE.match(name) or not runs.NAME_RE.match(last):
        raise JobsError(f"sweep name {name[:200]!r}: use letters, digits, '.', '_' and '-', at most "
                        f"{128 - (len(last) - len(name))} here (its runs are NAME-0 ... NAME{last[len(name):]})")
    elements = sweep.build_elements(args.profile, args.overrides, axes, name, root)
    sweep_run = sweep.spec(elements, root, name)
    local = base.cluster.launcher == "local"
    if args.dry_run:
        first = elements[0]
        script = render_local(first.profile, first.run) if local else \
            render_array(first.profile, sweep_run, len(elements), args.max_parallel)
        sys.stdout.write(script)
        how = "one after another on this machine (this is the first one's script)" if local else \
            f"as one job array, {args.max_parallel or len(elements)} at once"
        print(f"\n# sweep {name}: {len(elements)} elements, {how}")
        print("\n".join(f"# {line}" for line in sweep.describe_elements(axes, elements).splitlines()))
        note = partition_note(base)
        if note:
            print(note, file=sys.stderr)
        return 0
    if not local:
        runs.require_tool("sbatch")
        runs.require_tool("srun")
    taken = [p for p in [Path(sweep_run.run_dir)] + [Path(e.run.run_dir) for e in elements] if p.exists()]
    if taken:
        raise JobsError(f"{taken[0]} exists; pick another --sweep-name")
    Path(sweep_run.run_dir).mkdir(parents=True)  # claims the name: a second submit of it stops here
    created = [Path(sweep_run.run_dir)]
    try:
        rundir.write_json_atomic(Path(sweep_run.run_dir) / sweep.SWEEP_FILE, {
            "name": name, "profile": base.name, "launcher": base.cluster.launcher, "created": runs.now_iso(),
            "axes": [{"key": a.key, "values": list(a.values)} for a in axes], "max_parallel": args.max_parallel,
            "elements": [{"name": e.name, "values": e.values} for e in elements], "jobs": [],
            "cancel_requested": None})
        for i, e in enumerate(elements):
            Path(e.run.run_dir).mkdir(parents=True)
            created.append(Path(e.run.run_dir))
            write_run_files(e.profile, e.run)
            rundir.write_json_atomic(Path(e.run.run_dir) / "run.json", {
                "name": e.name, "profile": e.profile.name, "launcher": e.profile.cluster.launcher,
                "run_dir": e.run.run_dir, "workdir": e.run.workdir, "python": e.run.python,
                "created": runs.now_iso(), "cancel_requested": None, "jobs": [],
                "sweep": {"name": name, "index": i, "values": e.values}})
        if local:
            job = sweep.start_local(sweep_run, [e.name for e in elements], how="submit")
        else:
            job = sweep.submit_array(elements[0].profile, sweep_run, [(e.profile, e.run) for e in elements],
                                     args.max_parallel, how="submit")
    except BaseException:
        for path in created:
            shutil.rmtree(path, ignore_errors=True)  # nothing half-created
        raise
    print_started(Path(sweep_run.run_dir), axes, elements, job, local)
    follow = args.follow if args.follow is not None else local
    return follow_sweep(Path(sweep_run.run_dir)) if follow else 0


def print_started(sweep_dir: Path, axes: Sequence[sweep.Axis], elements: Sequence[sweep.Element],
                  job: dict[str, Any], local: bool) -> None:
    tracking = elements[0].profile.train.tracking
    print(f"sweep:    {sweep_dir.name} ({len(elements)} elements)")
    print("\n".join(f"          {line}" for line in sweep.describe_elements(axes, elements).splitlines()))
    if local:
        print(f"job:      {job['id']} (local: one element after another); log: {sweep_dir / 'local.log'}")
    else:
        print(f"job:      {job['id']} (Slurm job array); logs: {sweep_dir / 'slurm'}")
    if tracking.enabled:
        print(f"mlflow:   experiment '{tracking.experiment}', runs tagged {sweep.TAG}={sweep_dir.name}")
    print(f"watch:    python -m jobs.status {sweep_dir.name}")
    print(f"compare:  python -m jobs.compare --sweep {sweep_dir.name}")


# ---------------------------------------------------------------- status

def print_sweep(sweep_dir: Path) -> None:
    info = sweep.read(sweep_dir)
    keys = [a["key"] for a in info.get("axes", [])]
    views = [(e, runs.view(sweep_dir.parent / e["name"])) for e in info.get("elements", [])]
    job = runs.last_job(info)
    counts = Counter(v.state for _, v in views)
    print(f"sweep {info.get('name', sweep_dir.name)}: profile {info.get('profile')}, {len(views)} elements "
          f"({', '.join(f'{n} {s}' for s, n in counts.most_common())}); job {job.get('id', '-')}")
    rows = [("RUN", *keys, "STATE", "STEP", "REWARD", "RESTARTS", "CHECKPOINT", "JOB")]
    for e, v in views:
        step = f"{v.step if v.step is not None else '-'}/{v.total_steps if v.total_steps is not None else '-'}"
        reward = "-" if v.last_reward is None else f"{v.last_reward:.4f}"
        ckpt = Path(v.latest_checkpoint).name if v.latest_checkpoint else "-"
        rows.append((v.name, *(str(e["values"].get(k, "")) for k in keys), v.state, step, reward, str(v.restarts),
                     ckpt, f"{v.job_id} {v.job_state}"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip())
    if any(v.state in RESUMABLE for _, v in views):
        print(f"resume:   python -m jobs.resubmit {sweep_dir.name}")


def summary_lines(root: Path, limit: int = 20) -> list[str]:
    """One line per recent sweep, for the plain `jobs.status` listing."""
    out = []
    for sweep_dir in sweep.recent(root, limit):
        states = Counter(runs.read_status(d).get("state") or "pending" for d in sweep.element_dirs(sweep_dir))
        text = ", ".join(f"{n} {s}" for s, n in states.most_common())
        out.append(f"sweep {sweep_dir.name}: {text} (trainer states; python -m jobs.status {sweep_dir.name})")
    return out


def follow_sweep(sweep_dir: Path) -> int:
    """Follow the elements of the sweep's latest job in turn; 0 if every one finished."""
    from jobs.status import follow

    job = runs.last_job(sweep.read(sweep_dir))
    codes = []
    for name in job.get("elements", []):
        run_dir = sweep_dir.parent / name

        def started() -> bool:  # by this job, not an earlier one (resubmit)
            return runs.last_job(runs.read_json(run_dir / "run.json")).get("sweep_job") == job["id"]

        # A local element starts when the one before ends; a Slurm element may wait in the queue.
        while not started() and (job.get("pid") is None or sweep.runner_alive(sweep_dir)):
            time.sleep(0.2)
        if not started():
            print(f"{name}: not started", flush=True)
            codes.append(1)
            continue
        print(f"--- {name}", flush=True)
        codes.append(follow(run_dir))
        if codes[-1] == 130:
            return 130
    return 0 if all(c == 0 for c in codes) else 1


# ---------------------------------------------------------------- cancel, resubmit

def cancel(sweep_dir: Path) -> list[str]:
    """Mark every element cancelled (a local runner then skips those not started) and cancel running jobs."""
    from jobs.cancel import cancel as cancel_run

    info = sweep.read(sweep_dir)
    said = []
    for run_dir in sweep.element_dirs(sweep_dir):
        run_info = runs.read_json(run_dir / "run.json")
        state = runs.job_state(run_info, run_dir)
        if state in runs.ACTIVE:
            said.append(cancel_run(run_dir))
        elif state == "NONE" and not run_info.get("cancel_requested"):
            rundir.write_json_atomic(run_dir / "run.json", {**run_info, "cancel_requested": runs.now_iso()})
            said.append(f"cancelled run {run_dir.name} (not started)")
    if not said:
        raise JobsError(f"sweep {sweep_dir.name}: no element is queued or running; nothing to cancel")
    rundir.write_json_atomic(sweep_dir / sweep.SWEEP_FILE, {**info, "cancel_requested": runs.now_iso()})
    return said + [f"resume with: python -m jobs.resubmit {sweep_dir.name}"]


def resubmit(sweep_dir: Path, overrides: Sequence[str] = ()) -> list[str]:
    """The stopped, failed and cancelled elements again: one new job array (or local runner)."""
    from jobs.submit import write_run_files

    bad = [o for o in overrides if not o.strip().startswith("cluster.")]
    if bad:
        raise JobsError(f"override {bad[0]!r}: only cluster.* can change when resuming a sweep")
    info = sweep.read(sweep_dir)
    todo, skipped = [], []
    for run_dir in sweep.element_dirs(sweep_dir):
        v = runs.view(run_dir)
        (todo if v.state in RESUMABLE else skipped).append((run_dir, v))
    if not todo:
        states = ", ".join(f"{v.name} {v.state}" for _, v in skipped)
        raise JobsError(f"sweep {sweep_dir.name}: nothing to resume ({states})")
    elements, before = [], {run_dir: (run_dir / "run.json").read_text() for run_dir, _ in todo}
    for run_dir, _ in todo:
        run_info = runs.read_json(run_dir / "run.json")
        profile = load_resolved(run_dir / "profile.yaml", overrides)
        run = RunSpec(name=run_dir.name, run_dir=str(run_dir), workdir=str(run_info["workdir"]),
                      python=str(run_info["python"]))
        if overrides:
            write_run_files(profile, run)
        rundir.write_json_atomic(run_dir / "run.json", {**run_info, "cancel_requested": None})
        elements.append((profile, run))
    sweep_run = RunSpec(name=sweep_dir.name, run_dir=str(sweep_dir), workdir=elements[0][1].workdir,
                        python=elements[0][1].python)
    try:
        if info.get("launcher") == "local":
            job = sweep.start_local(sweep_run, [r.name for _, r in elements], how="resubmit")
        else:
            job = sweep.submit_array(elements[0][0], sweep_run, elements, int(info.get("max_parallel") or 0),
                                     how="resubmit")
    except BaseException:
        for run_dir, text in before.items():  # the cancel markers back: nothing changed
            (run_dir / "run.json").write_text(text)
        raise
    rundir.write_json_atomic(sweep_dir / sweep.SWEEP_FILE, {**sweep.read(sweep_dir), "cancel_requested": None})
    lines = [f"resubmitted {len(elements)} of sweep {sweep_dir.name} as job {job['id']}: "
             + ", ".join(r.name for _, r in elements)]
    lines += [f"left alone: {v.name} ({v.state})" for _, v in skipped]
    return lines + [f"watch: python -m jobs.status {sweep_dir.name}"]
