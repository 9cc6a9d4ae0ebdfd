"""Search efficiency: how many evaluations each optimizer needs on the default experiment, and what Ax costs.

Everything runs in this one process on real evaluations of the embedded demo
trajectory (experiment ``tiny``, cached by ``python -m lightning_merge``): one
``Evaluator`` set up as the driver sets it up (fp32, CPU, strategy single, 1
thread), with the last 4 checkpoints as sources. The objective is the held-out
loss on ``data.search_blocks`` (64 evenly spaced of the 256 held-out blocks).
Evaluation is deterministic, so it is memoized on the exact weights, across
every run: a repeated point still counts as one trial of the optimizer that
asked for it, but costs no time.

Each optimizer is driven through ``AxSearch`` as the driver's loop drives it
(``ask``, ``kick`` once the point is known, evaluate, ``tell``; ``close`` at the
end), without the baselines as trials, so every trial is the optimizer's own:

1. pairwise, ``lam`` in [0.3, 1] on the two newest (``PairwiseSpace(0.3, k=4,
   pair=(2, 3))``): a dense grid gives the reference best loss; each optimizer
   runs up to 12 trials per seed, and we count the evaluations until the best so
   far is within 0.1% of it. ``grid`` ignores the seed: its row gives the
   smallest N whose N-point grid gets there (N evaluations), and a second row
   the trials the 12-point grid walks, in order, before it gets there.
2. simplex over all 4, both parameterizations: the best loss after 1/3, 2/3 and
   all of 30 trials, against the best of the baselines (each checkpoint, uniform
   = LAWA, EMA, WMA, greedy soup) on the same objective.

Repeats: a trial within ``NEAR`` (``lightning_merge.search.NEAR``, every unit
coordinate; ``--near`` to set it) of an earlier trial of its run is counted as
a near-duplicate (``near-dups``); ``distinct to target`` counts the trials to
the target less those. A search that ends itself (``ask()`` returns None:
converged) runs fewer trials (``trials run``).

``ask ms`` is the mean time of ``AxSearch.ask()`` per trial, the driver's
``ask_s`` (for ``ax`` and ``random`` it includes waiting for Ax to record the
previous result; for ``paper`` it is the GP proposal, and Ax's bookkeeping runs
on a thread beside the evaluation). ``search ms`` is the run's wall time minus
its evaluations, per trial: every cost of the search on this process.

    python benchmarks/search_efficiency.py [--seeds 5] [--quick] [--wait-quiet 300]
    python benchmarks/search_efficiency.py --pairwise-only --tolerance 1e-4   # the 0.01% table
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _machine import busy_cpu_seconds, own_cpu_seconds, wait_quiet  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")
T0 = time.monotonic()
REL = 1e-3  # "within 0.1%" of the dense-grid best
DUP_TOL = 1e-3  # a trial within this of an earlier one (every unit coordinate) counts as a near-duplicate


def say(msg: str) -> None:
    print(f"[{time.monotonic() - T0:7.1f}s] {msg}", flush=True)


class Load:
    """CPUs kept busy by other processes between construction and ``other()``."""

    def __init__(self) -> None:
        self.b0, self.o0, self.t0 = busy_cpu_seconds(), own_cpu_seconds(), time.monotonic()

    def other(self) -> float:
        dt = max(time.monotonic() - self.t0, 1e-9)
        return max(0.0, (busy_cpu_seconds() - self.b0 - (own_cpu_seconds() - self.o0)) / dt)


class Objective:
    """The held-out loss on the search blocks of a merge of the 4 newest demo checkpoints, memoized."""

    def __init__(self) -> None:
        import torch
        from transformers import AutoTokenizer

        from lightning_merge.series import CheckpointSeries
        from lightning_merge.config import CheckpointsConf, DemoConf, RunConfig
        from lightning_merge.data import evenly_spaced, load_blocks
        from lightning_merge.driver import (
            Stages,
            _merger_factory,
            _resolve_inputs,
            _seed_everything,
        )
        from lightning_merge.evaluate import Evaluator
        from lightning_merge.model import build_model

        cfg = RunConfig(demo=DemoConf(enabled=True), checkpoints=CheckpointsConf(last=4))
        _seed_everything(cfg.seed, cfg.threads)  # threads=1, as the driver's default
        cfg = _resolve_inputs(cfg, Stages())
        c = cfg.checkpoints
        self.series = CheckpointSeries.from_sources(c.sources, selector=c.selector(), strip_prefix=c.strip_prefix,
                                                    config_dir=c.config_dir)
        tok = AutoTokenizer.from_pretrained(self.series.config_dir)
        report_blocks = load_blocks(cfg.data.heldout, tok, "heldout", cache_dir=cfg.cache_dir)
        self.blocks = evenly_spaced(report_blocks, cfg.data.search_blocks)
        model = build_model(self.series.config_dir, getattr(torch, cfg.model.dtype), False)
        self.evaluator = Evaluator(model, cfg.strategy, batch_size=cfg.data.batch_size,
                                   merger_factory=_merger_factory(cfg, self.series))
        self.names = [p.name for p in self.series.paths]
        self.cfg = cfg
        self.memo: dict[tuple, float] = {}
        self.evals, self.seconds = 0, 0.0
        self.negative: list[tuple] = []  # distinct proposals with a weight below 0 (none should be)

    def __call__(self, weights) -> float:
        key = tuple(float(w) for w in weights)
        if min(key) < 0 and key not in self.memo:
            self.negative.append(key)
        if key not in self.memo:
            t0 = time.perf_counter()
            self.evaluator.set_weights(list(key))
            self.memo[key] = self.evaluator.evaluate(self.blocks).loss
            self.seconds += time.perf_counter() - t0
            self.evals += 1
        return self.memo[key]


@dataclass
class Run:
    """One optimizer run: the loss of every trial in order, and its timings."""

    losses: list[float] = field(default_factory=list)
    origins: list[str] = field(default_factory=list)
    points: list[list[float]] = field(default_factory=list)  # unit-cube coordinates of each trial
    asks: list[float] = field(default_factory=list)
    ask_s: float = 0.0
    eval_s: float = 0.0
    wall_s: float = 0.0
    converged: str | None = None  # why the search ended itself (``ask()`` returned None) before its trials

    def best_after(self, n: int) -> float:
        return min(self.losses[:n])

    def evals_to(self, target: float) -> int | None:
        best = math.inf
        for i, v in enumerate(self.losses):
            best = min(best, v)
            if best <= target:
                return i + 1
        return None

    def near_duplicates(self, upto: int | None = None) -> int:
        """Trials within ``DUP_TOL`` (every unit coordinate) of an earlier trial of the run: no new information."""
        pts = self.points[:upto]
        return sum(any(max(abs(a - b) for a, b in zip(p, q)) <= DUP_TOL * (1 + 1e-9) for q in pts[:i])
                   for i, p in enumerate(pts))

    def distinct_to(self, target: float) -> int | None:
        """Trials until the target, less the near-duplicates among them: evaluations that told the search something."""
        n = self.evals_to(target)
        return None if n is None else n - self.near_duplicates(n)

    def exact_duplicates(self) -> int:
        return len(self.points) - len({tuple(round(x, 12) for x in p) for p in self.points})

    @property
    def ask_ms(self) -> float:
        return 1e3 * self.ask_s / len(self.losses)

    @property
    def search_ms(self) -> float:
        return 1e3 * (self.wall_s - self.eval_s) / len(self.losses)


def run_search(obj: Objective, conf, space, trials: int, marks=(), label: str = "") -> Run:
    """Drive ``AxSearch`` for ``trials`` trials as the driver's loop does (no baselines as trials)."""
    from lightning_merge.search import AxSearch

    search = AxSearch(conf, space, name="bench")
    search.warm_up()  # the driver does this in its setup stage, before any trial
    r = Run()
    t_start, e_start = time.perf_counter(), obj.seconds
    for i in range(trials):
        t = time.perf_counter()
        prop = search.ask()
        if prop is None:  # converged: nothing left worth evaluating (the driver's loop stops here too)
            r.converged = getattr(search, "converged", None) or "converged"
            break
        r.asks.append(time.perf_counter() - t)
        r.ask_s += r.asks[-1]
        search.kick()  # the driver kicks once the trial's merge is done
        loss = obj(prop.weights)
        search.tell(prop.index, loss)
        r.losses.append(loss)
        r.origins.append(prop.origin)
        r.points.append(space.to_unit(prop.params))
        if i + 1 in marks and i + 1 < trials:
            say(f"  {label}: {i + 1} trials, best {min(r.losses):.5f}, ask {r.ask_ms:.0f} ms/trial")
    search.close()
    r.wall_s, r.eval_s = time.perf_counter() - t_start, obj.seconds - e_start
    return r


