"""The search stage: baselines, then the trial loop, the same on every rank.

Rank 0 decides (what to evaluate, whether a result can be reused, when to
stop) and broadcasts the decision; every rank then makes the same collective
calls in the same order, so ranks can never disagree on how many evaluations
run. Reuse is exact: evaluation is deterministic, so weights already
evaluated on the same blocks (earlier in this run, or in the ledger of a run
being resumed) are not evaluated again.

Order of writes in a trial (rank 0): the ledger's ``running`` line (fsync'd),
the evaluation, the ledger's ``completed`` or ``failed`` line (fsync'd), then
Ax's bookkeeping and the snapshot (background, see ``search.py``), then the
report. A kill anywhere loses at most the trial in flight.

Not a failed trial: a failed collective (a rank died or hung) propagates and
ends the run naming the rank (``rankwatch.py``), leaving the trial ``running``
for the resume; a source that fails to read (``SourceReadError``) fails its
trial and ends the search, since every later merge would read the same bytes.

Stopping (rank 0, at trial boundaries only): the trial budget, the wall-time
budget, the plateau rule, too many failures in a row, a preemption signal, or
the optimizer's own word that nothing not yet evaluated is worth an evaluation
(``converged``, see ``search.py``). The budget is never spent on repeats.
"""

from __future__ import annotations

import logging
import math
import os
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from .baselines import greedy_soup, schedules
from .errors import SourceReadError
from .io import append_jsonl, read_jsonl
from .ledger import OBJECTIVE, Ledger
from .rankwatch import is_comm_failure

__all__ = ["SearchLoop"]

log = logging.getLogger(__name__)


_KILL_COUNTS: dict[str, int] = {}
TIMINGS_ENV = "LIGHTNING_MERGE_TIMINGS"  # a path: rank 0 writes every search trial's timings there (benchmarks)


def _fault_point(point: str) -> None:
    """Test hook: ``LIGHTNING_MERGE_KILL_AT=point:n`` SIGKILLs this process the n-th time it passes ``point``.

    The kill test (tests/test_resume.py) uses it to die at exact moments of a
    trial (``running``: after the ledger's running line; ``evaluated``: with the
    result computed but not yet recorded; ``completed``: recorded in the ledger
    but not yet told to Ax or snapshotted). Unset, it costs one dict lookup.
    """
    spec = os.environ.get("LIGHTNING_MERGE_KILL_AT")
    if not spec:
        return
    where, _, n = spec.partition(":")
    if where == point:
        _KILL_COUNTS[point] = _KILL_COUNTS.get(point, 0) + 1
        if _KILL_COUNTS[point] == int(n or 1):
            os.kill(os.getpid(), signal.SIGKILL)


def _test_barrier(point: str) -> None:
    """Test hook: ``LIGHTNING_MERGE_BARRIER=point:DIR:n`` holds this process at ``point`` until ``n`` processes have
    reached it (each leaves a file in ``DIR``; at most 300 s), so that a test can start two runs' writes to one
    folder at one moment instead of hoping their start-up times overlap (tests/test_ledger_integrity.py).
    Unset, it costs one dict lookup."""
    spec = os.environ.get("LIGHTNING_MERGE_BARRIER")
    if not spec:
        return
    where, _, rest = spec.partition(":")
    folder, _, n = rest.rpartition(":")
    if where != point:
        return
    Path(folder).mkdir(parents=True, exist_ok=True)
    (Path(folder) / str(os.getpid())).touch()
    deadline = time.monotonic() + 300
    while len(list(Path(folder).iterdir())) < int(n) and time.monotonic() < deadline:
        time.sleep(0.05)


def _key(weights) -> tuple:
    return tuple(round(float(w), 12) for w in weights)


