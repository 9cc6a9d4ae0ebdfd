"""Experiments 6, 7 and 8: the search against free schedules, generalisation, and annealing.

Every candidate is picked on the search set and then scored on the whole report set (256 held-out
blocks) and on each out-of-domain set; its gain is against the newest checkpoint it was merged from,
on the same set. ``evals`` is what the candidate cost to pick: search-set evaluations (a schedule costs
none; greedy soup scores each checkpoint and each soup it tries).
"""

from __future__ import annotations

from lightning_merge.baselines import greedy_soup, schedules
from .objective import Objective, View
from .pilot import gain_pct
from .searching import best_of


def _bo(view: View, sp, trials: int, seed: int, **kw):
    """The paper's search (GP-Hedge) over the space ``sp``: its best trial's weights and the trials it ran."""
    from lightning_merge.config import SearchConf

    conf = SearchConf(name="paper", acquisition="gp_hedge", trials=trials, seed=seed, **kw)
    run, best = best_of(view, sp, conf, trials)
    return [float(w) for w in sp.weights(best)], len(run.losses)


def _simplex_bo(view: View, k: int, trials: int, seed: int):
    from lightning_merge.spaces import SimplexSpace

    return _bo(view, SimplexSpace(k=k, parameterization="constrained"), trials, seed, space="simplex")


def _pairwise_bo(view: View, k: int, trials: int, seed: int, alpha: float = 0.3):
    from lightning_merge.spaces import PairwiseSpace

    return _bo(view, PairwiseSpace(alpha=alpha, k=k, pair=(k - 2, k - 1)), trials, seed, space="pairwise",
               alpha=alpha)


def candidates(obj: Objective, indices: list[int], pair_trials: int, simplex_trials: int, seed: int = 0,
               lawa_k: int = 4, ema_alpha: float = 0.2) -> list[dict]:
    """Every method's pick over ``indices`` (oldest first), with what it cost in search-set evaluations."""
    view = View(obj, indices)
    k = len(indices)
    out = [{"name": "newest", "weights": [0.0] * (k - 1) + [1.0], "evals": 0}]
    w, n = _pairwise_bo(view, k, pair_trials, seed)
    out.append({"name": "pairwise BO (paper)", "weights": w, "evals": n})
    w, n = _simplex_bo(view, k, simplex_trials, seed)
    out.append({"name": f"K={k} simplex BO (paper)", "weights": w, "evals": n})
    out += [{"name": name, "weights": list(ws), "evals": 0} for name, ws in schedules(k, lawa_k, ema_alpha)]
    singles = [view([1.0 if j == i else 0.0 for j in range(k)]) for i in range(k)]
    soup, tried = greedy_soup(singles, view)
    out.append({"name": "greedy soup", "weights": soup, "evals": k + len(tried)})
    return out


def score(obj: Objective, indices: list[int], cands: list[dict]) -> list[dict]:
    """Each candidate on the search, report and out-of-domain sets, and its gain over the newest."""
    sets = ["search", "report", *[s for s in obj.blocks if s.startswith("ood:")]]
    view = {s: View(obj, indices, s) for s in sets}
    newest = {s: view[s]([0.0] * (len(indices) - 1) + [1.0]) for s in sets}
    for c in cands:
        c["loss"] = {s: view[s](c["weights"]) for s in sets}
        c["gain_pct"] = {s: gain_pct(newest[s], c["loss"][s]) for s in sets}
    return cands


def annealing(wsd: Objective, wsd_steps: list[int], stable: list[int], decay: list[int], cosine: Objective,
              cos_steps: list[int], pair_trials: int, simplex_trials: int, tokens_per_step: int,
              search_tokens: int) -> dict:
    """The gain of merging in the stable phase, after a WSD decay, and after a cosine decay; and PMA's claim:
    how much of the decay's drop in report loss a merge of stable checkpoints recovers, at what cost."""
    last4 = stable[-4:]
    stable_c = score(wsd, last4, candidates(wsd, last4, pair_trials, simplex_trials))
    decay_c = score(wsd, decay, candidates(wsd, decay, pair_trials, simplex_trials))
    n = len(cos_steps)
    cos_idx = list(range(n - len(decay), n))
    cos_c = score(cosine, cos_idx, candidates(cosine, cos_idx, pair_trials, simplex_trials))
    report = {s: wsd(wsd.one_hot(i), "report") for s, i in ((wsd_steps[i], i) for i in range(len(wsd_steps)))}
    cos_report = {cos_steps[i]: cosine(cosine.one_hot(i), "report") for i in range(n)}
    start, end = wsd_steps[stable[-1]], wsd_steps[decay[-1]]
    best = min((c for c in stable_c if c["name"] != "newest"), key=lambda c: c["loss"]["search"])
    drop = report[start] - report[end]
    recovered = report[start] - best["loss"]["report"]
    decay_steps = end - start
    return {"stable": stable_c, "wsd_decay": decay_c, "cosine": cos_c, "wsd_report": report,
            "cosine_report": cos_report, "decay_start": start, "decay_end": end,
            "stable_steps": [wsd_steps[i] for i in last4], "decay_steps_saved": [wsd_steps[i] for i in decay],
            "pma": {"pick": best["name"], "merge_report": best["loss"]["report"], "start_report": report[start],
                    "annealed_report": report[end], "recovered_frac": recovered / drop if drop > 0 else None,
                    "search_evals": best["evals"], "decay_train_steps": decay_steps,
                    # forward-token equivalents: a training step is ~3 forwards of its tokens
                    "search_cost_tokens": best["evals"] * search_tokens,
                    "decay_cost_tokens": 3 * decay_steps * tokens_per_step}}
