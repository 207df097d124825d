"""The run directory's small files (run.json, status.json, metrics.jsonl) and the
run's provenance (code version, where it ran): the one copy, for the trainer and jobs.*."""
from __future__ import annotations

import json
import os
import secrets
import socket
import subprocess
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from grpo_core.exitcodes import EXIT_BAD_INPUT


class RunFileError(ValueError):
    """A run-dir file that exists but is not a readable JSON object (torn, foreign, unreadable)."""

    code = EXIT_BAD_INPUT


def unusable_run_dir(run_dir: Path) -> str | None:
    """Why `run_dir` can never be a run directory (it, or a folder above it, is a file), else None.
    Checked before the model is built; a full or read-only disk shows later, as the environment."""
    path = Path(run_dir).absolute()
    for candidate in (path, *path.parents):
        if candidate.exists():
            return None if candidate.is_dir() else (
                "is a file, not a directory" if candidate == path else f"is under {candidate}, a file")
    return None


def write_json_atomic(path: Path, data: Any) -> None:
    """Readers see the old file or the new one, never a part; the new one is on disk
    (fsync'd, rename included) before this returns. Mode follows the umask, as a plain write's."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "w") as handle:
            handle.write(json.dumps(data, indent=1, sort_keys=True) + "\n")
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)  # e.g. a full disk: the old file stays, no litter
        raise
    _fsync_dir(path.parent)


def _fsync_dir(directory: Path) -> None:
    """Makes the rename itself durable; a filesystem that cannot fsync a directory keeps it atomic all the same."""
    try:
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass


def read_json(path: Path, *, strict: bool = True) -> dict[str, Any]:
    """A run-dir JSON file; {} when it does not exist. One that exists but is not a JSON object
    raises RunFileError (one line naming the file), or gives {} when not `strict`."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
        if not isinstance(data, dict):
            raise ValueError(f"a JSON {type(data).__name__}, not an object")
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        if strict:
            raise RunFileError(f"{path}: unreadable ({exc})") from None
        return {}
    return data


def write_status(run_dir: Path, **fields: Any) -> None:
    path = run_dir / "status.json"
    status = read_json(path, strict=False)  # not ours (writes are atomic): start it afresh
    status.update(fields, updated=datetime.now(timezone.utc).isoformat(timespec="seconds"))
    write_json_atomic(path, status)


def append_metrics(run_dir: Path, record: dict[str, Any]) -> None:
    with open(run_dir / "metrics.jsonl", "a") as handle:
        handle.write(json.dumps(record, sort_keys=True) + "\n")


def _records(text: str) -> list[tuple[str, dict[str, Any]]]:
    """(line, record) for every whole line; a torn last line (a kill mid-write) or
    any other unreadable line is skipped, never fatal."""
    out = []
    for line in text.splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and isinstance(record.get("step"), int):
            out.append((line, record))
    return out


def truncate_metrics(run_dir: Path, last_step: int) -> None:
    """Drop lines after `last_step` (those steps are about to be replayed) and torn lines."""
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return
    kept = [line for line, record in _records(path.read_text(errors="replace")) if record["step"] <= last_step]
    tmp = path.with_suffix(".jsonl.tmp")
    tmp.write_text("".join(line + "\n" for line in kept))
    os.replace(tmp, path)


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        return []
    return [record for _, record in _records(path.read_text(errors="replace"))]


def git_sha() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True, text=True, timeout=10)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def provenance_tags(run_dir: Path, restarts: int) -> dict[str, str]:
    """Facts that can change between restarts of one run: tags, not params."""
    run_info = read_json(run_dir / "run.json", strict=False)
    env = os.environ.get
    sweep = run_info.get("sweep") or {}
    # A sweep's elements: the tag `sweep` groups them (jobs.compare --sweep, the UI's group-by),
    # `sweep.<key>` says what this one varies.
    swept = {"sweep": str(sweep["name"]), **{f"sweep.{k}": str(v) for k, v in sweep.get("values", {}).items()}} \
        if sweep.get("name") else {}
    return {**swept,
        "profile": str(run_info.get("profile", "")), "slurm_restart_count": str(restarts),
        "slurm_job_id": env("SLURM_JOB_ID", ""), "cluster": env("SLURM_CLUSTER_NAME", "local"),
        "nodelist": env("SLURM_JOB_NODELIST", socket.gethostname()),
    }
