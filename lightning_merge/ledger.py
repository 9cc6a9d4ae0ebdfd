"""The trial ledger (``trials.jsonl``) and the fingerprint that says whether it can be resumed.

The ledger is the source of truth of a search: one fsync'd JSON line per status
change of a trial (``running`` before the evaluation starts, then ``completed``
or ``failed``), the last line of a trial wins, and a torn last line (a kill in
the middle of a write) is ignored. The Ax snapshot is derived from it and may
lag it by one trial; on resume the Ax state is reconciled with the ledger
(``search.AxSearch.restore``), never the other way round.

One run folder has one writer. Two processes on one folder interleave their
lines (every trial twice, and with other seeds the same trial numbers with
other weights), so :meth:`Ledger.open` checks that every trial's lines form a
history this tool writes, and refuses the ledger naming the trial and lines
when they do not (see :func:`_conflict`).

``search_state.json`` holds the fingerprint of what makes old trials comparable
with new ones: the checkpoints, the search-set blocks, the space and the
objective. Resuming with another fingerprint is refused with the key that
changed, because mixing losses of other models or other data would silently
corrupt the GP.
"""

from __future__ import annotations

import json
import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from .config import ConfigError
from .io import append_jsonl, atomic_write_json, cut_torn_tail

__all__ = ["Ledger", "OBJECTIVE", "check_fingerprint", "archive_previous"]

log = logging.getLogger(__name__)
OBJECTIVE = "objective"  # the minimised value: held-out loss, or 1 - accuracy
STATE = "search_state.json"
STATUSES = ("running", "completed", "failed")
_POINT = ("weights", "params", "origin")  # what every line of one trial repeats unchanged


@dataclass
class Ledger:
    """``trials.jsonl``: one fsync'd line per status change of a trial; the last line wins."""

    path: Path
    records: dict[int, dict] = field(default_factory=dict)

    @classmethod
    def open(cls, path: str | Path) -> "Ledger":
        """Read a ledger to resume it; refuse one this tool did not write, or that two runs wrote at once."""
        led = cls(Path(path))
        lines: dict[int, list[tuple[int, dict]]] = {}
        conflicts: list[tuple[int, str]] = []
        for n, rec in _numbered(led.path):
            missing = [k for k in ("trial", "status", "weights", "params") if k not in rec]
            if missing or (rec["status"] == "completed" and OBJECTIVE not in rec):
                raise ConfigError(f"{led.path}: record {n} lacks {missing or [OBJECTIVE]}; this ledger was not "
                                  "written by this version. Add search.restart=true to set it aside and start afresh")
            if rec["status"] not in STATUSES:
                raise ConfigError(f"{led.path}: record {n} has status {rec['status']!r}, not one of {STATUSES}; this "
                                  "ledger was not written by this version. Add search.restart=true to set it aside "
                                  "and start afresh")
            idx = int(rec["trial"])
            problem = _conflict(lines.get(idx, []), n, rec)
            if problem and all(i != idx for i, _ in conflicts):
                conflicts.append((idx, problem))
            lines.setdefault(idx, []).append((n, rec))
            led.records[idx] = rec
        _warn_torn(led)
        if conflicts:
            idx, problem = conflicts[0]
            others = f"; {len(conflicts)} trials in all (" + ", ".join(str(i) for i, _ in conflicts[:8]) + \
                (", ..." if len(conflicts) > 8 else "") + ")" if len(conflicts) > 1 else ""
            raise ConfigError(
                f"{led.path}: trial {idx} has two different records: {problem}{others}. One run writes a trial's "
                f"lines as `running`, then one `completed` or `failed`, all for the same point, so two processes "
                f"most likely wrote this run folder at once (two runs given the same output_dir). Its trials cannot "
                f"be resumed. Add search.restart=true to set them aside (moved to {led.path.parent / 'previous'}/) "
                f"and start afresh, or give each run its own output_dir=...")
        return led

    def write(self, record: dict) -> dict:
        append_jsonl(self.path, record)
        self.records[int(record["trial"])] = record
        return record

    def ordered(self) -> list[dict]:
        return [r for _, r in sorted(self.records.items())]

    def completed(self) -> list[dict]:
        return [r for r in self.ordered() if r["status"] == "completed"]

    def best(self, search_only: bool = False) -> dict | None:
        done = [r for r in self.completed() if not (search_only and _is_baseline(r))]
        return min(done, key=lambda r: r[OBJECTIVE]) if done else None

    def search_trials(self) -> list[dict]:
        """Completed trials the optimizer chose (not baselines): what ``search.trials`` budgets."""
        return [r for r in self.completed() if not _is_baseline(r)]


