"""The paper's optimizer: a GP surrogate with EI, PI, UCB, or GP-Hedge over all three.

Liu et al. (arXiv 2403.19390, Algorithm 1) evaluate ``lam = alpha`` and
``lam = 1`` first, then let a Gaussian process propose every later point with
an acquisition function; GP-Hedge (Hoffman, Brochu & de Freitas, 2011) keeps a
portfolio of EI, PI and UCB, lets each nominate a point, picks one nominee at
random with probability ``softmax(eta * gains)``, and after each observation
credits every acquisition with the refitted posterior mean at its nominee.

This is built from BoTorch parts (``SingleTaskGP``, ``fit_gpytorch_mll``, the
analytic ``LogExpectedImprovement``, ``LogProbabilityOfImprovement`` and
``UpperConfidenceBound``). The acquisitions are maximised over a fixed
candidate set in the unit cube (a dense grid in 1-D, scrambled Sobol points
otherwise): for the low-dimensional spaces of checkpoint merging this is both
exact enough and ~100x cheaper than multi-start gradient optimisation, which
keeps the per-trial overhead small next to one evaluation.

Pure: no Ax, Lightning or ranks. The objective is a loss (minimised); the GP
models its negation.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field

import numpy as np
import torch

__all__ = ["ACQUISITIONS", "HedgeState", "GPProposer"]

ACQUISITIONS = ("ei", "pi", "ucb", "gp_hedge")
_PORTFOLIO = ("ei", "pi", "ucb")


@dataclass
class HedgeState:
    """GP-Hedge's memory: cumulative gains and the last nominees (unit-cube points)."""

    gains: dict[str, float] = field(default_factory=lambda: {a: 0.0 for a in _PORTFOLIO})
    nominees: dict[str, list[float]] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"gains": dict(self.gains), "nominees": {k: list(v) for k, v in self.nominees.items()}}

    @classmethod
    def from_dict(cls, d: dict | None) -> "HedgeState":
        if not d:
            return cls()
        return cls(gains={k: float(v) for k, v in d["gains"].items()},
                   nominees={k: [float(x) for x in v] for k, v in d.get("nominees", {}).items()})


class GPProposer:
    """Proposes the next point in ``[0, 1]^dim`` from observed (point, loss) pairs."""

    def __init__(self, dim: int, acquisition: str = "gp_hedge", seed: int = 0, ucb_kappa: float = 1.96,
                 eta: float = 1.0, grid: int = 2001, sobol: int = 4096) -> None:
        if acquisition not in ACQUISITIONS:
            raise ValueError(f"search.acquisition={acquisition!r}: use one of {ACQUISITIONS}")
        self.dim, self.acquisition, self.seed = dim, acquisition, seed
        self.beta = ucb_kappa**2
        self.eta = eta
        if dim == 1:
            self.candidates = torch.linspace(0, 1, grid, dtype=torch.float64).unsqueeze(-1)
        else:
            engine = torch.quasirandom.SobolEngine(dim, scramble=True, seed=seed)
            self.candidates = engine.draw(sobol, dtype=torch.float64)

    def set_candidates(self, candidates: torch.Tensor) -> None:
        """Restrict proposals to these unit-cube points (e.g. ones a constrained space allows)."""
        self.candidates = candidates.to(torch.float64)

    def _fit(self, X: torch.Tensor, loss: torch.Tensor):
        from botorch.fit import fit_gpytorch_mll
        from botorch.models import SingleTaskGP
        from gpytorch.mlls import ExactMarginalLogLikelihood

        torch.manual_seed(self.seed)
        model = SingleTaskGP(X, -loss.unsqueeze(-1))  # default: Standardize outcome, unit-cube inputs
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            fit_gpytorch_mll(ExactMarginalLogLikelihood(model.likelihood, model))
        return model.eval()

    def _acq_values(self, model, name: str, best_f: float) -> torch.Tensor:
        from botorch.acquisition.analytic import (LogExpectedImprovement, LogProbabilityOfImprovement,
                                                  UpperConfidenceBound)

        acq = {"ei": lambda: LogExpectedImprovement(model, best_f=best_f),
               "pi": lambda: LogProbabilityOfImprovement(model, best_f=best_f + self.pi_xi),
               "ucb": lambda: UpperConfidenceBound(model, beta=self.beta)}[name]()
        with torch.no_grad():
            return acq(self.candidates.unsqueeze(1))

    def posterior(self, X: torch.Tensor, loss: torch.Tensor, points: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """GP posterior mean and std of the LOSS at ``points`` (for plots)."""
        model = self._fit(X.to(torch.float64), loss.to(torch.float64))
        with torch.no_grad():
            post = model.posterior(points.to(torch.float64))
        return -post.mean.squeeze(-1), post.variance.clamp_min(0).sqrt().squeeze(-1)

    def propose(self, X: torch.Tensor, loss: torch.Tensor, step: int,
                state: HedgeState | None = None) -> tuple[list[float], str, HedgeState]:
        """The next point, the acquisition that chose it, and the updated hedge state.

        ``X``: ``[n, dim]`` observed points in the unit cube; ``loss``: ``[n]``
        finite losses. ``step`` seeds the hedge draw, so a resumed search makes
        the same choice again.
        """
        X, loss = X.to(torch.float64), loss.to(torch.float64)
        model = self._fit(X, loss)
        best_f = float((-loss).max())
        # PI with no margin re-proposes the incumbent forever; ask for a tenth of a standard deviation.
        self.pi_xi = 0.1 * float(loss.std()) if loss.numel() > 1 else 0.0
        state = HedgeState.from_dict(state.to_dict()) if state is not None else HedgeState()
        if self.acquisition != "gp_hedge":
            vals = self._acq_values(model, self.acquisition, best_f)
            return self.candidates[int(vals.argmax())].tolist(), self.acquisition, state
        # Credit each acquisition with the refitted posterior mean (standardised scale) at its last nominee.
        if state.nominees:
            pts = torch.tensor([state.nominees[a] for a in _PORTFOLIO], dtype=torch.float64)
            with torch.no_grad():
                mu = model.posterior(pts).mean.squeeze(-1)
            mu = (mu - (-loss).mean()) / ((-loss).std() if loss.numel() > 1 and (-loss).std() > 0 else 1.0)
            for a, m in zip(_PORTFOLIO, mu.tolist()):
                state.gains[a] += m
        nominees = {}
        for a in _PORTFOLIO:
            vals = self._acq_values(model, a, best_f)
            nominees[a] = self.candidates[int(vals.argmax())].tolist()
        g = np.array([state.gains[a] for a in _PORTFOLIO])
        p = np.exp(self.eta * (g - g.max()))
        p /= p.sum()
        rng = np.random.default_rng([self.seed, step])
        chosen = _PORTFOLIO[int(rng.choice(len(_PORTFOLIO), p=p))]
        state.nominees = nominees
        if not all(math.isfinite(x) for x in nominees[chosen]):  # pragma: no cover - defensive
            raise FloatingPointError(f"GP-Hedge nominee is not finite: {nominees}")
        return nominees[chosen], chosen, state
