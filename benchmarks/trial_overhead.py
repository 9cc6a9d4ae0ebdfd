"""Per-trial cost of the search outside evaluation, and how it grows with the number of trials.

Runs ``python -m lightning_merge`` (the embedded default, trajectory cached
after the first run) once per configuration, each into a fresh folder, with
the product's own bookkeeping (the ``paper`` optimizer's ask, Ax's record
keeping and snapshot, the fsync'd ledger, the live report.md and plots) on its
real code path. The evaluation is made cheap (``--search-blocks`` held-out
blocks per trial, a small report set for the baselines), since it is left out
of the figure anyway, so that 200 trials are affordable.

``LIGHTNING_MERGE_TIMINGS`` (``loop.py``) has rank 0 write every search
trial's seconds by part. The figure is ``outside eval`` = the trial's wall
time (from the stop check before its ask to the end of its report refresh)
minus its evaluation: ask, broadcast, merge, Ax bookkeeping run in line, the
ledger lines, the snapshot call, the report, and anything else on rank 0's
critical path. Work on the background bookkeeping thread shows up where it
slows the critical path (the GIL), including the evaluation (column ``eval``).

For each configuration it prints the mean milliseconds of each part over the
windows of trials 1-10, 41-50 and 191-200 (``last``: the window's last trial
alone; ``max``: its slowest), and whether ``outside eval`` stays under the
goal (50 ms) at 200 trials. The end-of-run snapshot (written once, in
``search.flush``) is timed separately on the run's own final Ax experiment.

    flock /tmp/lm_bench.lock python benchmarks/trial_overhead.py --wait-quiet 300
    python benchmarks/trial_overhead.py --configs pairwise,simplex8 --trials 200
    python benchmarks/trial_overhead.py --configs ax-pairwise,ax-simplex8 --trials 50
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _machine import busy_cpu_seconds, own_cpu_seconds, wait_quiet  # noqa: E402

GOAL_MS = 50.0
CONFIGS = {
    "pairwise": [],  # the default: paper, the last two checkpoints
    "simplex8": ["checkpoints.last=8", "search.space=simplex"],
    "ax-pairwise": ["search.name=ax"],
    "ax-simplex8": ["search.name=ax", "checkpoints.last=8", "search.space=simplex"],
}
PARTS = ("stop_s", "ask_s", "broadcast_s", "ledger_s", "merge_s", "ax_s", "tell_s", "report_s")


def run_once(name: str, trials: int, blocks: int, root: Path, extra: list[str]) -> tuple[list[dict], dict]:
    out = root / name
    timings = root / f"{name}.timings.json"
    cmd = [sys.executable, "-m", "lightning_merge", *CONFIGS[name], f"search.trials={trials}",
           f"data.search_blocks={blocks}", "data.heldout.num_blocks=16", "report.progress=false",
           "merge.write=false", f"output_dir={out}", *extra]
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", LIGHTNING_MERGE_TIMINGS=str(timings))
    b0, o0, t0 = busy_cpu_seconds(), own_cpu_seconds(), time.monotonic()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.monotonic() - t0
    other = (busy_cpu_seconds() - b0 - (own_cpu_seconds() - o0)) / wall
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    results = json.loads((out / "results.json").read_text())
    info = {"wall": wall, "other": other, "stop": results.get("stop_reason", ""),
            "search_s": results.get("seconds", {}).get("search", float("nan")),
            "final_snapshot_s": final_snapshot_seconds(out / "ax_snapshot.json", root / f"{name}.resave.json")}
    return json.loads(timings.read_text()), info


def final_snapshot_seconds(snapshot: Path, dest: Path) -> float:
    """Seconds to write the run's own final Ax experiment once more (what ``search.flush`` pays at the end)."""
    from ax import Client

    from lightning_merge.search import _save_client

    client = Client.load_from_json_file(str(snapshot))
    t = time.perf_counter()
    _save_client(client, dest)
    return time.perf_counter() - t


def outside(t: dict) -> float:
    return t["wall_s"] - t["eval_s"]


