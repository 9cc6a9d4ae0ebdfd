"""Experiments 1 and 2: which checkpoints to merge (the paper's pilot), and the shape of the ``lam`` curve.

The gain of a merge is measured against the better of its parents on the same blocks, in percent of that
parent's loss: positive when the merge beats both checkpoints it was made from.
"""

from __future__ import annotations

from .objective import Objective


def gain_pct(parent: float, merged: float) -> float:
    """How much lower ``merged`` is than ``parent``, in percent of ``parent`` (negative: worse)."""
    return 100.0 * (parent - merged) / parent


def pilot(obj: Objective, indices: list[int], steps: list[int], lams: list[float]) -> dict:
    """For every pair ``i < j`` of ``indices``: the best merge ``lam*c_j + (1-lam)*c_i`` over ``lams``.

    Returns the checkpoints' own losses, and per pair the best ``lam``, its loss and its gain over the
    better parent, plus summaries by distance (``j - i`` in saved checkpoints) and by age.
    """
    single = [obj(obj.one_hot(i)) for i in indices]
    n = len(indices)
    gain = [[None] * n for _ in range(n)]
    best_lam = [[None] * n for _ in range(n)]
    pairs = []
    for a in range(n):
        for b in range(a + 1, n):
            curve = [(lam, obj(obj.pair(indices[a], indices[b], lam))) for lam in lams]
            lam, loss = min(curve, key=lambda x: x[1])
            g = gain_pct(min(single[a], single[b]), loss)
            gain[a][b], best_lam[a][b] = g, lam
            pairs.append({"i": a, "j": b, "lam": lam, "loss": loss, "gain_pct": g})
    by_distance = {}
    for d in range(1, n):
        gs = [p["gain_pct"] for p in pairs if p["j"] - p["i"] == d]
        by_distance[d] = {"mean": sum(gs) / len(gs), "max": max(gs), "min": min(gs), "n": len(gs)}
    half = n // 2
    adjacent = [p for p in pairs if p["j"] - p["i"] == 1]
    early = [p["gain_pct"] for p in adjacent if p["j"] < half]
    late = [p["gain_pct"] for p in adjacent if p["i"] >= half]
    top = max(pairs, key=lambda p: p["gain_pct"])
    return {"indices": indices, "steps": steps, "lams": lams, "single": single, "gain_pct": gain,
            "best_lam": best_lam, "pairs": pairs, "by_distance": by_distance,
            "adjacent_early_mean": sum(early) / len(early), "adjacent_late_mean": sum(late) / len(late),
            "top": top, "evals": len(lams) * n * (n - 1) // 2 + n}


def lam_curve(obj: Objective, pairs: list[tuple[int, int]], steps: dict[int, int], points: int) -> list[dict]:
    """The dense ``lam`` curve on ``[0, 1]`` for each pair (older, newer).

    Per pair: the curve, the best ``lam``, the band of ``lam`` where the merge beats both parents, the
    number of local minima on the grid (1: unimodal, what a GP with a smooth kernel models well) and the
    largest second difference relative to the curve's range (how far it is from piecewise smooth).
    """
    out = []
    for i, j in pairs:
        lams = [k / (points - 1) for k in range(points)]
        losses = [obj(obj.pair(i, j, lam)) for lam in lams]
        parent = min(losses[0], losses[-1])
        b = min(range(points), key=lambda k: losses[k])
        beats = [lams[k] for k in range(points) if losses[k] < parent]
        minima = sum(1 for k in range(1, points - 1) if losses[k] < losses[k - 1] and losses[k] < losses[k + 1])
        span = max(losses) - min(losses)
        second = max(abs(losses[k - 1] - 2 * losses[k] + losses[k + 1]) for k in range(1, points - 1))
        out.append({"i": i, "j": j, "step_i": steps[i], "step_j": steps[j], "lams": lams, "losses": losses,
                    "best_lam": lams[b], "best_loss": losses[b], "older": losses[0], "newer": losses[-1],
                    "gain_pct": gain_pct(parent, losses[b]),
                    "band": [min(beats), max(beats)] if beats else None,
                    "local_minima": minima, "second_diff_rel": second / span if span > 0 else 0.0})
    return out
