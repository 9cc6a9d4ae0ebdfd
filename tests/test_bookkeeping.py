"""Per-trial bookkeeping that does not grow with the search: batched Ax records, a snapshot and a report
on a time budget, a GP whose hyperparameter fit and acquisitions cost the same at 200 points as at 32.

Real Ax, real BoTorch and a real trial loop (one process); the objective is a known function.
"""

from __future__ import annotations

import json
import os
import time
from types import SimpleNamespace

import pytest
import torch

from lightning_merge.bo import FIT_POINTS, GPProposer, fit_subset, map_hyperparameters
from lightning_merge.config import ConfigError, ReportConf, SearchConf
from lightning_merge.ledger import OBJECTIVE, Ledger
from lightning_merge.report import LiveReport
from lightning_merge.search import AxSearch
from lightning_merge.spaces import PairwiseSpace, SimplexSpace


def bowl(weights):
    return 3.6 + sum((w - x) ** 2 for w, x in zip(weights, [0.2, 0.3, 0.1, 0.4][-len(weights):]))


def _snapshot_status(path):
    from ax import Client

    df = Client.load_from_json_file(str(path)).summarize()
    values = {int(i): float(v) for i, v, s in zip(df["trial_index"], df[OBJECTIVE], df["trial_status"])
              if s == "COMPLETED"}
    return {int(i): str(s) for i, s in zip(df["trial_index"], df["trial_status"])}, values


def _run(conf, space, path, n, fail_at=(), batched=True):
    """Ask, tell (or fail) and save ``n`` trials as the loop does; return the losses told."""
    s = AxSearch(conf, space)
    s._batched = batched  # False: every record through Client.complete_trial etc. at once, as ax and random do
    told = {}
    for _ in range(n):
        p = s.ask()
        if p.index in fail_at:
            s.fail(p.index, "boom")
        else:
            told[p.index] = bowl(p.weights)
            s.tell(p.index, told[p.index])
        s.save(path)
        s.kick()
    return s, told


@pytest.mark.parametrize("name", ["paper", "grid"])
def test_batched_ax_records_equal_the_per_trial_ones(tmp_path, name):
    """paper and grid queue their Ax records and apply them in one batch: Ax ends with the same experiment."""
    space = PairwiseSpace(0.3)
    lazy, told = _run(SearchConf(name=name, trials=9, acquisition="ei", snapshot_every_s=1e9), space,
                      tmp_path / "lazy.json", 9, fail_at=(4,))
    one_by_one = []
    real = lazy.client.complete_trial
    lazy.client.complete_trial = lambda *a, **k: one_by_one.append(a) or real(*a, **k)
    lazy.close()
    assert one_by_one == []  # trials 1-8 went in as one batch at the end (trial 0 with the first snapshot)
    eager, told2 = _run(SearchConf(name=name, trials=9, acquisition="ei", snapshot_every_s=1e9), space,
                        tmp_path / "eager.json", 9, fail_at=(4,), batched=False)
    eager.close()
    assert told == told2
    status, values = _snapshot_status(tmp_path / "lazy.json")
    assert (status, values) == _snapshot_status(tmp_path / "eager.json")
    assert status == {i: "FAILED" if i == 4 else "COMPLETED" for i in range(9)}
    assert values == pytest.approx(told, abs=0, rel=1e-15)  # Ax's JSON keeps 16 digits


def test_the_snapshot_is_written_on_a_time_budget_and_always_on_flush(tmp_path):
    path = tmp_path / "ax_snapshot.json"
    s, told = _run(SearchConf(name="paper", trials=6, acquisition="ei", snapshot_every_s=1e9), PairwiseSpace(0.3),
                   path, 1)
    s._book.wait()
    assert _snapshot_status(path)[0] == {0: "COMPLETED"}  # the first save writes at once
    for _ in range(4):
        p = s.ask()
        s.tell(p.index, bowl(p.weights))
        s.save(path)
        s.kick()
    s._book.wait()
    assert _snapshot_status(path)[0] == {0: "COMPLETED"}  # not due yet: the ledger is the record
    s.flush()
    assert _snapshot_status(path)[0] == {i: "COMPLETED" for i in range(5)}
    s.conf.snapshot_every_s = 0.0  # due after every trial (at least 20x the last write's own time apart)
    s._save_cost = 0.0
    p = s.ask()
    s.tell(p.index, bowl(p.weights))
    s.save(path)
    s.kick()
    s._book.wait()
    assert _snapshot_status(path)[0] == {i: "COMPLETED" for i in range(6)}
    s.close()


