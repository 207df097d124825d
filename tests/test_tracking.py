"""grpo_core.tracking against a real `mlflow server` (and the embedded SQLite default)."""
from __future__ import annotations

import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from grpo_core.config import TrackingConfig
from grpo_core.secrecy import looks_secret
from grpo_core.tracking import STEP_KEY, Tracker
from tests.mlflow_server import MlflowServer, mlflow_server  # noqa: F401 - fixture

WARNING = "not reachable; buffering metrics, will retry"


def _steps(client: MlflowClient, run_id: str, key: str = "reward_mean") -> list[int]:
    return sorted(m.step for m in client.get_metric_history(run_id, key))


def _tracker(uri: str, run_dir: Path, run_id: str | None = None, **params: object) -> Tracker:
    cfg = TrackingConfig(experiment="t-tracking", tracking_uri=uri)
    base = {"rollout.n": 5, "rollout.max_tokens": 1024, "model.path": "x" * 7000, "HF_TOKEN": "hf_abc"}
    return Tracker(cfg, run_dir, active=True, run_id=run_id, params={**base, **params}, tags={"slurm_job_id": "11"})


def test_secret_keys() -> None:
    assert all(map(looks_secret, ["HF_TOKEN", "db.password", "aws_secret_access_key", "apiKey", "api_key"]))
    assert not any(map(looks_secret, ["rollout.max_tokens", "data.max_prompt_tokens", "algorithm.kl_estimator"]))


def test_inactive_is_a_noop(tmp_path: Path) -> None:
    t = Tracker(TrackingConfig(), tmp_path / "runs" / "r", active=False, run_id="abc", params={"a": 1}, tags={})
    t.log_metrics({"x": 1.0}, step=1)
    t.set_tags({"a": "b"})
    t.finish("FINISHED")
    assert t.run_id == "abc" and not (tmp_path / "runs").exists()


def test_new_run_then_resume_skips_logged_steps(mlflow_server: str, tmp_path: Path) -> None:
    client = MlflowClient(mlflow_server)
    first = _tracker(mlflow_server, tmp_path / "run-a")
    run_id = first.run_id
    assert run_id
    for step in (1, 2, 3):
        first.log_metrics({"reward_mean": 0.1 * step, "kl": 0.01}, step)
    first.log_metrics({"val_accuracy": 0.5}, 3)  # a second call at the same step still lands
    # Killed hard: no finish(). The resumed job replays steps 2..3 from its checkpoint.
    second = _tracker(mlflow_server, tmp_path / "run-a", run_id=run_id, **{"rollout.n": 8, "cluster.partition": "gpu"})
    assert second.run_id == run_id
    assert client.get_run(run_id).info.status == "RUNNING"
    for step in (2, 3, 4, 5):
        second.log_metrics({"reward_mean": 0.1 * step, "kl": 0.01}, step)
    second.set_tags({"slurm_restart_count": "1"})
    second.finish("FINISHED")

    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == "run-a"
    assert _steps(client, run_id) == [1, 2, 3, 4, 5]
    assert _steps(client, run_id, STEP_KEY) == [1, 2, 3, 4, 5]
    assert _steps(client, run_id, "val_accuracy") == [3]
    params = run.data.params
    assert params["rollout.n"] == "5"  # params cannot change; the old value stays
    assert params["cluster.partition"] == "gpu"  # new keys are added on resume
    assert params["rollout.max_tokens"] == "1024" and len(params["model.path"]) == 6000
    assert "HF_TOKEN" not in params
    assert run.data.tags["slurm_job_id"] == "11" and run.data.tags["slurm_restart_count"] == "1"


