"""Per-trial overhead of the search on the default experiment, next to the evaluation it wraps.

Runs ``python -m lightning_merge`` (the embedded default, trajectory cached
after the first run) twice in one go, each into a fresh folder:

- ``in line``: Ax's record keeping and JSON snapshot run on the trial's critical
  path (``search.background_bookkeeping=false``), the baseline;
- ``background`` (the default): they run on a worker thread while the next
  evaluation runs.

For each it prints the mean seconds per evaluated search trial of every part
(ask = the GP proposal, broadcast, merge, Ax bookkeeping in line, report
refresh, evaluation) and two fractions of the in-line run's evaluation time,
which has nothing running beside it:

- ``ask+bcast+merge``: the issue's definition of per-trial overhead;
- ``everything``: all of it, including bookkeeping and report time, and the
  evaluation slowdown that the background thread causes (eval - in-line eval).

    python benchmarks/trial_overhead.py [--trials 10] [--repeats 2] [--wait-quiet 300]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _machine import busy_cpu_seconds, own_cpu_seconds, wait_quiet  # noqa: E402

PARTS = ("ask_s", "broadcast_s", "merge_s", "book_s", "report_s", "eval_s")


def run_once(background: bool, trials: int, root: Path) -> dict:
    out = root / ("bg" if background else "inline")
    cmd = [sys.executable, "-m", "lightning_merge", f"search.trials={trials}", "report.progress=false",
           f"search.background_bookkeeping={str(background).lower()}", "merge.write=false", f"output_dir={out}"]
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    return json.loads((out / "results.json").read_text())["per_trial"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--trials", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--wait-quiet", type=float, default=0.0, help="wait up to this many seconds for an idle CPU")
    args = ap.parse_args()
    if args.wait_quiet:
        wait_quiet(args.wait_quiet)
    import time

    b0, o0, t0 = busy_cpu_seconds(), own_cpu_seconds(), time.monotonic()
    rows = {"in line": [], "background": []}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.repeats):
            for name, bg in (("in line", False), ("background", True)):
                rows[name].append(run_once(bg, args.trials, Path(tmp) / str(r)))
    other = (busy_cpu_seconds() - b0 - (own_cpu_seconds() - o0)) / (time.monotonic() - t0)
    print(f"other processes kept {other:.2f} CPUs busy on average during the runs")
    mean = {n: {k: sum(x[k] for x in v) / len(v) for k in PARTS} for n, v in rows.items()}
    ref_eval = mean["in line"]["eval_s"]
    print(f"\nmean ms per evaluated search trial, default experiment, {args.trials} trials x {args.repeats} runs "
          f"({rows['in line'][0]['evaluated_trials']} evaluated per run; the rest reuse an identical point)")
    print(f"{'':12}" + "".join(f"{k[:-2]:>10}" for k in PARTS) + f"{'ask+bcast+merge':>18}{'everything':>12}")
    for n, m in mean.items():
        core = m["ask_s"] + m["broadcast_s"] + m["merge_s"]
        total = core + m["book_s"] + m["report_s"] + (m["eval_s"] - ref_eval)
        print(f"{n:12}" + "".join(f"{1e3 * m[k]:10.1f}" for k in PARTS)
              + f"{100 * core / ref_eval:17.1f}%{100 * total / ref_eval:11.1f}%")
    print(f"\nfractions are of the in-line evaluation ({1e3 * ref_eval:.0f} ms); ratio everything "
          f"background/in line: {(mean['background']['ask_s'] + mean['background']['merge_s'] + mean['background']['book_s'] + mean['background']['report_s'] + mean['background']['eval_s'] - ref_eval) / max(mean['in line']['ask_s'] + mean['in line']['merge_s'] + mean['in line']['book_s'] + mean['in line']['report_s'], 1e-9):.2f}")


if __name__ == "__main__":
    main()
