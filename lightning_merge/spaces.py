"""Search spaces: how a point the optimizer sees becomes one merge weight per checkpoint.

``pairwise`` is the paper's space (arXiv 2403.19390): ``lam`` in ``[alpha, 1]``
weights the newer of two checkpoints, ``merged = lam * newer + (1 - lam) * older``.

``simplex`` goes beyond the paper: weights over K checkpoints that sum to 1,
non-negative by default (``min_weight < 0`` allows extrapolation). It can be
given to Ax in two ways (``parameterization``):

- ``constrained``: K-1 free weights ``w0..w{K-2}`` in ``[min_weight, 1 - (K-1) min_weight]``
  with the linear constraints ``1 - hi <= sum <= 1 - min_weight``; the last weight
  is ``1 - sum``. Every point of the simplex has exactly one parameter vector.
- ``normalized``: K values ``x0..x{K-1}`` in ``[0, 1]``, weights ``x / sum(x)``.
  No constraint, but a ray of parameter vectors maps to one merge, so the GP
  sees a flat direction, and the corners (one-hot merges) are a thin slice.

Measured with ``benchmarks/search_efficiency.py`` on the demo trajectory
(K=4: step560..step800, 5 seeds, real evaluations; mean best search-set loss
after 10 / 20 / 30 evaluations; best baseline, WMA: 3.58266):

================  ===========  =======  =======  =======  ===============
optimizer         space        @10      @20      @30      Ax ask ms/trial
================  ===========  =======  =======  =======  ===============
paper (gp_hedge)  constrained  3.58778  3.58225  3.58209  136
paper (gp_hedge)  normalized   3.58822  3.58570  3.58376  250
ax                constrained  3.58291  3.58189  3.58184  4409
ax                normalized   3.58650  3.58210  3.58189  508
random            constrained  3.58580  3.58524  3.58510  65
random            normalized   3.58991  3.58618  3.58598  67
================  ===========  =======  =======  =======  ===============

(The ``paper`` constrained row was re-measured after its candidate set became
spacings of sorted Sobol points: ``--simplex-only paper``; it beats WMA
within 11-16 evaluations on 5/5 seeds.)

``constrained`` is the default: it reached better merges at every budget for
every optimizer (the normalized map's flat direction costs the GP), and it is
the only one that allows negative weights. Its price is Ax's constrained
acquisition optimisation for ``search.name=ax`` (~4.4 s a trial against
0.5 s); the ``paper`` optimizer filters its candidate set instead and pays
nothing for the constraint.

Pure: no Ax objects are kept here, only the parameter configs it asks for.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch

__all__ = ["PairwiseSpace", "SimplexSpace", "make_space"]


@dataclass
class PairwiseSpace:
    """``lam`` in ``[alpha, 1]`` on the newer checkpoint of ``pair`` (indices into the K sources)."""

    alpha: float
    k: int = 2
    pair: tuple[int, int] = (0, 1)
    name = "pairwise"
    dim = 1

    def __post_init__(self) -> None:
        i, j = self.pair
        if not (0 <= i < j < self.k):
            raise ValueError(f"search.pair={list(self.pair)}: need two indices older < newer in [0, {self.k})")

    def parameters(self):
        from ax import RangeParameterConfig

        return [RangeParameterConfig(name="lam", parameter_type="float", bounds=(self.alpha, 1.0))]

    def constraints(self) -> list[str]:
        return []

    def weights(self, params: dict[str, float]) -> list[float]:
        lam = float(params["lam"])
        w = [0.0] * self.k
        w[self.pair[0]], w[self.pair[1]] = 1.0 - lam, lam
        return w

    def params(self, lam: float) -> dict[str, float]:
        return {"lam": float(lam)}

    def params_for(self, weights: Sequence[float], tol: float = 1e-9) -> dict[str, float] | None:
        """The point giving these weights, or None when they lie outside the space."""
        i, j = self.pair
        if any(abs(w) > tol for n, w in enumerate(weights) if n not in (i, j)):
            return None
        if abs(weights[i] + weights[j] - 1.0) > 1e-6:
            return None
        lam = float(weights[j])
        return self.params(lam) if self.alpha - tol <= lam <= 1.0 + tol else None

    def initial(self) -> list[dict[str, float]]:
        """Algorithm 1's two starting points: ``lam = alpha`` and ``lam = 1``."""
        return [self.params(self.alpha), self.params(1.0)]

    def grid(self, n: int, seed: int = 0) -> list[dict[str, float]]:
        """``n`` evenly spaced ``lam`` from ``alpha`` to 1 (``seed`` is unused: a line has one grid)."""
        return [self.params(self.alpha + (1.0 - self.alpha) * i / max(n - 1, 1)) for i in range(n)]

    def to_unit(self, params: dict[str, float]) -> list[float]:
        span = 1.0 - self.alpha
        return [(float(params["lam"]) - self.alpha) / span if span > 0 else 0.0]

    def from_unit(self, x: Sequence[float]) -> dict[str, float]:
        return self.params(min(1.0, max(self.alpha, self.alpha + x[0] * (1.0 - self.alpha))))

    def candidates(self, count: int, seed: int) -> torch.Tensor:
        """Unit-interval points the acquisition is maximised over: a dense grid."""
        return torch.linspace(0, 1, count, dtype=torch.float64).unsqueeze(-1)

    def fingerprint(self) -> dict:
        return {"space": self.name, "alpha": self.alpha, "pair": list(self.pair), "k": self.k}


