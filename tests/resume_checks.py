"""What "nothing lost" means after a fault and a resume, checked the same way by every fault test.

The ledger holds every trial once (no index completed twice, none left running), the budget of
search trials is finished, every trial that was in flight at a fault is failed with its reason and
its point evaluated again later, the trials completed before the fault keep their values, the Ax
snapshot agrees with the ledger, and results.json's best is the ledger's best.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest


def ledger_lines(out: Path) -> list[dict]:
    path = Path(out) / "trials.jsonl"
    if not path.exists():
        return []
    lines = []
    for line in path.read_text().splitlines():
        try:
            lines.append(json.loads(line))
        except json.JSONDecodeError:  # a torn last line is allowed; the ledger reader drops it
            pass
    return lines


def last_status(lines: list[dict]) -> dict[int, dict]:
    out: dict[int, dict] = {}
    for rec in lines:
        out[rec["trial"]] = rec
    return out


def assert_resumed_whole(out: Path, trials: int, before: dict[int, dict] | None = None,
                         expect_failed: bool = True) -> dict[int, dict]:
    """The checks of the module docstring on a finished run folder; returns the final records."""
    from ax import Client

    lines = ledger_lines(out)
    recs = last_status(lines)
    completed = [r for r in recs.values() if r["status"] == "completed"]
    search = [r for r in completed if not r["origin"].startswith("baseline:")]
    assert len(search) == trials, f"{len(search)} search trials completed, budget {trials}"
    assert max(Counter(r["trial"] for r in lines if r["status"] == "completed").values()) == 1
    assert all(r["status"] in ("completed", "failed") for r in recs.values())
    failed = [r for r in recs.values() if r["status"] == "failed"]
    if expect_failed:
        assert failed, "no trial was in flight at the fault"
    for r in failed:
        assert r.get("reason"), r
        assert any(c["trial"] > r["trial"] and c["weights"] == r["weights"] for c in completed), r
    for idx, rec in (before or {}).items():
        if rec["status"] == "completed":
            assert recs[idx]["status"] == "completed" and recs[idx]["objective"] == rec["objective"], idx
    df = Client.load_from_json_file(str(Path(out) / "ax_snapshot.json")).summarize()
    ax_status = {int(i): str(s) for i, s in zip(df["trial_index"], df["trial_status"])}
    assert ax_status == {i: r["status"].upper() for i, r in recs.items()}
    ax_values = {int(i): float(v) for i, v, s in zip(df["trial_index"], df["objective"], df["trial_status"])
                 if s == "COMPLETED"}
    assert ax_values == pytest.approx({r["trial"]: r["objective"] for r in completed})
    results = json.loads((Path(out) / "results.json").read_text())
    assert results["trials"] == trials
    assert results["best"]["weights"] == min(completed, key=lambda r: r["objective"])["weights"]
    return recs