def _gap(runs: list[Run], ref: float) -> float:
    """Mean relative gap (%) of the runs' final best to the reference (negative: better than it)."""
    return 100 * statistics.mean((min(r.losses) - ref) / ref for r in runs)


def _fmt_evals(n: int | None, cap: int) -> str:
    return str(n) if n is not None else f">{cap}"


def pairwise(obj: Objective, seeds: list[int], trials: int, dense: int) -> dict:
    from lightning_merge.config import SearchConf
    from lightning_merge.spaces import PairwiseSpace

    k = len(obj.series)
    space = PairwiseSpace(alpha=0.3, k=k, pair=(k - 2, k - 1))
    load = Load()
    curve = [(p["lam"], obj(space.weights(p))) for p in space.grid(dense)]
    lam_best, ref = min(curve, key=lambda x: x[1])
    target = ref * (1 + REL)
    pct = f"{100 * REL:g}%"
    say(f"pairwise {obj.names[-2]} -> {obj.names[-1]}: dense grid of {dense} lam in [0.3, 1] "
        f"({load.other():.2f} other CPUs)")
    for i in range(0, len(curve), 8):
        print("    " + "  ".join(f"{lam:.3f}:{v:.5f}" for lam, v in curve[i:i + 8]), flush=True)
    print(f"  reference best {ref:.5f} at lam={lam_best:.4f}; target ({pct}) <= {target:.5f}; "
          f"lam=1 (newest) {curve[-1][1]:.5f}", flush=True)

    rows = []
    optimizers = [(f"paper ({a})", {"name": "paper", "acquisition": a}) for a in ("ei", "pi", "ucb", "gp_hedge")]
    optimizers += [("ax", {"name": "ax"}), ("random", {"name": "random"})]
    for label, kw in optimizers:
        load, runs = Load(), []
        for s in seeds:
            conf = SearchConf(space="pairwise", alpha=0.3, trials=trials, seed=s, **kw)
            runs.append(run_search(obj, conf, space, trials))
            r = runs[-1]
            say(f"pairwise {label} seed {s}: {_fmt_evals(r.evals_to(target), trials)} evaluations to {pct}, "
                f"best {min(r.losses):.5f}, ask {r.ask_ms:.0f} ms/trial; {len(r.losses)} trials"
                f"{f' (converged: {r.converged})' if r.converged else ''}, {r.near_duplicates()} near-duplicates "
                f"({r.exact_duplicates()} exact); lam "
                + " ".join(f"{space.from_unit(p)['lam']:.4f}" for p in r.points))
        rows.append((label, [r.evals_to(target) for r in runs], statistics.mean(r.ask_ms for r in runs),
                     statistics.mean(r.search_ms for r in runs), load.other(), _gap(runs, ref),
                     [r.distinct_to(target) for r in runs], [r.near_duplicates() for r in runs],
                     [len(r.losses) for r in runs]))

    # grid ignores the seed: the smallest N whose N evenly spaced points reach the target, then the
    # N=trials grid walked in order (a run that does not know N in advance)
    load, smallest, walk = Load(), None, None
    for n in range(2, trials + 1):
        r = run_search(obj, SearchConf(name="grid", space="pairwise", alpha=0.3, trials=n), space, n)
        if smallest is None and r.evals_to(target) is not None:
            smallest = (n, r)
        walk = r
    say(f"pairwise grid: smallest N reaching {pct}: {smallest[0] if smallest else f'>{trials}'}; "
        f"{trials}-point grid in order: {_fmt_evals(walk.evals_to(target), trials)}")
    other = load.other()
    g = smallest[0] if smallest else None
    gr = smallest[1] if smallest else walk
    rows.append(("grid (smallest N)", [g] * len(seeds), gr.ask_ms, gr.search_ms, other, _gap([walk], ref),
                 [g] * len(seeds), [gr.near_duplicates()] * len(seeds), [len(gr.losses)] * len(seeds)))
    rows.append((f"grid ({trials}, in order)", [walk.evals_to(target)] * len(seeds), walk.ask_ms, walk.search_ms,
                 other, _gap([walk], ref), [walk.distinct_to(target)] * len(seeds),
                 [walk.near_duplicates()] * len(seeds), [len(walk.losses)] * len(seeds)))
    return {"ref": ref, "lam": lam_best, "rows": rows, "trials": trials}


