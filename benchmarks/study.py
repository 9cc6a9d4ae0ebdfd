"""The paper's claims, reproduced at small scale: one command, one document (``docs/study.md``).

    python benchmarks/study.py                # the full study: ~50 min of experiments on 2 cores, after
                                              # training what is not cached (~27 min per larger run)
    python benchmarks/study.py --quick        # the demo only, small grids: a smoke test of this code (minutes)
    python benchmarks/study.py --build large_wsd   # only build (train) one trajectory: run two side by side
    python benchmarks/study.py --document-only     # rewrite the document and plots from the saved results
    python benchmarks/study.py --redo '1_pilot_*'  # recompute some experiments (their rows), reuse the rest

It drives the tool itself: the trajectories are trained by the demo's trainer (``lightning_merge/demo.py``),
every loss comes from the tool's Evaluator through ``driver._session`` (``studylib/objective.py``), every
search is ``AxSearch`` driven as the driver's loop drives it. Evaluations are memoized on disk and each
experiment's results are saved when it ends (``<study dir>/results/*.json``), so a killed study resumes; the
document and its plots are written from those results only (``studylib/document.py``, ``figures.py``).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
T0 = time.monotonic()

# What each mode measures. The full study's grids are sized so that it ends in about an hour on 2 cores.
FULL = dict(
    trajectories=["tiny", "tiny_s1", "large", "large_wsd", "large_cosine"],
    search_blocks={"tiny": 64, "large_wsd": 32, "large_cosine": 32}, report_blocks=256,
    pilot_lams={"tiny": [k / 10 for k in range(1, 10)], "large": [0.25, 0.5, 0.75]},
    curve_points={"tiny": 41, "large": 21}, curve_pairs=3,
    eff_seeds=5, eff_trials=12, eff_dense={"tiny": 29, "large": 15},
    alphas=[0.0, 0.3, 0.5, 0.7], alpha_seeds=3, alpha_trials=10,
    sizes=[4, 16, 64, 256], size_seeds=3, size_trials=10, size_grid={"tiny": 15, "large": 8},
    pair_trials=10, simplex_trials=20,
    acc_grid=11, acc_seeds=2, acc_trials=10, acc_limit=None,
)
QUICK = dict(
    trajectories=["tiny", "tiny_wsd_q", "tiny_cosine_q"],
    search_blocks={"tiny": 64, "tiny_wsd_q": 16, "tiny_cosine_q": 16}, report_blocks=64,
    pilot_lams={"tiny": [0.5, 0.75]}, curve_points={"tiny": 5}, curve_pairs=1,
    eff_seeds=1, eff_trials=4, eff_dense={"tiny": 5},
    alphas=[0.0, 0.5], alpha_seeds=1, alpha_trials=3,
    sizes=[4, 16], size_seeds=1, size_trials=3, size_grid={"tiny": 3},
    pair_trials=3, simplex_trials=4,
    acc_grid=3, acc_seeds=1, acc_trials=3, acc_limit=40,
)


def say(msg: str) -> None:
    print(f"[{time.monotonic() - T0:7.1f}s] {msg}", flush=True)


class Study:
    """The runs, their objectives (built on first use) and the saved results of each experiment."""

    def __init__(self, plan: dict, cache_dir: str, study_dir: Path, quick: bool) -> None:
        self.plan, self.cache_dir, self.dir, self.quick = plan, cache_dir, study_dir, quick
        self.objs: dict[tuple, object] = {}
        (study_dir / "results").mkdir(parents=True, exist_ok=True)

    def run(self, name: str):
        from studylib.trajectories import open_run

        return open_run(name, self.cache_dir, progress=True)

    def obj(self, base: str, accuracy: bool = False):
        from studylib.objective import Objective

        key = (base, accuracy)
        if key not in self.objs:
            size = self.plan["search_blocks"].get(base, self.plan["search_blocks"].get("large_wsd", 64))
            self.objs[key] = Objective(base, self.cache_dir, self.dir, size, accuracy=accuracy,
                                       limit=self.plan["acc_limit"] if accuracy else None,
                                       report_blocks=self.plan["report_blocks"])
        return self.objs[key]

    def size(self, name: str) -> str:
        """The key of the per-trajectory settings: ``tiny`` for the demo's, ``large`` for the larger model's."""
        return "tiny" if name.startswith("tiny") else "large"

    def result(self, exp: str, compute):
        """The saved result of ``exp``, or ``compute()`` saved atomically (temp, then rename)."""
        path = self.dir / "results" / f"{exp}.json"
        if path.is_file():
            say(f"{exp}: saved result reused")
            return json.loads(path.read_text())
        t0 = time.monotonic()
        value = compute()
        value = {"result": value, "seconds": time.monotonic() - t0}
        before = path.with_suffix(".redo")  # a --redo keeps the cold run's time: this one reused memoized evaluations
        if before.is_file():
            old = json.loads(before.read_text())
            value["cold_seconds"] = old.get("cold_seconds", old["seconds"])
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(value, indent=1))
        os.replace(tmp, path)
        before.unlink(missing_ok=True)
        say(f"{exp}: done in {value['seconds']:.0f} s")
        return value


def experiments(st: Study) -> None:
    """Run (or reuse) every experiment of the plan, in the issue's order."""
    from studylib import pilot, schedules, searching

    p = st.plan
    stable_runs = [t for t in p["trajectories"] if t in ("tiny", "tiny_s1", "large")]
    for t in stable_runs:
        run = st.run(t)
        obj, size = st.obj("large_wsd" if t == "large" else t), st.size(t)
        idx = list(range(len(run.checkpoints)))  # "large": the stable phase of large_wsd, its first checkpoints
        if st.quick:
            idx = idx[-4:]
        steps = {i: run.steps[i] for i in idx}
        st.result(f"1_pilot_{t}", lambda: pilot.pilot(obj, idx, [steps[i] for i in idx], p["pilot_lams"][size]))
        pairs = [(idx[-n - 1], idx[-n]) for n in range(p["curve_pairs"], 0, -1)]
        curves = st.result(f"2_curve_{t}", lambda: pilot.lam_curve(obj, pairs, steps, p["curve_points"][size]))
        last = (idx[-2], idx[-1])
        if t != "tiny_s1":
            seeds = list(range(p["eff_seeds"]))
            st.result(f"3_efficiency_{t}", lambda: searching.efficiency(obj, last, seeds, p["eff_trials"],
                                                                        p["eff_dense"][size]))
            curve = curves["result"][-1]
            st.result(f"4_alpha_{t}", lambda: searching.alpha_sweep(
                obj, last, p["alphas"], list(range(p["alpha_seeds"])), p["alpha_trials"], curve["best_loss"]))
            n = p["size_grid"][size]
            grid = [0.3 + 0.7 * k / (n - 1) for k in range(n)]
            st.result(f"5_heldout_{t}", lambda: searching.heldout_size(
                obj, last, p["sizes"], list(range(p["size_seeds"])), p["size_trials"], grid))
        # 6 and 8: every method on the last 4 checkpoints, then with one distant, earlier checkpoint
        last4 = idx[-4:]
        st.result(f"8_schedules_{t}", lambda: schedules.score(obj, last4, schedules.candidates(
            obj, last4, p["pair_trials"], p["simplex_trials"])))
        distant = [idx[len(idx) * 2 // 5], *idx[-3:]] if len(idx) > 4 else None  # ~40% into the run
        if distant and not st.quick:
            st.result(f"8_distant_{t}", lambda: schedules.score(obj, distant, schedules.candidates(
                obj, distant, p["pair_trials"], p["simplex_trials"])))

    wsd_name = "large_wsd" if "large_wsd" in p["trajectories"] else "tiny_wsd_q"
    cos_name = "large_cosine" if "large_cosine" in p["trajectories"] else "tiny_cosine_q"
    wsd, cos = st.run(wsd_name), st.run(cos_name)
    decay = [i for i, ph in enumerate(wsd.phase) if ph == "decay"]
    conf = wsd.conf
    st.result("7_annealing", lambda: schedules.annealing(
        st.obj(wsd_name), wsd.steps, wsd.stable, decay, st.obj(cos_name), cos.steps, p["pair_trials"],
        p["simplex_trials"], conf.batch_size * conf.seq_len,
        st.plan["search_blocks"][wsd_name] * 256))

    grid = [k2 / (p["acc_grid"] - 1) for k2 in range(p["acc_grid"])]
    for t in [t for t in ("tiny", "large") if t in p["trajectories"]]:  # the last adjacent (stable) pair
        k = len(st.run(t).checkpoints)
        st.result(f"9_objective_{t}", lambda: searching.accuracy_objective(
            st.obj("large_wsd" if t == "large" else t, accuracy=True), (k - 2, k - 1), grid,
            list(range(p["acc_seeds"])), p["acc_trials"]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="the demo only, small grids (a smoke test; minutes)")
    ap.add_argument("--out", default=None, help="where study.md and its plots go (default: docs/, or "
                    "outputs/study-quick/ with --quick)")
    ap.add_argument("--study-dir", default=None, help="evaluations and results (default: <cache>/study[-quick])")
    ap.add_argument("--cache-dir", default=os.environ.get("LIGHTNING_MERGE_CACHE", "~/.cache/lightning_merge"))
    from studylib.trajectories import CONFS

    ap.add_argument("--build", default=None, choices=sorted(CONFS), help="only build (train) this trajectory")
    ap.add_argument("--document-only", action="store_true", help="only rewrite the document from saved results")
    ap.add_argument("--redo", default=None, metavar="GLOB",
                    help="recompute the experiments whose saved results match GLOB (e.g. '1_pilot_*'), reuse the "
                         "rest; evaluations stay memoized (they are deterministic)")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("studylib").setLevel(logging.INFO)
    from studylib.trajectories import build

    if args.build:
        import torch

        torch.set_num_threads(1)
        t0 = time.monotonic()
        traj = build(args.build, args.cache_dir, progress=True)
        say(f"{args.build}: {traj.root} ({'cached' if traj.cached else f'built in {time.monotonic() - t0:.0f} s'})")
        return
    plan = QUICK if args.quick else FULL
    cache = Path(args.cache_dir).expanduser()
    study_dir = Path(args.study_dir) if args.study_dir else cache / ("study-quick" if args.quick else "study")
    out = Path(args.out) if args.out else (Path("outputs/study-quick") if args.quick else HERE.parent / "docs")
    st = Study(plan, args.cache_dir, study_dir, args.quick)
    if args.redo:
        old = sorted((study_dir / "results").glob(f"{args.redo}.json"))
        if not old:
            known = ", ".join(p.stem for p in sorted((study_dir / "results").glob("*.json"))) or "none yet"
            ap.error(f"--redo {args.redo!r} matches no saved result in {study_dir / 'results'} (saved: {known})")
        for path in old:
            say(f"--redo: {path.stem} will be recomputed")
            path.replace(path.with_suffix(".redo"))
    if not args.document_only:
        for name in plan["trajectories"]:
            st.run(name)  # train what is missing first, so the experiments' timings are evaluation only
        say("trajectories ready")
        experiments(st)
    from studylib.document import write_document

    md = write_document(study_dir / "results", out, plan, quick=args.quick, cache_dir=args.cache_dir)
    say(f"wrote {md} ({time.monotonic() - T0:.0f} s in all)")


if __name__ == "__main__":
    main()
