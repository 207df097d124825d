"""Compare GRPO runs logged to MLflow: differing params, key metrics, plots.

    python -m jobs.compare RUN [RUN ...]          run names, run dirs or MLflow run ids
    python -m jobs.compare --experiment grpo --last 3 [--where "params.rollout.n = '8'"]
    python -m jobs.compare --sweep NAME             every run of a sweep
    options: --tracking-uri URI, --format table|csv|json, --out DIR, --no-plots

Plots go to <runs>/_compare/<run names>/ unless --out says otherwise; their
legends name each run's values of the params that differ.

Tracking URI: --tracking-uri, else the run dir's status.json, else
$MLFLOW_TRACKING_URI, else the trainer's default <runs>/mlflow.db ($GRPO_RUNS_DIR
or ./runs). Errors are one line on stderr; exit 2 for bad input, 1 when the
tracking server does not answer.
"""
from __future__ import annotations

import argparse
import csv
import hashlib
import io
import json
import math
import os
import re
import sys
import time
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any, NoReturn, Sequence

from grpo_core.cli import ArgumentParser
from grpo_core.cli import fail as cli_fail
from grpo_core.exitcodes import EXIT_BAD_INPUT, EXIT_FAILED
from grpo_core.rundir import RunFileError, read_json
from grpo_core.tracking import STEP_KEY, quiet_http_env

PLOTS = {  # file stem -> (metric, y label)
    "reward_mean": ("reward_mean", "mean reward"),
    "val_accuracy": ("val_accuracy", "validation accuracy"),
    "response_length_mean": ("response_length_mean", "mean response length (tokens)"),
    "kl": ("kl", "KL to reference"),
}
HISTORY_KEYS = ("reward_mean", "val_accuracy", "response_length_mean", "kl", "tokens_per_s")
METRIC_COLUMNS = ("final_val_accuracy", "best_val_accuracy", "final_reward_mean", "tokens_per_s",
                  "wall_time_s", "restarts", "steps", "status")
RUN_ID_RE = re.compile(r"^[0-9a-f]{32}$")
# Params that name a run rather than configure it (jobs.submit sets them per run): they always
# differ, so they are not "differences".
IDENTITY_PARAMS = ("trainer.run_dir", "tracking.run_name")
SCIENTIFIC_RE = re.compile(r"^[-+]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)[eE][-+]?[0-9]+$")  # how MLflow keeps 1e-05
COMPARE_DIR = "_compare"  # under the runs folder; no run is named so (run names start with a letter or digit)
LEGEND_PARAMS = 4  # a legend names at most this many differing params


class CompareError(Exception):
    def __init__(self, message: str, code: int = EXIT_BAD_INPUT) -> None:
        super().__init__(message)
        self.code = code


@dataclass
class RunData:
    label: str
    run_id: str
    experiment_id: str
    params: dict[str, str]
    tags: dict[str, str]
    status: str
    start_ms: int
    end_ms: int | None
    history: dict[str, list[tuple[int, float]]] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)


# --------------------------------------------------------------- resolution

SQLITE_MAGIC = b"SQLite format 3\x00"  # the first 16 bytes of every SQLite database file


def runs_root() -> Path:
    return Path(os.environ.get("GRPO_RUNS_DIR") or "runs")


def pick_tracking_uri(explicit: str | None, tokens: Sequence[str]) -> str:
    if explicit:
        return explicit
    for token in tokens:  # a run dir knows where its run was logged
        status = Path(token) / "status.json"
        if status.is_file():
            uri = read_json(status).get("mlflow_tracking_uri")
            if uri:
                return str(uri)
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    db = runs_root() / "mlflow.db"
    if db.is_file():
        return f"sqlite:///{db.resolve()}"
    raise CompareError(f"no tracking URI: pass --tracking-uri or set MLFLOW_TRACKING_URI (no {db} here)")


def _all_experiment_ids(client: Any) -> list[str]:
    return [e.experiment_id for e in client.search_experiments(max_results=1000)]


def _experiment_id(client: Any, name: str) -> str:
    exp = client.get_experiment_by_name(name)
    if exp is None:
        names = sorted(e.name for e in client.search_experiments(max_results=1000))
        raise CompareError(f"unknown experiment '{name}'; experiments: {', '.join(names) or '(none)'}")
    return str(exp.experiment_id)


