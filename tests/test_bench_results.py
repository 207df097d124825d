"""bench/results/current.json: every target names a committed record whose
figure it repeats, and every record says where, when and what ran it."""
from __future__ import annotations

import json
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"
RECORD_KEYS = ("metric", "value", "unit", "baseline", "baseline_value", "ratio", "hardware", "date", "command", "git_sha")


def test_current_targets_repeat_their_records() -> None:
    current = json.loads((RESULTS / "current.json").read_text())
    assert current, "current.json indexes no target"
    for target, entry in current.items():
        record = json.loads((REPO / entry["record"]).read_text())
        field = entry.get("field", "value")
        assert record[field] == entry["value"], (target, record[field], entry["value"])
        assert record["unit"] == entry["unit"] or field == "ratio", target
        assert any(card in record["hardware"] for card in ("H200", "H100")), target  # the card is named


def test_every_record_lives_in_a_dated_run_folder_and_is_complete() -> None:
    records = sorted(RESULTS.glob("*/*/*.json"))
    assert records
    for path in records:
        hardware, run = path.parts[-3], path.parts[-2]
        assert run[:4].isdigit() and run.count("-") == 3, path  # <date>-<n>
        record = json.loads(path.read_text())
        missing = [k for k in RECORD_KEYS if k not in record]
        assert not missing, (path, missing)
    assert not list(RESULTS.glob("*/*.json")), "records belong in a run folder"