@dataclass
class SearchLoop:
    """Runs baselines and trials; ``search``/``ledger`` are set on rank 0 only (None elsewhere)."""

    cfg: Any  # RunConfig
    evaluator: Any  # evaluate.Evaluator (broadcast, merge_seconds, on_batch)
    objective: Callable[[list[float]], tuple[float, dict]]
    full_eval: Callable[[list[float]], dict]
    out: Path
    space: Any
    search: Any = None
    ledger: Ledger | None = None
    on_trial: Callable[[], None] | None = None
    bar: Any = None  # report._Bar
    preempt: Any = None  # slurm.Preemption (flag only)
    _cache: dict[tuple, tuple[float, dict]] = field(default_factory=dict)
    _failures: int = 0
    report_seconds: float = 0.0  # rank 0: time spent keeping report.md current
    trials_run: int = 0  # rank 0: trials completed by this process
    timings: list[dict] = field(default_factory=list)  # rank 0: per search trial, seconds by part (run())
    _last: dict = field(default_factory=dict)  # rank 0: the parts of the trial _run_trial just recorded

    def __post_init__(self) -> None:
        if self.search is not None:
            # Ax's bookkeeping of the previous trial starts once this trial's merge is done (search.py).
            self.evaluator.on_merged = self.search.kick
        if self.ledger is not None:
            for rec in self.ledger.completed():
                self._cache[_key(rec["weights"])] = (rec[OBJECTIVE], _metrics(rec))

    @property
    def is_zero(self) -> bool:
        return self.search is not None

    # --- one evaluation of the objective, shared by trials and off-space baselines ---------
    def _objective_shared(self, weights: list[float], reuse: tuple | None) -> tuple[float, dict, bool]:
        """Every rank: the objective of ``weights``, or rank 0's cached value when it sent one."""
        if reuse is not None:
            return float(reuse[0]), dict(reuse[1]), True
        value, metrics = self.objective(weights)
        if not math.isfinite(value):
            raise FloatingPointError(f"non-finite objective {value}")
        self._cache[_key(weights)] = (value, metrics)
        return value, metrics, False

    # --- one trial -------------------------------------------------------------------------
    def _run_trial(self, msg: dict) -> float | None:
        """Every rank: evaluate the broadcast trial; rank 0 records it. Returns its objective (None: failed)."""
        t0 = time.perf_counter()
        self._last = part = {}
        # A proposal that replaced a repeat of an evaluated point says so on every line of its trial.
        dedup = {"deduplicated_from": msg["deduplicated_from"]} if msg.get("deduplicated_from") else {}
        # The optimizer state goes on every line: a resume after a kill or a failure continues from it.
        state = {"state": msg["state"]} if msg.get("state") else {}
        if self.ledger is not None:
            self.ledger.write({"trial": msg["index"], "status": "running", "weights": msg["weights"],
                               "params": msg["params"], "origin": msg["origin"], **dedup, **state})
            _fault_point("running")
        t_obj = time.perf_counter()
        part["ledger_s"] = t_obj - t0
        try:
            value, metrics, reused = self._objective_shared(msg["weights"], msg.get("reuse"))
        except (FloatingPointError, ValueError, RuntimeError) as e:
            if is_comm_failure(e):  # a rank is gone, not a bad trial: the run stops (rankwatch.guard)
                raise
            self._failures += 1
            if self.is_zero:
                log.warning("trial %d failed: %s", msg["index"], e)
                self.search.fail(msg["index"], str(e))
                self.ledger.write({"trial": msg["index"], "status": "failed", "weights": msg["weights"],
                                   "params": msg["params"], "origin": msg["origin"], **dedup, **state, "reason": str(e),
                                   "seconds": time.perf_counter() - t0})
                self.search.save(self.out / "ax_snapshot.json")
            if isinstance(e, SourceReadError):  # every later merge would read the same bytes: stop here
                raise
            return None
        self._failures = 0
        if not self.is_zero:
            return value
        _fault_point("evaluated")
        merge_s = self.evaluator.merge_seconds if not reused else 0.0
        book_s = self.evaluator.hook_seconds if not reused else 0.0
        t_done = time.perf_counter()
        timing = {"ask_s": msg.get("ask_s", 0.0), "broadcast_s": msg.get("broadcast_s", 0.0), "merge_s": merge_s,
                  "book_s": book_s, "eval_s": 0.0 if reused else t_done - t0 - merge_s - book_s}
        rec = self.ledger.write({"trial": msg["index"], "status": "completed", "weights": msg["weights"],
                                 "params": msg["params"], "origin": msg["origin"], **dedup, "state": msg.get("state"),
                                 OBJECTIVE: value, **metrics, "reused": reused,
                                 "seconds": time.perf_counter() - t0 + msg.get("ask_s", 0.0),
                                 **{k: round(v, 5) for k, v in timing.items()}})
        _fault_point("completed")
        t1 = time.perf_counter()
        self.search.tell(msg["index"], value)
        self.search.save(self.out / "ax_snapshot.json")
        t2 = time.perf_counter()
        if self.bar is not None:
            self.bar.advance(rec, self.ledger.best(), search=not str(msg["origin"]).startswith("baseline:"))
        t3 = time.perf_counter()
        if self.on_trial is not None:
            self.on_trial()
            self.report_seconds += time.perf_counter() - t3
        part.update(merge_s=merge_s, ax_s=book_s, eval_s=0.0 if reused else t_done - t_obj - merge_s - book_s,
                    reused=reused)
        part["ledger_s"] += t1 - t_done
        part.update(tell_s=t2 - t1, bar_s=t3 - t2, report_s=time.perf_counter() - t3)
        self.trials_run += 1
        return value

    def _message(self, prop, ask_s: float = 0.0) -> dict:
        return {"index": prop.index, "weights": prop.weights, "params": prop.params, "origin": prop.origin,
                "state": prop.state, "ask_s": ask_s, "reuse": self._cache.get(_key(prop.weights)),
                "deduplicated_from": prop.deduplicated_from}

    def trial_for(self, weights: list[float], origin: str) -> float | None:
        """Every rank: record ``weights`` as a trial when they lie in the space (else evaluate off-space).

        Returns the objective, or None if the evaluation failed. Weights the
        ledger already holds as a completed trial are not recorded again.
        """
        params = self.space.params_for(weights) if self.cfg.baselines.as_trials else None
        msg = None
        if self.is_zero:
            done = [r for r in self.ledger.completed() if _key(r["weights"]) == _key(weights)]
            if done:
                msg = {"done": done[0][OBJECTIVE]}
            elif params is not None:
                msg = self._message(self.search.attach(params, origin))
            else:  # outside the space: evaluated (or reused), but not an Ax trial
                msg = {"off_space": True, "reuse": self._cache.get(_key(weights))}
        msg = self.evaluator.broadcast(msg)
        if "done" in msg:
            return float(msg["done"])
        if msg.get("off_space"):
            try:
                return self._objective_shared(weights, msg["reuse"])[0]
            except (FloatingPointError, ValueError, RuntimeError) as e:
                if is_comm_failure(e) or isinstance(e, SourceReadError):
                    raise
                log.warning("baseline %s failed: %s", origin, e)
                return None
        return self._run_trial(msg)  # the same on every rank: the objective is all-reduced

    # --- baselines -------------------------------------------------------------------------
    def baselines(self, names: list[str]) -> list[dict]:
        """Every rank: each single checkpoint and each baseline, fully evaluated, as report candidates.

        ``names``: the checkpoint names, oldest first. Full evaluations (report
        set, out-of-domain, the lm-eval objective) are kept in ``candidates.jsonl`` so
        a resumed run does not repeat them.
        """
        _test_barrier("baselines")
        k = len(names)
        conf = self.cfg.baselines
        specs = [(n, "checkpoint", [1.0 if j == i else 0.0 for j in range(k)]) for i, n in enumerate(names)]
        if conf.enabled:
            specs += [(n, "baseline", w) for n, w in schedules(k, conf.lawa_k, conf.ema_alpha)]
        done = {}
        if self.is_zero:
            for rec in read_jsonl(self.out / "candidates.jsonl"):
                done[(rec["name"], _key(rec["weights"]))] = rec
        single_obj = []
        cands = []
        for name, kind, w in specs:
            if self._preempted():  # the run saves and requeues; a resume reuses what is done
                return cands
            value = self.trial_for(w, f"baseline:{name}")
            if kind == "checkpoint":
                single_obj.append(value if value is not None else math.inf)
            cands.append(self._candidate(name, kind, w, done))
        if conf.enabled and conf.greedy_soup and k > 1 and not self._preempted():
            soup, _ = greedy_soup(single_obj, lambda w: self._soup_value(w))
            cands.append(self._candidate("greedy soup", "baseline", soup, done))
        return cands

    def _soup_value(self, w: list[float]) -> float:
        v = self.trial_for(w, "baseline:greedy soup step")
        return v if v is not None else math.inf

    def _candidate(self, name: str, kind: str, weights: list[float], done: dict) -> dict:
        cached = None
        if self.is_zero:
            cached = done.get((name, _key(weights))) or next(
                ({**c, "name": name, "kind": kind} for (_, w), c in done.items() if w == _key(weights)), None)
        cached = self.evaluator.broadcast(cached)
        if cached is not None:
            if self.is_zero and (name, _key(weights)) not in done:
                done[(name, _key(weights))] = cached
            return cached
        rec = {"name": name, "kind": kind, "weights": list(weights), **self.full_eval(weights)}
        if self.is_zero:
            append_jsonl(self.out / "candidates.jsonl", rec)
            done[(name, _key(weights))] = rec  # another baseline with the same weights reuses it
        return rec

    def _preempted(self) -> bool:
        """Every rank: whether a preemption signal reached any rank (a collective vote)."""
        return self.preempt is not None and self.evaluator.any_rank(self.preempt.requested)

    # --- the search ------------------------------------------------------------------------
    def _should_stop(self, started: float, preempted: bool) -> str | None:
        conf = self.cfg.search
        if preempted:
            return f"preempted ({self.preempt.signal_name or 'signal on another rank'})"
        done = self.ledger.search_trials()
        if len(done) >= conf.trials:
            return f"trial budget reached ({conf.trials})"
        if conf.max_seconds is not None and time.perf_counter() - started >= conf.max_seconds:
            return f"wall-time budget reached ({conf.max_seconds:g}s)"
        if self._failures >= conf.max_failures:
            return f"{self._failures} trials failed in a row (search.max_failures)"
        n = conf.plateau_trials
        if n is not None and len(done) >= n + 2:
            objs = [r[OBJECTIVE] for r in self.ledger.completed()]
            recent = {r["trial"] for r in done[-n:]}
            before = [r[OBJECTIVE] for r in self.ledger.completed() if r["trial"] not in recent]
            if before and min(before) - min(objs) <= conf.plateau_tol * abs(min(before)):
                return f"plateau: no improvement above {conf.plateau_tol:g} (relative) in the last {n} trials"
        return None

    def run(self) -> str:
        """Every rank: trials until rank 0 says stop; returns the reason."""
        started = time.perf_counter()
        try:
            return self._trials(started)
        finally:
            if self.is_zero and os.environ.get(TIMINGS_ENV):
                from .io import atomic_write_json

                atomic_write_json(os.environ[TIMINGS_ENV], self.timings)

    def _trials(self, started: float) -> str:
        while True:
            msg = None
            t_it = time.perf_counter()
            # Every rank votes: SLURM signals every task, but a signal may reach some nodes first.
            preempted = self._preempted()
            if self.is_zero:
                reason = self._should_stop(started, preempted)
                if reason is None:
                    t = time.perf_counter()
                    stop_s = t - t_it
                    prop = self.search.ask()
                    if prop is None:
                        n = len(self.ledger.search_trials())
                        reason = f"converged after {n} of {self.cfg.search.trials} search trials: " \
                                 f"{self.search.converged}"
                        msg = {"stop": reason}
                    else:
                        msg = self._message(prop, time.perf_counter() - t)
                else:
                    msg = {"stop": reason}
            t = time.perf_counter()
            msg = self.evaluator.broadcast(msg)
            msg["broadcast_s"] = time.perf_counter() - t
            if "stop" in msg:
                log.info("search stops: %s", msg["stop"])
                return msg["stop"]
            value = self._run_trial(msg)
            if self.is_zero and value is not None:
                # Seconds by part; wall_s runs from this iteration's stop check to the end of the report.
                self.timings.append({"trial": msg["index"], "stop_s": stop_s, "ask_s": msg["ask_s"],
                                     "broadcast_s": msg["broadcast_s"], **self._last,
                                     "wall_s": time.perf_counter() - t_it})


def _metrics(rec: dict) -> dict:
    """The metric fields of a ledger record (what the objective returned besides its value)."""
    return {k: v for k, v in rec.items() if k in ("heldout_loss", "tokens") or k.startswith("lmeval_")}
