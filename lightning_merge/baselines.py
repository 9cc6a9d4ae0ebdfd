"""The baselines every search is compared with: fixed weight schedules and greedy soup.

Pure functions of the number of checkpoints (oldest first) and, for greedy
soup, of an objective the caller evaluates. The schedules follow the papers
they are named after:

- ``uniform``: the plain average of all loaded checkpoints;
- ``LAWA``: the uniform average of the newest ``k`` (Kaddour 2022; Sanyal et al. 2023);
- ``EMA``: an exponential moving average along the series, ``m_i = a * theta_i + (1 - a) * m_{i-1}``,
  so the newest gets ``a``, the i-th older ``a (1 - a)^i`` and the oldest the rest
  (PMA, Li et al. 2025);
- ``WMA``: weights rising linearly with the position, ``w_i ~ i`` (PMA's WMA);
- ``greedy soup``: checkpoints sorted by their own objective, each added to the
  uniform soup only if the soup's objective does not get worse (Wortsman et al. 2022).
"""

from __future__ import annotations

from typing import Callable, Sequence

__all__ = ["schedules", "greedy_soup"]


def _uniform_last(k: int, n: int) -> list[float]:
    n = min(n, k)
    return [0.0] * (k - n) + [1.0 / n] * n


def schedules(k: int, lawa_k: int = 4, ema_alpha: float = 0.2) -> list[tuple[str, list[float]]]:
    """``(name, weights)`` of the fixed-schedule baselines over ``k`` checkpoints, duplicates dropped."""
    ema = [0.0] * k
    for i in range(k):  # i = 0 is the newest
        ema[k - 1 - i] = ema_alpha * (1 - ema_alpha) ** i if i < k - 1 else (1 - ema_alpha) ** (k - 1)
    total = k * (k + 1) / 2
    out = [("uniform", [1.0 / k] * k),
           (f"LAWA (last {min(lawa_k, k)})", _uniform_last(k, lawa_k)),
           (f"EMA (a={ema_alpha:g})", ema),
           ("WMA (linear)", [(i + 1) / total for i in range(k)])]
    kept: list[tuple[str, list[float]]] = []
    for name, w in out:
        same = [i for i, (_, s) in enumerate(kept) if max(abs(a - b) for a, b in zip(w, s)) < 1e-12]
        if same:  # one evaluation, both names (LAWA over every checkpoint is the uniform average)
            kept[same[0]] = (f"{kept[same[0]][0]} = {name}", kept[same[0]][1])
        else:
            kept.append((name, w))
    return kept


def greedy_soup(single_objectives: Sequence[float], evaluate: Callable[[list[float]], float]
                ) -> tuple[list[float], list[tuple[list[float], float]]]:
    """Greedy soup: returns the soup's weights and every ``(weights, objective)`` it evaluated.

    ``single_objectives[i]`` is checkpoint i's own objective (minimised);
    ``evaluate(weights)`` returns a soup's objective. A checkpoint joins when
    the soup with it is no worse than without it.
    """
    k = len(single_objectives)
    order = sorted(range(k), key=lambda i: single_objectives[i])
    soup = [order[0]]
    best = single_objectives[order[0]]
    tried = []
    for i in order[1:]:
        cand = sorted(soup + [i])
        w = [1.0 / len(cand) if j in cand else 0.0 for j in range(k)]
        value = evaluate(w)
        tried.append((w, value))
        if value <= best:
            soup, best = cand, value
    return [1.0 / len(soup) if j in soup else 0.0 for j in range(k)], tried
