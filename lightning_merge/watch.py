"""``mode=watch``: a merging service beside a live pretraining run.

It follows the run's checkpoint folder (``checkpoints.sources``, any format the
tool reads) and, for each new checkpoint, runs a **round**: an ordinary search
(``driver._search``) over the newest K checkpoints, in its own folder
``rounds/<round>/`` with the layout of a search run, on the same held-out blocks
every round, with the baselines in every round. Setting up is paid once: the
tokenizer, the blocks, the model skeleton and the Trainer are the service's
(``driver._session``); a round only binds the Evaluator to its checkpoints.

Taking checkpoints. Only checkpoints that are completely written count (each
format's rule: ``completion.py`` for HF folders, ``formats/`` for the training
frameworks'). A round starts once ``watch.every`` checkpoints newer than the
last round's are complete, on the newest of them: when several land during a
round, the next round takes the newest, not each in turn. The first round waits
for K. A round's checkpoints are what ``checkpoints.*`` select among the
complete ones up to its newest (``checkpoints.last=K``).

Warm start. A round's first trials are the previous round's best weights
(position by position, so the weight of the newest goes to the new newest: the
pattern shifted by one checkpoint) and the previous round's best schedule
(uniform, LAWA, EMA, WMA or greedy soup), where they lie in the space.

State: ``rounds.jsonl``, one line when a round starts (``running``) and one when
it ends (``completed`` or ``failed``, with the reason), fsync'd; the last line of
a round wins. A kill at any moment loses nothing: a round whose last line is
``running`` is resumed (its own ledger resumes its trials) before anything new,
so no round is lost or run twice. ``merged`` (a symlink, swapped atomically) is
always the newest completed round's best merge.

Failures. A round whose checkpoints disappear while it reads them (a training
job's ``keep_latest_k`` / ``save_total_limit`` cleanup), or whose search fails,
is recorded ``failed`` with the reason and the service goes on with the next
checkpoint. It stops at ``watch.until_step``, when ``watch.stop_file`` appears
(after the round in flight), after ``watch.max_idle_s`` with nothing new, or on
SIGTERM/SIGUSR2 at the next trial boundary (then it requeues under SLURM).

Every rank runs this loop; rank 0 decides (what to run, when to stop) and
broadcasts each decision, so ranks never disagree.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path

from .config import ConfigError, RunConfig
from .errors import CheckpointError
from .io import append_jsonl, read_jsonl

__all__ = ["watch", "ROUNDS", "round_name"]

log = logging.getLogger(__name__)
ROUNDS = "rounds.jsonl"


def _now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def round_name(path: Path) -> str:
    """``step-800`` for a checkpoint at step 800 (from its trainer state or name), else its name."""
    from .sources import step_of

    step = step_of(path)
    return f"step-{step}" if step is not None else path.name


def _complete(cfg: RunConfig) -> list[Path]:
    """The run's completely written checkpoints, oldest first ([] while a look fails: a folder being deleted)."""
    from .sources import resolve_sources

    quiet = logging.getLogger("lightning_merge.sources")
    level = quiet.level
    quiet.setLevel(logging.ERROR)  # an unfinished newest is normal here: said once per checkpoint below
    try:
        return resolve_sources(cfg.checkpoints.sources, None, hub_cache=cfg.checkpoints.hub_cache)
    except (CheckpointError, OSError) as e:
        log.debug("watch: nothing to take yet (%s)", e)
        return []
    finally:
        quiet.setLevel(level)