@dataclass
class SimplexSpace:
    """Weights over ``k`` checkpoints summing to 1 (see the module docstring)."""

    k: int
    min_weight: float = 0.0
    parameterization: str = "constrained"
    name = "simplex"

    def __post_init__(self) -> None:
        if self.k < 2:
            raise ValueError(f"search.space=simplex needs at least 2 checkpoints, got {self.k}")
        if self.parameterization not in ("constrained", "normalized"):
            raise ValueError(f"search.parameterization={self.parameterization!r}: use constrained or normalized")
        if self.min_weight < 0 and self.parameterization == "normalized":
            raise ValueError("search.min_weight < 0 (negative weights) needs search.parameterization=constrained")
        if self.min_weight * self.k > 1.0:
            raise ValueError(f"search.min_weight={self.min_weight}: k * min_weight must be <= 1 (k={self.k})")
        self.lo = self.min_weight
        self.hi = 1.0 - (self.k - 1) * self.min_weight

    @property
    def dim(self) -> int:
        return self.k - 1 if self.parameterization == "constrained" else self.k

    def _names(self) -> list[str]:
        return [f"{'w' if self.parameterization == 'constrained' else 'x'}{i}" for i in range(self.dim)]

    def parameters(self):
        from ax import RangeParameterConfig

        bounds = (self.lo, self.hi) if self.parameterization == "constrained" else (0.0, 1.0)
        return [RangeParameterConfig(name=n, parameter_type="float", bounds=bounds) for n in self._names()]

    def constraints(self) -> list[str]:
        if self.parameterization != "constrained":
            return []
        total = " + ".join(self._names())
        out = [f"{total} <= {1.0 - self.lo!r}"]
        if self.lo < 0:
            out.append(f"{total} >= {1.0 - self.hi!r}")
        return out

    def weights(self, params: dict[str, float]) -> list[float]:
        v = [float(params[n]) for n in self._names()]
        if self.parameterization == "constrained":
            last = 1.0 - math.fsum(v)
            if self.lo - 1e-9 < last < self.lo or self.hi < last < self.hi + 1e-9:
                last = min(self.hi, max(self.lo, last))  # 1e-14 past a bound in floating point: the bound
            return v + [last]
        s = math.fsum(v)
        return [x / s for x in v] if s > 1e-12 else [1.0 / self.k] * self.k

    def params_for(self, weights: Sequence[float], tol: float = 1e-9) -> dict[str, float] | None:
        w = [float(x) for x in weights]
        if len(w) != self.k or abs(math.fsum(w) - 1.0) > 1e-6 or min(w) < self.lo - tol or max(w) > self.hi + tol:
            return None
        if self.parameterization == "constrained":
            return {n: min(self.hi, max(self.lo, x)) for n, x in zip(self._names(), w[:-1])}
        top = max(w)
        return {n: max(0.0, x / top) for n, x in zip(self._names(), w)}

    def initial(self) -> list[dict[str, float]]:
        """The newest checkpoint alone, then the uniform average (the simplex analogue of 1 and alpha)."""
        one_hot = [0.0] * (self.k - 1) + [1.0]
        return [p for p in (self.params_for(one_hot), self.params_for([1.0 / self.k] * self.k)) if p is not None]

    def grid(self, n: int, seed: int = 0) -> list[dict[str, float]]:
        """``n`` quasi-random points of the simplex (a lattice grows as n^(K-1); Sobol covers it evenly)."""
        u = self.candidates(max(n, 1), seed=seed)[:n]
        return [self.from_unit(x.tolist()) for x in u]

    def to_unit(self, params: dict[str, float]) -> list[float]:
        if self.parameterization == "constrained":
            return [(float(params[n]) - self.lo) / (self.hi - self.lo) for n in self._names()]
        return [float(params[n]) for n in self._names()]

    def from_unit(self, x: Sequence[float]) -> dict[str, float]:
        if self.parameterization == "constrained":
            return {n: self.lo + float(v) * (self.hi - self.lo) for n, v in zip(self._names(), x)}
        return {n: float(v) for n, v in zip(self._names(), x)}

    def candidates(self, count: int, seed: int) -> torch.Tensor:
        """``count`` unit-cube points spread evenly over the space (what the acquisition is maximised over).

        ``constrained``: the spacings of sorted scrambled-Sobol points are
        uniform on the simplex, and with ``w = lo + (1 - K lo) * spacing`` the
        unit coordinate of each free weight is the spacing itself, so every
        point satisfies the constraints by construction. (Filtering cube points
        instead keeps a share of 1/(K-1)!: 1 in 5040 at K=8.)
        """
        if self.parameterization == "normalized":
            return torch.quasirandom.SobolEngine(self.dim, scramble=True, seed=seed).draw(count, dtype=torch.float64)
        u = torch.quasirandom.SobolEngine(self.k - 1, scramble=True, seed=seed).draw(count, dtype=torch.float64)
        edges = torch.cat([torch.zeros(count, 1, dtype=torch.float64), u.sort(dim=1).values,
                           torch.ones(count, 1, dtype=torch.float64)], dim=1)
        return edges.diff(dim=1)[:, : self.k - 1]

    def fingerprint(self) -> dict:
        return {"space": self.name, "k": self.k, "min_weight": self.min_weight,
                "parameterization": self.parameterization}


def make_space(conf, k: int):
    """The space ``search.space`` names, for ``k`` loaded checkpoints."""
    if conf.space == "pairwise":
        if not all(-k <= i < k for i in conf.pair):
            raise ValueError(f"search.pair={list(conf.pair)}: {k} checkpoints are loaded, so indices must be in "
                             f"[{-k}, {k - 1}] (negative counts from the newest). To load more, raise checkpoints.last "
                             "(it keeps the newest N of what the sources resolve to) or give more checkpoints.sources")
        pair = tuple(i % k for i in conf.pair)
        if pair[0] >= pair[1]:
            raise ValueError(f"search.pair={list(conf.pair)}: give [older, newer] (they are checkpoints "
                             f"{pair[0]} and {pair[1]} of {k}, oldest first)")
        return PairwiseSpace(alpha=conf.alpha, k=k, pair=pair)  # type: ignore[arg-type]
    return SimplexSpace(k=k, min_weight=conf.min_weight, parameterization=conf.parameterization)