def test_a_snapshot_many_trials_behind_the_ledger_is_completed_from_it_on_resume(tmp_path):
    """A crash between snapshots: the snapshot lags several trials; restore completes them from the ledger."""
    conf, space = SearchConf(name="paper", trials=10, acquisition="ei", snapshot_every_s=1e9), PairwiseSpace(0.3)
    path = tmp_path / "ax_snapshot.json"
    led = Ledger.open(tmp_path / "trials.jsonl")
    s = AxSearch(conf, space)
    for i in range(6):
        p = s.ask()
        led.write({"trial": p.index, "status": "running", "weights": p.weights, "params": p.params,
                   "origin": p.origin})
        if i == 5:
            break  # dies mid-trial
        v = bowl(p.weights)
        led.write({"trial": p.index, "status": "completed", "weights": p.weights, "params": p.params,
                   "origin": p.origin, OBJECTIVE: v})
        s.tell(p.index, v)
        s.save(path)
        s.kick()
    s._book.wait()  # a crash: no flush, so the snapshot holds trial 0 only
    assert _snapshot_status(path)[0] == {0: "COMPLETED"}
    r = AxSearch.restore(conf, space, "merge", Ledger.open(tmp_path / "trials.jsonl"), path)
    assert r.statuses() == {**{i: "COMPLETED" for i in range(5)}, 5: "FAILED"}
    again = r.ask()
    assert again.index == 6 and again.params == led.records[5]["params"]  # the trial that died, again
    r.tell(again.index, bowl(again.weights))
    r.save(path)
    r.close()
    status, values = _snapshot_status(path)
    assert status == {**{i: "COMPLETED" for i in range(5)}, 5: "FAILED", 6: "COMPLETED"}
    led = Ledger.open(tmp_path / "trials.jsonl")
    assert values == pytest.approx({i: led.records[i][OBJECTIVE] for i in range(5)} | {6: bowl(again.weights)})
    s.close()


def test_bookkeeping_options_are_checked():
    for key, bad in (("snapshot_every_s", -1.0), ("repeat_tol", 0.0), ("min_gain", -1e-9)):
        with pytest.raises(ConfigError, match=f"search.{key}"):
            SearchConf(**{key: bad})
    with pytest.raises(ConfigError, match="report.refresh_s"):
        ReportConf(refresh_s=-1)


def test_min_gain_zero_spends_the_budget_instead_of_converging():
    """The default ends a search whose acquisition has nothing worth evaluating; min_gain=0 does not."""
    def flat(w):
        return 3.0 + 1e-3 * (w[1] - 0.5) ** 2

    def trials(**kw):
        s = AxSearch(SearchConf(name="paper", trials=40, acquisition="ei", **kw), PairwiseSpace(0.3))
        n = 0
        while n < 40 and (p := s.ask()) is not None:
            s.tell(p.index, flat(p.weights))
            n += 1
        s.close()
        return n, s.converged

    n, why = trials()
    assert n < 40 and "expected improvement" in why
    assert trials(min_gain=0.0) == (40, None)


# --- the GP -------------------------------------------------------------------------------------
def test_fit_subset_keeps_the_best_half_and_spreads_the_rest():
    y = torch.tensor([float(i % 7) - 0.01 * i for i in range(100)], dtype=torch.float64)
    keep = fit_subset(y, 32)
    assert len(keep) == 32 and len(set(keep.tolist())) == 32 and keep.tolist() == sorted(keep.tolist())
    best = torch.argsort(-y, stable=True)[:16]
    assert set(best.tolist()) <= set(keep.tolist())
    assert fit_subset(y[:20], 32).tolist() == list(range(20))
    assert torch.equal(fit_subset(y, 32), keep)  # a function of the data alone


