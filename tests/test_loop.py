"""The trial loop's decisions on one process: stopping rules, failed trials, reuse, baselines as trials.

The evaluator is a stand-in (one process: broadcast is the identity) and the
objective a known function, so every decision can be checked exactly; the
search and the ledger are the real ones, with real Ax.
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest

from lightning_merge.config import BaselinesConf, RunConfig, SearchConf
from lightning_merge.ledger import Ledger
from lightning_merge.loop import SearchLoop
from lightning_merge.search import AxSearch
from lightning_merge.spaces import PairwiseSpace

from conftest import OneProcess


def make_loop(tmp_path, objective, search=None, baselines=None, **search_kw):
    conf = SearchConf(**{"name": "paper", "acquisition": "ei", "trials": 6, **search_kw})
    cfg = RunConfig(search=conf, baselines=baselines or BaselinesConf())
    space = PairwiseSpace(conf.alpha)
    calls = []

    def obj(w):
        calls.append(tuple(w))
        v = objective(w)
        return v, {"heldout_loss": v}

    def full_eval(w):
        return {"heldout_loss": objective(w), "ood_loss": {}}

    loop = SearchLoop(cfg, OneProcess(), obj, full_eval, tmp_path, space,
                      search=search or AxSearch(conf, space), ledger=Ledger.open(tmp_path / "trials.jsonl"))
    return loop, calls


def bowl(w):
    return 3.6 + (w[1] - 0.58) ** 2


def test_budget_counts_search_trials_and_identical_points_are_not_evaluated_twice(tmp_path):
    loop, calls = make_loop(tmp_path, bowl)
    cands = loop.baselines(["a", "b"])
    assert [c["name"] for c in cands] == ["a", "b", "uniform = LAWA (last 2)", "EMA (a=0.2)", "WMA (linear)",
                                         "greedy soup"]
    assert loop.run() == "trial budget reached (6)"
    recs = loop.ledger.completed()
    assert len(loop.ledger.search_trials()) == 6
    assert len(calls) == len(set(calls))  # every distinct weight vector evaluated once
    lam1 = [r for r in recs if r["weights"] == [0.0, 1.0]]
    assert len(lam1) == 2 and lam1[1]["reused"]  # the paper's lam=1 reused the baseline's value
    loop.search.close()


def test_a_non_finite_loss_fails_the_trial_and_never_reaches_ax(tmp_path):
    def nan_at_alpha(w):
        return math.nan if abs(w[1] - 0.3) < 1e-9 else bowl(w)

    loop, _ = make_loop(tmp_path, nan_at_alpha, baselines=BaselinesConf(enabled=False), trials=4)
    loop.run()
    failed = [r for r in loop.ledger.ordered() if r["status"] == "failed"]
    assert len(failed) == 1 and "non-finite" in failed[0]["reason"]
    st = loop.search.statuses()
    assert st[failed[0]["trial"]] == "FAILED"
    assert len(loop.ledger.search_trials()) == 4  # the budget is still met with finite trials
    loop.search.close()


def test_repeated_failures_stop_the_search(tmp_path):
    loop, _ = make_loop(tmp_path, lambda w: math.inf, baselines=BaselinesConf(enabled=False), max_failures=2)
    assert "2 trials failed in a row" in loop.run()
    loop.search.close()


def test_plateau_and_wall_time_rules(tmp_path):
    flat = make_loop(tmp_path / "a", lambda w: 3.6, baselines=BaselinesConf(enabled=False), trials=20,
                     plateau_trials=3, plateau_tol=1e-6)[0]
    assert flat.run().startswith("plateau")
    assert len(flat.ledger.search_trials()) == 5  # the 2 initial points, then 3 without improvement
    flat.search.close()
    timed = make_loop(tmp_path / "b", bowl, baselines=BaselinesConf(enabled=False), trials=20,
                      max_seconds=1e-9)[0]
    assert timed.run().startswith("wall-time budget")
    assert timed.ledger.search_trials() == []
    timed.search.close()


def test_a_preemption_flag_stops_at_the_next_boundary(tmp_path):
    loop, _ = make_loop(tmp_path, bowl, baselines=BaselinesConf(enabled=False))
    loop.preempt = SimpleNamespace(requested=False, signal_name=None)
    done = []

    def on_trial():
        done.append(1)
        if len(done) == 2:
            loop.preempt.requested, loop.preempt.signal_name = True, "SIGUSR2"

    loop.on_trial = on_trial
    assert loop.run() == "preempted (SIGUSR2)"
    assert len(loop.ledger.completed()) == 2  # the trial in flight finished; no new one started
    loop.search.close()


def test_baselines_outside_the_space_are_candidates_not_trials(tmp_path):
    loop, _ = make_loop(tmp_path, bowl, alpha=0.55)
    cands = loop.baselines(["a", "b"])
    lams = sorted(round(r["params"]["lam"], 6) for r in loop.ledger.completed())
    assert lams == [round(2 / 3, 6), 1.0]  # uniform (0.5) and EMA (0.2) lie below alpha=0.55
    assert {c["name"] for c in cands} >= {"uniform = LAWA (last 2)", "EMA (a=0.2)"}
    assert next(c for c in cands if c["name"].startswith("EMA"))["heldout_loss"] == pytest.approx(bowl([0.8, 0.2]))
    loop.search.close()


def test_a_preemption_during_the_baselines_stops_before_the_next_one(tmp_path):
    loop, calls = make_loop(tmp_path, bowl)
    loop.preempt = SimpleNamespace(requested=False, signal_name=None)

    def on_trial():
        loop.preempt.requested, loop.preempt.signal_name = True, "SIGTERM"

    loop.on_trial = on_trial  # the signal arrives during the first baseline trial ("b": "a" is off the space)
    cands = loop.baselines(["a", "b"])
    assert [c["name"] for c in cands] == ["a", "b"]  # the baseline in flight finished; no other started
    assert loop.run() == "preempted (SIGTERM)"
    assert len(loop.ledger.completed()) == 1
    loop.search.close()
