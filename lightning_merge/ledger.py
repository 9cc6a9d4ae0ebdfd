"""The trial ledger (``trials.jsonl``) and the fingerprint that says whether it can be resumed.

The ledger is the source of truth of a search: one fsync'd JSON line per status
change of a trial (``running`` before the evaluation starts, then ``completed``
or ``failed``), the last line of a trial wins, and a torn last line (a kill in
the middle of a write) is ignored. The Ax snapshot is derived from it and may
lag it by one trial; on resume the Ax state is reconciled with the ledger
(``search.AxSearch.restore``), never the other way round.

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
from dataclasses import dataclass, field
from pathlib import Path

from .config import ConfigError
from .io import append_jsonl, atomic_write_json, read_jsonl

__all__ = ["Ledger", "OBJECTIVE", "check_fingerprint", "archive_previous"]

log = logging.getLogger(__name__)
OBJECTIVE = "objective"  # the minimised value: held-out loss, or 1 - accuracy
STATE = "search_state.json"


@dataclass
class Ledger:
    """``trials.jsonl``: one fsync'd line per status change of a trial; the last line wins."""

    path: Path
    records: dict[int, dict] = field(default_factory=dict)

    @classmethod
    def open(cls, path: str | Path) -> "Ledger":
        led = cls(Path(path))
        for n, rec in enumerate(read_jsonl(led.path), 1):
            missing = [k for k in ("trial", "status", "weights", "params") if k not in rec]
            if missing or (rec["status"] == "completed" and OBJECTIVE not in rec):
                raise ConfigError(f"{led.path}: record {n} lacks {missing or [OBJECTIVE]}; this ledger was not "
                                  "written by this version. Add search.restart=true to set it aside and start afresh")
            led.records[int(rec["trial"])] = rec
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
