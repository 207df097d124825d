"""The progress line (by hand), the live bar on a terminal, and `jobs.status --follow` from elsewhere."""
from __future__ import annotations

import io
import json
import threading
import time
from pathlib import Path

from grpo_core.progress import Progress, eta_s, hms, progress_line, slowest_stage

METRICS = {"reward_mean": 0.4125, "accuracy": 0.375, "policy_loss": -0.01234, "tokens_per_s": 1234.4,
           "time_rollout": 3.0, "time_reference": 0.5, "time_update": 4.25, "time_sync": 0.1, "time_step": 8.0}


def test_progress_line_by_hand() -> None:
    line = progress_line(12, 150, 83.0, 940.4, METRICS)
    assert line == ("[grpo] step  12/150 (  8%) elapsed 0:01:23 eta 0:15:40 | 1234 tok/s | reward 0.412 | "
                    "acc 0.375 | loss -0.0123 | slowest update 4.25s")
    with_val = progress_line(150, 150, 3600 * 2 + 5, 0, {**METRICS, "val_accuracy": 0.5, "time_validation": 9.0})
    assert with_val.endswith("slowest validation 9.00s | val_acc 0.500") and "(100%) elapsed 2:00:05 eta 0:00:00" in with_val
    assert progress_line(1, 10, None, None, {}) == "[grpo] step  1/10 ( 10%) elapsed ? eta ?"


def test_eta_and_slowest_stage() -> None:
    assert eta_s(10, 100, [2.0, 4.0]) == 270.0 and eta_s(100, 100, [2.0]) == 0 and eta_s(1, 5, []) is None
    assert slowest_stage(METRICS) == ("update", 4.25) and slowest_stage({"reward_mean": 1.0}) is None
    assert hms(59.6) == "0:01:00" and hms(-3) == "0:00:00"


def test_plain_lines_when_not_a_terminal() -> None:
    out = io.StringIO()  # a Slurm log: not a tty
    p = Progress(total=3, start_step=1, stream=out)
    assert p.bar is None
    for step in (2, 3):
        p.step(step, METRICS)
    p.close()
    lines = out.getvalue().splitlines()
    assert [line.split(" (")[0] for line in lines] == ["[grpo] step 2/3", "[grpo] step 3/3"]
    assert "\r" not in out.getvalue() and all("reward 0.412" in line for line in lines)


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_live_bar_on_a_terminal() -> None:
    out = _Tty()
    p = Progress(total=4, start_step=1, stream=out)  # resumed after step 1
    assert p.bar is not None
    p.step(2, METRICS)
    p.step(3, METRICS)
    p.close()
    text = out.getvalue()
    assert "\r" in text and "step 3/4" in text and "reward 0.412" in text and "slowest update 4.25s" in text
    assert "[grpo] step" not in text  # the bar instead of lines


def test_follow_from_anywhere(tmp_path: Path, monkeypatch) -> None:
    """`jobs.status --follow RUN_DIR` from another folder: the progress lines, the log's own
    messages, and it returns when the run ends."""
    from grpo_core import rundir
    from jobs import runs, status

    run_dir = tmp_path / "runs" / "r1"
    run_dir.mkdir(parents=True)
    rundir.write_json_atomic(run_dir / "run.json", {"name": "r1", "launcher": "local", "run_dir": str(run_dir),
                                                  "jobs": [{"id": "local-1", "pid": 999999999}]})
    (run_dir / "local.log").write_text("[grpo] resuming from checkpoints/step_000001 (step 1)\nnoise\n")

    def write(state: str, step: int) -> None:
        rundir.write_json_atomic(run_dir / "status.json", {"state": state, "step": step, "total_steps": 3})

    write("running", 1)
    with open(run_dir / "metrics.jsonl", "w") as f:
        f.write(json.dumps({"step": 1, **METRICS}) + "\n")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    monkeypatch.setattr(status, "POLL_S", 0.05)
    monkeypatch.setattr(runs, "local_alive", lambda pid, rd: (run_dir / "status.json").read_text().find("finished") < 0)

    def trainer() -> None:
        for step in (2, 3):
            time.sleep(0.2)
            with open(run_dir / "metrics.jsonl", "a") as f:
                f.write(json.dumps({"step": step, **METRICS}) + "\n")
            write("running" if step < 3 else "finished", step)

    thread = threading.Thread(target=trainer)
    thread.start()
    out = io.StringIO()
    code = status.follow(run_dir, out=out)
    thread.join()
    text = out.getvalue()
    assert code == 0, text
    assert "[grpo] resuming from checkpoints/step_000001 (step 1)" in text and "noise" not in text
    steps = [line.split(" (")[0] for line in text.splitlines() if line.startswith("[grpo] step")]
    assert steps == ["[grpo] step 1/3", "[grpo] step 2/3", "[grpo] step 3/3"]
    assert "elapsed 0:00:16 eta 0:00:08" in text  # two 8 s steps done, one left
    assert text.rstrip().endswith("r1: finished at step 3/3, checkpoint -")