def resolve_token(client: Any, token: str, experiment_ids: list[str]) -> Any:
    """A run dir, an MLflow run id or a run name -> mlflow Run."""
    from mlflow.exceptions import MlflowException

    status = Path(token) / "status.json"
    if status.is_file():
        run_id = read_json(status).get("mlflow_run_id")
        if not run_id:
            raise CompareError(f"{token}: status.json has no mlflow_run_id (tracking disabled or not started)")
        token = str(run_id)
    if RUN_ID_RE.match(token):
        try:
            return client.get_run(token)
        except MlflowException as exc:
            if exc.get_http_status_code() >= 500:
                raise
    name = token.replace("'", "\\'")
    found = client.search_runs(experiment_ids, f"tags.mlflow.runName = '{name}'", max_results=50,
                               order_by=["attributes.start_time DESC"])
    if not found:
        names = sorted({r.info.run_name for r in client.search_runs(experiment_ids, max_results=200)})
        shown = ", ".join(names[:30]) + (" ..." if len(names) > 30 else "")
        raise CompareError(f"unknown run '{token}'; runs that exist: {shown or '(none)'}")
    if len(found) > 1:
        print(f"note: {len(found)} runs named '{token}'; using the latest ({found[0].info.run_id})", file=sys.stderr)
    return found[0]


def collect_runs(client: Any, args: argparse.Namespace) -> list[Any]:
    exp_ids = [_experiment_id(client, args.experiment)] if args.experiment else _all_experiment_ids(client)
    runs = [resolve_token(client, t, exp_ids) for t in args.runs]
    if args.sweep:  # the elements carry the tag `sweep` (grpo_core/rundir.py)
        name = args.sweep.replace("'", "\\'")
        found = client.search_runs(exp_ids, f"tags.sweep = '{name}'", max_results=1000,
                                   order_by=["attributes.start_time ASC"])
        if not found:
            raise CompareError(f"no MLflow runs tagged sweep={args.sweep} (not started yet, or another "
                               "--tracking-uri/--experiment?)")
        runs += found
    if args.last or args.where:
        limit = args.last or 1000
        runs += client.search_runs(exp_ids, args.where or "", max_results=limit,
                                   order_by=["attributes.start_time DESC"])
    if not runs:
        raise CompareError("nothing to compare: give RUN names, run dirs or ids, --sweep NAME, "
                           "or --experiment NAME --last K")
    unique = list({r.info.run_id: r for r in runs}.values())
    experiments = {r.info.experiment_id for r in unique}
    if len(experiments) > 1:
        names = {e: client.get_experiment(e).name for e in experiments}
        which = ", ".join(f"{r.info.run_name} ({names[r.info.experiment_id]})" for r in unique)
        raise CompareError(f"runs are from different experiments: {which}; compare runs of one experiment")
    return unique


# ------------------------------------------------------------------ metrics

def load(client: Any, runs: list[Any]) -> list[RunData]:
    labels = [r.info.run_name or r.info.run_id[:8] for r in runs]
    out = []
    for run, label in zip(runs, labels):
        if labels.count(label) > 1:
            label = f"{label} ({run.info.run_id[:8]})"
        data = RunData(label, run.info.run_id, run.info.experiment_id, dict(run.data.params),
                       dict(run.data.tags), run.info.status, run.info.start_time, run.info.end_time)
        for key in HISTORY_KEYS:
            last: dict[int, tuple[int, float]] = {}  # step -> (timestamp, value): latest wins
            for m in client.get_metric_history(run.info.run_id, key):
                if m.step not in last or m.timestamp >= last[m.step][0]:
                    last[m.step] = (m.timestamp, m.value)
            if last:
                data.history[key] = [(s, last[s][1]) for s in sorted(last)]
        data.metrics = key_metrics(data, run.data.metrics)
        out.append(data)
    return out


def key_metrics(run: RunData, latest: dict[str, float]) -> dict[str, Any]:
    val = [v for _, v in run.history.get("val_accuracy", [])]
    tps = [v for _, v in run.history.get("tokens_per_s", [])]
    end = run.end_ms if run.end_ms and run.status != "RUNNING" else int(time.time() * 1000)
    restarts = run.tags.get("slurm_restart_count")
    return {
        "final_val_accuracy": val[-1] if val else None,
        "best_val_accuracy": max(val) if val else None,
        "final_reward_mean": latest.get("reward_mean"),
        "tokens_per_s": sum(tps) / len(tps) if tps else None,  # mean over steps
        "wall_time_s": round((end - run.start_ms) / 1000, 1) if run.start_ms else None,
        "restarts": int(restarts) if restarts and restarts.isdigit() else restarts,
        "steps": int(latest[STEP_KEY]) if STEP_KEY in latest else None,
        "status": run.status,
    }


