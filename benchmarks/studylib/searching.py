"""Experiments 3, 4, 5 and 9: the tool's searches, driven as its loop drives them (``AxSearch``).

Each search runs through ``benchmarks/search_efficiency.py``'s ``run_search``: ``ask``, ``kick``, evaluate,
``tell``, ``close``, with no baselines as trials, so every trial counted is the optimizer's own.
"""

from __future__ import annotations

import statistics

from search_efficiency import run_search  # noqa: E402  (benchmarks/ is on sys.path: study.py puts it there)

from .objective import Objective, View
from .pilot import gain_pct

OPTIMIZERS = [(f"paper ({a})", {"name": "paper", "acquisition": a}) for a in ("ei", "pi", "ucb", "gp_hedge")]
OPTIMIZERS += [("ax", {"name": "ax"}), ("random", {"name": "random"}), ("grid", {"name": "grid"})]


def best_of(view, space, conf, trials: int):
    """Run one search (``conf`` over ``space``) on ``view``; return the run and its best trial's parameters."""
    run = run_search(view, conf, space, trials)
    best = min(range(len(run.losses)), key=lambda k: run.losses[k])
    return run, space.from_unit(run.points[best])


def _search(view: View, alpha: float, trials: int, seed: int, **kw):
    """A pairwise search of the two checkpoints ``view`` holds: the run, every trial's ``lam``, the best ``lam``."""
    from lightning_merge.config import SearchConf
    from lightning_merge.spaces import PairwiseSpace

    space = PairwiseSpace(alpha=alpha, k=2, pair=(0, 1))
    run, best = best_of(view, space, SearchConf(space="pairwise", alpha=alpha, trials=trials, seed=seed, **kw),
                        trials)
    return run, [space.from_unit(p)["lam"] for p in run.points], best["lam"]


def efficiency(obj: Objective, pair: tuple[int, int], seeds: list[int], trials: int, dense: int,
               alpha: float = 0.3, tolerances=(1e-3, 1e-4)) -> dict:
    """Evaluations until the best so far is within each tolerance of the dense grid's best, per optimizer."""
    view = View(obj, list(pair))
    grid = [alpha + (1 - alpha) * k / (dense - 1) for k in range(dense)]
    curve = [view([1 - lam, lam]) for lam in grid]
    ref = min(curve)
    rows = []
    for label, kw in OPTIMIZERS:
        per_seed = seeds if kw["name"] != "grid" else seeds[:1]  # grid ignores the seed
        runs = []
        for s in per_seed:
            run, lams, best_lam = _search(view, alpha, trials, s, **kw)
            runs.append({"seed": s, "losses": run.losses, "lams": lams, "best_lam": best_lam,
                         "to": {str(t): run.evals_to(ref * (1 + t)) for t in tolerances},
                         "ask_ms": run.ask_ms, "trials_run": len(run.losses)})
        rows.append({"label": label, "runs": runs})
    return {"pair": list(pair), "alpha": alpha, "dense": dense, "grid": grid, "curve": curve, "ref": ref,
            "ref_lam": grid[curve.index(ref)], "trials": trials, "tolerances": list(tolerances), "rows": rows}


def summarize_to(rows: list[dict], tol: float, trials: int) -> dict[str, dict]:
    """Per optimizer: the evaluations to ``tol`` per seed (None: not within ``trials``), median, reached."""
    out = {}
    for row in rows:
        ns = [r["to"][str(tol)] for r in row["runs"]]
        vals = sorted(n if n is not None else trials + 1 for n in ns)
        out[row["label"]] = {"per_seed": ns, "median": statistics.median(vals),
                             "reached": sum(n is not None for n in ns), "seeds": len(ns)}
    return out


