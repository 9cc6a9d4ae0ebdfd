"""The optimizers: every one records its trials in one Ax experiment, and a search resumes from its ledger.

``paper`` follows Algorithm 1 of Liu et al. (arXiv 2403.19390): the first two
trials are the space's initial points (``lam = alpha`` and ``lam = 1``), and
every later one comes from a GP surrogate with the configured acquisition (EI,
PI, UCB or GP-Hedge over the three; see ``bo.py``). Its points, and the
baselines', are attached to the Ax experiment (``attach_trial``). ``ax`` is the
Ax ``Client`` default (a centre point and Sobol, then its BoTorch GP).
``grid`` walks evenly spaced points (seeded quasi-random ones on a simplex);
``random`` is Ax's ``random_search`` (the centre of the space, then
scrambled Sobol points). The objective is minimised.

Ax bookkeeping is off the critical path, and its cost does not grow per
trial. Both of Ax's costs grow with the experiment: ``complete_trial`` rebuilds
the experiment's whole data table (~25 ms a trial at 10 trials, more later),
and the JSON snapshot serialises every trial (~35 ms at 10 trials, ~1.8 s at
200). The ledger is the source of truth (a resume rebuilds Ax from it, see
:meth:`AxSearch.restore`), so neither is needed per trial:

- the snapshot is written on a time budget: at most every
  ``search.snapshot_every_s``, and never more than 5% of the time (the
  interval is at least 20 times the last write's duration); and always on
  :meth:`AxSearch.flush` (the end of the search, a stop, a preemption);
- ``paper`` and ``grid`` propose without Ax, so their Ax records (attach,
  complete, fail) are queued and applied in one batch just before each
  snapshot (:meth:`AxSearch._apply`: one data table rebuild for the batch).
  ``ax`` and ``random`` ask Ax itself, so it records every trial at once.

The Ax calls run in order on one background thread (:class:`_Bookkeeper`)
while the next evaluation runs (``search.background_bookkeeping=false``: in
line); trial indices are assigned here and checked against Ax's. Only ``ax``
and ``random`` wait for it before they ask. The fsync'd ledger is written
synchronously by the driver before any of this, so a kill loses at most the
trial in flight (see ``ledger.py``), and a snapshot that lags the ledger costs
the resume only the re-attaching of the trials it lacks.

No budget is spent on a point already evaluated. Once the GP believes the
incumbent is best it proposes it (or a hair beside it) again and again; a
repeat of a deterministic evaluation teaches it nothing. So the ``paper``
optimizer's proposal within ``search.repeat_tol`` (default ``NEAR``, every unit
coordinate) of a completed or failed trial is replaced by the acquisition's
best point not yet evaluated, recorded as ``deduplicated_from`` (the point it
replaces, and the trial it repeats); when nothing else is worth an evaluation
(an expected improvement below ``search.min_gain`` of the best objective, see
``bo.GPProposer.propose``), ``ask`` returns None and the search ends as
converged. ``ax`` proposes from
its own acquisition optimiser, which cannot be asked for a second-best point,
so a near-repeat from Ax (a sign it has nothing better) ends the search the
same way, its trial abandoned in Ax. ``grid`` never repeats itself, and
``random``'s Sobol points are near one another only by chance, which ends
nothing: the next point is elsewhere. Baselines and the initial points are
evaluated as the paper and the baselines define them (an exact repeat is
reused for free by the loop).

Knows nothing of Lightning or ranks: the driver calls it on rank 0 only.
"""

from __future__ import annotations

import errno
import logging
import math
import os
import tempfile
import time
import warnings
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from .config import SearchConf
from .errors import DiskFullError, disk_full
from .ledger import OBJECTIVE, Ledger

__all__ = ["Proposal", "AxSearch", "OBJECTIVE"]

log = logging.getLogger(__name__)
DIED = "the process died while this trial was running; it is evaluated again"
NEAR = 5e-3  # search.repeat_tol's default: a proposal within this of an evaluated point, in every unit coordinate
WORTH = 1e-9  # search.min_gain's default: an expected improvement below this fraction of the best is not worth it


