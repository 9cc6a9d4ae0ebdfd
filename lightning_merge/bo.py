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

A point already evaluated is never proposed again. The GP keeps choosing
the incumbent (or a hair beside it) once it believes nothing else is better,
and with a deterministic objective a repeat teaches it nothing, so every
acquisition is maximised only over candidates not :func:`near` an evaluated
point (within ``tol`` in every unit coordinate). The result
says when that changed the choice (``replaced``), and when nothing is left
that is worth an evaluation (``converged``): every candidate is within ``tol``
of an evaluated point, or the acquisition's own best was an evaluated point
and the expected improvement anywhere else is below ``worth`` of the best
objective.

Pure: no Ax, Lightning or ranks. The objective is a loss (minimised); the GP
models its negation.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np
import torch

__all__ = ["ACQUISITIONS", "HedgeState", "GPProposer", "Proposed", "map_hyperparameters", "near"]

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


class Proposed(NamedTuple):
    """What :meth:`GPProposer.propose` chose."""

    point: list[float] | None  # unit-cube point to evaluate; None: converged
    acquisition: str  # the acquisition that chose it ("ei", "pi", "ucb")
    state: "HedgeState"
    replaced: list[float] | None = None  # the acquisition's own best, near an evaluated point, that ``point`` replaces
    converged: str | None = None  # why nothing is left worth evaluating
    gain: float | None = None  # with ``replaced``: the best expected improvement (loss units) of the other points


