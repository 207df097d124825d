"""A Markdown table of a results dir's records (written as SUMMARY.md there).

    python -m bench.summary bench/results/h200/2026-11-29-9
"""
from __future__ import annotations

import json
import sys
from pathlib import Path


def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def _target(rec: dict) -> str:
    t = rec.get("target")
    if not t:
        return ""
    op, goal = t.get("op", ""), t.get("value")
    if op.startswith("ratio"):
        ok = rec.get("ratio") is not None and rec["ratio"] >= goal
        return f"ratio >= {goal}: {'met' if ok else 'NOT met'}"
    v = rec.get("value")
    if v is None:
        return f"{op} {goal}: not measured"
    ok = v >= goal if op == ">=" else v <= goal
    return f"{op} {goal}: {'met' if ok else 'NOT met'}"


def table(results: Path) -> str:
    rows = ["| metric | ours | baseline | baseline value | ratio | target / note |", "|---|---|---|---|---|---|"]
    for path in sorted(results.glob("*.json")):
        try:
            rec = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            rows.append(f"| {path.stem} | unreadable: {exc} | | | | |")
            continue
        if "metric" not in rec:
            continue
        note = _target(rec)
        if rec.get("error"):
            note = "FAILED: " + rec["error"].splitlines()[0][:120]
        elif "rel_error" in rec and rec["rel_error"] is not None:
            note = (note + "; " if note else "") + f"rel. error {rec['rel_error']:+.1%}"
        rows.append(f"| {rec['metric']} | {_fmt(rec.get('value'))} {rec.get('unit', '')} | {rec.get('baseline', '')} | "
                    f"{_fmt(rec.get('baseline_value'))} | {_fmt(rec.get('ratio'))} | {note} |")
    first = next((json.loads(p.read_text()) for p in sorted(results.glob("*.json"))), {})
    head = f"# Benchmark results\n\nhardware: {first.get('hardware', '?')}  \ndate: {first.get('date', '?')}\n\n"
    return head + "\n".join(rows) + "\n"


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    results = Path(argv[0] if argv else "bench/results/h200/2026-11-29-9")
    text = table(results)
    (results / "SUMMARY.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
