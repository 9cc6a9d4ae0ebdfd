"""The search budget is spent on new points: no repeats, an honest record of each replacement, a converged stop.

The loop, the optimizers, Ax and the ledger are the real ones; the objective
is a known bowl (minimum at ``lam = 0.58``), on which the GP's EI proposed the
incumbent again and again (``0.5828`` three times, ``0.58245`` twice).
"""

from __future__ import annotations

import json

import pytest
import torch

from lightning_merge.bo import GPProposer, near
from lightning_merge.config import BaselinesConf, RunConfig, SearchConf
from lightning_merge.ledger import Ledger
from lightning_merge.loop import SearchLoop
from lightning_merge.search import NEAR, AxSearch
from lightning_merge.spaces import PairwiseSpace, SimplexSpace

from conftest import OneProcess

GP = ("ei", "pi", "ucb")


def bowl(w):
    return 3.6 + (w[-1] - 0.58) ** 2


def make_loop(out, trials=12, acquisition="ei", baselines=False, search=None, seed=0, objective=bowl):
    conf = SearchConf(name="paper", acquisition=acquisition, trials=trials, seed=seed)
    cfg = RunConfig(search=conf, baselines=BaselinesConf(enabled=baselines))
    space = PairwiseSpace(conf.alpha)

    def obj(w):
        v = objective(w)
        return v, {"heldout_loss": v}

    return SearchLoop(cfg, OneProcess(), obj, lambda w: {"heldout_loss": objective(w), "ood_loss": {}}, out, space,
                      search=search or AxSearch(conf, space), ledger=Ledger.open(out / "trials.jsonl"))


def repeats(recs, space):
    """GP trials within NEAR (every unit coordinate) of an earlier evaluated trial."""
    out = []
    for i, r in enumerate(recs):
        if r["origin"] in GP:
            u = space.to_unit(r["params"])
            out += [(r["trial"], q["trial"]) for q in recs[:i]
                    if max(abs(a - b) for a, b in zip(u, space.to_unit(q["params"]))) <= NEAR]
    return out


@pytest.mark.parametrize("acquisition", ["ei", "gp_hedge"])
def test_the_gp_spends_no_trial_on_a_repeat_and_records_each_replacement(tmp_path, acquisition):
    loop = make_loop(tmp_path, acquisition=acquisition, baselines=True)
    loop.baselines(["a", "b"])
    reason = loop.run()
    loop.search.close()
    recs = loop.ledger.completed()
    assert repeats(recs, loop.space) == []
    assert reason == "trial budget reached (12)" and len(loop.ledger.search_trials()) == 12
    replaced = [r for r in recs if "deduplicated_from" in r]
    assert replaced, "the GP proposed no repeat to replace"
    by_index = {r["trial"]: r for r in recs}
    for r in replaced:
        d = r["deduplicated_from"]
        assert r["origin"] in GP and not r["reused"]  # still the acquisition's trial, and a new evaluation
        near_unit = loop.space.to_unit(by_index[d["trial"]]["params"])
        assert abs(loop.space.to_unit(d["params"])[0] - near_unit[0]) <= NEAR < \
            abs(loop.space.to_unit(r["params"])[0] - near_unit[0])
        assert d["expected_improvement"] > 0
    # Every line of a replaced trial says so, and the ledger is one a resume accepts.
    lines = [json.loads(x) for x in (tmp_path / "trials.jsonl").read_text().splitlines()]
    assert all("deduplicated_from" in x for x in lines if x["trial"] == replaced[0]["trial"])
    assert Ledger.open(tmp_path / "trials.jsonl").records.keys() == loop.ledger.records.keys()


def test_a_search_with_nothing_left_worth_a_trial_stops_converged(tmp_path, caplog):
    loop = make_loop(tmp_path, trials=30)
    with caplog.at_level("INFO", logger="lightning_merge.loop"):
        reason = loop.run()
    loop.search.close()
    n = len(loop.ledger.search_trials())
    assert n < 30 and reason.startswith(f"converged after {n} of 30 search trials: the EI acquisition's best point "
                                        f"was already evaluated, and the best expected improvement elsewhere")
    assert "search stops: converged after" in caplog.text
    assert repeats(loop.ledger.completed(), loop.space) == []
    best = loop.ledger.best()
    assert abs(best["params"]["lam"] - 0.58) < 0.005


def test_near_and_a_candidate_set_used_up():
    cands = torch.tensor([[0.0], [0.25], [0.5], [0.75], [1.0]], dtype=torch.float64)
    seen = torch.tensor([[0.25 + 1e-3], [0.8]], dtype=torch.float64)
    assert near(cands, seen, 1e-3).tolist() == [False, True, False, False, False]  # the bound is within
    assert near(cands, seen, 0.05).tolist() == [False, True, False, True, False]
    assert near(cands, None, 0.05).tolist() == [False] * 5
    gp = GPProposer(1, "ei")
    gp.set_candidates(cands)
    X = cands[[0, 2, 4]]
    loss = 3.6 + (X.squeeze(-1) - 0.6) ** 2
    got = gp.propose(X, loss, step=0, evaluated=cands, tol=1e-3)
    assert got.point is None and got.converged.startswith("every one of the 5 candidate points lies within 0.001")
    free = gp.propose(X, loss, step=0, evaluated=X, tol=1e-3)
    assert free.point in ([0.25], [0.75]) and free.replaced is None