def print_pairwise(res: dict, seeds: list[int]) -> None:
    cap = res["trials"]
    print(f"\n### pairwise: evaluations until the best so far is within {100 * REL:g}% of the dense-grid best "
          f"({res['ref']:.5f} at lam={res['lam']:.4f}); up to {cap} trials\n")
    print("| optimizer | " + " | ".join(f"seed {s}" for s in seeds)
          + f" | reached | median | mean | distinct to target (mean) | near-dups in {cap} (per seed) | trials run"
          f" | gap @{cap} % | ask ms/trial | search ms/trial | other procs |")
    print("|---|" + "---|" * len(seeds) + "---|---|---|---|---|---|---|---|---|---|")
    for label, ns, ask, srch, other, gap, distinct, dups, ran in res["rows"]:
        vals = [n if n is not None else math.inf for n in ns]
        med = statistics.median(vals)
        miss = any(n is None for n in ns)
        mean = statistics.mean(n if n is not None else cap + 1 for n in ns)
        dmean = statistics.mean(n if n is not None else cap + 1 for n in distinct)
        print(f"| {label} | " + " | ".join(_fmt_evals(n, cap) for n in ns)
              + f" | {sum(n is not None for n in ns)}/{len(ns)} | {_fmt_evals(None if med == math.inf else med, cap)}"
              f" | {'>' if miss else ''}{mean:.1f} | {'>' if None in distinct else ''}{dmean:.1f}"
              f" | {' '.join(map(str, dups))} | {' '.join(map(str, ran))}"
              f" | {gap:+.3f} | {ask:.0f} | {srch:.0f} | {other:.2f} |", flush=True)