@dataclass
class Proposal:
    """One trial to evaluate: Ax's index, its parameters and the merge weights."""

    index: int
    params: dict[str, float]
    weights: list[float]
    origin: str  # "init", "grid", "random", "ax", "baseline:<name>", or the acquisition: "ei", "pi", "ucb"
    state: dict | None = None  # optimizer state to keep with the trial (GP-Hedge gains)
    deduplicated_from: dict | None = None  # {"params", "trial"}: the repeat this proposal replaces


def _quiet_ax() -> None:
    """Ax logs every trial at INFO on its own handlers; our ledger and progress bar say it better."""
    prefixes = ("ax", "botorch", "gpytorch", "linear_operator")
    for name in list(logging.root.manager.loggerDict) + list(prefixes):
        if name.split(".")[0] in prefixes:
            logging.getLogger(name).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", module=r"(ax|botorch|gpytorch|linear_operator)(\..*)?")
    warnings.filterwarnings("ignore", message=".*Optimization failed.*")


class _Bookkeeper:
    """Runs Ax client calls in order on one background thread; re-raises their errors.

    Calls are first deferred, then started by :meth:`kick` once the next
    proposal is made and merged, so the Python-heavy Ax work overlaps the
    next evaluation's forward passes instead of competing with the proposal
    and the merge for the GIL.
    """

    def __init__(self, background: bool = True) -> None:
        self.background = background
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ax-bookkeeping")
        self._pending: list[Future] = []
        self._deferred: list[tuple] = []

    def defer(self, fn, *args, **kwargs) -> None:
        self._deferred.append((fn, args, kwargs))

    def kick(self) -> None:
        self._raise_done()
        deferred, self._deferred = self._deferred, []
        for fn, args, kwargs in deferred:
            if self.background:
                self._pending.append(self._pool.submit(fn, *args, **kwargs))
            else:  # search.background_bookkeeping=false: in line, on the caller's thread
                fn(*args, **kwargs)

    def _raise_done(self) -> None:
        still = []
        for f in self._pending:
            if f.done():
                f.result()  # re-raises an Ax error here, on the caller's thread
            else:
                still.append(f)
        self._pending = still

    def wait(self) -> None:
        self.kick()
        pending, self._pending = self._pending, []
        for f in pending:
            f.result()

    def close(self) -> None:
        try:
            self.wait()
        finally:
            self._pool.shutdown(wait=True)