def test_a_resumed_search_makes_the_same_trials_as_an_uninterrupted_one(tmp_path):
    def points(led):
        return [(r["params"], r["origin"], (r.get("deduplicated_from") or {}).get("params"))
                for r in led.search_trials()]

    whole = make_loop(tmp_path / "whole", acquisition="gp_hedge")
    whole.run()
    whole.search.close()
    assert any("deduplicated_from" in r for r in whole.ledger.search_trials())

    def resume_to_12(out, first):
        """Close ``first``, restore its search from disk with a budget of 12, run that to the end."""
        first.search.flush()
        first.search.close()
        led = Ledger.open(out / "trials.jsonl")
        s = AxSearch.restore(SearchConf(**{**vars(first.cfg.search), "trials": 12}), first.space, "merge", led,
                             out / "ax_snapshot.json")
        again = make_loop(out, acquisition="gp_hedge", search=s)
        again.run()
        again.search.close()
        return again

    # Stopped at a trial boundary after 7, resumed to 12.
    first = make_loop(tmp_path / "resumed", trials=7, acquisition="gp_hedge")
    first.run()
    assert points(resume_to_12(tmp_path / "resumed", first).ledger) == points(whole.ledger)

    # Killed mid-trial after 8 (its running line written, never finished), resumed to 12: the trial is re-run
    # with what its proposal recorded, and the rest follows as before.
    first = make_loop(tmp_path / "killed", trials=8, acquisition="gp_hedge")
    first.run()
    prop = first.search.ask()
    first.ledger.write({"trial": prop.index, "status": "running", "weights": prop.weights, "params": prop.params,
                        "origin": prop.origin, "state": prop.state,
                        **({"deduplicated_from": prop.deduplicated_from} if prop.deduplicated_from else {})})
    assert points(resume_to_12(tmp_path / "killed", first).ledger) == points(whole.ledger)


def test_an_ax_proposal_that_repeats_a_trial_ends_the_search_and_is_abandoned_in_ax(tmp_path):
    space = PairwiseSpace(0.3)
    s = AxSearch(SearchConf(name="ax", trials=6), space)
    p = s.ask()
    s.tell(p.index, bowl(p.weights))
    real = s.client.get_next_trials

    def repeat(max_trials):  # Ax's generator, landing 1e-4 from trial 0 (as its GP does near an incumbent)
        params = {"lam": p.params["lam"] + 1e-4}
        return {s.client.attach_trial(params): params}

    s.client.get_next_trials = repeat
    assert s.ask() is None
    assert s.converged.startswith("Ax proposed {'lam': 0.6501") and "of trial 0 already evaluated" in s.converged
    s.client.get_next_trials = real
    assert s.statuses() == {0: "COMPLETED", 1: "ABANDONED"}
    s.close()


@pytest.mark.parametrize("name,space", [("grid", PairwiseSpace(0.3)), ("random", PairwiseSpace(0.3)),
                                        ("paper", SimplexSpace(k=3)), ("grid", SimplexSpace(k=3))])
def test_other_optimizers_and_the_simplex_hold_no_repeats(name, space):
    """20 trials: the simplex GP repeated 5 of them before (grid and random never did)."""
    s = AxSearch(SearchConf(name=name, space=space.name, trials=20), space)
    seen = []
    for _ in range(20):
        p = s.ask()
        if p is None:
            break
        u = space.to_unit(p.params)
        assert all(max(abs(a - b) for a, b in zip(u, q)) > NEAR for q in seen), (name, p)
        seen.append(u)
        s.tell(p.index, 3.6 + sum((w - x) ** 2 for w, x in zip(p.weights, [0.2, 0.3, 0.5][-len(p.weights):])))
    s.close()
    assert len(seen) >= 12


@pytest.mark.slow
def test_a_converged_run_says_so_in_the_log_and_results(tiny_run, tmp_path):
    """The CLI on three tiny checkpoints (the newest is best, at lam=1): it stops converged, well inside 20 trials."""
    import os
    import subprocess
    import sys

    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "lightning_merge", f"checkpoints.sources=[{tiny_run['ckdir']}]", "checkpoints.last=3",
           f"data.heldout.path={tiny_run['heldout']}", "data.heldout.block_size=32", "data.heldout.num_blocks=16",
           "data.search_blocks=8", "data.batch_size=4", "demo.enabled=false", "search.trials=20",
           "search.acquisition=ei", "report.progress=false", "merge.write=false", f"output_dir={out}"]
    proc = subprocess.run(cmd, env=dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1"), capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    n = results["trials"]
    assert n < 20 and results["stop_reason"].startswith(f"converged after {n} of 20 search trials")
    assert f"search stops: converged after {n} of 20" in proc.stderr + proc.stdout
    assert "Search stopped: converged" in (out / "report.md").read_text()
    recs = Ledger.open(out / "trials.jsonl").completed()
    assert repeats(recs, PairwiseSpace(0.3, k=3, pair=(1, 2))) == []
    assert any("deduplicated_from" in r for r in recs)
