"""The default run (``python -m lightning_merge``, warm) stage by stage, against an earlier commit, in one go.

What it measures. The embedded default (experiment ``tiny``: its trajectory
cached after the first run) is run with this checkout and with ``--base`` (a
commit, checked out once into a ``git worktree``), alternately, each into a
fresh output folder, with one torch thread (the default). For each run it
prints the stages' wall times (``results.json`` ``seconds``), the held-out blocks scored
(every ``Evaluator.evaluate`` call, counted by a wrapper around it), and the
candidates' report losses, which must be the same for both. The ratio column
is this checkout's median over the base's, per stage.

Goal (issue 15): the baselines phase reuses what is already computed: a
candidate's search-set sums come from its trial (the search blocks are a subset
of the report set), and a baseline equal to a checkpoint or another baseline is
scored once; every candidate is still scored on the full report set.

    python benchmarks/default_run.py                          # base: the commit before the reuse (~5 min)
    python benchmarks/default_run.py --base HEAD~3 --repeats 3 --wait-quiet 300
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _machine import busy_cpu_seconds, own_cpu_seconds, wait_quiet  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
STAGES = ("baselines", "search", "evaluate best", "total")

# Run in a child process with the checkout under test first on sys.path: counts the blocks each stage scores.
COUNTER = r'''
import json, sys, time
import lightning_merge, lightning_merge.evaluate as ev
blocks = {"n": 0, "calls": 0}
real = ev.Evaluator.evaluate
def counted(self, b):
    blocks["n"] += b.shape[0]; blocks["calls"] += 1
    return real(self, b)
ev.Evaluator.evaluate = counted
from lightning_merge.__main__ import cli
out = sys.argv[1]
sys.argv = ["lightning_merge", f"output_dir={out}", "report.progress=false", "merge.write=false"]
try:
    cli()
except SystemExit as e:
    if e.code not in (0, None):
        raise
print("COUNTS " + json.dumps({**blocks, "package": lightning_merge.__file__}))
'''


def run(src: Path, out: Path) -> dict:
    env = dict(os.environ, PYTHONPATH=str(src), HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    b0, o0, t0 = busy_cpu_seconds(), own_cpu_seconds(), time.monotonic()
    proc = subprocess.run([sys.executable, "-c", COUNTER, str(out)], env=env, capture_output=True, text=True,
                          cwd=src)
    wall = time.monotonic() - t0
    if proc.returncode != 0:
        raise SystemExit(f"the default run from {src} failed:\n{proc.stderr[-3000:]}")
    counts = json.loads(next(ln for ln in proc.stdout.splitlines() if ln.startswith("COUNTS "))[7:])
    if not counts["package"].startswith(str(src)):
        raise SystemExit(f"{src}: imported {counts['package']}, not the checkout under test")
    res = json.loads((out / "results.json").read_text())
    losses = {c["name"]: c["heldout_loss"] for c in res["candidates"]}
    other = (busy_cpu_seconds() - b0 - (own_cpu_seconds() - o0)) / wall
    return {"stages": res["seconds"], "blocks": counts["n"], "calls": counts["calls"], "losses": losses,
            "other": max(other, 0.0)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--base", default="70117a1", help="the commit to compare with (default: before the reuse)")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--wait-quiet", type=float, default=0.0, help="wait up to S seconds for an idle CPU per run")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="lm_default_run_") as tmp:
        tmp = Path(tmp)
        base = tmp / "base"
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", "-q", str(base), args.base], check=True)
        try:
            runs: dict[str, list[dict]] = {"base": [], "this": []}
            for i in range(args.repeats):
                for name, src in (("base", base), ("this", ROOT)):  # alternated: drift hits both alike
                    wait_quiet(args.wait_quiet)
                    runs[name].append(run(src, tmp / f"{name}{i}"))
                    r = runs[name][-1]
                    print(f"  {name} run {i + 1}: baselines {r['stages']['baselines']:.1f} s, total "
                          f"{r['stages']['total']:.1f} s, {r['blocks']} blocks in {r['calls']} evaluations, "
                          f"other procs {r['other']:.2f}", flush=True)
        finally:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(base)], check=False)
    med = {n: {s: statistics.median(r["stages"].get(s, float("nan")) for r in rs) for s in STAGES}
           for n, rs in runs.items()}
    print(f"\nwarm default run (experiment tiny), median of {args.repeats}; base = {args.base}\n")
    print("| stage | base s | this s | this / base |")
    print("|---|---|---|---|")
    for s in STAGES:
        print(f"| {s} | {med['base'][s]:.1f} | {med['this'][s]:.1f} | {med['this'][s] / med['base'][s]:.2f} |")
    b, t = runs["base"][0], runs["this"][0]
    print(f"| blocks scored (evaluations) | {b['blocks']} ({b['calls']}) | {t['blocks']} ({t['calls']}) | "
          f"{t['blocks'] / b['blocks']:.2f} |")
    worst = max(abs(t["losses"][n] - v) / v for n, v in b["losses"].items())
    print(f"\ncandidates' report losses, this vs base: max relative difference {worst:.1e} "
          f"({len(b['losses'])} candidates; the same blocks, batched differently)")
    print(f"other procs (CPUs busy with other work, mean per run): "
          f"{statistics.mean(r['other'] for rs in runs.values() for r in rs):.2f}")


if __name__ == "__main__":
    main()