def _model(n, dim, seed=0):
    from botorch.models import SingleTaskGP

    g = torch.Generator().manual_seed(seed)
    X = torch.rand(n, dim, generator=g, dtype=torch.float64)
    y = ((X - 0.3) ** 2).sum(-1) + 0.01 * torch.rand(n, generator=g, dtype=torch.float64)
    return SingleTaskGP(X, -y.unsqueeze(-1))


def test_map_fit_is_unchanged_up_to_fit_points_and_bounded_beyond():
    small = _model(FIT_POINTS, 2)
    a = map_hyperparameters(small)
    ls = small.covar_module.lengthscale.clone()
    b = map_hyperparameters(small, max_points=None)
    assert a == b and torch.equal(ls, small.covar_module.lengthscale)
    big = _model(200, 1)
    map_hyperparameters(big)  # warm
    t = time.perf_counter()
    map_hyperparameters(big)
    capped = time.perf_counter() - t
    t = time.perf_counter()
    map_hyperparameters(big, max_points=None)
    full = time.perf_counter() - t
    assert capped < full / 4  # eigendecompositions of 32 points, not 200


@pytest.mark.parametrize("dim", [1, 3])
def test_the_shared_posterior_gives_botorchs_acquisition_values(dim):
    """One Cholesky for all candidates: LogEI, LogPI and UCB equal BoTorch's own classes."""
    from botorch.acquisition.analytic import (LogExpectedImprovement, LogProbabilityOfImprovement,
                                              UpperConfidenceBound)

    g = GPProposer(dim, "gp_hedge", seed=0, grid=301, sobol=512)
    if dim > 1:
        g.set_candidates(SimplexSpace(k=dim + 1).candidates(512, 0))
    model = _model(40, dim)
    map_hyperparameters(model)
    model.eval()
    post = g._mean_sigma(model)
    g.pi_xi, best_f = 0.05, float(post[0].max()) - 0.01  # the loss scale: the transform is undone
    theirs = {"ei": LogExpectedImprovement(model, best_f=best_f),
              "pi": LogProbabilityOfImprovement(model, best_f=best_f + g.pi_xi),
              "ucb": UpperConfidenceBound(model, beta=g.beta)}
    for name, acq in theirs.items():
        with torch.no_grad():
            ref = acq(g.candidates.unsqueeze(1))
        ours = g._acq_values(post, name, best_f)
        # Both compute sigma^2 = k(x, x) - k K^-1 k in float64; where it nearly cancels (LogEI's far tail,
        # thousands of nats down) their roundings differ in the 8th digit. The choice is the same.
        assert torch.allclose(ours, ref, rtol=1e-6, atol=1e-9), name
        assert int(ours.argmax()) == int(ref.argmax()), name


# --- the live report ----------------------------------------------------------------------------
def test_the_live_report_refreshes_on_a_time_budget_and_always_when_forced(tmp_path):
    cfg = SimpleNamespace(experiment="t", search=SearchConf(), data=SimpleNamespace(ood={}),
                          report=ReportConf(refresh_s=3600, plot_every_s=3600))
    led = Ledger.open(tmp_path / "trials.jsonl")
    rep = LiveReport(tmp_path, cfg, ["a", "b"], led)

    def trial(i):
        led.write({"trial": i, "status": "completed", "weights": [0.5, 0.5], "params": {"lam": 0.5},
                   "origin": "ei", OBJECTIVE: 3.0 + i, "seconds": 1.0})
        rep.update()

    trial(0)
    md = tmp_path / "report.md"
    assert "| 0 | ei |" in md.read_text()  # the first refresh is immediate
    trial(1)
    assert "| 1 | ei |" not in md.read_text()  # not due: the ledger has it, the report waits
    rep.update(force_plots=True)  # a preemption
    assert "| 1 | ei |" in md.read_text()
    trial(2)
    rep.finish({"candidates": [], "best": led.best(), "seconds": {}}, draw=False)
    assert "| 2 | ei |" in md.read_text()
    rep.cfg.report = ReportConf(refresh_s=0, plot_every_s=3600)
    time.sleep(20 * rep._write_cost + 0.01)  # refresh_s=0: after every trial, but within 5% of the time
    trial(3)
    assert "| 3 | ei |" in md.read_text()