def _numbered(path: Path):
    """``(line number, record)`` for each line of the ledger, as ``io.read_jsonl`` reads it (a torn tail skipped)."""
    if not path.exists():
        return
    lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            yield i, json.loads(line)
        except json.JSONDecodeError:
            if i == len(lines) and not line.endswith("\n"):
                return  # torn tail from a kill mid-write
            raise ConfigError(f"{path}: line {i} is not valid JSON ({line[:80]!r}); add search.restart=true to "
                              "set this ledger aside and start afresh") from None


def _warn_torn(led: "Ledger") -> None:
    """Say what a torn last line (a crash in the middle of its write) was, and what becomes of its trial."""
    try:
        with open(led.path, "rb") as fh:
            fh.seek(max(0, led.path.stat().st_size - (1 << 16)))
            tail = fh.read().rsplit(b"\n", 1)[-1]
    except FileNotFoundError:
        return
    if not tail.strip():
        return
    text = tail.decode("utf-8", "replace")
    m = re.search(r'"trial":\s*(\d+)', text)
    idx = int(m.group(1)) if m else None
    status = led.records[idx]["status"] if idx in led.records else None
    if idx is None:
        fate = "no trial can be told from it"
    elif status == "running":
        fate = f"trial {idx} is left `running`, so it is marked failed and its point is evaluated again"
    elif status is None:
        fate = f"trial {idx} has no whole line, so it never started as far as the search knows"
    else:
        fate = f"trial {idx} keeps its whole `{status}` line"
    log.warning("%s: the last line is torn (the process died while writing it) and is dropped: %d bytes, %r; "
                "%s", led.path, len(tail), text[:80] + ("..." if len(text) > 80 else ""), fate)
    cut_torn_tail(led.path)  # said once; the run folder has one writer (runlock.py)


def _conflict(earlier: list[tuple[int, dict]], n: int, rec: dict) -> str | None:
    """Why line ``n`` cannot follow the ``earlier`` lines of its trial in one run's ledger (None: it can).

    What one run writes for a trial index: one ``running`` line before the
    evaluation, then at most one ``completed`` or ``failed`` line (a resumed
    run writes the ``failed`` line of a trial that was running when the process
    died, and evaluates its point again under a new index), every line with the
    same ``weights``, ``params`` and ``origin``. So these are two records:
    lines whose point differs, a second ``running`` line (also one after a
    result), and a second result (two ``completed``, or ``completed`` and
    ``failed``). A trial with only a result line, as a hand-made ledger may
    have, is accepted.
    """
    if not earlier:
        return None
    first_n, first = earlier[0]
    for key in _POINT:
        if first.get(key) != rec.get(key):
            return f"`{key}` is {_short(first.get(key), 60)} on line {first_n} but {_short(rec.get(key), 60)} " \
                   f"on line {n}"
    if rec["status"] == "running":
        m, prev = earlier[-1]
        return f"line {n} starts it again (`running`) after `{prev['status']}` on line {m}"
    done = [(m, r) for m, r in earlier if r["status"] != "running"]
    if done:
        m, prev = done[0]
        return f"two results, `{prev['status']}` on line {m} and `{rec['status']}` on line {n}"
    return None


def _is_baseline(rec: dict) -> bool:
    return str(rec.get("origin", "")).startswith("baseline:")


def check_fingerprint(out: Path, fingerprint: dict, n_records: int) -> None:
    """Refuse to resume trials made under another fingerprint; record it for a fresh search."""
    path = Path(out) / STATE
    if n_records and path.exists():
        try:
            old = json.loads(path.read_text()).get("fingerprint", {})
        except (json.JSONDecodeError, AttributeError) as e:
            raise ConfigError(f"{path} is not the JSON this tool writes ({e}); add search.restart=true to set "
                              f"the earlier search aside and start afresh") from None
        for key in sorted(set(old) | set(fingerprint)):
            if old.get(key) != fingerprint.get(key):
                raise ConfigError(
                    f"cannot resume the search in {out}: `{key}` changed since its {n_records} trials were run "
                    f"(was {_short(old.get(key))}, now {_short(fingerprint.get(key))}), so the old losses are not "
                    f"comparable. To start fresh, add search.restart=true (the old trials are moved to "
                    f"{Path(out) / 'previous'}/), or give another output_dir=...")
        return
    atomic_write_json(path, {"fingerprint": fingerprint})


def archive_previous(out: Path, names: tuple[str, ...] = ("trials.jsonl", "ax_snapshot.json", STATE)) -> Path | None:
    """Move an earlier search's files to ``out/previous/<n>/`` (``search.restart=true``); nothing is deleted."""
    present = [Path(out) / n for n in names if (Path(out) / n).exists()]
    if not present:
        return None
    base = Path(out) / "previous"
    n = 0
    while (base / str(n)).exists():
        n += 1
    dest = base / str(n)
    dest.mkdir(parents=True)
    for p in present:
        os.replace(p, dest / p.name)
    log.warning("search.restart=true: moved the earlier search's %s to %s",
                ", ".join(p.name for p in present), dest)
    return dest


def _short(value, limit: int = 160) -> str:
    text = json.dumps(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
