"""Search spaces, the Ax-backed optimizers, and the trial ledger.

Every optimizer records its trials in one Ax experiment (``attach_trial`` for
points it chooses itself, ``get_next_trials`` for points Ax's generator
chooses), so reports and snapshots look the same whichever produced a point.

``paper`` follows Algorithm 1 of Liu et al. (arXiv 2403.19390): the first two
evaluations are ``lam = alpha`` and ``lam = 1``; every later ``lam`` comes from
a GP surrogate with the configured acquisition (EI, PI, UCB or GP-Hedge over
the three; see ``bo.py``), and is attached to the Ax experiment. ``ax`` is the
Ax ``Client`` default (Sobol initial points, then its BoTorch GP). ``grid``
walks evenly spaced points; ``random`` draws quasi-random (scrambled Sobol)
points. The objective is minimised.

Knows nothing of Lightning or ranks: the driver calls it on rank 0 only.
"""

from __future__ import annotations

import logging
import os
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from .config import SearchConf
from .io import append_jsonl, read_jsonl

__all__ = ["Proposal", "PairwiseSpace", "AxSearch", "Ledger", "OBJECTIVE"]

log = logging.getLogger(__name__)
OBJECTIVE = "objective"  # the minimised value: held-out loss, or 1 - accuracy


@dataclass
class Proposal:
    """One trial to evaluate: Ax's index, its parameters and the merge weights."""

    index: int
    params: dict[str, float]
    weights: list[float]
    origin: str  # "init", "grid", "random", "ax", or the acquisition: "ei", "pi", "ucb"
    state: dict | None = None  # optimizer state to keep with the trial (GP-Hedge gains)


@dataclass
class PairwiseSpace:
    """The paper's space: ``lam`` in ``[alpha, 1]`` weights the newer of two checkpoints.

    Weights are returned in source order (older first): ``[1 - lam, lam]``.
    """

    alpha: float

    def parameters(self):
        from ax import RangeParameterConfig

        return [RangeParameterConfig(name="lam", parameter_type="float", bounds=(self.alpha, 1.0))]

    def weights(self, params: dict[str, float]) -> list[float]:
        lam = float(params["lam"])
        return [1.0 - lam, lam]

    def params(self, lam: float) -> dict[str, float]:
        return {"lam": float(lam)}

    dim = 1

    def to_unit(self, params: dict[str, float]) -> list[float]:
        """The point in ``[0, 1]`` the GP sees (``lam`` rescaled from ``[alpha, 1]``)."""
        span = 1.0 - self.alpha
        return [(float(params["lam"]) - self.alpha) / span if span > 0 else 0.0]

    def from_unit(self, x: list[float]) -> dict[str, float]:
        return self.params(min(1.0, max(self.alpha, self.alpha + x[0] * (1.0 - self.alpha))))


def _quiet_ax() -> None:
    """Ax logs every trial at INFO on its own handlers; our ledger and progress bar say it better."""
    prefixes = ("ax", "botorch", "gpytorch", "linear_operator")
    for name in list(logging.root.manager.loggerDict) + list(prefixes):
        if name.split(".")[0] in prefixes:
            logging.getLogger(name).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", module=r"(ax|botorch|gpytorch|linear_operator)(\..*)?")
    warnings.filterwarnings("ignore", message=".*Optimization failed.*")


class AxSearch:
    """An Ax ``Client`` plus the optimizer's own points (see the module docstring)."""

    def __init__(self, conf: SearchConf, space: PairwiseSpace, name: str = "merge") -> None:
        from ax import Client

        _quiet_ax()
        self.conf = conf
        self.space = space
        self.client = Client(random_seed=conf.seed)
        self.client.configure_experiment(parameters=space.parameters(), name=name)
        self.client.configure_optimization(objective=f"-{OBJECTIVE}")
        self._queue: list[tuple[dict[str, float], str]] = []
        self._proposer = None
        self._params: dict[int, dict[str, float]] = {}
        self._observed: list[tuple[list[float], float]] = []
        self.hedge = None
        if conf.name == "paper":
            from .bo import GPProposer

            self._proposer = GPProposer(space.dim, conf.acquisition, seed=conf.seed)
            self._queue = [(space.params(space.alpha), "init"), (space.params(1.0), "init")]
        elif conf.name == "ax":
            self.client.configure_generation_strategy(method="fast", initialization_random_seed=conf.seed)
        elif conf.name == "grid":
            n = conf.trials
            self._queue = [(space.params(space.alpha + (1.0 - space.alpha) * i / (n - 1)), "grid")
                           for i in range(n)]
        elif conf.name == "random":
            self.client.configure_generation_strategy(
                method="random_search", initialization_random_seed=conf.seed)
        else:  # pragma: no cover - SearchConf rejects other names
            raise ValueError(f"unknown search.name {conf.name!r}")

    def ask(self) -> Proposal:
        """The next trial; it is RUNNING in the Ax experiment when this returns."""
        state = None
        if self._queue:
            params, origin = self._queue.pop(0)
            index = self.client.attach_trial(params)
        elif self._proposer is not None:
            if len(self._observed) < 2:
                raise RuntimeError("the paper optimizer needs the two initial points observed first")
            import torch

            from .bo import HedgeState

            X = torch.tensor([x for x, _ in self._observed])
            y = torch.tensor([v for _, v in self._observed])
            x, origin, hedge = self._proposer.propose(X, y, step=len(self._observed),
                                                     state=HedgeState.from_dict(self.hedge))
            self.hedge = hedge.to_dict()
            state = {"hedge": self.hedge} if self.conf.acquisition == "gp_hedge" else None
            params = self.space.from_unit(x)
            index = self.client.attach_trial(params)
        else:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                ((index, params),) = self.client.get_next_trials(max_trials=1).items()
            origin = "random" if self.conf.name == "random" else "ax"
        params = {k: float(v) for k, v in params.items()}
        self._params[index] = params
        return Proposal(index=index, params=params, weights=self.space.weights(params), origin=origin,
                        state=state)

    def tell(self, index: int, loss: float) -> None:
        """Complete a trial with its (finite) loss."""
        self.client.complete_trial(index, raw_data={OBJECTIVE: float(loss)})
        self._observed.append((self.space.to_unit(self._params[index]), float(loss)))

    def fail(self, index: int, reason: str) -> None:
        """Mark a trial failed; its loss is never given to the surrogate."""
        self.client.mark_trial_failed(index, failed_reason=reason)

    def save(self, path: str | Path) -> None:
        """Snapshot the Ax client atomically (temp file, then rename)."""
        path = Path(path)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
        try:
            self.client.save_to_json_file(tmp)
            os.chmod(tmp, 0o644)
            os.replace(tmp, path)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise


@dataclass
class Ledger:
    """``trials.jsonl``: one fsync'd line per status change of a trial; the last line wins."""

    path: Path
    records: dict[int, dict] = field(default_factory=dict)

    @classmethod
    def open(cls, path: str | Path) -> "Ledger":
        led = cls(Path(path))
        for rec in read_jsonl(led.path):
            led.records[int(rec["trial"])] = rec
        return led

    def write(self, record: dict) -> dict:
        append_jsonl(self.path, record)
        self.records[int(record["trial"])] = record
        return record

    def completed(self) -> list[dict]:
        return [r for _, r in sorted(self.records.items()) if r["status"] == "completed"]

    def best(self) -> dict | None:
        done = self.completed()
        return min(done, key=lambda r: r[OBJECTIVE]) if done else None

