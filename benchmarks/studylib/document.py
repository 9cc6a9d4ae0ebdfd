"""``docs/study.md`` from the saved results: the claims table first, then one section per experiment.

Nothing here evaluates a model: every number is read from ``<study dir>/results/*.json`` (written by
``benchmarks/study.py``), and each verdict is computed from those numbers by the rule stated beside it.
"""

from __future__ import annotations

import json
import os
import statistics
from pathlib import Path

from . import figures
from .searching import best_known, summarize_to
from .trajectories import decay_start, params_of

CMD = "python benchmarks/study.py"
NAMES = figures.LABELS


def _load(results: Path) -> dict[str, dict]:
    return {p.stem: json.loads(p.read_text()) for p in sorted(results.glob("*.json"))}


def _f(x: float | None, digits: int = 3, pct: bool = False) -> str:
    if x is None:
        return "n/a"
    return f"{x:+.{digits}f}%" if pct else f"{x:.{digits}f}"


def _table(header: list[str], rows: list[list]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return out


def _verdict(ok: int, of: int) -> str:
    return "reproduced" if of and ok == of else ("partly" if ok else "not reproduced")


def _set_owner(base: str) -> str:
    """Who a search-set size belongs to: both demo seeds share ``tiny``'s, both larger runs ``large_*``'s."""
    return "the demo" if base == "tiny" else "the larger model" if base.startswith("large") else NAMES.get(base, base)


def _trajectories(cache_dir: str, names: list[str]) -> list[str]:
    from .trajectories import open_run

    rows = []
    for n in names:
        run = open_run(n, cache_dir)
        meta = json.loads((run.traj.root / "trajectory.json").read_text())
        c = run.conf
        rows.append([NAMES.get(n, n), f"{params_of(run) / 1e6:.2f}M", f"{c.num_layers} x {c.hidden_size}",
                     c.steps, f"{c.batch_size} x {c.seq_len}", c.lr_schedule + (
                         f" (decay from step {decay_start(c)})" if c.lr_schedule == "wsd" else ""),
                     ", ".join(map(str, run.steps)), f"{meta['seconds'].get('training', 0) / 60:.1f} min"])
    return _table(["trajectory", "parameters", "layers x width", "steps", "batch (seqs x tokens)", "LR after warm-up",
                   "checkpoints (steps)", "training (1 thread)"], rows)


def write_document(results_dir: Path, out: Path, plan: dict, quick: bool, cache_dir: str) -> Path:
    """Write ``out/study.md`` and its plots (``out/study/*.png``) from the results; return the document's path."""
    R = {k: v["result"] for k, v in _load(results_dir).items()}
    secs = {k: v.get("cold_seconds", v["seconds"]) for k, v in _load(results_dir).items()}
    img = out / "study"
    img.mkdir(parents=True, exist_ok=True)
    stable = [t for t in ("tiny", "tiny_s1", "large") if f"1_pilot_{t}" in R]
    claims: list[list] = []
    body: list[str] = []

    # 1. pilot
    pil = {t: R[f"1_pilot_{t}"] for t in stable}
    figures.pilot_heatmaps(pil, img / "1_pilot.png")
    ok = sum(p["adjacent_late_mean"] > p["adjacent_early_mean"]
             and p["by_distance"]["1"]["mean"] > p["by_distance"][str(len(p["steps"]) - 1)]["mean"] for p in pil.values())
    claims.append(["Pilot: adjacent late pairs gain the most; distant or early pairs gain little or lose (paper)",
                   "; ".join(f"{NAMES[t]}: adjacent late {p['adjacent_late_mean']:+.2f}%, adjacent early "
                             f"{p['adjacent_early_mean']:+.2f}%, most distant {p['by_distance'][str(len(p['steps']) - 1)]['mean']:+.2f}%"
                             for t, p in pil.items()),
                   _verdict(ok, len(pil)), f"`{CMD} --redo '1_pilot_*'`"])
    body += ["## 1. Pilot: which checkpoints to merge", "",
             "For every pair of saved checkpoints (older i, newer j), the best merge `lam*c_j + (1-lam)*c_i` over a "
             "grid of `lam`, as a gain over the better of the two parents on the search set. Rule: reproduced when "
             "adjacent pairs in the later half gain more than adjacent pairs in the earlier half, and adjacent pairs "
             "more than the most distant pair.", "", "![pilot](study/1_pilot.png)", ""]
    rows = []
    for t, p in pil.items():
        top = p["top"]
        for d, v in sorted(p["by_distance"].items(), key=lambda x: int(x[0])):
            rows.append([NAMES[t], d, v["n"], _f(v["mean"], 2, True), _f(v["max"], 2, True), _f(v["min"], 2, True),
                         f"{p['steps'][top['i']]} + {p['steps'][top['j']]}: {top['gain_pct']:+.2f}% (lam {top['lam']:g})"
                         if d == "1" else ""])
    body += _table(["trajectory", "distance (saves apart)", "pairs", "mean gain", "best", "worst", "top pair"], rows)
    body += [""]

    # 2. lam curve
    cur = {t: R[f"2_curve_{t}"] for t in stable}
    figures.lam_curves(cur, img / "2_lam_curve.png")
    late = [r for rs in cur.values() for r in rs]
    newer_heavy = sum(r["best_lam"] > 0.5 for r in late)
    smooth = sum(r["local_minima"] <= 1 for r in late)
    claims.append(["The best lam puts more weight on the newer checkpoint, and the curve is smooth enough for a GP "
                   "(paper)",
                   f"best lam > 0.5 in {newer_heavy} of {len(late)} late adjacent pairs (best lam "
                   f"{min(r['best_lam'] for r in late):.3f}-{max(r['best_lam'] for r in late):.3f}); one local minimum "
                   f"in {smooth} of {len(late)}",
                   _verdict(newer_heavy + smooth, 2 * len(late)), f"`{CMD} --redo '2_curve_*'`"])
    body += ["## 2. The lam curve", "",
             "Dense grids of `lam` in [0, 1] for the late adjacent pairs, on the search set.", "",
             "![lam curve](study/2_lam_curve.png)", ""]
    body += _table(["trajectory", "pair (steps)", "best lam", "gain over better parent", "band beating both parents",
                    "local minima", "max 2nd difference / range"],
                   [[NAMES[t], f"{r['step_i']} -> {r['step_j']}", f"{r['best_lam']:.3f}", _f(r["gain_pct"], 3, True),
                     f"[{r['band'][0]:.3f}, {r['band'][1]:.3f}]" if r["band"] else "none", r["local_minima"],
                     f"{r['second_diff_rel']:.3f}"] for t, rs in cur.items() for r in rs])
    body += [""]

    # 3. efficiency
    effs = {t: R[f"3_efficiency_{t}"] for t in ("tiny", "large") if f"3_efficiency_{t}" in R}
    summ = {t: {str(tol): summarize_to(e["rows"], tol, e["trials"]) for tol in e["tolerances"]} for t, e in effs.items()}
    figures.efficiency(effs, summ, img / "3_efficiency.png")
    body += ["## 3. Search efficiency", "",
             "Evaluations until the best so far is within 0.1% and 0.01% of the best of a dense grid on "
             "`lam` in [0.3, 1] (the last adjacent pair), for every optimizer, seeds 0.."
             f"{plan['eff_seeds'] - 1} ({plan['eff_trials']} trials at most; `grid` ignores the seed). "
             "Rule: for each trajectory and tolerance, the best `paper` acquisition needs no more evaluations "
             "(median) than `random` and `grid`; reproduced when that holds everywhere, partly when somewhere.", "", "![efficiency](study/3_efficiency.png)", ""]
    rows, ok = [], 0
    for t, e in effs.items():
        s1, s2 = summ[t]["0.001"], summ[t]["0.0001"]
        for lab in s1:
            rows.append([NAMES[t], lab, " ".join(str(n) if n is not None else "-" for n in s1[lab]["per_seed"]),
                         s1[lab]["median"], f"{s1[lab]['reached']}/{s1[lab]['seeds']}",
                         " ".join(str(n) if n is not None else "-" for n in s2[lab]["per_seed"]),
                         s2[lab]["median"], f"{s2[lab]['reached']}/{s2[lab]['seeds']}"])
        best_paper = {tol: min(v["median"] for k, v in summ[t][tol].items() if k.startswith("paper"))
                      for tol in summ[t]}
        ok += sum(best_paper[tol] <= min(summ[t][tol]["random"]["median"], summ[t][tol]["grid"]["median"])
                  for tol in summ[t])
    body += _table(["trajectory", "optimizer", "to 0.1% (per seed)", "median", "reached", "to 0.01% (per seed)",
                    "median", "reached"], rows)
    body += ["", "`-`: not reached within the trials; a median over unreached seeds counts them as trials + 1.", ""]
    for t, e in effs.items():
        first = {row["label"]: row["runs"][0] for row in e["rows"]}
        if "ax" in first:
            lam0, loss0 = first["ax"]["lams"][0], first["ax"]["losses"][0]
            body += [f"{NAMES[t]}: the dense grid's best is lam {e['ref_lam']:.3f}. Ax's first trial (for `ax` and "
                     f"`random`) is the centre of the space, lam {lam0:.3f}, {100 * (loss0 - e['ref']) / e['ref']:.3f}% "
                     "above the best; `paper` spends its first two on lam = alpha and lam = 1 (the paper's "
                     "Algorithm 1), "
                     + ", ".join(f"{100 * (v - e['ref']) / e['ref']:.2f}%" for v in first["paper (ei)"]["losses"][:2])
                     + " above it.", ""]
    claims.append(["BO finds the best lam in fewer evaluations than grid or random search (paper)",
                   "; ".join(f"{NAMES[t]}: median evaluations to 0.1% / 0.01%: best paper "
                             f"{min(v['median'] for k, v in summ[t]['0.001'].items() if k.startswith('paper'))} / "
                             f"{min(v['median'] for k, v in summ[t]['0.0001'].items() if k.startswith('paper'))}, "
                             f"random {summ[t]['0.001']['random']['median']} / {summ[t]['0.0001']['random']['median']}, "
                             f"grid {summ[t]['0.001']['grid']['median']} / {summ[t]['0.0001']['grid']['median']}"
                             for t in effs),
                   _verdict(ok, sum(len(summ[t]) for t in effs)) + f" (holds at {ok} of "
                   f"{sum(len(summ[t]) for t in effs)} trajectory-tolerance pairs)", f"`{CMD} --redo '3_efficiency_*'`"])

    # 4 and 5
    alphas = {t: R[f"4_alpha_{t}"] for t in ("tiny", "large") if f"4_alpha_{t}" in R}
    sizes = {t: best_known(R[f"5_heldout_{t}"]) for t in ("tiny", "large") if f"5_heldout_{t}" in R}
    figures.alpha_and_size(alphas, sizes, img / "4_5_alpha_heldout.png")
    body += ["## 4. Search space: alpha", "",
             "`paper` (GP-Hedge) with `lam` in [alpha, 1], seeds 0.."
             f"{plan['alpha_seeds'] - 1}, {plan['alpha_trials']} trials at most (it stops itself once converged). "
             "`to 0.1%`: evaluations until within 0.1% of the best of the dense grid over all of [0, 1] (section 2).",
             "", "![alpha and held-out size](study/4_5_alpha_heldout.png)", ""]
    rows = []
    for t, rs in alphas.items():
        for r in rs:
            runs = r["runs"]
            rows.append([NAMES[t], r["alpha"], " ".join(f"{x['best_lam']:.3f}" for x in runs),
                         _f(statistics.mean(x["gain_pct"] for x in runs), 3, True),
                         " ".join(str(x["trials_run"]) for x in runs),
                         " ".join(str(x["to_0.1%"]) if x["to_0.1%"] else "-" for x in runs)])
    body += _table(["trajectory", "alpha", "lam picked (per seed)", "gain over newer (mean)", "trials run",
                    "to 0.1%"], rows)
    gains = {t: {r["alpha"]: statistics.mean(x["gain_pct"] for x in r["runs"]) for r in rs} for t, rs in alphas.items()}
    best_lam = {t: cur[t][-1]["best_lam"] for t in gains if t in cur}  # the dense [0, 1] grid's best (section 2)
    below = {t: [a for a in g if a < best_lam.get(t, 1.0)] for t, g in gains.items()}
    ok = sum(len(below[t]) > 0 and max(g[a] for a in below[t]) - min(g[a] for a in below[t]) < 0.01
             for t, g in gains.items())
    claims.append(["Restricting lam to [alpha, 1] loses nothing while alpha stays below the best lam (paper)",
                   "; ".join(f"{NAMES[t]}: gain " + ", ".join(f"alpha {a:g}: {v:+.3f}%" for a, v in g.items())
                             for t, g in gains.items()),
                   _verdict(ok, len(gains)) + " (rule: every alpha below the dense grid's best lam gains the same, "
                   "within 0.01 points)",
                   f"`{CMD} --redo '4_alpha_*'`"])
    body += ["", "## 5. Held-out size", "",
             "The same search run on N evenly spaced held-out blocks (256 tokens each); its pick scored on all "
             f"{plan['report_blocks']} report blocks, against the best `lam` known on those blocks: the best of a "
             "grid scored on them, or a pick's where it is lower.", ""]
    rows = []
    for t, r in sizes.items():
        for row in r["rows"]:
            runs = row["runs"]
            rows.append([NAMES[t], row["blocks"], row["tokens"], " ".join(f"{x['lam']:.3f}" for x in runs),
                         _f(statistics.mean(x["gain_pct"] for x in runs), 3, True),
                         _f(statistics.mean(x["gap_pct"] for x in runs), 4, True), _f(r["ref_gain_pct"], 3, True)])
    body += _table(["trajectory", "blocks", "tokens", "lam picked (per seed)", "gain over newer (full set)",
                    "above the best known (full set)", "best known gain"], rows)
    small = {t: next((statistics.mean(x["gap_pct"] for x in row["runs"]) for row in r["rows"] if row["blocks"] == 16),
                     None) for t, r in sizes.items()}
    ok = sum(v is not None and v <= 0.1 for v in small.values())
    claims.append(["A small held-out set picks nearly the best lam (paper)",
                   "; ".join(f"{NAMES[t]}: the pick on 16 blocks is {_f(v, 4, True)} above the best known on the full set"
                             for t, v in small.items()),
                   _verdict(ok, len(small)) + " (rule: within 0.1% at 16 blocks)", f"`{CMD} --redo '5_heldout_*'`"])
    body += [""]

    # 6 and 8
    sched = {t: R[f"8_schedules_{t}"] for t in stable if f"8_schedules_{t}" in R}
    ann = R.get("7_annealing")
    if ann:
        size = "large" if "large" in stable else "tiny"
        sched[f"{size}_wsd_decay"] = ann["wsd_decay"]
        sched[f"{size}_cosine_last"] = ann["cosine"]
    distant = {t: R[f"8_distant_{t}"] for t in stable if f"8_distant_{t}" in R}
    figures.schedules({**sched, **{f"{t}+early": v for t, v in distant.items()}},
                      img / "6_8_schedules.png")
    body += ["## 6 and 8. Search against free schedules, and generalisation", "",
             "Every method over the last 4 checkpoints (and over the newest 3 with one early checkpoint: a distant "
             f"checkpoint in the set). Each pick is made on the search set and scored on the {plan['report_blocks']} held-out blocks and "
             "on the out-of-domain sets (the stdlib's test suite, pydoc prose); gains are over the newest "
             "checkpoint on the same set. Evals: search-set evaluations spent choosing (a schedule costs none).", "",
             "![schedules](study/6_8_schedules.png)", ""]
    rows, beats, carry, carry_of, misses = [], [], 0, 0, []
    for t, cands in {**sched, **{f"{t}+early": v for t, v in distant.items()}}.items():
        sets = [s for s in cands[0]["gain_pct"] if s != "search"]
        for c in cands:
            rows.append([NAMES.get(t, t), c["name"], c["evals"], *[_f(c["gain_pct"][s], 3, True) for s in sets]])
        search = [c for c in cands if "BO" in c["name"]]
        free = [c for c in cands if c["name"] not in ("newest", "greedy soup") and "BO" not in c["name"]]
        bs = min(search, key=lambda c: c["loss"]["search"])
        bf = min(free, key=lambda c: c["loss"]["search"])
        beats.append((t, bs["name"], bf["name"], 100 * (bf["loss"]["report"] - bs["loss"]["report"]) / bf["loss"]["report"]))
        for c in search:
            if c["gain_pct"]["report"] > 0:
                carry_of += 1
                held = all(c["gain_pct"][s] > 0 for s in sets if s.startswith("ood:"))
                carry += held
                if not held:
                    misses.append(f"{NAMES.get(t, t)} {c['name']}: held-out {c['gain_pct']['report']:+.3f}%, "
                                  + ", ".join(f"{s[4:]} {c['gain_pct'][s]:+.3f}%" for s in sets if s.startswith("ood:")))
    body += _table(["trajectory", "method", "evals", *[s.replace("ood:", "ood ") for s in sets]], rows)
    body += ["", "The search's pick (chosen on the search set) against the free schedule it would have beaten the "
             "most easily (the best free one on the search set), on the full held-out set:", ""]
    body += _table(["trajectory", "search pick", "best free schedule", "search lower by"],
                   [[NAMES.get(t, t), a, b, _f(d, 4, True)] for t, a, b, d in beats])
    body += [""]
    claims.append(["Gains found on held-out text carry over to out-of-domain text (paper)",
                   f"{carry} of {carry_of} search picks that gain on the held-out set also gain on every "
                   "out-of-domain set" + (f" (the exceptions: {'; '.join(misses)})" if misses else ""),
                   _verdict(carry, carry_of), f"`{CMD} --redo '[78]_*'`"])
    all_c = {**sched, **{f"{k}+early": v for k, v in distant.items()}}

    def merged_gain(t: str, name: str) -> float:
        return next(c for c in all_c[t] if c["name"] == name)["gain_pct"]["report"]

    wins = [t for t, a, _, d in beats if d > 0.05 and merged_gain(t, a) > 0.01]
    by_not_merging = [t for t, a, _, d in beats if d > 0.05 and merged_gain(t, a) <= 0.01]
    claims.append(["The search's pick beats the best free schedule (uniform, LAWA, EMA, WMA) by more than 0.05%",
                   "; ".join(f"{NAMES.get(t, t)}: {d:+.3f}%" for t, _, _, d in beats)
                   + " (positive: the search's pick has the lower held-out loss)",
                   _verdict(len(wins), len(beats)) + f" ({len(wins)} of {len(beats)} with a merge"
                   + (f"; {len(by_not_merging)} more only by not merging" if by_not_merging else "")
                   + ")", f"`{CMD} --redo '[78]_*'`"])
    # Where the search pays: said plainly, from the numbers above
    pays = []
    for t, a, b, d in beats:
        pick = next(c for c in all_c[t] if c["name"] == a)
        own = pick["gain_pct"]["report"]
        verdict = "the search buys nothing over it" if d <= 0.05 else "the search pays"
        if abs(own) <= 0.01 and d > 0.05:
            verdict = (f"merging buys nothing here (the search's pick is within {abs(own):.3f}% of the newest "
                       "checkpoint): the search pays only by not merging, where every free average loses")
        pays.append(f"- {NAMES.get(t, t)}: the search's pick ({a}, {pick['evals']} evaluations) has a held-out loss "
                    f"{abs(d):.3f}% {'lower' if d > 0 else 'higher'} than the best free schedule ({b}, none): "
                    f"{verdict}.")
    for t, rs in cur.items():
        for r in rs:
            half = [v for lam, v in zip(r["lams"], r["losses"]) if abs(lam - 0.5) < 1e-9]
            if half:
                gap = 100 * (half[0] - r["best_loss"]) / half[0]
                pays.append(f"- {NAMES[t]}, pair {r['step_i']} -> {r['step_j']}: the free pair average (lam 0.5) is "
                            f"{gap:.3f}% above the best lam ({r['best_lam']:.3f}): the price of a fixed lam prior.")

    # 7
    if ann:
        figures.annealing(ann, img / "7_annealing.png")
        def best(cs):
            return min((c for c in cs if c["name"] != "newest"), key=lambda c: c["loss"]["search"])
        g = {k: best(ann[k])["gain_pct"]["report"] for k in ("stable", "wsd_decay", "cosine")}
        pma = ann["pma"]
        body += ["## 7. Annealing", "",
                 f"Merging the last checkpoints of the stable phase (steps {ann['stable_steps']}), of the WSD decay "
                 f"(steps {ann['decay_steps_saved']}) and of the cosine run, each pick's gain over its newest "
                 "checkpoint on the full held-out set; and PMA's claim: the merge at the end of the stable phase "
                 f"(step {ann['decay_start']}) against the annealed model (step {ann['decay_end']}).", "",
                 "![annealing](study/7_annealing.png)", ""]
        body += _table(["phase", "best pick (on the search set)", "gain over newest (held-out)"],
                       [[k.replace("_", " "), best(ann[k])["name"], _f(v, 3, True)] for k, v in g.items()])
        frac = pma["recovered_frac"]
        recovered = f"recovers {100 * frac:.0f}% of the decay's drop" if frac is not None else "gains nothing"
        curve = sorted((int(k), v) for k, v in ann["wsd_report"].items() if int(k) >= ann["decay_start"])
        match = next((s0 + (s1 - s0) * (v0 - pma["merge_report"]) / (v0 - v1)
                      for (s0, v0), (s1, v1) in zip(curve, curve[1:]) if v1 <= pma["merge_report"] <= v0), None)
        if match is not None:
            per_step = pma["decay_cost_tokens"] / pma["decay_train_steps"]
            steps_in = match - ann["decay_start"]
            recovered += (f" (the WSD run reaches the merge's loss at about step {match:.0f}, {steps_in:.0f} decay "
                          f"steps in: the search costs {100 * pma['search_cost_tokens'] / (steps_in * per_step):.0f}% "
                          "of those steps' compute)")
        body += ["", f"PMA: the stable-phase merge ({pma['pick']}) has held-out loss {pma['merge_report']:.4f}, the "
                 f"checkpoint it ends at {pma['start_report']:.4f}, the annealed model {pma['annealed_report']:.4f}: "
                 f"the merge {recovered}, for {pma['search_evals']} evaluations ({pma['search_cost_tokens']:,} forward "
                 f"tokens) against {pma['decay_train_steps']} training steps ({pma['decay_cost_tokens']:,} "
                 f"forward-token equivalents: the search costs "
                 f"{100 * pma['search_cost_tokens'] / pma['decay_cost_tokens']:.1f}% of the decay).", ""]
        claims.append(["Merging gains most in the stable phase and little after the LR has decayed (paper; PMA)",
                       ", ".join(f"{k.replace('_', ' ')} {v:+.3f}%" for k, v in g.items()),
                       _verdict(int(g["stable"] > g["wsd_decay"]) + int(g["stable"] > g["cosine"]), 2),
                       f"`{CMD} --redo '7_annealing'`"])
        claims.append(["PMA: a merge of stable-phase checkpoints approaches the annealed model",
                       f"recovers {100 * frac:.0f}% of the decay's loss drop at "
                       f"{100 * pma['search_cost_tokens'] / pma['decay_cost_tokens']:.1f}% of its compute"
                       if frac is not None else "the decay did not lower the loss",
                       ("reproduced" if frac >= 0.8 else "partly" if frac >= 0.3 else "not reproduced")
                       + " (rule: >= 80% reproduced, >= 30% partly)" if frac is not None else "not reproduced",
                       f"`{CMD} --redo '7_annealing'`"])

    # 9
    accs = {t: R[f"9_objective_{t}"] for t in ("tiny", "large") if f"9_objective_{t}" in R}
    if accs:
        figures.objective(accs, img / "9_objective.png")
        body += ["## 9. Objective: held-out loss against accuracy", "",
                 "The last adjacent pair of each constant-LR trajectory: held-out loss and the accuracy on cloze "
                 "items cut from the held-out text (lm-eval task `cloze_local`, 4 choices, so chance is 25%, scored "
                 "on the resident model), on the same grid of `lam`; then `paper` searches on each objective, each "
                 "pick scored on both.", "", "![objective](study/9_objective.png)", ""]
        rows, seen = [], []
        for t, acc in accs.items():
            spread = 100 * (max(acc["acc"]) - min(acc["acc"]))
            se = 100 * statistics.mean(acc["stderr"])
            top = 100 * max(acc["acc"])
            rows += [[NAMES[t], p["objective"], p["seed"], f"{p['lam']:.3f}", f"{p['loss']:.5f}",
                      f"{100 * p['acc']:.1f}%"] for p in acc["picks"]]
            seen.append((t, acc, spread, se, top))
        body += _table(["trajectory", "objective searched", "seed", "lam picked", "held-out loss", "cloze accuracy"],
                       rows)
        body += [""]
        for t, acc, spread, se, top in seen:
            body += [f"{NAMES[t]}: on the grid, the loss's best lam is {acc['loss_best_lam']:.2f} and the accuracy's "
                     f"{acc['acc_best_lam']:.2f}; accuracy moves {spread:.1f} points over all of lam in [0, 1] "
                     f"(best {top:.1f}% on {acc['items']} items, chance 25%), its standard error is {se:.1f} points.",
                     ""]
            pays.append(f"- An accuracy objective, {NAMES[t]} (section 9): its search picks lam "
                        + ", ".join(f"{p['lam']:.2f}" for p in acc["picks"] if p["objective"] != "held-out loss")
                        + " where the loss picks " + ", ".join(f"{p['lam']:.2f}" for p in acc["picks"]
                                                               if p["objective"] == "held-out loss")
                        + f"; the accuracy's standard error ({se:.1f} points) is "
                        + ("larger than" if se > spread else "a large part of" if se > spread / 3 else "small next to")
                        + f" its whole range over lam ({spread:.1f} points), and its best is {top:.1f}% "
                        "(chance: 25%).")
        noisy = [t for t, _, spread, se, _ in seen if spread < 2 * se]
        same = [t for t, acc, *_ in seen if abs(acc["loss_best_lam"] - acc["acc_best_lam"]) <= 0.2]
        claims.append(["An accuracy objective (the paper's) picks the same lam as held-out loss",
                       "; ".join(f"{NAMES[t]}: loss picks lam {acc['loss_best_lam']:.2f}, accuracy "
                                 f"{acc['acc_best_lam']:.2f}; accuracy spans {spread:.1f} points (best {top:.1f}%, "
                                 f"chance 25%) with a standard error of {se:.1f}" for t, acc, spread, se, top in seen),
                       "not reproduced: too noisy to tell at this scale" if len(noisy) == len(seen)
                       else _verdict(len(same), len(seen)),
                       f"`{CMD} --redo '9_objective_*'`"])

    head = ["# The paper's claims, reproduced at small scale", "",
            "Liu et al., *Checkpoint Merging via Bayesian Optimization in LLM Pretraining* (arXiv 2403.19390), and "
            "PMA (*Model Merging in Pre-training of Large Language Models*, arXiv 2505.12082), tested on "
            "trajectories this repository trains offline on 2 CPU cores. Every number below was written by "
            f"`{CMD}{' --quick' if quick else ''}` from its saved results; nothing is typed in by hand.", ""]
    if quick:
        head += ["**This is the `--quick` smoke run (the demo, tiny grids): its numbers test the code, not the "
                 "claims.**", ""]
    head += ["## Claims", ""]
    head += _table(["claim", "measured", "verdict", "regenerate"], claims)
    head += ["", "## Where the search pays, and where it does not", ""] + pays
    head += ["- Spikes in the trajectory: not measured (none of these runs has a loss spike).", ""]
    head += ["## Trajectories", ""]
    names = [*(["tiny", "tiny_s1"] if not quick else ["tiny"]), *[t for t in plan["trajectories"]
                                                                 if t.startswith(("large_", "tiny_wsd", "tiny_cos"))]]
    head += _trajectories(cache_dir, names)
    head += ["", f"Study wall time (evaluations and searches, trajectories excluded): {sum(secs.values()) / 60:.1f} "
             "min, each experiment's first (cold) computation summed; search sets (blocks of 256 tokens): "
             + ", ".join(dict.fromkeys(f"{_set_owner(k)} {v}" for k, v in plan["search_blocks"].items()))
             + f"; the report set and each out-of-domain set: {plan['report_blocks']} blocks.", ""]
    md = out / "study.md"
    tmp = md.with_suffix(".tmp")
    tmp.write_text("\n".join(head + body) + "\n")
    os.replace(tmp, md)
    return md
