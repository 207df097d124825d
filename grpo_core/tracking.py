"""MLflow tracking for the trainer that never stops training.

Only rank 0 tracks (`active=True`). Everything goes through `MlflowClient`
with an explicit run id, so the library never touches MLflow's global
"active run". When the tracking server does not answer, metrics, tags and
artifact paths are buffered in memory (bounded), one warning goes to stderr,
and sending is retried on later calls at most every few seconds; finish()
makes a last attempt. On resume (`run_id` given) the same run continues, and
steps that MLflow already has are skipped: the trainer replays the steps
after its last checkpoint bit-exactly, so they would otherwise appear twice.
"""
from __future__ import annotations

import os
import re
import sys
import time
from pathlib import Path
from typing import Any, Mapping

from grpo_core.config import TrackingConfig
from grpo_core.secrecy import looks_secret, secret_in

STEP_KEY = "step"  # sentinel metric logged last in every step: MLflow's last step on resume
MAX_BUFFERED_VALUES = 200_000  # metric values kept while the server is away (~tens of MB)
_PARAM_VAL_MAX = 6000  # mlflow.utils.validation.MAX_PARAM_VAL_LENGTH
_TAG_VAL_MAX = 8000  # MAX_TAG_VAL_LENGTH
_PER_BATCH = 100  # params/tags per log_batch
_METRICS_PER_BATCH = 1000
_STATUSES = ("FINISHED", "KILLED", "FAILED")
# MLflow 3's UI decides from this experiment tag which view an experiment opens
# in (server/js: "mlflow.experimentKind"); without it, it guesses, and files our
# runs under GenAI "evaluation runs". This value is its "Machine learning" kind:
# training runs with metric charts.
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"
_BAD_NAME_CHARS = re.compile(r"[^A-Za-z0-9_\-./ ]")  # one bad name would sink a whole batch