def alpha_sweep(obj: Objective, pair: tuple[int, int], alphas: list[float], seeds: list[int], trials: int,
                ref: float) -> list[dict]:
    """``paper`` (gp_hedge) for each ``alpha``: the ``lam`` it picks, the pick's gain over the newer
    checkpoint, the trials it ran (it stops itself once converged) and whether it reached 0.1% of ``ref``
    (the best on a dense grid over the whole ``[0, 1]``)."""
    view = View(obj, list(pair))
    newer = view([0.0, 1.0])
    out = []
    for a in alphas:
        runs = []
        for s in seeds:
            run, lams, best_lam = _search(view, a, trials, s, name="paper", acquisition="gp_hedge")
            runs.append({"seed": s, "best_lam": best_lam, "best": min(run.losses), "trials_run": len(run.losses),
                         "gain_pct": gain_pct(newer, min(run.losses)), "to_0.1%": run.evals_to(ref * 1.001)})
        out.append({"alpha": a, "runs": runs})
    return out


def heldout_size(obj: Objective, pair: tuple[int, int], sizes: list[int], seeds: list[int], trials: int,
                 report_grid: list[float]) -> dict:
    """The search run on ``N`` held-out blocks; its pick scored on the whole report set (256 blocks).

    The reference is the best report loss known: the best ``lam`` of ``report_grid`` scored on the report set
    itself, or a pick's where it is lower (:func:`best_known`).
    """
    report = View(obj, list(pair), "report")
    ref_curve = [report([1 - lam, lam]) for lam in report_grid]
    ref = min(ref_curve)
    newer = report([0.0, 1.0])
    rows = []
    for n in sizes:
        view = View(obj, list(pair), f"search_{n}")
        runs = []
        for s in seeds:
            _, _, lam = _search(view, 0.3, trials, s, name="paper", acquisition="gp_hedge")
            loss = report([1 - lam, lam])
            runs.append({"seed": s, "lam": lam, "report": loss, "gain_pct": gain_pct(newer, loss),
                         "gap_pct": 100 * (loss - ref) / ref})
        rows.append({"blocks": n, "tokens": n * int(obj.report_blocks.shape[1]), "runs": runs})
    return best_known({"pair": list(pair), "ref": ref, "ref_lam": report_grid[ref_curve.index(ref)], "newer": newer,
            "ref_gain_pct": gain_pct(newer, ref), "report_grid": report_grid, "report_curve": ref_curve,
            "rows": rows})


def best_known(res: dict) -> dict:
    """Measure every pick against the best report loss known: the grid's, or a pick's where it is lower (a
    coarse grid can miss the best ``lam`` that a search finds). Idempotent; rewrites ``ref``, ``gap_pct``."""
    ref = min([res["ref"], *(x["report"] for row in res["rows"] for x in row["runs"])])
    res["ref"], res["ref_gain_pct"] = ref, gain_pct(res["newer"], ref)
    for row in res["rows"]:
        for x in row["runs"]:
            x["gap_pct"] = 100 * (x["report"] - ref) / ref
    return res


def accuracy_objective(obj: Objective, pair: tuple[int, int], grid: list[float], seeds: list[int],
                       trials: int) -> dict:
    """Experiment 9: the ``lam`` picked by held-out loss against the one picked by cloze accuracy.

    Both curves on the same grid, the accuracy's binomial standard error, and ``paper`` searches on each
    objective; each pick is scored on both.
    """
    loss_v, acc_v = View(obj, list(pair), "search"), View(obj, list(pair), "cloze")
    loss_curve = [loss_v([1 - lam, lam]) for lam in grid]
    acc_curve = [1.0 - acc_v([1 - lam, lam]) for lam in grid]
    items = obj.cloze_items
    picks = []
    for label, view in (("held-out loss", loss_v), ("cloze accuracy", acc_v)):
        for s in seeds:
            _, _, lam = _search(view, 0.3, trials, s, name="paper", acquisition="gp_hedge")
            picks.append({"objective": label, "seed": s, "lam": lam, "loss": loss_v([1 - lam, lam]),
                          "acc": 1.0 - acc_v([1 - lam, lam])})
    stderr = [(a * (1 - a) / items) ** 0.5 for a in acc_curve]
    return {"pair": list(pair), "grid": grid, "loss": loss_curve, "acc": acc_curve, "stderr": stderr,
            "items": items, "picks": picks,
            "loss_best_lam": grid[loss_curve.index(min(loss_curve))],
            "acc_best_lam": grid[acc_curve.index(max(acc_curve))]}
