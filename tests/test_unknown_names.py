"""Unknown runs and sweeps, and names that are neither, for jobs.status,
jobs.resubmit, jobs.cancel and jobs.compare --sweep: one line naming what
exists, exit 2 (grpo_core/exitcodes.py), nothing created or changed."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from grpo_core.exitcodes import EXIT_BAD_INPUT
from jobs import cancel, compare, resubmit, status

CLIS = {"status": status.main, "resubmit": resubmit.main, "cancel": cancel.main}
NAMES = ["nosuch", "nosuch-sweep-0", "", ".", "..", "../outside", "-x", "ü", "a b", "x" * 129, "x" * 300,
         "a/" + "x" * 300, "$(touch PWNED)", "r1/..", "/"]


def _tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() if p.is_file() else b"" for p in sorted(root.rglob("*"))}


@pytest.fixture
def world(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A runs dir with one run (r1), one sweep (sw, element sw-0) and a folder beside it."""
    monkeypatch.chdir(tmp_path)
    runs = tmp_path / "runs"
    for name in ("r1", "sw-0"):
        (runs / name).mkdir(parents=True)
        (runs / name / "run.json").write_text(json.dumps({"name": name, "launcher": "local", "jobs": []}))
    (runs / "sw").mkdir()
    (runs / "sw" / "sweep.json").write_text(json.dumps({"name": "sw", "launcher": "local", "elements": [
        {"name": "sw-0", "values": {"optim.lr": "1e-5"}}], "axes": [{"key": "optim.lr"}], "jobs": []}))
    (tmp_path / "outside").mkdir()
    return tmp_path


def _one_line(capsys: pytest.CaptureFixture[str]) -> str:
    out = capsys.readouterr()
    lines = out.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), out.err
    assert "Traceback" not in out.err and not out.out.strip(), out
    return lines[0]


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("cli", list(CLIS))
def test_unknown_run_or_sweep(cli: str, name: str, world: Path, capsys) -> None:
    before = _tree(world)
    with pytest.raises(SystemExit) as info:
        CLIS[cli](["--runs-dir", str(world / "runs"), "--", name])
    line = _one_line(capsys)
    assert info.value.code == EXIT_BAD_INPUT, line
    assert len(line) < 400, line  # a 300-character name is cut, not echoed whole
    if name.startswith("nosuch"):
        assert line == f"error: no run or sweep '{name}' under {world / 'runs'}; recent runs: r1, sw-0; sweeps: sw" \
            or line == f"error: no run or sweep '{name}' under {world / 'runs'}; recent runs: sw-0, r1; sweeps: sw"
    assert _tree(world) == before and not list(world.rglob("PWNED"))


def test_status_of_the_known_ones_still_works(world: Path, capsys) -> None:
    assert status.main(["--runs-dir", str(world / "runs"), "sw"]) == 0
    assert "sweep sw:" in capsys.readouterr().out
    assert status.main(["--runs-dir", str(world / "runs"), "r1"]) == 0
    assert "r1" in capsys.readouterr().out


@pytest.mark.parametrize("name", ["nosuch", "x" * 300, "../outside"])
def test_compare_unknown_sweep(name: str, world: Path, capsys, monkeypatch: pytest.MonkeyPatch) -> None:
    """Against a real MLflow database that has a run of another sweep."""
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{world / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    run = client.create_run(client.create_experiment("e"), run_name="sw-0", tags={"sweep": "sw"})
    client.set_terminated(run.info.run_id)
    monkeypatch.setenv("GRPO_RUNS_DIR", str(world / "runs"))
    before = _tree(world)
    capsys.readouterr()  # MLflow's own lines while the test made the database
    with pytest.raises(SystemExit) as info:
        compare.main(["--sweep", name, "--tracking-uri", uri])
    line = _one_line(capsys)
    assert info.value.code == EXIT_BAD_INPUT and "no MLflow runs tagged sweep=" in line and len(line) < 400, line
    assert _tree(world).keys() == before.keys()  # no plots folder, no new database