def window(ts: list[dict], end: int, width: int) -> dict | None:
    """Mean of each part over search trials ``end - width + 1 .. end`` (1-based), plus the last and slowest."""
    if len(ts) < end:
        return None
    w = ts[end - width:end]
    m = {k: sum(t.get(k, 0.0) for t in w) / len(w) for k in (*PARTS, "eval_s", "wall_s")}
    m["outside"] = sum(outside(t) for t in w) / len(w)
    m["other"] = m["outside"] - sum(m[k] for k in PARTS)
    m["last"] = outside(w[-1])
    m["max"] = max(outside(t) for t in w)
    return m


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--configs", default="pairwise,simplex8", help=f"comma-separated, of {', '.join(CONFIGS)}")
    ap.add_argument("--trials", type=int, default=200)
    ap.add_argument("--windows", default="10,50,200", help="the last trial of each window")
    ap.add_argument("--width", type=int, default=10, help="trials per window")
    ap.add_argument("--search-blocks", type=int, default=1, help="held-out blocks per evaluation (cheap)")
    ap.add_argument("--wait-quiet", type=float, default=0.0, help="wait up to this many seconds for an idle CPU")
    ap.add_argument("--label", default="", help="printed in the title (e.g. before / after)")
    ap.add_argument("overrides", nargs="*", help="extra Hydra overrides for every run")
    args = ap.parse_args()
    ends = [int(x) for x in args.windows.split(",") if int(x) <= args.trials]
    names = [c for c in args.configs.split(",") if c]
    for n in names:
        if n not in CONFIGS:
            raise SystemExit(f"--configs: unknown {n!r}; use {', '.join(CONFIGS)}")
    if args.wait_quiet:
        wait_quiet(args.wait_quiet)
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        for n in names:
            rows[n] = run_once(n, args.trials, args.search_blocks, Path(tmp), args.overrides)

    heads = ["stop", "ask", "bcast", "ledger", "merge", "ax", "tell+snap", "report", "other"]
    print(f"\nms per search trial outside evaluation{' (' + args.label + ')' if args.label else ''}: mean over "
          f"trials N-{args.width - 1}..N, {args.search_blocks} search block(s) per evaluation, "
          f"search.background_bookkeeping default (on)\n")
    print(f"| config | N | " + " | ".join(heads) + " | **outside eval** | last | max | eval |")
    print("|---|---:|" + "---:|" * (len(heads) + 4))
    verdicts = []
    for n, (ts, info) in rows.items():
        for end in ends:
            m = window(ts, end, args.width)
            if m is None:
                print(f"| {n} | {end} | " + " | ".join("" for _ in heads) + f" | n/a: {len(ts)} trials ran | | | |")
                continue
            cells = [m[k] for k in PARTS] + [m["other"]]
            print(f"| {n} | {end} | " + " | ".join(f"{1e3 * v:.1f}" for v in cells)
                  + f" | **{1e3 * m['outside']:.1f}** | {1e3 * m['last']:.1f} | {1e3 * m['max']:.1f} "
                  f"| {1e3 * m['eval_s']:.1f} |")
        final = window(ts, args.trials, args.width) if args.trials in ends else None
        if final is not None:
            verdicts.append(f"{n}: {1e3 * final['outside']:.1f} ms at trials {args.trials - args.width + 1}-"
                            f"{args.trials} -> goal (<= {GOAL_MS:.0f} ms) "
                            f"{'HOLDS' if 1e3 * final['outside'] <= GOAL_MS else 'MISSED'}")
    print()
    for n, (ts, info) in rows.items():
        print(f"{n}: {len(ts)} search trials in {info['search_s']:.1f} s of search ({info['wall']:.0f} s in all); "
              f"end-of-run snapshot {1e3 * info['final_snapshot_s']:.0f} ms once; other processes kept "
              f"{info['other']:.2f} CPUs busy; stop: {info['stop']}")
    for v in verdicts:
        print(v)


if __name__ == "__main__":
    main()
