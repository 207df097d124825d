"""What a hostile pass over the CLIs found, one test each: a run dir or runs
dir that is a file (or under one), an empty run dir, flags out of range, a
sweep over the run dir, an empty sweep name, and the hub's retry chatter.
Each is one line, exit 2, and creates nothing."""
from __future__ import annotations

import logging
from pathlib import Path

import pytest

from grpo_core import data, train
from grpo_core.data import DataError
from grpo_core.exitcodes import EXIT_BAD_INPUT
from jobs import cancel, resubmit, status, submit


def _tree(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


def _one_line(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    return lines[0]


def _exit_code(fn, argv: list[str]) -> int:
    try:
        return fn(argv)
    except SystemExit as exc:
        return int(exc.code)


@pytest.fixture
def here(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "afile").write_text("not a directory")
    return tmp_path


@pytest.mark.parametrize("run_dir, why", [("afile", "is a file, not a directory"),
                                          ("afile/run", "is under {here}/afile, a file"),
                                          ("", "trainer.run_dir is required")])
def test_train_run_dir_that_cannot_be_one(run_dir: str, why: str, here: Path, capsys) -> None:
    """Refused before the model is built (the tiny model's folder never appears) and before the
    run dir is touched; an empty one would have trained into the current directory."""
    before = _tree(here)
    code = train.main(["model.path=tiny", "model.tiny=true", "data.task=synthetic", f"trainer.run_dir={run_dir}",
                       "rollout.engine=tests.fake_engine:FakeEngine", "tracking.enabled=false"])
    line = _one_line(capsys)
    assert code == EXIT_BAD_INPUT and why.format(here=here) in line, line
    assert _tree(here) == before


@pytest.mark.parametrize("cli, argv", [
    (status.main, []), (status.main, ["r"]), (cancel.main, ["r"]), (resubmit.main, ["r"]),
    (submit.main, ["--name", "r", "--dry-run"]), (submit.main, ["--name", "r", "--no-follow"]),
    (submit.main, ["--sweep", "optim.lr=1e-5,2e-5", "--no-follow"]),
])
@pytest.mark.parametrize("runs_dir", ["afile", "afile/runs"])
def test_runs_dir_that_is_a_file(cli, argv: list[str], runs_dir: str, here: Path, capsys) -> None:
    """Bad input (exit 2), not 'cannot write' (exit 4): no disk is at fault."""
    before = _tree(here)
    assert _exit_code(cli, ["--runs-dir", runs_dir, *argv]) == EXIT_BAD_INPUT
    assert f"runs dir {here / runs_dir} " in _one_line(capsys)
    assert _tree(here) == before


@pytest.mark.parametrize("cli, argv, needle", [
    (status.main, ["--limit", "0"], "--limit 0: must be >= 1"),
    (status.main, ["--limit", "-1"], "--limit -1: must be >= 1"),
    (status.main, ["--follow"], "--follow needs a RUN"),
    (submit.main, ["--dry-run", "train.trainer.run_dir=/elsewhere"], "jobs.submit sets the run dir"),
    (submit.main, ["--dry-run", "--sweep", "trainer.run_dir=a,b"], "each element's run dir is its own"),
    (submit.main, ["--dry-run", "--sweep", "optim.lr=1e-5,2e-5", "--sweep-name="], "sweep name ''"),
    (submit.main, ["--dry-run", "--sweep", "optim.lr=1e-5,2e-5", "--name="], "--name names one run"),
    (submit.main, ["--dry-run", "--sweep-name="], "--sweep-name and --max-parallel go with --sweep"),
    # 127 characters is a run name, but not with "-0" after it: the sweep's name is what is wrong
    (submit.main, ["--dry-run", "--sweep", "optim.lr=1e-5,2e-5", "--sweep-name", "s" * 127],
     "at most 126 here (its runs are NAME-0 ... NAME-1)"),
    (submit.main, ["--dry-run", "--sweep", f"rollout.n={','.join(map(str, range(1, 12)))}", "--sweep-name",
                   "s" * 126], "at most 125 here (its runs are NAME-0 ... NAME-10)"),
])
def test_flags_out_of_range(cli, argv: list[str], needle: str, here: Path, capsys) -> None:
    before = _tree(here)
    assert _exit_code(cli, ["--runs-dir", str(here / "runs"), *argv]) == EXIT_BAD_INPUT
    assert needle in _one_line(capsys)
    assert _tree(here) == before


def test_the_hubs_retry_warnings_stay_quiet(monkeypatch: pytest.MonkeyPatch, caplog, capsys) -> None:
    """Offline, huggingface_hub warns twice per retry (10 lines before ours); only the error is said,
    and the logger's level is restored after."""
    import datasets

    def offline(*_args, **_kwargs):
        log = logging.getLogger("huggingface_hub.utils._http")
        for attempt in range(1, 6):
            log.warning("'[Errno -2] Name or service not known' thrown while requesting HEAD https://huggingface.co/x")
            log.warning(f"Retrying in 1s [Retry {attempt}/5].")
        raise OSError("Couldn't reach 'openai/gsm8k' on the Hub (LocalEntryNotFoundError)")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    level = logging.getLogger("huggingface_hub").level
    with caplog.at_level(logging.WARNING), pytest.raises(DataError, match="cannot load openai/gsm8k"):
        data.load_gsm8k("", "train")
    assert not [r for r in caplog.records if r.name.startswith("huggingface_hub")]
    assert "Retrying" not in capsys.readouterr().err
    assert logging.getLogger("huggingface_hub").level == level


def test_compare_a_file_that_is_not_a_database(here: Path, capsys) -> None:
    from jobs import compare

    assert _exit_code(compare.main, ["--tracking-uri", f"sqlite:///{here / 'afile'}", "x"]) == EXIT_BAD_INPUT
    assert _one_line(capsys) == f"error: {here / 'afile'} is not an SQLite database (not an MLflow store)"
    assert (here / "afile").read_text() == "not a directory"


@pytest.mark.parametrize("record", ['{"name": "r", "launcher": "lo', "[1, 2]",
                                    '{"name": "r", "launcher": "local", "jobs": [{"id": "local-1", "pid": "abc"}]}'],
                         ids=["torn", "a-list", "foreign-pid"])
@pytest.mark.parametrize("cli", [cancel.main, resubmit.main], ids=["cancel", "resubmit"])
def test_cancel_and_resubmit_a_run_with_an_unreadable_run_json(cli, record: str, here: Path, capsys) -> None:
    """One line naming the file's problem, exit 2, run.json untouched (a foreign pid was a traceback)."""
    run = here / "runs" / "r"
    run.mkdir(parents=True)
    (run / "run.json").write_text(record)
    assert _exit_code(cli, ["--runs-dir", str(here / "runs"), "r"]) == EXIT_BAD_INPUT
    assert "unreadable" in _one_line(capsys)
    assert (run / "run.json").read_text() == record and _tree(here / "runs") == ["r", "r/run.json"]