class RoundLog:
    """``rounds.jsonl``: the service's state (see the module docstring)."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.records = read_jsonl(self.path)

    def write(self, rec: dict) -> dict:
        append_jsonl(self.path, rec)
        self.records.append(rec)
        return rec

    def latest(self) -> dict[str, dict]:
        out: dict[str, dict] = {}
        for r in self.records:
            out[r["round"]] = r
        return out

    def in_flight(self) -> dict | None:
        running = [r for r in self.latest().values() if r["status"] == "running"]
        return running[-1] if running else None

    def finished(self) -> list[dict]:
        """Completed and failed rounds, in the order they ended."""
        ended = {n for n, r in self.latest().items() if r["status"] != "running"}
        return [r for r in self.records if r["status"] != "running" and r["round"] in ended]

    def last_completed(self) -> dict | None:
        done = [r for r in self.finished() if r["status"] == "completed"]
        return done[-1] if done else None


class Watcher:
    """Rank 0's decisions: the next round, the wait, or the stop (see the module docstring)."""

    def __init__(self, cfg: RunConfig, out: Path) -> None:
        self.cfg, self.out = cfg, Path(out)
        self.log = RoundLog(self.out / ROUNDS)
        self.waited_for: set[str] = set()
        self.idle_since = time.monotonic()
        self.poll = cfg.watch.poll_s

    # --- which checkpoints a round takes ----------------------------------------------------
    def _window(self, done: list[Path], newest: Path) -> list[Path]:
        upto = done[: done.index(newest) + 1]
        return self.cfg.checkpoints.selector().apply(upto)

    def _after_last(self, done: list[Path]) -> list[Path]:
        """The complete checkpoints newer than the newest one any round took (all when none did)."""
        from .sources import step_key, step_of

        taken = [Path(r["sources"][-1]) for r in self.log.finished()]
        if not taken:
            return done
        last = taken[-1]
        s = step_of(last) if last.exists() else _step_from_name(last)
        if s is not None:
            return [p for p in done if (step_of(p) if step_of(p) is not None else -1) > s]
        return [p for p in done if step_key(p) > step_key(last)]

    def _warm_start(self, k: int) -> tuple[list[list[float]], list[str]]:
        """The previous round's best weights and best schedule, where they are points of this round's space."""
        from .spaces import make_space

        prev = self.log.last_completed()
        if prev is None:
            return [], []
        space = make_space(self.cfg.search, k)
        points, why = [], []
        for label, w in (("previous best", prev.get("best_weights")),
                         (f"best schedule so far: {prev.get('best_baseline')}", prev.get("best_baseline_weights"))):
            if not w or len(w) != k or space.params_for(w) is None:
                continue
            if any(max(abs(a - b) for a, b in zip(w, q)) < 1e-9 for q in points):
                continue
            points.append([float(x) for x in w])
            why.append(label)
        return points, why

    def _stop_reason(self, done: list[Path]) -> str | None:
        w = self.cfg.watch
        if (self.out / w.stop_file).exists():
            return f"stop file {self.out / w.stop_file} found (remove it to run the service again)"
        if w.until_step is not None:
            for r in self.log.finished():
                s = r.get("step")
                if s is not None and s >= w.until_step:
                    return f"watch.until_step={w.until_step} reached (round {r['round']})"
        if w.max_idle_s is not None and time.monotonic() - self.idle_since >= w.max_idle_s:
            return f"nothing new for watch.max_idle_s={w.max_idle_s:g}s"
        return None

    def decide(self) -> dict:
        """``{"round": ...}`` (a round to run), ``{"wait": seconds}`` or ``{"stop": reason}``."""
        flight = self.log.in_flight()
        if flight is not None:  # a kill interrupted it: finish it first (its ledger resumes the trials)
            log.info("watch: resuming round %s, interrupted before it ended", flight["round"])
            return {"round": flight["round"], "step": flight.get("step"), "sources": flight["sources"],
                    "warm_start": flight.get("warm_start") or [], "warm_origins": flight.get("warm_origins", []),
                    "resumed": True}
        done = _complete(self.cfg)
        reason = self._stop_reason(done)
        if reason:
            return {"stop": reason}
        k = self.cfg.checkpoints.last
        fresh = self._after_last(done)
        self._say_unfinished()
        if len(done) >= k and len(fresh) >= self.cfg.watch.every:
            newest = fresh[-1]
            window = self._window(done, newest)
            if len(window) == k:
                if len(fresh) > self.cfg.watch.every:
                    log.info("watch: %d new checkpoints since the last round; taking the newest, %s",
                             len(fresh), newest.name)
                warm, why = self._warm_start(k)
                from .sources import step_of

                rec = {"round": round_name(newest), "step": step_of(newest), "status": "running",
                       "sources": [str(p) for p in window], "warm_start": warm, "warm_origins": why,
                       "started": _now()}
                self.idle_since, self.poll = time.monotonic(), self.cfg.watch.poll_s
                return {**rec, "resumed": False}
        if len(done) < k:
            log.debug("watch: %d of the %d complete checkpoints the first round needs", len(done), k)
        return {"wait": self.next_wait()}

    def next_wait(self) -> float:
        """The wait before the next look: ``watch.poll_s``, doubling while nothing is new, to ``max_poll_s``."""
        wait, self.poll = self.poll, min(self.poll * 2, self.cfg.watch.max_poll_s)
        return wait

    def _say_unfinished(self) -> None:
        """Log once per checkpoint that one is being written (the rule is checked on every look)."""
        from .completion import incomplete
        from .sources import step_key

        for src in self.cfg.checkpoints.sources:
            folder = Path(src).expanduser()
            try:
                kids = sorted((c for c in folder.iterdir() if not c.name.startswith(".")), key=step_key) \
                    if folder.is_dir() else []
            except OSError:
                continue
            for c in kids[-2:]:
                key = str(c)
                if key in self.waited_for:
                    continue
                from . import formats

                fmt = formats.find(c)
                unfinished = (not fmt.complete(c)) if fmt is not None else (
                    c.is_dir() and any(c.iterdir()) and incomplete(c) is not None)
                if unfinished:
                    self.waited_for.add(key)
                    log.info("watch: %s is being written; waiting for it to complete", c)


