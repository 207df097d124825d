"""jobs.compare against a real `mlflow server`: two tiny runs logged with the Tracker."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from matplotlib.colors import to_rgb
from matplotlib.image import imread

from grpo_core.config import TrainConfig, flatten, to_dict
from grpo_core.config import TrackingConfig
from grpo_core.tracking import Tracker
from jobs import compare
from jobs.compare import RunData, default_plot_dir, legend_labels, main, plain
from tests.mlflow_server import free_port, mlflow_server  # noqa: F401 - fixture

REPO = Path(__file__).resolve().parents[1]
CYCLE = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728"]  # matplotlib's default colour cycle


def _log_run(uri: str, experiment: str, name: str, overrides: dict[str, Any], with_kl: bool, restarts: int,
             tmp: Path) -> str:
    # as jobs.submit binds a run: its own run dir and run name
    params = {**flatten(to_dict(TrainConfig())), "trainer.run_dir": str(tmp / name), "tracking.run_name": name,
              **overrides}
    cfg = TrackingConfig(experiment=experiment, tracking_uri=uri)
    t = Tracker(cfg, tmp / name, active=True, run_id=None, params=params, tags={"slurm_restart_count": str(restarts)})
    n = overrides.get("rollout.n", 5)
    for step in range(1, 7):
        metrics = {"reward_mean": 0.1 * step * n / 5, "response_length_mean": 100.0 + 10 * step * n,
                   "tokens_per_s": 1000.0 * n}
        if with_kl:
            metrics["kl"] = 0.001 * step
        if step % 2 == 0:
            metrics["val_accuracy"] = 0.05 * step * n / 5
        t.log_metrics(metrics, step)
    t.finish("FINISHED")
    assert t.run_id
    return t.run_id


@pytest.fixture(scope="module")
def runs(mlflow_server: str, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:  # noqa: F811
    tmp = tmp_path_factory.mktemp("cmp-runs")
    return {
        "uri": mlflow_server,
        "a": _log_run(mlflow_server, "cmp", "cmp-a", {}, True, 0, tmp),
        "b": _log_run(mlflow_server, "cmp", "cmp-b", {"rollout.n": 8, "optim.lr": 3e-5}, False, 2, tmp),
        "x": _log_run(mlflow_server, "cmp-other", "other-x", {}, True, 0, tmp),
    }


def _colour_pixels(png: Path) -> list[int]:
    """Pixels of each default-cycle colour (lines are 2 px wide, so their cores are exact)."""
    rgb = imread(png)[..., :3]
    return [int((np.abs(rgb - np.array(to_rgb(c))).max(axis=-1) < 0.02).sum()) for c in CYCLE]


def _lines(png: Path) -> int:
    return sum(n > 300 for n in _colour_pixels(png))  # a legend swatch alone is far fewer pixels


def test_table_and_plots(runs: dict[str, str], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["cmp-a", "cmp-b", "--tracking-uri", runs["uri"], "--out", str(tmp_path / "plots")]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    start, end = lines.index(next(l for l in lines if l.startswith("params that differ"))), lines.index("metrics")
    diff = {l.split()[0]: l.split()[1:] for l in lines[start + 1 : end]}
    # run_dir and run_name differ too, but they name the runs; numbers are plain, not 1e-06
    assert diff == {"optim.lr": ["0.000001", "0.00003"], "rollout.n": ["5", "8"]}
    rows = {l.split()[0]: l.split()[1:] for l in lines[end + 1 :] if l.startswith("  ")}
    assert rows["final_val_accuracy"] == ["0.3", "0.48"] and rows["best_val_accuracy"] == ["0.3", "0.48"]
    assert rows["restarts"] == ["0", "2"] and rows["steps"] == ["6", "6"]
    assert rows["tokens_per_s"] == ["5000", "8000"] and rows["status"] == ["FINISHED", "FINISHED"]
    assert f"plots: {tmp_path / 'plots'}" in out

    pngs = {p.stem: p for p in (tmp_path / "plots").glob("*.png")}
    assert set(pngs) == {"reward_mean", "val_accuracy", "response_length_mean", "kl"}
    for stem in ("reward_mean", "val_accuracy", "response_length_mean"):
        counts = _colour_pixels(pngs[stem])
        assert counts[0] > 300 and counts[1] > 300 and counts[2] == 0, (stem, counts)
    kl = _colour_pixels(pngs["kl"])  # cmp-b has no kl: no line, no legend entry
    assert kl[0] > 300 and kl[1] == 0, kl


def test_csv_json_last_and_where(runs: dict[str, str], capsys: pytest.CaptureFixture[str]) -> None:
    uri = runs["uri"]
    assert main(["--experiment", "cmp", "--last", "2", "--format", "json", "--tracking-uri", uri, "--no-plots"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["differing_params"] == ["optim.lr", "rollout.n"]
    assert [r["run"] for r in data["runs"]] == ["cmp-b", "cmp-a"]  # newest first
    assert data["runs"][0]["metrics"]["final_reward_mean"] == pytest.approx(0.96)
    assert data["runs"][0]["metrics"]["wall_time_s"] >= 0

    where = "params.rollout.n = '8'"
    assert main(["--experiment", "cmp", "--where", where, "--format", "csv", "--tracking-uri", uri, "--no-plots"]) == 0
    rows = capsys.readouterr().out.splitlines()
    assert rows[0].startswith("run,run_id,final_val_accuracy") and len(rows) == 2 and rows[1].startswith("cmp-b,")


def test_run_dir_and_run_id(runs: dict[str, str], tmp_path: Path, capsys: pytest.CaptureFixture[str],
                            monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    run_dir = tmp_path / "cmp-a"
    run_dir.mkdir()
    (run_dir / "status.json").write_text(json.dumps({"mlflow_run_id": runs["a"], "mlflow_tracking_uri": runs["uri"]}))
    assert main([str(run_dir), runs["b"], "--format", "csv", "--out", str(tmp_path / "p")]) == 0
    captured = capsys.readouterr()
    assert [r.split(",")[0] for r in captured.out.splitlines()[1:]] == ["cmp-a", "cmp-b"]
    assert "plots:" in captured.err  # csv keeps stdout machine-readable
    assert _lines(tmp_path / "p" / "reward_mean.png") == 2


@pytest.mark.parametrize("argv, needle", [
    (["nope-run", "cmp-a"], "unknown run 'nope-run'; runs that exist: "),
    (["cmp-a", "other-x"], "runs are from different experiments"),
    (["cmp-a", "--experiment", "missing"], "unknown experiment 'missing'"),
])
def test_bad_input(runs: dict[str, str], argv: list[str], needle: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main([*argv, "--tracking-uri", runs["uri"], "--no-plots"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and needle in err, err
    if argv[0] == "nope-run":
        assert "cmp-a" in err and "cmp-b" in err


def test_server_that_does_not_answer(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "jobs.compare", "cmp-a", "--tracking-uri", f"http://127.0.0.1:{free_port()}"],
        cwd=REPO, capture_output=True, text=True, timeout=60,
    )
    assert proc.returncode == 1
    assert proc.stderr.count("\n") == 1 and "does not answer" in proc.stderr and "Traceback" not in proc.stderr


def test_plots_go_under_the_runs_folder_and_legends_name_the_varied_params(
        runs: dict[str, str], tmp_path: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    from matplotlib.figure import Figure

    legends: dict[str, list[str]] = {}
    savefig = Figure.savefig

    def record(fig: Figure, path: Any, *args: Any, **kwargs: Any) -> None:  # the drawn legend, then the real save
        legends[Path(path).stem] = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
        savefig(fig, path, *args, **kwargs)

    monkeypatch.setattr(Figure, "savefig", record)
    monkeypatch.setenv("GRPO_RUNS_DIR", str(tmp_path / "runs"))
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    assert main(["cmp-a", "cmp-b", "--tracking-uri", runs["uri"]]) == 0
    folder = tmp_path / "runs" / "_compare" / "cmp-a+cmp-b"
    assert f"plots: {folder} (" in capsys.readouterr().out
    assert {p.name for p in folder.iterdir()} == {"reward_mean.png", "val_accuracy.png", "response_length_mean.png",
                                                  "kl.png"}
    assert list(cwd.iterdir()) == []  # nothing in the directory it ran in
    assert legends["reward_mean"] == ["cmp-a: lr=0.000001, n=5", "cmp-b: lr=0.00003, n=8"]
    assert legends["kl"] == ["cmp-a: lr=0.000001, n=5"]  # cmp-b logged no kl


def _run(label: str, params: dict[str, str], tags: dict[str, str] | None = None) -> RunData:
    return RunData(label, label.ljust(32, "0"), "1", params, tags or {}, "FINISHED", 0, 0)


def test_plain_numbers_by_hand() -> None:
    # MLflow keeps params as str(value): scientific text keeps all its digits, other text stays as it is
    assert [plain(t) for t in ("1e-05", "3e-05", "1e-06", "2.5e-4", "1.5E+3", "0.003", "8", "True", "gsm8k")] == \
        ["0.00001", "0.00003", "0.000001", "0.00025", "1500", "0.003", "8", "True", "gsm8k"]
    # metric floats: 4 significant digits, fixed point
    assert [plain(v) for v in (1e-05, 0.96, 5000.0, 12345.678, 0.000012345, 100.0, 0.0, 7)] == \
        ["0.00001", "0.96", "5000", "12350", "0.00001234", "100", "0", "7"]
    assert [plain(v) for v in (float("nan"), float("inf"))] == ["nan", "inf"]


def test_identity_params_are_not_differences() -> None:
    a = _run("a", {"trainer.run_dir": "/r/a", "tracking.run_name": "a", "optim.lr": "1e-05", "trainer.seed": "1"})
    b = _run("b", {"trainer.run_dir": "/r/b", "tracking.run_name": "b", "optim.lr": "1e-05", "trainer.seed": "2"})
    assert compare.differing_params([a, b]) == ["trainer.seed"]  # a seed is a real param
    assert legend_labels([a, b]) == ["a: seed=1", "b: seed=2"]
    same = _run("c", {"trainer.run_dir": "/r/c", "optim.lr": "1e-05", "trainer.seed": "1"})
    assert legend_labels([a, same]) == ["a", "c"]  # nothing varies: the run names alone


def test_legend_keys_stay_whole_when_their_last_parts_clash() -> None:
    a = _run("a", {"rollout.max_tokens": "4", "data.max_tokens": "8"})
    b = _run("b", {"rollout.max_tokens": "6", "data.max_tokens": "9"})
    assert legend_labels([a, b]) == ["a: data.max_tokens=8, rollout.max_tokens=4",
                                     "b: data.max_tokens=9, rollout.max_tokens=6"]


def test_default_plot_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("GRPO_RUNS_DIR", str(tmp_path))
    a, b = _run("lr-0", {}, {"sweep": "lr"}), _run("lr-1", {}, {"sweep": "lr"})
    assert default_plot_dir([a, b], "lr") == tmp_path / "_compare" / "lr"  # a sweep: its name
    assert default_plot_dir([a, b], None) == tmp_path / "_compare" / "lr-0+lr-1"
    assert default_plot_dir([a, _run("x (0123abcd)", {})], "lr") == tmp_path / "_compare" / "lr-0+x-0123abcd"
    many = [_run(f"run-{i:02d}-with-a-long-name", {}) for i in range(6)]
    name = default_plot_dir(many, None).name
    assert name.startswith("run-00-with-a-long-name+run-01-with-a-long-name+4-more-") and len(name) <= 100
    assert default_plot_dir(many, None) == default_plot_dir(list(many), None)  # the same runs: the same folder