def differing_params(runs: list[RunData]) -> list[str]:
    keys = sorted({k for r in runs for k in r.params} - set(IDENTITY_PARAMS))
    return [k for k in keys if len({r.params.get(k) for r in runs}) > 1]


# ------------------------------------------------------------------- output

def plain(value: Any, digits: int = 4) -> str:
    """Numbers in plain notation, never 1e-05: fixed point with trailing zeros trimmed.

    A float keeps `digits` significant digits (1234.5678 -> 1235, 0.000012345 -> 0.00001234);
    a param's text in scientific notation keeps all of its digits (1e-05 -> 0.00001); other
    text is shown as it is."""
    if isinstance(value, str):
        return _fixed(Decimal(value)) if SCIENTIFIC_RE.match(value) else value
    if isinstance(value, float) and math.isfinite(value):
        return _fixed(Decimal(f"{value:.{digits}g}"))
    return str(value)


def _fixed(number: Decimal) -> str:
    text = format(number, "f")
    return (text.rstrip("0").rstrip(".") if "." in text else text) or "0"


def _fmt(value: Any, key: str = "") -> str:
    if value is None:
        return "-"
    if key == "wall_time_s":
        secs = int(value)
        return f"{secs // 3600}:{secs // 60 % 60:02d}:{secs % 60:02d}"
    return plain(value)


def legend_labels(runs: list[RunData]) -> list[str]:
    """Each run's label with its values of the differing params: "cmp-b: lr=0.00003, n=8".

    Keys are shortened to their last part unless two of them would read the same."""
    diff = differing_params(runs)
    if not diff:
        return [r.label for r in runs]
    short = {k: k.rsplit(".", 1)[-1] for k in diff}
    names = short if len(set(short.values())) == len(short) else {k: k for k in diff}
    more = ", ..." if len(diff) > LEGEND_PARAMS else ""
    return [f"{r.label}: " + ", ".join(f"{names[k]}={plain(r.params.get(k, '-'))}" for k in diff[:LEGEND_PARAMS]) + more
            for r in runs]


def default_plot_dir(runs: list[RunData], sweep: str | None) -> Path:
    """<runs>/_compare/<names>/: the same runs compared again land in the same folder."""
    if sweep and all(r.tags.get("sweep") == sweep for r in runs):
        name = sweep
    else:
        labels = [re.sub(r"[^A-Za-z0-9._-]+", "-", r.label).strip("-") or r.run_id[:8] for r in runs]
        name = "+".join(labels)
        if len(name) > 100:  # many runs: the first two and a digest of them all
            digest = hashlib.sha1(" ".join(r.run_id for r in runs).encode()).hexdigest()[:8]
            name = f"{labels[0][:40]}+{labels[1][:40]}+{len(runs) - 2}-more-{digest}"
    return runs_root() / COMPARE_DIR / name


def render(runs: list[RunData], fmt: str) -> str:
    diff = differing_params(runs)
    if fmt == "json":
        rows = [{"run": r.label, "run_id": r.run_id, "params": {k: r.params.get(k) for k in diff},
                 "metrics": r.metrics} for r in runs]
        return json.dumps({"differing_params": diff, "runs": rows}, indent=2)
    if fmt == "csv":
        buf = io.StringIO()
        writer = csv.writer(buf, lineterminator="\n")
        writer.writerow(["run", "run_id", *diff, *METRIC_COLUMNS])
        for r in runs:
            writer.writerow([r.label, r.run_id, *(r.params.get(k, "") for k in diff),
                             *("" if r.metrics[c] is None else r.metrics[c] for c in METRIC_COLUMNS)])
        return buf.getvalue().rstrip("\n")
    rows: list[list[str]] = [["", *(r.label for r in runs)], ["run_id", *(r.run_id for r in runs)]]
    rows.append(["params that differ" if diff else "params: all equal", *([""] * len(runs))])
    rows += [[f"  {k}", *(_fmt(r.params.get(k)) for r in runs)] for k in diff]
    rows.append(["metrics", *([""] * len(runs))])
    rows += [[f"  {c.replace('wall_time_s', 'wall_time')}", *(_fmt(r.metrics[c], c) for r in runs)]
             for c in METRIC_COLUMNS]
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows)