def test_outage_buffers_and_recovers(
    tmp_path: Path, capfd: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(Tracker, "retry_min_s", 0.2)  # retry soon, so recovery shows before finish()
    monkeypatch.setattr(Tracker, "retry_max_s", 0.5)
    server = MlflowServer(tmp_path / "srv")
    uri = server.start()
    try:
        client = MlflowClient(uri)
        a = _tracker(uri, tmp_path / "a")
        a.log_metrics({"reward_mean": 1.0}, 1)
        a.log_metrics({"reward_mean": 2.0}, 2)

        server.kill()
        start = time.monotonic()
        for step in range(3, 8):  # must neither raise nor stall training
            a.log_metrics({"reward_mean": float(step)}, step)
        assert time.monotonic() - start < 15
        assert capfd.readouterr().err.count(WARNING) == 1

        # Created while the server is down: the run appears when it comes back.
        b = _tracker(uri, tmp_path / "b")
        assert b.run_id is None
        b.log_metrics({"reward_mean": 0.5}, 1)

        server.start()  # same port, same database
        time.sleep(0.5)
        a.log_metrics({"reward_mean": 8.0}, 8)
        b.log_metrics({"reward_mean": 0.6}, 2)
        assert _steps(client, a.run_id) == list(range(1, 9))  # flushed by a later call, before finish
        a.finish("FINISHED")
        b.finish("KILLED")
        err = capfd.readouterr().err
        assert "reachable again" in err and "still not reachable" not in err

        assert _steps(client, a.run_id) == list(range(1, 9))
        assert client.get_run(a.run_id).info.status == "FINISHED"
        assert b.run_id and _steps(client, b.run_id) == [1, 2]
        run_b = client.get_run(b.run_id)
        assert run_b.info.status == "KILLED" and run_b.info.run_name == "b"
        assert run_b.data.params["rollout.n"] == "5" and run_b.data.tags["slurm_job_id"] == "11"

        # A preempted job restarts while the server hangs (accepts, never answers): the
        # replayed steps 7..8 are dropped once the tracker learns MLflow already has them.
        monkeypatch.setattr(Tracker, "retry_min_s", 30.0)  # each try now costs the 2 s timeout
        server.pause()
        start = time.monotonic()
        resumed = _tracker(uri, tmp_path / "a", run_id=a.run_id)
        for step in (7, 8, 9):
            resumed.log_metrics({"reward_mean": float(step)}, step)
        assert time.monotonic() - start < 10
        server.pause(False)
        resumed.finish("FINISHED")
        assert _steps(client, a.run_id) == list(range(1, 10))
    finally:
        server.stop()


def test_embedded_sqlite_default(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    run_dir = tmp_path / "runs" / "local-1"
    run_dir.mkdir(parents=True)
    (run_dir / "train.yaml").write_text("rollout:\n  n: 5\n")
    t = Tracker(TrackingConfig(experiment="local"), run_dir, active=True, run_id=None, params={"rollout.n": 5}, tags={})
    assert t.tracking_uri == f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}"
    t.log_metrics({"reward_mean": 0.25}, 1)
    t.log_artifact(run_dir / "train.yaml")
    t.finish("FINISHED")
    assert (tmp_path / "runs" / "mlflow.db").is_file()
    client = MlflowClient(t.tracking_uri)
    run = client.get_run(t.run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == "local-1"
    assert [a.path for a in client.list_artifacts(t.run_id)] == ["train.yaml"]
    assert (tmp_path / "runs" / "mlartifacts").is_dir() and not (tmp_path / "mlruns").exists()


def test_experiment_opens_in_the_model_training_view(mlflow_server: str, tmp_path: Path) -> None:
    """MLflow 3's UI picks an experiment's view from its `mlflow.experimentKind` tag;
    the tracker sets the "Machine learning" kind on experiments it creates, and on
    ours made without it, but leaves a kind chosen in the UI alone."""
    from grpo_core.tracking import EXPERIMENT_KIND, EXPERIMENT_KIND_TAG

    client = MlflowClient(mlflow_server)
    t = _tracker(mlflow_server, tmp_path / "kind-a")
    assert t.run_id
    exp = client.get_experiment_by_name("t-tracking")
    assert exp.tags[EXPERIMENT_KIND_TAG] == EXPERIMENT_KIND == "custom_model_development"
    t.finish("FINISHED")
    old = client.create_experiment("t-kind-old")  # as an older version of us made it
    Tracker(TrackingConfig(experiment="t-kind-old", tracking_uri=mlflow_server), tmp_path / "kind-b", active=True,
            run_id=None, params={}, tags={}).finish("FINISHED")
    assert client.get_experiment(old).tags[EXPERIMENT_KIND_TAG] == EXPERIMENT_KIND
    chosen = client.create_experiment("t-kind-chosen", tags={EXPERIMENT_KIND_TAG: "genai_development"})
    Tracker(TrackingConfig(experiment="t-kind-chosen", tracking_uri=mlflow_server), tmp_path / "kind-c", active=True,
            run_id=None, params={}, tags={}).finish("FINISHED")
    assert client.get_experiment(chosen).tags[EXPERIMENT_KIND_TAG] == "genai_development"
