"""The README's examples run as written, so the documentation cannot rot: the user task
and reward (loaded through the real config-time check, then scored) and the exit codes."""
from __future__ import annotations

import re
import shlex
import sys
from pathlib import Path

import pytest

from grpo_core import exitcodes
from grpo_core.config import load
from grpo_core.tasks import Row, Task, make_reward, make_task
from jobs.profiles import load_profile

README = Path(__file__).resolve().parents[1] / "README.md"


def code_after(label: str) -> str:
    """The indented code block that follows the README line starting with `label`."""
    lines = README.read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(label))
    block: list[str] = []
    for line in lines[start + 1:]:
        if line.strip() and not line.startswith("    "):
            if block:
                break
            continue
        block.append(line[4:])
    return "\n".join(block).strip("\n") + "\n"


@pytest.fixture
def mypkg(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    pkg = tmp_path / "mypkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    for name in ("tasks", "rewards"):
        (pkg / f"{name}.py").write_text(code_after(f"`mypkg/{name}.py`"))
    monkeypatch.syspath_prepend(str(tmp_path))
    yield pkg
    for name in ("mypkg", "mypkg.tasks", "mypkg.rewards"):
        sys.modules.pop(name, None)


def test_the_user_task_and_reward_example_runs(mypkg: Path) -> None:
    headings = re.findall(r"^`mypkg/\w+\.py` \(`(data\.\w+)=([\w.:]+)`\):$", README.read_text(), re.M)
    assert headings == [("data.task", "mypkg.tasks:make_task"), ("data.reward", "mypkg.rewards:score")]
    cfg = load(None, ["model.path=unused", *(f"{key}={spec}" for key, spec in headings)])  # the config-time check
    task = make_task(cfg.data, cfg.trainer.seed)
    assert isinstance(task, Task)
    train, test = task.rows("train"), task.rows("test")
    assert len(train) == 3 and len(test) == 1 and all(isinstance(r, Row) for r in [*train, *test])
    row = train[0]
    assert row.messages == ({"role": "user", "content": "The capital of France? Answer after ####."},)
    assert [task.score(text, row.ground_truth) for text in ("It is #### Paris", "#### Lyon", "Paris")] == [1.0, 0.0, 0.0]
    reward = make_reward(cfg.data, task)
    assert reward is not task.score
    assert [reward(text, row.ground_truth) for text in ("#### Paris", "#### Lyon", "Paris")] == [1.0, 0.1, 0.0]


def test_the_documented_command_loads(mypkg: Path) -> None:
    line = next(line.strip() for line in README.read_text().splitlines()
                if line.strip().startswith("python -m jobs.submit") and "mypkg" in line)
    words = shlex.split(line)
    profile = words[words.index("--profile") + 1]
    overrides = words[words.index("--profile") + 2:]
    data = load_profile(profile, overrides).train.data
    assert (data.task, data.reward) == ("mypkg.tasks:make_task", "mypkg.rewards:score")


def test_the_exit_code_table_is_exitcodes_table() -> None:
    rows = re.findall(r"^\| (\d+) \| (.+?) \|$", README.read_text(), re.M)
    assert [(int(code), text) for code, text in rows] == list(exitcodes.TABLE)