def test_the_loop_records_each_trials_parts_for_the_benchmark(tmp_path, monkeypatch):
    """LIGHTNING_MERGE_TIMINGS: every search trial's seconds by part (benchmarks/trial_overhead.py)."""
    from lightning_merge.config import BaselinesConf, RunConfig
    from lightning_merge.loop import TIMINGS_ENV, SearchLoop

    from conftest import OneProcess

    conf = SearchConf(name="paper", acquisition="ei", trials=4)
    space = PairwiseSpace(conf.alpha)
    loop = SearchLoop(RunConfig(search=conf, baselines=BaselinesConf(enabled=False)), OneProcess(),
                      lambda w: (bowl(w), {"heldout_loss": bowl(w)}), None, tmp_path, space,
                      search=AxSearch(conf, space), ledger=Ledger.open(tmp_path / "trials.jsonl"))
    monkeypatch.setenv(TIMINGS_ENV, str(tmp_path / "timings.json"))
    loop.run()
    loop.search.close()
    rows = json.loads((tmp_path / "timings.json").read_text())
    assert [r["trial"] for r in rows] == [0, 1, 2, 3]
    for r in rows:
        parts = sum(r[k] for k in ("stop_s", "ask_s", "broadcast_s", "ledger_s", "merge_s", "ax_s", "eval_s",
                                   "tell_s", "bar_s", "report_s"))
        assert 0 < parts <= r["wall_s"] + 1e-6
    assert os.path.exists(tmp_path / "ax_snapshot.json")


def test_the_repeat_mask_is_updated_incrementally_and_equals_a_full_scan():
    from lightning_merge.bo import near

    g = GPProposer(3, "ei", seed=0, sobol=512)
    pts = torch.rand(40, 3, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    for n in (0, 1, 5, 6, 20, 40):
        ev = pts[:n] if n else None
        assert torch.equal(g._taken(ev, 0.05), near(g.candidates, ev, 0.05)), n
    other = pts[10:30]  # not an extension of what it saw: a full scan again
    assert torch.equal(g._taken(other, 0.05), near(g.candidates, other, 0.05))
    assert torch.equal(g._taken(other, 0.2), near(g.candidates, other, 0.2))  # another tolerance


def test_beyond_fit_points_the_polish_runs_on_the_subset_and_the_model_keeps_every_point():
    from botorch.models import SingleTaskGP
    from gpytorch.mlls import ExactMarginalLogLikelihood

    g = GPProposer(2, "ei", seed=0, sobol=256)
    m0 = _model(80, 2)
    X, y = m0.train_inputs[0], -m0.outcome_transform.untransform(m0.train_targets.unsqueeze(-1))[0].squeeze(-1)
    model = g._fit(X, y)
    assert model.train_inputs[0].shape[0] == 80  # conditioned on every point
    keep = fit_subset(model.train_targets)
    sub = SingleTaskGP(X[keep], model.train_targets[keep].unsqueeze(-1), outcome_transform=None)
    for part in ("covar_module", "likelihood", "mean_module"):
        getattr(sub, part).load_state_dict(getattr(model, part).state_dict())
    coarse = SingleTaskGP(X[keep], model.train_targets[keep].unsqueeze(-1), outcome_transform=None)
    coarse.train_targets = sub.train_targets
    map_hyperparameters(coarse)

    def mll(m):
        m.train()
        with torch.no_grad():
            return float(ExactMarginalLogLikelihood(m.likelihood, m)(m(*m.train_inputs), m.train_targets))

    assert mll(sub) >= mll(coarse) - 1e-9  # the polish improved on the global search, on the subset
