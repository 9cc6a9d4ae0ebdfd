"""The ``paper`` optimizer's acquisitions on the K=4 simplex: does the search beat the best baseline in 20?

A companion to ``search_efficiency.py`` (same memoized in-process objective: the held-out loss on the 64
search blocks of a merge of the 4 newest demo checkpoints, real evaluations). For each acquisition and
seed it runs 20 trials of ``search.name=paper search.space=simplex`` (constrained), without baselines as
trials, and prints the best loss after 10 and 20 evaluations and the first evaluation that beats WMA,
the best baseline there.

    python benchmarks/simplex_acquisitions.py [--seeds 5] [--trials 20]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from search_efficiency import Objective  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--trials", type=int, default=20)
    ap.add_argument("--acquisitions", default="ei,ucb,gp_hedge")
    args = ap.parse_args()

    from lightning_merge.config import SearchConf
    from lightning_merge.search import AxSearch
    from lightning_merge.spaces import SimplexSpace

    f = Objective()
    wma = f([0.1, 0.2, 0.3, 0.4])
    print(f"best baseline (WMA) {wma:.5f}", flush=True)
    half = max(1, args.trials // 2)
    summary = []
    for acq in args.acquisitions.split(","):
        rows = []
        for seed in range(args.seeds):
            s = AxSearch(SearchConf(name="paper", space="simplex", acquisition=acq, seed=seed, trials=args.trials),
                         SimplexSpace(k=len(f.series)))
            best, t0 = [], time.perf_counter()
            for _ in range(args.trials):
                p = s.ask()
                if p is None:  # converged: every candidate left is within reach of an evaluated point
                    break
                v = f(p.weights)
                s.tell(p.index, v)
                best.append(min(v, best[-1]) if best else v)
            s.close()
            best += best[-1:] * (args.trials - len(best))  # a converged search keeps its best
            beat = next((i + 1 for i, b in enumerate(best) if b < wma), None)
            rows.append((best[half - 1], best[-1], beat))
            print(f"{acq} seed {seed}: @{half} {best[half - 1]:.5f} @{args.trials} {best[-1]:.5f} "
                  f"beats WMA at {beat or '>' + str(args.trials)} ({time.perf_counter() - t0:.0f} s)", flush=True)
        n = len(rows)
        summary.append(f"| paper ({acq}) | {sum(r[0] for r in rows) / n:.5f} | {sum(r[1] for r in rows) / n:.5f} | "
                       f"{sum(1 for r in rows if r[2])}/{n} | {' '.join(str(r[2] or '>' + str(args.trials)) for r in rows)} |")
    print(f"\n| acquisition | best @{half} | best @{args.trials} | beat WMA by {args.trials} | evaluations to beat |")
    print("|---|---|---|---|---|")
    print("\n".join(summary))


if __name__ == "__main__":
    main()