def near(points: torch.Tensor, evaluated: torch.Tensor | None, tol: float) -> torch.Tensor:
    """``[n]`` bool: whether each of ``points`` lies within ``tol`` of an ``evaluated`` one in every unit coordinate.

    The max-norm in the optimizer's unit cube: ``tol=0.01`` is a hundredth of
    every parameter's range, whatever the space's own scale. "Within" includes
    the bound, with a relative slack of 1e-9 for the round trip of a point
    through the space's own parameters (a candidate exactly ``tol`` away on a
    grid must not be near on one trial and not on the next).
    """
    if evaluated is None or evaluated.numel() == 0 or tol <= 0:
        return torch.zeros(points.shape[0], dtype=torch.bool)
    dist = (points.unsqueeze(1) - evaluated.to(points).unsqueeze(0)).abs().amax(-1)  # [n, m]
    return (dist <= tol * (1 + 1e-9)).any(-1)


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
        self._taken_cache = None

    _taken_cache: tuple | None = None  # (tol, evaluated points, candidates, mask) of the last call of _taken

    def _taken(self, evaluated: torch.Tensor | None, tol: float) -> torch.Tensor:
        """:func:`near` of every candidate, updated only for the points evaluated since the last proposal.

        A search only adds evaluated points, so scanning all of them against
        every candidate each time (4096 x 200 x 7 differences at 200 trials in
        7-D, ~50 MB) would repeat what is known; any other change starts afresh.
        """
        n = 0 if evaluated is None else evaluated.shape[0]
        c = self._taken_cache
        if c is not None and c[0] == tol and c[2] is self.candidates and c[1].shape[0] <= n \
                and torch.equal(c[1], evaluated[: c[1].shape[0]]):
            done, mask = c[1].shape[0], c[3]
            if n > done:
                mask = mask | near(self.candidates, evaluated[done:], tol)
        else:
            mask = near(self.candidates, evaluated, tol)
        if n:
            self._taken_cache = (tol, evaluated.clone(), self.candidates, mask)
        return mask

    def _fit(self, X: torch.Tensor, loss: torch.Tensor):
        """A ``SingleTaskGP`` (BoTorch defaults) with MAP hyperparameters; see :func:`map_hyperparameters`."""
        from botorch.models import SingleTaskGP

        torch.manual_seed(self.seed)
        model = SingleTaskGP(X, -loss.unsqueeze(-1))  # default: Standardize outcome, unit-cube inputs
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            map_hyperparameters(model, seed=self.seed)
            if X.shape[-1] > 1:
                # Beyond one dimension the global search is coarse: polish its optimum with L-BFGS, on the
                # same fit_subset as map_hyperparameters (its cost then stops growing at FIT_POINTS points),
                # in the whole model's standardised units, so the polished values apply to it unchanged.
                from botorch.optim.fit import fit_gpytorch_mll_scipy
                from gpytorch.mlls import ExactMarginalLogLikelihood

                fit = model
                if X.shape[0] > FIT_POINTS:
                    keep = fit_subset(model.train_targets, FIT_POINTS)
                    fit = SingleTaskGP(X[keep], model.train_targets[keep].unsqueeze(-1), outcome_transform=None)
                    for part in ("covar_module", "likelihood", "mean_module"):
                        getattr(fit, part).load_state_dict(getattr(model, part).state_dict())
                mll = ExactMarginalLogLikelihood(fit.likelihood, fit).train()
                fit_gpytorch_mll_scipy(mll)
                if fit is not model:
                    for part in ("covar_module", "likelihood", "mean_module"):
                        getattr(model, part).load_state_dict(getattr(fit, part).state_dict())
        return model.eval()

    def _mean_sigma(self, model) -> tuple[torch.Tensor, torch.Tensor]:
        """The posterior mean and standard deviation of the (negated) loss at every candidate, computed once.

        What BoTorch's analytic acquisitions compute for a batch of single
        points (``model.posterior(candidates[:, None])``, the variance clamped
        at 1e-12), equal to ~1e-14, with one Cholesky factor of the training
        covariance shared by all candidates: BoTorch's batched form costs
        ~230 ms per acquisition at 200 points and 4096 candidates in 7-D, and
        GP-Hedge evaluates four. Exact GP of a constant mean, a kernel and
        Gaussian noise, as ``SingleTaskGP`` is, then its outcome transform undone.
        """
        with torch.no_grad():
            X, y = model.train_inputs[0], model.train_targets
            K = model.covar_module(X).to_dense()
            K = K + model.likelihood.noise.view(-1)[0] * torch.eye(K.shape[0], dtype=K.dtype)
            chol = torch.linalg.cholesky(K)
            alpha = torch.cholesky_solve((y - model.mean_module(X)).unsqueeze(-1), chol)
            cross = model.covar_module(self.candidates, X).to_dense()  # [N, n]
            mean = model.mean_module(self.candidates) + (cross @ alpha).squeeze(-1)
            v = torch.linalg.solve_triangular(chol, cross.T, upper=False)
            var = model.covar_module(self.candidates, diag=True) - (v * v).sum(0)
            if getattr(model, "outcome_transform", None) is not None:
                mean, var = model.outcome_transform.untransform(mean.unsqueeze(-1), var.unsqueeze(-1))
            return mean.view(-1), var.clamp_min(1e-12).sqrt().view(-1)

    def _acq_values(self, post: tuple[torch.Tensor, torch.Tensor], name: str, best_f: float) -> torch.Tensor:
        """LogEI, LogPI (margin ``pi_xi``) or UCB at every candidate, as BoTorch's analytic classes define them."""
        from botorch.acquisition.analytic import _log_ei_helper, log_Phi

        mean, sigma = post
        if name == "ei":
            return _log_ei_helper((mean - best_f) / sigma) + sigma.log()
        if name == "pi":
            return log_Phi((mean - (best_f + self.pi_xi)) / sigma)
        return mean + math.sqrt(self.beta) * sigma

    def posterior(self, X: torch.Tensor, loss: torch.Tensor, points: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """GP posterior mean and std of the LOSS at ``points`` (for plots)."""
        model = self._fit(X.to(torch.float64), loss.to(torch.float64))
        with torch.no_grad():
            post = model.posterior(points.to(torch.float64))
        return -post.mean.squeeze(-1), post.variance.clamp_min(0).sqrt().squeeze(-1)

    def propose(self, X: torch.Tensor, loss: torch.Tensor, step: int, state: HedgeState | None = None,
                evaluated: torch.Tensor | None = None, tol: float = 0.0, worth: float = 0.0) -> Proposed:
        """The next point (or None: converged), the acquisition that chose it, the updated hedge state.

        ``X``: ``[n, dim]`` observed points in the unit cube; ``loss``: ``[n]``
        finite losses. ``step`` seeds the hedge draw, so a resumed search makes
        the same choice again. ``evaluated``: every point tried so far (``X``
        and the failed ones); no candidate :func:`near` one of them (``tol``) is
        chosen. ``worth``: the smallest expected improvement, relative to the
        best objective, that still justifies an evaluation once the acquisition's
        own best is an evaluated point (see the module docstring).
        """
        X, loss = X.to(torch.float64), loss.to(torch.float64)
        model = self._fit(X, loss)
        best_f = float((-loss).max())
        # PI with no margin re-proposes the incumbent forever; ask for a tenth of a standard deviation.
        self.pi_xi = 0.1 * float(loss.std()) if loss.numel() > 1 else 0.0
        state = HedgeState.from_dict(state.to_dict()) if state is not None else HedgeState()
        taken = self._taken(evaluated, tol)
        if bool(taken.all()):
            return Proposed(None, self.acquisition, state, converged=f"every one of the {len(taken)} candidate "
                            f"points lies within {tol:g} of an evaluated point")

        post = self._mean_sigma(model)

        def pick(name: str) -> tuple[int, int]:
            """The acquisition's best candidate, and its best one not near an evaluated point."""
            vals = self._acq_values(post, name, best_f)
            return int(vals.argmax()), int(vals.masked_fill(taken, -math.inf).argmax())

        def result(own: int, free: int, name: str) -> Proposed:
            if own == free:
                return Proposed(self.candidates[own].tolist(), name, state)
            gain = math.exp(float(self._acq_values(post, "ei", best_f).masked_fill(taken, -math.inf).max()))
            if gain <= worth * abs(best_f):
                return Proposed(None, name, state, replaced=self.candidates[own].tolist(), gain=gain, converged=(
                    f"the {name.upper()} acquisition's best point was already evaluated, and the best expected "
                    f"improvement elsewhere, {gain:.3g}, is below {worth:g} x the best objective ({-best_f:.6g})"))
            return Proposed(self.candidates[free].tolist(), name, state, replaced=self.candidates[own].tolist(),
                            gain=gain)

        if self.acquisition != "gp_hedge":
            return result(*pick(self.acquisition), self.acquisition)
        # Credit each acquisition with the refitted posterior mean (standardised scale) at its last nominee.
        if state.nominees:
            pts = torch.tensor([state.nominees[a] for a in _PORTFOLIO], dtype=torch.float64)
            with torch.no_grad():
                mu = model.posterior(pts).mean.squeeze(-1)
            mu = (mu - (-loss).mean()) / ((-loss).std() if loss.numel() > 1 and (-loss).std() > 0 else 1.0)
            for a, m in zip(_PORTFOLIO, mu.tolist()):
                state.gains[a] += m
        # Each acquisition nominates its best point not yet evaluated: crediting one with the value at a
        # point already known would reward it for proposing nothing.
        picks = {a: pick(a) for a in _PORTFOLIO}
        nominees = {a: self.candidates[free].tolist() for a, (_, free) in picks.items()}
        g = np.array([state.gains[a] for a in _PORTFOLIO])
        p = np.exp(self.eta * (g - g.max()))
        p /= p.sum()
        rng = np.random.default_rng([self.seed, step])
        chosen = _PORTFOLIO[int(rng.choice(len(_PORTFOLIO), p=p))]
        state.nominees = nominees
        if not all(math.isfinite(x) for x in nominees[chosen]):  # pragma: no cover - defensive
            raise FloatingPointError(f"GP-Hedge nominee is not finite: {nominees}")
        return result(*picks[chosen], chosen)


FIT_POINTS = 32  # the hyperparameters of a larger GP are fitted on this many of its points (see map_hyperparameters)


def fit_subset(y: torch.Tensor, m: int = FIT_POINTS) -> torch.Tensor:
    """Indices of the ``m`` observations the hyperparameters are fitted on (all of them when ``n <= m``).

    Half are the best (highest ``y``, the negated loss: the region the search
    refines), the rest spread evenly, in trial order, over the others (the
    search's early, space-filling points among them). A function of the data
    alone, so a resumed search fits the same hyperparameters again.
    """
    n = y.shape[0]
    if n <= m:
        return torch.arange(n)
    order = torch.argsort(-y, stable=True)
    best = order[: m // 2]
    rest = torch.sort(order[m // 2:]).values
    spread = rest[torch.linspace(0, len(rest) - 1, m - m // 2).round().long()]
    return torch.sort(torch.cat([best, spread])).values


def map_hyperparameters(model, seed: int = 0, n_lengthscales: int = 128, n_noise: int = 64,
                        max_points: int | None = FIT_POINTS) -> float:
    """Set ``model``'s kernel lengthscales, noise and constant mean to their MAP values; return the MAP / n.

    The objective is exactly what ``fit_gpytorch_mll`` maximises for a
    ``SingleTaskGP`` with BoTorch's default RBF kernel: the exact marginal
    log-likelihood of the standardised targets plus the log-densities of the
    model's own lengthscale and noise priors. It is searched globally instead
    of by L-BFGS from one start:

    - the constant mean is profiled out in closed form (generalised least squares);
    - for each candidate lengthscale vector the correlation matrix is
      eigendecomposed once, ``R = Q diag(l) Q^T``; every noise level ``s`` then
      costs O(n), since ``(R + s I)^-1 = Q diag(1 / (l + s)) Q^T``;
    - candidates are a log-spaced grid (1-D) or scrambled Sobol points, inside
      the model's constraints, then a finer set around the best one.

    For the tens of points and one to a few dimensions of a merge search this
    reaches the optimum that L-BFGS finds (or a better one, which L-BFGS misses
    from its single start) in a few milliseconds instead of ~50 ms, which keeps
    the per-trial overhead small next to one evaluation, and a singular kernel
    cannot make it raise.

    Each candidate costs an eigendecomposition, O(n^3): ~1 s a fit at 200
    points. So beyond ``max_points`` observations the objective is that of the
    :func:`fit_subset` (in the model's own standardised units, so the values
    apply to the whole model unchanged), and the cost stays that of
    ``max_points``; the model is then conditioned on every point as before.
    Three to seven hyperparameters are well determined by 32 points.
    """
    X = model.train_inputs[0].to(torch.float64)
    y = model.train_targets.to(torch.float64)
    if max_points is not None and X.shape[0] > max_points:
        keep = fit_subset(y, max_points)
        X, y = X[keep], y[keep]
    n, dim = X.shape
    cov, noise_covar = model.covar_module, model.likelihood.noise_covar
    lo_ls = math.log(float(cov.raw_lengthscale_constraint.lower_bound) + 1e-9)
    lo_s = math.log(float(noise_covar.raw_noise_constraint.lower_bound) + 1e-12)
    hi_ls, hi_s = math.log(20.0), math.log(2.0)
    sq = (X.unsqueeze(1) - X.unsqueeze(0)) ** 2  # [n, n, dim]
    ones = torch.ones(n, dtype=torch.float64)

    def score(log_ls: torch.Tensor, log_s: torch.Tensor):
        """MAP objective for every (lengthscale row, noise) pair: [L, S] values and GLS constants."""
        ls = log_ls.exp()
        R = torch.exp(-0.5 * (sq.unsqueeze(0) / ls[:, None, None, :] ** 2).sum(-1))
        lam, Q = torch.linalg.eigh(R)  # [L, n], [L, n, n]
        lam = lam.clamp_min(0.0)
        a, b = Q.transpose(1, 2) @ y, Q.transpose(1, 2) @ ones  # [L, n]
        inv = 1.0 / (lam.unsqueeze(1) + log_s.exp().view(1, -1, 1))  # [L, S, n]
        yKy, oKy, oKo = ((a * a).unsqueeze(1) * inv).sum(-1), ((a * b).unsqueeze(1) * inv).sum(-1), \
            ((b * b).unsqueeze(1) * inv).sum(-1)
        c = oKy / oKo
        quad = yKy - 2 * c * oKy + c * c * oKo
        logdet = -torch.log(inv).sum(-1)
        mll = -0.5 * (quad + logdet + n * math.log(2 * math.pi))
        prior = cov.lengthscale_prior.log_prob(ls).sum(-1, keepdim=True) \
            + noise_covar.noise_prior.log_prob(log_s.exp()).view(1, -1)
        return torch.nan_to_num(mll + prior, nan=-math.inf), c

    def candidates(lo: torch.Tensor, hi: torch.Tensor, count: int, offset: int) -> torch.Tensor:
        if dim == 1:
            return torch.linspace(float(lo[0]), float(hi[0]), count, dtype=torch.float64).unsqueeze(-1)
        u = torch.quasirandom.SobolEngine(dim, scramble=True, seed=seed + offset).draw(count, dtype=torch.float64)
        return lo + (hi - lo) * u

    with torch.no_grad():
        box_lo, box_hi = torch.full((dim,), lo_ls, dtype=torch.float64), torch.full((dim,), hi_ls, dtype=torch.float64)
        log_ls = candidates(box_lo, box_hi, n_lengthscales, 0)
        log_s = torch.linspace(lo_s, hi_s, n_noise, dtype=torch.float64)
        val, c = score(log_ls, log_s)
        i, j = divmod(int(val.argmax()), len(log_s))
        # Refine around the best: a few coarse spacings either side, in every coordinate.
        step_ls = (hi_ls - lo_ls) * (3.0 if dim == 1 else 1.0) / n_lengthscales ** (1.0 / dim)
        step_s = 3.0 * (hi_s - lo_s) / n_noise
        fine_ls = candidates(torch.maximum(log_ls[i] - step_ls, box_lo), torch.minimum(log_ls[i] + step_ls, box_hi),
                             n_lengthscales // 2, 1)
        fine_ls = torch.cat([log_ls[i:i + 1], fine_ls])
        fine_s = torch.linspace(max(lo_s, float(log_s[j]) - step_s), min(hi_s, float(log_s[j]) + step_s), n_noise,
                                dtype=torch.float64)
        val, c = score(fine_ls, fine_s)
        i, j = divmod(int(val.argmax()), len(fine_s))
    best = float(val[i, j])
    if not math.isfinite(best):  # pragma: no cover - every candidate degenerate
        raise FloatingPointError("GP hyperparameters: no candidate gave a finite marginal likelihood")
    cov.lengthscale = fine_ls[i].exp().view_as(cov.lengthscale)
    noise_covar.noise = fine_s[j].exp().view(1)
    model.mean_module.constant = c[i, j].view_as(model.mean_module.constant)
    return best / n