def baselines(obj: Objective) -> list[tuple[str, list[float], float]]:
    from lightning_merge.baselines import greedy_soup, schedules

    k = len(obj.series)
    out = []
    for i, n in enumerate(obj.names):
        w = [1.0 if j == i else 0.0 for j in range(k)]
        out.append((n, w, obj(w)))
    b = obj.cfg.baselines
    out += [(n, w, obj(w)) for n, w in schedules(k, b.lawa_k, b.ema_alpha)]
    soup, _ = greedy_soup([v for _, _, v in out[:k]], obj)
    out.append(("greedy soup", soup, obj(soup)))
    return out


def simplex(obj: Objective, seeds: list[int], trials: int, only: set[str] | None = None,
            parameterizations: tuple[str, ...] = ("constrained", "normalized")) -> list[dict]:
    from lightning_merge.config import SearchConf
    from lightning_merge.spaces import SimplexSpace

    k = len(obj.series)
    marks = sorted({max(1, trials // 3), max(1, 2 * trials // 3), trials})
    rows = []
    for par in parameterizations:
        space = SimplexSpace(k=k, parameterization=par)
        for label, kw in (("paper (gp_hedge)", {"name": "paper", "acquisition": "gp_hedge"}), ("ax", {"name": "ax"}),
                          ("random", {"name": "random"}), ("grid", {"name": "grid"})):
            if only and kw["name"] not in only:
                continue
            load, runs = Load(), []
            for s in seeds:
                conf = SearchConf(space="simplex", parameterization=par, trials=trials, seed=s, **kw)
                runs.append(run_search(obj, conf, space, trials, marks=marks, label=f"{label} {par} seed {s}"))
                say(f"simplex {label} {par} seed {s}: best " + ", ".join(
                    f"@{m} {runs[-1].best_after(m):.5f}" for m in marks) + f"; ask {runs[-1].ask_ms:.0f} ms/trial; "
                    f"{len(runs[-1].losses)} trials{' (converged)' if runs[-1].converged else ''}, "
                    f"{runs[-1].near_duplicates()} near-duplicates ({runs[-1].exact_duplicates()} exact)")
            rows.append({"label": label, "par": par, "runs": runs, "marks": marks, "other": load.other()})
    return rows


def print_simplex(rows: list[dict], best_base: float) -> None:
    marks = rows[0]["marks"]
    print(f"\n### simplex K=4: best loss after n evaluations (mean over seeds; beat = seeds below the best "
          f"baseline {best_base:.5f})\n")
    print("| optimizer | parameterization | " + " | ".join(f"best @{m} | beat @{m}" for m in marks)
          + f" | evals to beat (per seed) | near-dups (per seed) | ask ms/trial | ask ms @{marks[-1]}"
          " | search ms/trial | other procs |")
    print("|---|---|" + "---|---|" * len(marks) + "---|---|---|---|---|---|")
    for row in rows:
        runs = row["runs"]
        cells = []
        for m in marks:
            cells.append(f"{statistics.mean(r.best_after(m) for r in runs):.5f}")
            cells.append(f"{sum(r.best_after(m) < best_base for r in runs)}/{len(runs)}")
        beat = [next((i + 1 for i, v in enumerate(r.losses) if v < best_base), None) for r in runs]
        print(f"| {row['label']} | {row['par']} | " + " | ".join(cells)
              + f" | {' '.join(_fmt_evals(b, marks[-1]) for b in beat)}"
              f" | {' '.join(str(r.near_duplicates()) + ('c' if r.converged else '') for r in runs)}"
              f" | {statistics.mean(r.ask_ms for r in runs):.0f} | {1e3 * statistics.mean(r.asks[-1] for r in runs):.0f}"
              f" | {statistics.mean(r.search_ms for r in runs):.0f}"
              f" | {row['other']:.2f} |", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seeds", type=int, default=5, help="seeds 0..N-1 per optimizer (default 5)")
    ap.add_argument("--quick", action="store_true", help="smoke test: 2 seeds, 6 pairwise / 9 simplex trials")
    ap.add_argument("--pairwise-trials", type=int, default=12)
    ap.add_argument("--simplex-trials", type=int, default=30)
    ap.add_argument("--dense", type=int, default=41, help="points of the pairwise reference grid")
    ap.add_argument("--wait-quiet", type=float, default=0.0, help="wait up to this many seconds for an idle CPU")
    ap.add_argument("--tolerance", type=float, default=1e-3,
                    help="pairwise: relative distance to the dense-grid best that counts as reached (0.001 = 0.1%%)")
    ap.add_argument("--near", type=float, default=None,
                    help="the search's repeat tolerance (lightning_merge.search.NEAR, unit coordinates) and the one "
                         "the near-duplicate columns count with (default: the package's, else 1e-3)")
    ap.add_argument("--pairwise-only", action="store_true", help="skip the baselines and the simplex part")
    ap.add_argument("--simplex-only", default=None,
                    help="only these simplex optimizers (comma-separated names, e.g. paper,grid), constrained only; "
                         "skips the pairwise part and the comparison of parameterizations")
    args = ap.parse_args()
    global REL, DUP_TOL
    REL = args.tolerance
    import lightning_merge.search as search_mod

    if args.near is not None:
        search_mod.NEAR = args.near  # an older package without the attribute ignores it (it never deduplicates)
    DUP_TOL = getattr(search_mod, "NEAR", DUP_TOL) if args.near is None else args.near
    if args.quick:
        args.seeds, args.pairwise_trials, args.simplex_trials, args.dense = min(args.seeds, 2), 6, 9, 11
    logging.basicConfig(level=logging.WARNING)
    if args.wait_quiet:
        wait_quiet(args.wait_quiet)
    seeds = list(range(args.seeds))
    total = Load()

    obj = Objective()
    import lightning_merge

    say(f"package {lightning_merge.__file__}; sources {', '.join(obj.names)}; search blocks "
        f"{tuple(obj.blocks.shape)}; torch threads 1")

    if args.simplex_only:
        base = baselines(obj)
        best_name, _, best_base = min(base, key=lambda x: x[2])
        print(f"best baseline: {best_name} {best_base:.5f}", flush=True)
        print_simplex(simplex(obj, seeds, args.simplex_trials, set(args.simplex_only.split(",")),
                              ("constrained",)), best_base)
        return
    pw = pairwise(obj, seeds, args.pairwise_trials, args.dense)
    if args.pairwise_only:
        print_pairwise(pw, seeds)
        return

    base = baselines(obj)
    best_name, _, best_base = min(base, key=lambda x: x[2])
    say("baselines (K=4) on the search objective:")
    for n, w, v in base:
        print(f"    {n:28s} {v:.5f}   weights {[round(x, 3) for x in w]}", flush=True)
    print(f"  best baseline: {best_name} {best_base:.5f}", flush=True)

    sx = simplex(obj, seeds, args.simplex_trials)

    other = total.other()
    print(f"\n== search efficiency, default experiment (tiny), sources {', '.join(obj.names)}, "
          f"{len(seeds)} seeds; {obj.evals} distinct evaluations ({obj.seconds / max(obj.evals, 1):.2f} s each), "
          f"{time.monotonic() - T0:.0f} s in all; other processes kept {other:.2f} CPUs busy on average ==")
    print_pairwise(pw, seeds)
    print("\nbaselines: " + ", ".join(f"{n} {v:.5f}" for n, _, v in base) + f"; best {best_name}")
    print_simplex(sx, best_base)
    if obj.negative:
        print(f"\n{len(obj.negative)} distinct proposals had a weight below 0 (min_weight=0), e.g. "
              f"{list(obj.negative[0])}; the smallest weight seen: {min(min(k) for k in obj.negative):.3g}")

    # the goals, said plainly
    print("\n### goals\n")
    for label, ns, *_ in pw["rows"]:
        if label.startswith(("paper", "ax")):
            ok = sum(n is not None and n <= 6 for n in ns)
            print(f"- pairwise {label}: within 6 evaluations on {ok}/{len(ns)} seeds "
                  f"({'met' if ok == len(ns) else 'not met on every seed'})")
    at = max((m for m in sx[0]["marks"] if m <= 20), default=sx[0]["marks"][0])
    for row in sx:
        if row["label"].startswith(("paper", "ax")):
            ok = sum(r.best_after(at) < best_base for r in row["runs"])
            print(f"- simplex {row['label']} {row['par']}: beats the best baseline within {at} evaluations on "
                  f"{ok}/{len(row['runs'])} seeds")
    for label in ("paper (gp_hedge)", "ax", "random"):
        c = next(r for r in sx if r["label"] == label and r["par"] == "constrained")
        n = next(r for r in sx if r["label"] == label and r["par"] == "normalized")
        diffs = ", ".join(f"@{m} {statistics.mean(x.best_after(m) for x in n['runs']) - statistics.mean(x.best_after(m) for x in c['runs']):+.5f}"
                          for m in c["marks"])
        print(f"- {label}: normalized - constrained mean best: {diffs} (negative: normalized better); ask ms/trial "
              f"constrained {statistics.mean(x.ask_ms for x in c['runs']):.0f}, normalized "
              f"{statistics.mean(x.ask_ms for x in n['runs']):.0f}")


if __name__ == "__main__":
    main()