def plot(runs: list[RunData], out_dir: Path) -> list[Path]:
    """One PNG per metric, one line per run; a run's colour is the same in every plot."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    out_dir.mkdir(parents=True, exist_ok=True)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    labels = legend_labels(runs)
    written = []
    for stem, (key, ylabel) in PLOTS.items():
        if not any(r.history.get(key) for r in runs):
            continue  # no run has it: no empty plot
        fig, ax = plt.subplots(figsize=(8, 4.5), dpi=100)
        for i, (r, label) in enumerate(zip(runs, labels)):
            points = r.history.get(key)
            if points:  # missing metric: no line for that run
                steps, values = zip(*points)
                ax.plot(steps, values, color=colours[i % len(colours)], linewidth=2,
                        marker="o" if len(points) < 30 else None, markersize=4, label=label)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("step")
        ax.set_ylabel(ylabel)
        ax.set_title(key)
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        path = out_dir / f"{stem}.png"
        fig.savefig(path)
        plt.close(fig)
        written.append(path)
    return written


# --------------------------------------------------------------------- main

def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = ArgumentParser(prog="python -m jobs.compare", description=__doc__.split("\n")[0])
    p.add_argument("runs", nargs="*", metavar="RUN", help="run name, run dir or MLflow run id")
    p.add_argument("--experiment", help="MLflow experiment to search (default: all)")
    p.add_argument("--last", type=int, default=0, metavar="K", help="add the K most recent runs")
    p.add_argument("--sweep", metavar="NAME", help="add every run of a sweep (jobs.submit --sweep)")
    p.add_argument("--where", default="", help="MLflow filter, e.g. \"params.rollout.n = '8'\"")
    p.add_argument("--tracking-uri", help="default: run dir's status.json, $MLFLOW_TRACKING_URI, runs/mlflow.db")
    p.add_argument("--format", choices=("table", "csv", "json"), default="table")
    p.add_argument("--out", type=Path, help=f"plot directory (default: RUNS/{COMPARE_DIR}/<run names>/; "
                                            "RUNS is $GRPO_RUNS_DIR or ./runs)")
    p.add_argument("--no-plots", action="store_true")
    args = p.parse_args(argv)
    if args.last < 0:
        p.error("--last must be >= 0")
    return args


def run(args: argparse.Namespace) -> int:
    tokens = list(args.runs)
    from jobs import sweep
    from jobs.runs import JobsError

    swept = sweep.find(args.sweep, runs_root()) if args.sweep else None
    if swept is not None:  # its elements know the URI
        try:
            tokens += [str(p) for p in sweep.element_dirs(swept)]
        except JobsError as exc:  # an unreadable sweep.json
            raise CompareError(str(exc), exc.code) from None
    uri = pick_tracking_uri(args.tracking_uri, tokens)
    if uri.startswith("sqlite:///"):
        db = Path(uri[len("sqlite:///"):])
        if not db.is_file():
            raise CompareError(f"no MLflow database at {db}")  # MLflow would create one
        with open(db, "rb") as f:
            if f.read(16) not in (SQLITE_MAGIC, b""):  # an empty file is a database MLflow sets up
                raise CompareError(f"{db} is not an SQLite database (not an MLflow store)")
    quiet_http_env()
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    try:
        client = MlflowClient(tracking_uri=uri)
        runs = load(client, collect_runs(client, args))
    except MlflowException as exc:
        if exc.get_http_status_code() < 500:
            raise CompareError(f"MLflow at {uri}: {_first_line(exc)}") from None
        raise CompareError(f"MLflow tracking server at {uri} does not answer ({_first_line(exc)})", EXIT_FAILED) from None
    print(render(runs, args.format))
    if not args.no_plots:
        out = args.out or default_plot_dir(runs, args.sweep)
        written = plot(runs, out)
        # csv/json stay machine-readable on stdout; the plot path then goes to stderr.
        stream = sys.stdout if args.format == "table" else sys.stderr
        print(f"plots: {out.resolve()} ({', '.join(p.name for p in written) or 'no metrics to plot'})", file=stream)
    return 0


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return (lines[0] if lines else type(exc).__name__)[:300]


def fail(message: str, code: int) -> NoReturn:
    cli_fail(message, code)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        return run(args)
    except (CompareError, RunFileError) as exc:
        fail(str(exc), exc.code)
    except Exception as exc:  # noqa: BLE001 - e.g. a bad --where; one line, no traceback
        fail(f"{type(exc).__name__}: {_first_line(exc)}", EXIT_FAILED)


if __name__ == "__main__":
    sys.exit(main())