class AxSearch:
    """An Ax ``Client`` plus the optimizer's own points (see the module docstring)."""

    def __init__(self, conf: SearchConf, space, name: str = "merge") -> None:
        from ax import Client

        _quiet_ax()
        self.conf, self.space = conf, space
        self.client = Client(random_seed=conf.seed)
        self.client.configure_experiment(parameters=space.parameters(),
                                         parameter_constraints=space.constraints() or None, name=name)
        self.client.configure_optimization(objective=f"-{OBJECTIVE}")
        self._book = _Bookkeeper(background=conf.background_bookkeeping)
        # paper and grid never ask Ax: their records are queued and applied in batches (module docstring).
        self._batched = conf.name in ("paper", "grid")
        self._ops: list[tuple] = []  # queued Ax records, in order: ("attach", params, index), ("complete", ...)
        self._snapshot: Path | None = None  # where save() writes, once it has been called
        self._dirty = False  # Ax records since the last scheduled snapshot
        self._saved_at: float | None = None  # monotonic time the last snapshot was scheduled
        self._save_cost = 0.0  # seconds the last snapshot took to write (set on the bookkeeping thread)
        self._next = 0
        self._queue: list[tuple[dict[str, float], str, dict]] = []  # (params, origin, what the trial keeps)
        self._params: dict[int, dict[str, float]] = {}
        self._observed: list[tuple[list[float], float]] = []
        self._evaluated: dict[int, list[float]] = {}  # unit points of completed and failed trials: never proposed again
        self.converged: str | None = None  # why ask() returned None
        self._proposer = None
        self.hedge: dict | None = None
        warm = self._warm_points(conf, space)
        if conf.name == "paper":
            from .bo import GPProposer

            self._proposer = GPProposer(space.dim, conf.acquisition, seed=conf.seed)
            self._proposer.set_candidates(space.candidates(2001 if space.dim == 1 else 4096, conf.seed))
            self._queue = [(p, "init", {}) for p in space.initial()]
        elif conf.name == "ax":
            self.client.configure_generation_strategy(method="fast", initialization_random_seed=conf.seed)
        elif conf.name == "grid":
            self._queue = [(p, "grid", {}) for p in space.grid(conf.trials, seed=conf.seed)]
        elif conf.name == "random":
            self.client.configure_generation_strategy(method="random_search",
                                                      initialization_random_seed=conf.seed)
        else:  # pragma: no cover - SearchConf rejects other names
            raise ValueError(f"unknown search.name {conf.name!r}")
        self._queue = warm + self._queue  # the warm start first, then the optimizer's own first points

    @staticmethod
    def _warm_points(conf: SearchConf, space) -> list[tuple[dict[str, float], str, dict]]:
        """``search.warm_start`` as queued points (origin ``warm``); a point outside the space is refused."""
        out = []
        for i, w in enumerate(conf.warm_start or []):
            params = space.params_for(w) if len(w) == space.k else None
            if params is None:
                raise ValueError(f"config option `search.warm_start`: point {i} {list(w)} is not a point of the "
                                 f"{conf.space} space over {space.k} checkpoints (one weight per checkpoint, summing "
                                 "to 1, within the space's bounds)")
            out.append((params, "warm", {}))
        return out

    # --- proposing -----------------------------------------------------------------------
    def ask(self) -> Proposal | None:
        """The next trial (attached to the Ax experiment as RUNNING); None when converged (see ``converged``)."""
        state = dedup = None
        if self._queue:
            params, origin, keep = self._queue.pop(0)
            state, dedup = keep.get("state"), keep.get("deduplicated_from")
        elif self._proposer is not None and len(self._observed) < 2:
            # An initial point failed (e.g. a non-finite loss): the GP needs two observations, so
            # seed it with a quasi-random point of the space, chosen by (seed, trial) like the rest.
            import numpy as np

            cands = self._proposer.candidates
            pick = int(np.random.default_rng([self.conf.seed, self._next]).integers(len(cands)))
            params, origin = self.space.from_unit(cands[pick].tolist()), "random-init"
        elif self._proposer is not None:
            import torch

            from .bo import HedgeState

            X = torch.tensor([x for x, _ in self._observed], dtype=torch.float64)
            y = torch.tensor([v for _, v in self._observed], dtype=torch.float64)
            got = self._proposer.propose(X, y, step=len(self._observed), state=HedgeState.from_dict(self.hedge),
                                         evaluated=self._evaluated_points(), tol=self.conf.repeat_tol,
                                         worth=self.conf.min_gain if self.conf.min_gain > 0 else -math.inf)
            if got.replaced is not None:
                dedup = {"params": self.space.from_unit(got.replaced), "trial": self._nearest(got.replaced),
                         "expected_improvement": got.gain}
            if got.point is None:
                return self._converge(f"{got.converged}; the point it repeats is trial {dedup['trial']}" if dedup
                                      else got.converged)
            self.hedge = got.state.to_dict()
            origin = got.acquisition
            state = {"hedge": self.hedge} if self.conf.acquisition == "gp_hedge" else None
            params = self.space.from_unit(got.point)
        else:
            self._book.wait()  # Ax itself proposes: it must have seen every result first
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                ((index, params),) = self.client.get_next_trials(max_trials=1).items()
            if index != self._next:
                raise RuntimeError(f"Ax numbered a trial {index}, expected {self._next}")
            self._next = index + 1
            params = {k: float(v) for k, v in params.items()}
            if self.conf.name == "ax":
                import torch

                from .bo import near

                unit = self.space.to_unit(params)
                tol = self.conf.repeat_tol
                if bool(near(torch.tensor([unit], dtype=torch.float64), self._evaluated_points(), tol)[0]):
                    self._record("abandon", index)
                    shown = {k: round(v, 6) for k, v in params.items()}
                    return self._converge(f"Ax proposed {shown}, within {tol:g} of trial {self._nearest(unit)} "
                                          f"already evaluated: its acquisition has nothing better")
            self._params[index] = params
            return Proposal(index, params, self.space.weights(params), "random" if self.conf.name == "random" else "ax")
        return self.attach(params, origin, state, dedup)

    def _evaluated_points(self):
        import torch

        pts = list(self._evaluated.values())
        return torch.tensor(pts, dtype=torch.float64) if pts else None

    def _nearest(self, unit: list[float]) -> int | None:
        """The evaluated trial closest to ``unit`` (max-norm in the unit cube)."""
        return min(self._evaluated, key=lambda i: max(abs(a - b) for a, b in zip(self._evaluated[i], unit)),
                   default=None)

    def _converge(self, reason: str) -> None:
        self.converged = reason
        return None

    def attach(self, params: dict[str, float], origin: str, state: dict | None = None,
               deduplicated_from: dict | None = None) -> Proposal:
        """Record a point chosen here (an initial point, a GP proposal or a baseline) as the next trial."""
        params = {k: float(v) for k, v in params.items()}
        index = self._next
        self._next += 1
        self._params[index] = params
        self._record("attach", params, index)
        return Proposal(index, params, self.space.weights(params), origin, state, deduplicated_from)

    def _attach_now(self, params: dict[str, float], expect: int) -> None:
        index = self.client.attach_trial(params)
        if index != expect:
            raise RuntimeError(f"Ax numbered an attached trial {index}, expected {expect}")

    def warm_up(self) -> None:
        """Import and run the surrogate once on dummy data, so the first real proposal is not slow."""
        if self._proposer is not None:
            import torch

            X = torch.tensor([[0.0] * self.space.dim, [1.0] * self.space.dim], dtype=torch.float64)
            self._proposer.propose(X, torch.tensor([1.0, 0.0], dtype=torch.float64), step=0)

    # --- results -------------------------------------------------------------------------
    def tell(self, index: int, loss: float) -> None:
        """Complete a trial with its finite loss (Ax is told in the background)."""
        if not math.isfinite(loss):
            raise ValueError(f"trial {index}: a non-finite loss ({loss}) is never given to Ax; use fail()")
        self._observed.append((self.space.to_unit(self._params[index]), float(loss)))
        self._evaluated[index] = self._observed[-1][0]
        self._record("complete", index, float(loss))

    def fail(self, index: int, reason: str) -> None:
        """Mark a trial failed; its loss is never given to the surrogate, and its point is not proposed again."""
        if index in self._params:
            self._evaluated[index] = self.space.to_unit(self._params[index])
        self._record("fail", index, reason)

    def save(self, path: str | Path) -> None:
        """Snapshot the Ax client atomically at ``path`` when one is due (see the module docstring).

        Due: no snapshot yet, or ``search.snapshot_every_s`` and 20 times the
        last write's duration have passed since the last one. The snapshot
        holds every record made before it. :meth:`flush` writes one whenever
        records were made since.
        """
        self._snapshot = Path(path)
        now = time.monotonic()
        every = max(self.conf.snapshot_every_s, 20.0 * self._save_cost)
        if self._saved_at is None or now - self._saved_at >= every:
            self._schedule_snapshot(now)

    def _record(self, op: str, *args) -> None:
        """One Ax record: queued for the next batch (paper, grid), or handed to the bookkeeper now."""
        self._dirty = True
        if self._batched:
            self._ops.append((op, *args))
        else:
            self._book.defer(self._apply, [(op, *args)])

    def _schedule_snapshot(self, now: float) -> None:
        ops, self._ops = self._ops, []
        self._book.defer(self._apply, ops, self._snapshot)
        self._saved_at, self._dirty = now, False

    def _apply(self, ops: list[tuple], snapshot: Path | None = None) -> None:
        """Bookkeeping thread: make the Ax records ``ops`` in order, then write the snapshot (if given).

        The results of a batch go in last, with one ``attach_data`` (Ax
        rebuilds its whole data table on each), then each trial is marked
        completed, which is what ``Client.complete_trial`` does one trial at a
        time. (A result only needs its own trial attached, and no other record
        depends on a result.)
        """
        done: list[tuple[int, float]] = []
        for op, *args in ops:
            if op == "complete":
                done.append((args[0], args[1]))
            elif op == "attach":
                self._attach_now(*args)
            elif op == "fail":
                self.client.mark_trial_failed(args[0], failed_reason=args[1])
            elif op == "abandon":
                self.client.mark_trial_abandoned(args[0])
            else:  # pragma: no cover - _record's callers name these four
                raise ValueError(f"unknown Ax record {op!r}")
        self._complete(done)
        if snapshot is not None:
            t = time.perf_counter()
            _save_client(self.client, snapshot)
            self._save_cost = time.perf_counter() - t

    def _complete(self, done: list[tuple[int, float]]) -> None:
        if len(done) == 1:
            index, loss = done[0]
            self.client.complete_trial(index, raw_data={OBJECTIVE: loss})
        elif done:
            from ax.core.data import Data

            exp = self.client._experiment  # noqa: SLF001 - the batch form of Client.complete_trial
            trials = [(exp.trials[i], loss) for i, loss in done]
            exp.attach_data(Data.from_multiple_data(
                [t._raw_evaluations_to_data({t.arm.name: [(math.nan, {OBJECTIVE: loss})]})  # noqa: SLF001
                 for t, loss in trials]))
            for t, _ in trials:
                t.mark_completed()

    def kick(self) -> None:
        """Start the deferred Ax calls in the background; the driver calls it once the trial's merge is done."""
        self._book.kick()

    def flush(self) -> None:
        """Wait until Ax has every record and, once :meth:`save` has named it, the snapshot holds them all."""
        if self._snapshot is not None and self._dirty:
            self._schedule_snapshot(time.monotonic())
        elif self._ops:
            ops, self._ops = self._ops, []
            self._book.defer(self._apply, ops)
        self._book.wait()

    def close(self) -> None:
        """Flush (every record in Ax, the last snapshot on disk), then stop the bookkeeping thread."""
        try:
            self.flush()
        finally:
            self._book.close()

    def statuses(self) -> dict[int, str]:
        """Ax's status of every trial (``COMPLETED``, ``FAILED``, ``RUNNING``), after a flush."""
        self.flush()
        df = self.client.summarize()
        if len(df) == 0:
            return {}
        return {int(i): str(s) for i, s in zip(df["trial_index"], df["trial_status"])}

    # --- resume --------------------------------------------------------------------------
    @classmethod
    def restore(cls, conf: SearchConf, space, name: str, ledger: Ledger, snapshot: Path) -> "AxSearch":
        """A search that continues the one in ``ledger`` (and ``snapshot``, when it can be read).

        The ledger wins: a trial the snapshot lacks is attached again; a trial
        the ledger completed is completed in Ax with the ledger's value (never
        re-evaluated); a trial that was running when the process died is
        marked failed, in Ax and in the ledger, and its point is queued to be
        evaluated again. Initial and grid points already tried are not queued.
        """
        s = cls(conf, space, name)
        status: dict[int, str] = {}
        if snapshot.exists():
            try:
                from ax import Client

                client = Client.load_from_json_file(str(snapshot))
                df = client.summarize()
                status = {int(i): str(st) for i, st in zip(df["trial_index"], df["trial_status"])} if len(df) else {}
                ahead = [i for i, r in ledger.records.items()
                         if status.get(i) in ("COMPLETED", "FAILED", "ABANDONED") and r["status"] == "running"]
                if ahead:  # the ledger wins, and Ax cannot take a result back: rebuild it from the ledger
                    log.warning("%s has a result for trial(s) %s that %s holds as running (a torn or lost ledger "
                                "line); rebuilding the Ax experiment from the ledger", snapshot, ahead, ledger.path)
                    status = {}
                else:
                    s.client = client
            except Exception as e:  # noqa: BLE001 - a stale snapshot only costs the Ax generator's memory
                log.warning("could not load %s (%s); rebuilding the Ax experiment from %s", snapshot, e, ledger.path)
                status = {}
        rerun: list[tuple[dict[str, float], str, dict]] = []
        tried: list[tuple[dict[str, float], str]] = []
        for rec in ledger.ordered():
            idx, params = int(rec["trial"]), {k: float(v) for k, v in rec["params"].items()}
            # A re-run keeps what its proposal recorded: the GP-Hedge state after it, the repeat it replaced.
            keep = {k: rec[k] for k in ("state", "deduplicated_from") if rec.get(k)}
            if rec.get("state") and rec["state"].get("hedge"):
                s.hedge = rec["state"]["hedge"]  # the last proposal's, as the uninterrupted search has it
            if idx not in status:
                got = s.client.attach_trial(params)
                if got != idx:
                    raise RuntimeError(f"{ledger.path}: trial {idx} became Ax trial {got}; the ledger has a gap")
                status[idx] = "RUNNING"
            s._params[idx] = params
            if rec["status"] == "completed":
                if status[idx] != "COMPLETED":
                    s.client.complete_trial(idx, raw_data={OBJECTIVE: float(rec[OBJECTIVE])})
                s._observed.append((space.to_unit(params), float(rec[OBJECTIVE])))
                s._evaluated[idx] = s._observed[-1][0]
                tried.append((params, rec.get("origin", "")))
            elif rec["status"] == "failed":
                if status[idx] == "RUNNING":
                    s.client.mark_trial_failed(idx, failed_reason=str(rec.get("reason", "failed")))
                if rec.get("reason") != DIED:
                    tried.append((params, rec.get("origin", "")))
                    s._evaluated[idx] = space.to_unit(params)
                elif not any(int(r["trial"]) > idx and r["params"] == rec["params"] for r in ledger.ordered()):
                    rerun.append((params, rec.get("origin", ""), keep))  # died, and a crash came before its re-run
            else:  # running when the process died
                if status[idx] == "RUNNING":
                    s.client.mark_trial_failed(idx, failed_reason=DIED)
                ledger.write({**rec, "status": "failed", "reason": DIED})
                if not str(rec.get("origin", "")).startswith("baseline:"):
                    rerun.append((params, rec.get("origin", ""), keep))
                log.warning("trial %d was running when the process died: marked failed, evaluated again", idx)
            status[idx] = "DONE"
        for idx, st in status.items():
            if st == "RUNNING":  # in the snapshot but never in the ledger: its result cannot be known
                s.client.mark_trial_failed(idx, failed_reason="not in the ledger")
        s._next = max(status) + 1 if status else 0

        def among(p: dict[str, float], origin: str, pool) -> bool:
            return any(o == origin and all(abs(q[k] - p[k]) < 1e-12 for k in p) for q, o, *_ in pool)

        s._queue = rerun + [(p, o, x) for p, o, x in s._queue if not among(p, o, tried) and not among(p, o, rerun)]
        log.info("resumed %d trials from %s (%d completed, %d to re-run)", len(ledger.records), ledger.path,
                 len(s._observed), len(rerun))
        return s


def _save_client(client, path: Path) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        client.save_to_json_file(tmp)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException as e:
        size = os.path.getsize(tmp) if os.path.exists(tmp) else None
        if os.path.exists(tmp):
            os.unlink(tmp)
        if isinstance(e, OSError) and e.errno == errno.ENOSPC and not isinstance(e, DiskFullError):
            # The ledger line of the trial is already on disk; a resume rebuilds Ax from the ledger.
            raise disk_full(path, None if size is None else max(size, 1) * 2, "the Ax snapshot") from e
        raise
