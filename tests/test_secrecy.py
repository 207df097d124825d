"""The one secret filter: names and values (grpo_core.secrecy), used by jobs and the trainer."""
from __future__ import annotations

import pytest

from grpo_core import secrecy, tracking
from grpo_core.config import ConfigError, flatten, to_dict
from jobs import profiles
from jobs.profiles import dump_profile, load_profile
from jobs.render import RunSpec, render_sbatch
from jobs.runs import JobsError

SECRET = ["HF_TOKEN", "MLFLOW_TRACKING_TOKEN", "hfToken", "WANDB_API_KEY", "apiKey", "AWS_SECRET_ACCESS_KEY",
          "db.password", "MLFLOW_TRACKING_PASSWORD", "PGPASSWD", "GOOGLE_APPLICATION_CREDENTIALS", "ssh_key",
          "MY_SECRET", "token", "private_key_file"]
NOT_SECRET = ["TOKENIZERS_PARALLELISM", "rollout.max_tokens", "data.max_prompt_tokens", "rollout.val_max_tokens",
              "algorithm.kl_estimator", "checkpoint.keep", "PYTHONUNBUFFERED", "NCCL_DEBUG", "CUDA_VISIBLE_DEVICES"]


@pytest.mark.parametrize("name", SECRET)
def test_secret_names(name: str) -> None:
    assert secrecy.looks_secret(name)


@pytest.mark.parametrize("name", NOT_SECRET)
def test_plain_names(name: str) -> None:
    assert not secrecy.looks_secret(name)


def test_no_config_key_looks_secret() -> None:
    """Else a real setting would silently never reach MLflow."""
    keys = list(flatten(to_dict(load_profile("h100x2").train))) + list(to_dict(load_profile("h100x2").cluster))
    assert not [k for k in keys if secrecy.looks_secret(k)]


def test_one_filter_for_jobs_and_the_trainer() -> None:
    assert profiles.looks_secret is secrecy.looks_secret is tracking.looks_secret


def test_secret_values_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_TOKEN", "hf_abcdefgh123")
    monkeypatch.setenv("SHORT_TOKEN", "1")  # too short to redact
    assert "hf_abcdefgh123" in secrecy.secret_values() and "1" not in secrecy.secret_values()
    assert secrecy.secret_in("x hf_abcdefgh123 y") == "the value of $HF_TOKEN"
    assert secrecy.redact("a hf_abcdefgh123") == "a <redacted>"


@pytest.mark.parametrize("override", ["cluster.env.FOO=hf_abcdefgh123", "train.model.path=/m/hf_abcdefgh123",
                                      "cluster.setup=export X=hf_abcdefgh123", "train.tracking.experiment=hf_abcdefgh123"])
def test_a_profile_value_that_is_an_environment_secret_is_refused(override: str, monkeypatch) -> None:
    monkeypatch.setenv("HF_TOKEN", "hf_abcdefgh123")
    with pytest.raises(ConfigError, match=r"holds the value of \$HF_TOKEN"):
        load_profile("slurm-cpu", [override])


@pytest.mark.parametrize("override", ["cluster.env.HF_TOKEN=x", "cluster.env.WANDB_API_KEY=x",
                                      "cluster.setup=export DB_PASSWORD=x"])
def test_secret_names_are_refused_in_profiles(override: str) -> None:
    with pytest.raises(ConfigError, match="secret"):
        load_profile("slurm-cpu", [override])


def test_script_that_would_spell_out_a_secret_is_refused(monkeypatch, tmp_path) -> None:
    profile = load_profile("local")
    monkeypatch.setenv("HF_TOKEN", "hf_abcdefgh123")
    run = RunSpec(name="x", run_dir=str(tmp_path / "hf_abcdefgh123"), workdir=str(tmp_path))
    with pytest.raises(JobsError, match="HF_TOKEN"):
        render_sbatch(profile, run)
    assert "hf_abcdefgh123" not in dump_profile(profile)


def test_tracker_drops_secret_params_and_values(monkeypatch, tmp_path) -> None:
    monkeypatch.setenv("HF_TOKEN", "hf_abcdefgh123")
    from grpo_core.config import TrackingConfig

    t = tracking.Tracker(TrackingConfig(enabled=True, tracking_uri=f"sqlite:///{tmp_path / 'm.db'}"), tmp_path,
                         active=True, run_id=None, params={"a.api_key": "v", "b": "hf_abcdefgh123", "c": "ok"},
                         tags={"t": "hf_abcdefgh123", "u": "fine"})
    from mlflow.tracking import MlflowClient

    run = MlflowClient(t.tracking_uri).get_run(t.run_id)
    t.finish()
    assert run.data.params == {"c": "ok"} and "t" not in run.data.tags and run.data.tags["u"] == "fine"
