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

Ax bookkeeping is off the critical path. Ax's ``complete_trial`` and the JSON
snapshot cost tens of milliseconds a trial and grow with the experiment, while
the paper optimizer needs nothing from Ax to propose. So the Ax calls run in
order on one background thread (:class:`_Bookkeeper`) while the next
evaluation runs; trial indices are assigned here and checked against Ax's.
Only ``ax`` and ``random``, which ask Ax itself, wait for it first. The
fsync'd ledger is written synchronously by the driver before any of this, so
a kill loses at most the trial in flight (see ``ledger.py``).

Knows nothing of Lightning or ranks: the driver calls it on rank 0 only.
"""

from __future__ import annotations

import logging
import math
import os
import tempfile
import warnings
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from .config import SearchConf
from .ledger import OBJECTIVE, Ledger

__all__ = ["Proposal", "AxSearch", "OBJECTIVE"]

log = logging.getLogger(__name__)
DIED = "the process died while this trial was running; it is evaluated again"


@dataclass
class Proposal:
    """One trial to evaluate: Ax's index, its parameters and the merge weights."""

    index: int
    params: dict[str, float]
    weights: list[float]
    origin: str  # "init", "grid", "random", "ax", "baseline:<name>", or the acquisition: "ei", "pi", "ucb"
    state: dict | None = None  # optimizer state to keep with the trial (GP-Hedge gains)


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
        self._next = 0
        self._queue: list[tuple[dict[str, float], str]] = []
        self._params: dict[int, dict[str, float]] = {}
        self._observed: list[tuple[list[float], float]] = []
        self._proposer = None
        self.hedge: dict | None = None
        if conf.name == "paper":
            from .bo import GPProposer

            self._proposer = GPProposer(space.dim, conf.acquisition, seed=conf.seed)
            self._proposer.set_candidates(space.candidates(2001 if space.dim == 1 else 4096, conf.seed))
            self._queue = [(p, "init") for p in space.initial()]
        elif conf.name == "ax":
            self.client.configure_generation_strategy(method="fast", initialization_random_seed=conf.seed)
        elif conf.name == "grid":
            self._queue = [(p, "grid") for p in space.grid(conf.trials, seed=conf.seed)]
        elif conf.name == "random":
            self.client.configure_generation_strategy(method="random_search",
                                                      initialization_random_seed=conf.seed)
        else:  # pragma: no cover - SearchConf rejects other names
            raise ValueError(f"unknown search.name {conf.name!r}")

    # --- proposing -----------------------------------------------------------------------
    def ask(self) -> Proposal:
        """The next trial to evaluate (attached to the Ax experiment as RUNNING)."""
        state = None
        if self._queue:
            params, origin = self._queue.pop(0)
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
            x, origin, hedge = self._proposer.propose(X, y, step=len(self._observed),
                                                     state=HedgeState.from_dict(self.hedge))
            self.hedge = hedge.to_dict()
            state = {"hedge": self.hedge} if self.conf.acquisition == "gp_hedge" else None
            params = self.space.from_unit(x)
        else:
            self._book.wait()  # Ax itself proposes: it must have seen every result first
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                ((index, params),) = self.client.get_next_trials(max_trials=1).items()
            if index != self._next:
                raise RuntimeError(f"Ax numbered a trial {index}, expected {self._next}")
            self._next = index + 1
            params = {k: float(v) for k, v in params.items()}
            self._params[index] = params
            return Proposal(index, params, self.space.weights(params), "random" if self.conf.name == "random" else "ax")
        return self.attach(params, origin, state)

    def attach(self, params: dict[str, float], origin: str, state: dict | None = None) -> Proposal:
        """Record a point chosen here (an initial point, a GP proposal or a baseline) as the next trial."""
        params = {k: float(v) for k, v in params.items()}
        index = self._next
        self._next += 1
        self._params[index] = params
        self._book.defer(self._attach_now, params, index)
        return Proposal(index, params, self.space.weights(params), origin, state)

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
        self._book.defer(self.client.complete_trial, index, raw_data={OBJECTIVE: float(loss)})

    def fail(self, index: int, reason: str) -> None:
        """Mark a trial failed; its loss is never given to the surrogate."""
        self._book.defer(self.client.mark_trial_failed, index, failed_reason=reason)

    def save(self, path: str | Path) -> None:
        """Snapshot the Ax client atomically, after every call submitted so far."""
        self._book.defer(_save_client, self.client, Path(path))

    def kick(self) -> None:
        """Start the deferred Ax calls in the background; the driver calls it once the trial's merge is done."""
        self._book.kick()

    def flush(self) -> None:
        """Wait until Ax has every result and the last snapshot is on disk."""
        self._book.wait()

    def close(self) -> None:
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
                s.client = client
            except Exception as e:  # noqa: BLE001 - a stale snapshot only costs the Ax generator's memory
                log.warning("could not load %s (%s); rebuilding the Ax experiment from %s", snapshot, e, ledger.path)
                status = {}
        rerun: list[tuple[dict[str, float], str]] = []
        tried: list[tuple[dict[str, float], str]] = []
        for rec in ledger.ordered():
            idx, params = int(rec["trial"]), {k: float(v) for k, v in rec["params"].items()}
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
                if rec.get("state") and rec["state"].get("hedge"):
                    s.hedge = rec["state"]["hedge"]
                tried.append((params, rec.get("origin", "")))
            elif rec["status"] == "failed":
                if status[idx] == "RUNNING":
                    s.client.mark_trial_failed(idx, failed_reason=str(rec.get("reason", "failed")))
                if rec.get("reason") != DIED:
                    tried.append((params, rec.get("origin", "")))
                elif not any(int(r["trial"]) > idx and r["params"] == rec["params"] for r in ledger.ordered()):
                    rerun.append((params, rec.get("origin", "")))  # died, and a crash came before its re-run
            else:  # running when the process died
                if status[idx] == "RUNNING":
                    s.client.mark_trial_failed(idx, failed_reason=DIED)
                ledger.write({**rec, "status": "failed", "reason": DIED})
                if not str(rec.get("origin", "")).startswith("baseline:"):
                    rerun.append((params, rec.get("origin", "")))
                log.warning("trial %d was running when the process died: marked failed, evaluated again", idx)
            status[idx] = "DONE"
        for idx, st in status.items():
            if st == "RUNNING":  # in the snapshot but never in the ledger: its result cannot be known
                s.client.mark_trial_failed(idx, failed_reason="not in the ledger")
        s._next = max(status) + 1 if status else 0

        def among(p: dict[str, float], origin: str, pool) -> bool:
            return any(o == origin and all(abs(q[k] - p[k]) < 1e-12 for k in p) for q, o in pool)

        s._queue = rerun + [(p, o) for p, o in s._queue if not among(p, o, tried) and not among(p, o, rerun)]
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
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