def quiet_http_env() -> None:
    """Make a dead server cost about a second instead of minutes of retries.

    MLflow reads these per request. setdefault: an explicit user choice wins.
    Zero client-side retries also keeps urllib3's retry warnings off stderr;
    the tracker retries on its own schedule.
    """
    for name, value in (
        ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0"),
        ("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "0"),
        ("MLFLOW_HTTP_REQUEST_BACKOFF_JITTER", "0"),
        ("MLFLOW_HTTP_REQUEST_TIMEOUT", "2"),
    ):
        os.environ.setdefault(name, value)


def default_tracking_uri(cfg: TrackingConfig, run_dir: Path) -> str:
    """cfg.tracking_uri, else $MLFLOW_TRACKING_URI, else SQLite next to the run dir."""
    if cfg.tracking_uri:
        return cfg.tracking_uri
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    return f"sqlite:///{Path(run_dir).resolve().parent / 'mlflow.db'}"


def _is_permanent(exc: BaseException) -> bool:
    """A 4xx-type error (bad data, unknown run): retrying cannot help.

    Everything else (connection refused, timeouts, 5xx, a locked SQLite file)
    counts as an outage and is retried later.
    """
    from mlflow.exceptions import MlflowException

    if isinstance(exc, MlflowException):
        return 400 <= exc.get_http_status_code() < 500
    response = getattr(exc, "response", None)  # requests.HTTPError from artifact uploads
    status = getattr(response, "status_code", None)
    return isinstance(status, int) and 400 <= status < 500


class _Outage(Exception):
    pass


class Tracker:
    retry_min_s: float = 5.0  # first retry after an outage starts
    retry_max_s: float = 60.0  # retries back off to this interval

    def __init__(
        self,
        cfg: TrackingConfig,
        run_dir: Path,
        *,
        active: bool,
        run_id: str | None,
        params: Mapping[str, Any],
        tags: Mapping[str, str],
    ) -> None:
        self.run_id: str | None = run_id
        self.run_dir = Path(run_dir)
        self.tracking_uri: str = default_tracking_uri(cfg, self.run_dir)
        self.active = bool(active and cfg.enabled)
        if not self.active:
            return
        quiet_http_env()
        self._cfg = cfg
        self._run_name = cfg.run_name or self.run_dir.name
        self._params = {k: str(v)[:_PARAM_VAL_MAX] for k, v in params.items()
                        if not looks_secret(k) and not secret_in(str(v))}
        self._tags: dict[str, str] = {}
        self._steps: list[tuple[int, list[Any]]] = []  # (step, [Metric]) not yet sent, in order
        self._n_buffered = 0
        self._dropping = False  # warned that the buffer overflowed
        self._artifacts: list[tuple[Path, str | None]] = []
        self._client: Any = None
        self._ready = False  # run created/resumed and its last step known
        self._skip_upto: int | None = None  # last step MLflow had when this tracker attached
        self._sentinel_upto: int | None = None
        self._down = False
        self._next_try = 0.0
        self._interval = self.retry_min_s
        self._monitor: Any = None
        self._finished = False
        self._constructing = True  # a refused run raises here (config error), later it only warns
        self.set_tags(dict(tags))  # also makes the first connection attempt
        self._constructing = False

    # ----------------------------------------------------------- public API

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        if not self.active:
            return
        if self._skip_upto is not None and step <= self._skip_upto:
            return  # already in MLflow from before the restart
        from mlflow.entities import Metric

        now = int(time.time() * 1000)  # kept through buffering, so retries are idempotent
        batch = [
            Metric(_BAD_NAME_CHARS.sub("_", str(k))[:250], float(v), now, int(step))
            for k, v in metrics.items()
            if k != STEP_KEY and isinstance(v, (int, float))
        ]
        if self._sentinel_upto is None or step > self._sentinel_upto:  # once per step
            batch.append(Metric(STEP_KEY, float(step), now, int(step)))  # last: step complete
            self._sentinel_upto = int(step)
        self._steps.append((int(step), batch))
        self._n_buffered += len(batch)
        while self._n_buffered > MAX_BUFFERED_VALUES and len(self._steps) > 1:
            dropped = self._steps.pop(0)
            self._n_buffered -= len(dropped[1])
            if not self._dropping:
                self._dropping = True
                self._say(f"buffer full; dropping the oldest buffered steps (from step {dropped[0]})")
        self._flush()

    def set_tags(self, tags: Mapping[str, str]) -> None:
        if not self.active:
            return
        self._tags.update({str(k): str(v)[:_TAG_VAL_MAX] for k, v in tags.items()
                           if not looks_secret(str(k)) and not secret_in(str(v))})
        self._flush()

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        if not self.active:
            return
        self._artifacts.append((Path(path), artifact_path))
        self._flush()

    def finish(self, status: str = "FINISHED") -> None:
        if status not in _STATUSES:
            raise ValueError(f"status must be one of {', '.join(_STATUSES)}, got {status!r}")
        if not self.active or self._finished:
            return
        self._finished = True
        if self._monitor is not None:
            try:
                self._monitor.finish()
            except Exception:  # noqa: BLE001 - system metrics are best effort
                pass
        self._flush(force=True)
        if not self.active:
            return
        if self._ready and not (self._steps or self._tags or self._artifacts):
            try:
                self._client.set_terminated(self.run_id, status=status)
                return
            except Exception as exc:  # noqa: BLE001
                if _is_permanent(exc):
                    self._say(f"could not set the run's status: {_one_line(exc)}")
                    return
        self._say(
            f"tracking server at {self.tracking_uri} still not reachable; {len(self._steps)} buffered steps "
            f"not sent (all steps are in {self.run_dir / 'metrics.jsonl'}); the run stays RUNNING"
        )

    # ------------------------------------------------------------ internals

    def _say(self, text: str) -> None:
        print(f"mlflow: {text}", file=sys.stderr, flush=True)

    def _flush(self, force: bool = False) -> None:
        """Send what is buffered; on an outage buffer and back off instead of raising."""
        if not force and time.monotonic() < self._next_try:
            return
        try:
            if not self._ready:
                self._connect()
            self._send()
        except _Outage:
            if not self._down:
                self._down = True
                self._say(f"tracking server at {self.tracking_uri} not reachable; buffering metrics, will retry "
                          f"(training goes on; every step is in {self.run_dir / 'metrics.jsonl'})")
            self._next_try = time.monotonic() + self._interval
            self._interval = min(self._interval * 2, self.retry_max_s)
            return
        except Exception as exc:  # noqa: BLE001 - the server refused the run itself
            if self._constructing:
                raise RuntimeError(f"mlflow at {self.tracking_uri}: {_one_line(exc)}") from None
            self._say(f"tracking disabled: {_one_line(exc)}")  # mid-training: never kill the run
            self.active = False
            return
        if self._down:
            self._down = False
            self._say(f"tracking server at {self.tracking_uri} reachable again; buffered metrics sent")
        self._interval = self.retry_min_s
        self._next_try = 0.0

    def _call(self, what: str, fn: Any, *args: Any, **kwargs: Any) -> bool:
        """Run one client call. False: a permanent error (warned, item dropped)."""
        try:
            fn(*args, **kwargs)
            return True
        except Exception as exc:  # noqa: BLE001 - training must never die of tracking
            if _is_permanent(exc):
                self._say(f"{what} rejected, dropped: {_one_line(exc)}")
                return False
            raise _Outage(str(exc)) from exc

    def _connect(self) -> None:
        """Create or resume the run; learn the last step MLflow already has."""
        from mlflow.entities import Param, RunStatus
        from mlflow.exceptions import MlflowException
        from mlflow.tracking import MlflowClient

        try:
            if self._client is None:
                if self.tracking_uri.startswith("sqlite:///"):
                    Path(self.tracking_uri[len("sqlite:///"):]).parent.mkdir(parents=True, exist_ok=True)
                self._client = MlflowClient(tracking_uri=self.tracking_uri)
            client = self._client
            existing: dict[str, str] = {}
            resumed = False
            run = None
            if self.run_id is not None:
                try:
                    run = client.get_run(self.run_id)
                except MlflowException as exc:
                    if not _is_permanent(exc):
                        raise
                    self._say(f"run {self.run_id} not found at {self.tracking_uri}; starting a new run")
            if run is not None:
                resumed = True
                existing = dict(run.data.params)
                last = run.data.metrics.get(STEP_KEY)  # latest value = the largest step logged
                self._skip_upto = int(last) if last is not None else None
                if run.info.status != RunStatus.to_string(RunStatus.RUNNING):
                    client.update_run(self.run_id, status="RUNNING")
            else:
                run = client.create_run(self._experiment_id(client), run_name=self._run_name)
                self.run_id = run.info.run_id
            changed = sorted(k for k, v in self._params.items() if k in existing and existing[k] != v)
            if changed:
                self._say(f"params cannot change in a resumed run; kept the old values of {', '.join(changed)}")
            todo = [Param(k, v) for k, v in self._params.items() if k not in existing]
            for i in range(0, len(todo), _PER_BATCH):
                self._call("params", client.log_batch, self.run_id, params=todo[i : i + _PER_BATCH], synchronous=True)
        except _Outage:
            raise
        except Exception as exc:  # noqa: BLE001
            if _is_permanent(exc):
                raise  # e.g. a malformed experiment name: a programming/config error
            raise _Outage(str(exc)) from exc
        self._ready = True
        if self._skip_upto is not None:  # drop replayed steps buffered before we knew
            kept = [(s, b) for s, b in self._steps if s > self._skip_upto]
            self._n_buffered = sum(len(b) for _, b in kept)
            self._steps = kept
        if self._cfg.system_metrics:
            self._start_system_metrics(resumed=resumed)

    def _experiment_id(self, client: Any) -> str:
        from mlflow.exceptions import MlflowException

        exp = client.get_experiment_by_name(self._cfg.experiment)
        if exp is not None:
            if EXPERIMENT_KIND_TAG not in exp.tags:  # made before we set it; a user's own choice stays
                client.set_experiment_tag(exp.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
            return str(exp.experiment_id)
        location = None
        if self.tracking_uri.startswith("sqlite:///"):  # else MLflow uses ./mlruns of the cwd
            location = (Path(self.tracking_uri[len("sqlite:///"):]).parent / "mlartifacts").as_uri()
        try:
            return str(client.create_experiment(self._cfg.experiment, artifact_location=location,
                                                tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND}))
        except MlflowException:  # another job created it first
            exp = client.get_experiment_by_name(self._cfg.experiment)
            if exp is None:
                raise
            return str(exp.experiment_id)

    def _send(self) -> None:
        from mlflow.entities import RunTag

        client = self._client
        if self._tags:
            items = [RunTag(k, v) for k, v in self._tags.items()]
            for i in range(0, len(items), _PER_BATCH):
                self._call("tags", client.log_batch, self.run_id, tags=items[i : i + _PER_BATCH], synchronous=True)
            self._tags = {}
        while self._steps:
            # Whole steps per request, in order; a step's sentinel goes last.
            n, chunk = 0, []
            while n < len(self._steps) and (not chunk or len(chunk) + len(self._steps[n][1]) <= _METRICS_PER_BATCH):
                chunk.extend(self._steps[n][1])
                n += 1
            for i in range(0, len(chunk), _METRICS_PER_BATCH):
                self._call("metrics", client.log_batch, self.run_id, metrics=chunk[i : i + _METRICS_PER_BATCH], synchronous=True)
            self._n_buffered -= len(chunk)
            del self._steps[:n]
        while self._artifacts:
            path, where = self._artifacts[0]
            if not path.exists():
                self._say(f"artifact {path} no longer exists; skipped")
            else:
                self._call(f"artifact {path}", client.log_artifact, self.run_id, str(path), where)
            self._artifacts.pop(0)

    def _start_system_metrics(self, resumed: bool) -> None:
        try:
            from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

            self._monitor = SystemMetricsMonitor(self.run_id, resume_logging=resumed, tracking_uri=self.tracking_uri)
            self._monitor.start()
        except Exception as exc:  # noqa: BLE001 - optional extra
            self._monitor = None
            self._say(f"system metrics not available ({_one_line(exc)})")


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return (text[0] if text else type(exc).__name__)[:300]