def _step_from_name(p: Path) -> int | None:
    import re

    nums = re.findall(r"\d+", p.name)
    return int(nums[-1]) if nums else None


def publish_link(link: Path, target: Path) -> None:
    """Point ``link`` at ``target`` atomically (a new symlink renamed over the old one)."""
    link = Path(link)
    if link.exists() and not link.is_symlink():  # a folder from an earlier mode=search in this directory
        aside = link.with_name(f".{link.name}.replaced-{os.getpid()}")
        os.replace(link, aside)
        log.warning("watch: moved the folder %s aside to %s to publish rounds there", link, aside)
    tmp = link.with_name(f".{link.name}.{os.getpid()}.link")
    if tmp.is_symlink() or tmp.exists():
        tmp.unlink()
    os.symlink(os.path.relpath(target, link.parent), tmp)
    os.replace(tmp, link)


def _missing(sources: list[str]) -> str | None:
    """The first source that is gone or no longer whole (deleted while the round read it), with why."""
    from . import formats
    from .completion import incomplete

    for s in sources:
        p = Path(s)
        if not p.exists():
            return f"{p} was deleted while the round read it"
        fmt = formats.find(p)
        why = (None if fmt.complete(p) else "no longer complete") if fmt is not None else incomplete(p)
        if why:
            return f"{p} changed while the round read it ({why})"
    return None


def watch(cfg: RunConfig, out: Path, stages, on_accepted=None) -> dict:
    """Run the service until it stops; returns ``{"status", "reason", "rounds"}`` (see the module docstring)."""
    from .watch_service import Service

    return Service(cfg, Path(out), stages, on_accepted).run()


def _cleanup_merged(out: Path, keep: set[str]) -> None:
    """``watch.keep_merged=latest``: remove older rounds' merged folders (the published one and the one
    before it stay: a reader that resolved the link a moment ago may still be reading it)."""
    rounds = out / "rounds"
    if not rounds.is_dir():
        return
    for r in rounds.iterdir():
        if r.name in keep:
            continue
        for m in r.glob("merged*"):
            if m.is_dir():
                shutil.rmtree(m, ignore_errors=True)


def round_config(cfg: RunConfig, d: dict, out: Path) -> RunConfig:
    """The search run of one round: its checkpoints, its folder, its warm start."""
    ckpts = replace(cfg.checkpoints, sources=list(d["sources"]), last=None, every=None, steps=None, names=None)
    search = replace(cfg.search, warm_start=[list(w) for w in d["warm_start"]] or None)
    merge = replace(cfg.merge, out="merged")
    report = replace(cfg.report, plot_every_s=float("inf"))  # a round's plots are drawn once, when it ends
    return replace(cfg, mode="search", checkpoints=ckpts, search=search, merge=merge, report=report,
                   output_dir=str(out / "rounds" / d["round"]))


def check_service(cfg: RunConfig, out: Path, rounds: RoundLog) -> None:
    """Refuse, before any heavy work, a service whose rounds.jsonl was written with another K."""
    if not rounds.records:
        return
    k = len(rounds.records[-1]["sources"])
    if k != cfg.checkpoints.last:
        raise ConfigError(f"config option `checkpoints.last`: {out / ROUNDS} holds rounds over {k} checkpoints, "
                          f"but checkpoints.last={cfg.checkpoints.last}; use {k}, or a new output_dir")
