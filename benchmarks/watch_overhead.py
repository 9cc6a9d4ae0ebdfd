"""What a watch round spends outside evaluation, measured in one run of the service.

The embedded demo's trajectory (experiment ``tiny``, cached after the first build) is fed to
``python -m lightning_merge mode=watch`` one checkpoint at a time, as a training job would save
them: the next lands once the round of the previous one has ended, so every round is a round with
no new data to tokenize (the held-out blocks are tokenized once, when the service starts). For
each round it prints the round's wall time (its critical path: open, bind, Ax set-up, asks,
merges, evaluations, report.md, the merged model, the publish), the time spent in evaluation
(``Evaluator.eval_seconds``: forward passes and the all-reduce, merges left out), and their
ratio; then the parts of the rest, from the round's own results.json.

    python benchmarks/watch_overhead.py [--rounds 4] [--k 4] [--trials 6] [--wait-quiet 0]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _machine import busy_cpu_seconds, own_cpu_seconds, wait_quiet  # noqa: E402


def _rounds(out: Path) -> dict[str, dict]:
    recs = {}
    path = out / "rounds.jsonl"
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                r = json.loads(line)
            except json.JSONDecodeError:
                continue
            recs[r["round"]] = r
    return recs


def feed(paths: list[Path], watched: Path, out: Path, k: int, stop: threading.Event) -> None:
    watched.mkdir(parents=True, exist_ok=True)
    fed = 0

    def put() -> None:
        nonlocal fed
        tmp = watched / f".{paths[fed].name}.copying"
        shutil.copytree(paths[fed], tmp)
        os.replace(tmp, watched / paths[fed].name)
        fed += 1

    while fed < k:
        put()
    while not stop.is_set() and fed < len(paths):
        done = sum(r["status"] != "running" for r in _rounds(out).values())
        if done >= fed - k + 1:
            put()
        time.sleep(0.1)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--trials", type=int, default=6)
    ap.add_argument("--wait-quiet", type=float, default=0.0, help="wait up to this long for a quiet machine")
    args = ap.parse_args()

    from lightning_merge.config import DemoConf
    from lightning_merge.demo import build_trajectory

    traj = build_trajectory(DemoConf(enabled=True), os.environ.get("LIGHTNING_MERGE_CACHE", "~/.cache/lightning_merge"),
                            progress=False)
    paths = traj.checkpoints[: args.k - 1 + args.rounds]
    if args.wait_quiet:
        wait_quiet(args.wait_quiet)
    root = Path(tempfile.mkdtemp(prefix="watch_overhead."))
    out, watched = root / "watch", root / "ckpts"
    stop = threading.Event()
    feeder = threading.Thread(target=feed, args=(paths, watched, out, args.k, stop), daemon=True)
    feeder.start()
    ood = ["+data.ood={" + ",".join(f"{n}:{{path:'{p}'}}" for n, p in traj.ood.items()) + "}"]
    cmd = [sys.executable, "-m", "lightning_merge", "mode=watch", f"checkpoints.sources=[{watched}]",
           f"checkpoints.last={args.k}", "search.space=simplex", f"search.trials={args.trials}",
           f"data.heldout.path={traj.heldout}", *ood, "demo.enabled=false", "report.progress=false",
           f"watch.until_step={int(paths[-1].name.removeprefix('step'))}", "watch.poll_s=0.2",
           "watch.max_poll_s=0.5", f"output_dir={out}"]
    busy0, own0, t0 = busy_cpu_seconds(), own_cpu_seconds(), time.perf_counter()
    res = subprocess.run(cmd, env=dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1"),
                         capture_output=True, text=True)
    wall = time.perf_counter() - t0
    stop.set()
    if res.returncode != 0:
        print(res.stderr[-4000:])
        return 1
    other = max(0.0, (busy_cpu_seconds() - busy0) - (own_cpu_seconds() - own0)) / wall
    rounds = [r for r in _rounds(out).values() if r["status"] == "completed"]
    print(f"watch rounds over the newest {args.k} of the demo trajectory, {args.trials} search trials each "
          f"(other processes kept {other:.2f} CPUs busy)")
    print(f"{'round':<10} {'seconds':>8} {'eval s':>8} {'outside':>8}   parts outside evaluation (s)")
    for r in rounds:
        res_json = json.loads((out / "rounds" / r["round"] / "results.json").read_text())
        st, pt = res_json.get("seconds", {}), res_json.get("per_trial", {})
        n = pt.get("evaluated_trials", 0)
        parts = {"search setup": st.get("search setup", 0.0),
                 "asks": pt.get("ask_s", 0.0) * n, "merges": pt.get("merge_s", 0.0) * n,
                 "write merged": st.get("write merged model", 0.0)}
        print(f"{r['round']:<10} {r['seconds']:>8.1f} {r['eval_seconds']:>8.1f} "
              f"{100 * r['outside_eval_fraction']:>7.1f}%   " + ", ".join(f"{k} {v:.2f}" for k, v in parts.items()))
    later = [r["outside_eval_fraction"] for r in rounds[1:]]
    if later:
        print(f"outside evaluation, rounds after the first: mean {100 * sum(later) / len(later):.1f}%, "
              f"max {100 * max(later):.1f}% (the first round also pays the one-off imports of Ax/BoTorch: "
              f"{100 * rounds[0]['outside_eval_fraction']:.1f}%)")
    shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
