"""The optimizers, spaces, baselines and resume logic against synthetic objectives, with real Ax and BoTorch."""

from __future__ import annotations

import math
import warnings

import pytest
import torch

from lightning_merge.baselines import greedy_soup, schedules
from lightning_merge.bo import GPProposer, map_hyperparameters
from lightning_merge.config import ConfigError, SearchConf
from lightning_merge.ledger import OBJECTIVE, Ledger, archive_previous, check_fingerprint
from lightning_merge.search import DIED, AxSearch
from lightning_merge.spaces import PairwiseSpace, SimplexSpace, make_space


def bowl(weights):
    """A smooth loss with its minimum inside the space: 3.6 + distance to a fixed target merge."""
    target = [0.1, 0.2, 0.3, 0.4][-len(weights):] if len(weights) > 2 else [0.42, 0.58]
    t = sum(target)
    return 3.6 + sum((w - x / t) ** 2 for w, x in zip(weights, target))


def drive(search, n, f=bowl):
    out = []
    for _ in range(n):
        p = search.ask()
        v = f(p.weights)
        search.tell(p.index, v)
        out.append((p, v))
    search.flush()
    return out


def test_paper_starts_at_alpha_and_one_then_uses_the_acquisition():
    for acq in ("ei", "pi", "ucb", "gp_hedge"):
        s = AxSearch(SearchConf(name="paper", alpha=0.3, acquisition=acq, trials=6), PairwiseSpace(0.3))
        trials = drive(s, 6)
        assert [p.params["lam"] for p, _ in trials[:2]] == [0.3, 1.0]
        assert [p.origin for p, _ in trials[:2]] == ["init", "init"]
        later = {p.origin for p, _ in trials[2:]}
        assert later <= ({"ei", "pi", "ucb"} if acq == "gp_hedge" else {acq}), (acq, later)
        assert all(0.3 <= p.params["lam"] <= 1.0 for p, _ in trials)
        # Every trial is in the Ax experiment, completed, with the value we gave.
        assert s.statuses() == {i: "COMPLETED" for i in range(6)}
        s.close()


def test_paper_finds_the_interior_minimum():
    s = AxSearch(SearchConf(name="paper", alpha=0.3, acquisition="ei"), PairwiseSpace(0.3))
    trials = drive(s, 7)
    best = min(trials, key=lambda t: t[1])[0]
    assert abs(best.params["lam"] - 0.58) < 0.03


@pytest.mark.parametrize("name", ["paper", "ax", "random", "grid"])
def test_a_fixed_seed_proposes_the_same_trials(name):
    runs = []
    for _ in range(2):
        s = AxSearch(SearchConf(name=name, seed=3, trials=6), PairwiseSpace(0.3))
        runs.append([round(p.params["lam"], 12) for p, _ in drive(s, 6)])
        s.close()
    assert runs[0] == runs[1]
    assert len(set(runs[0])) >= 5


def test_map_hyperparameters_match_or_beat_lbfgs():
    from botorch.fit import fit_gpytorch_mll
    from botorch.models import SingleTaskGP
    from gpytorch.mlls import ExactMarginalLogLikelihood

    def mll_value(m):
        m.train()
        mll = ExactMarginalLogLikelihood(m.likelihood, m)
        with torch.no_grad():
            return float(mll(m(*m.train_inputs), m.train_targets))

    g = torch.Generator().manual_seed(0)
    for n in (3, 6, 12):
        X = torch.rand(n, 1, generator=g, dtype=torch.float64)
        y = (X - 0.4) ** 2 * 0.1 + 0.002 * torch.randn(n, 1, generator=g, dtype=torch.float64)
        a, b = SingleTaskGP(X, -y), SingleTaskGP(X, -y)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            fit_gpytorch_mll(ExactMarginalLogLikelihood(a.likelihood, a))
        own = map_hyperparameters(b)
        assert mll_value(b) >= mll_value(a) - 1e-3, n
        assert own == pytest.approx(mll_value(b), abs=1e-6)


def test_gp_posterior_interpolates_a_quadratic():
    X = torch.linspace(0, 1, 6, dtype=torch.float64).unsqueeze(-1)
    loss = 3.6 + (X.squeeze(-1) - 0.4) ** 2
    gp = GPProposer(1, "ei")
    at_data, _ = gp.posterior(X, loss, X)
    # It follows what it saw, up to the noise it fitted (~1% of the range here; measured 0.0046 at most).
    assert at_data.tolist() == pytest.approx(loss.tolist(), abs=0.01)
    # Between the observations (spaced 0.2) it is off the truth by ~3% of the curve's range (0.36) at most.
    mean, std = gp.posterior(X, loss, torch.tensor([[0.5], [0.9]], dtype=torch.float64))
    assert mean.tolist() == pytest.approx([3.61, 3.85], abs=0.02)
    assert (std < 0.05).all()


def test_simplex_parameterizations_give_weights_on_the_simplex():
    for par, dim in (("constrained", 3), ("normalized", 4)):
        sp = SimplexSpace(k=4, parameterization=par)
        assert sp.dim == dim
        for x in sp.candidates(64, seed=0):
            w = sp.weights(sp.from_unit(x.tolist()))
            assert math.fsum(w) == pytest.approx(1.0) and min(w) >= -1e-12
        assert sp.weights(sp.initial()[0]) == pytest.approx([0, 0, 0, 1])
        assert sp.weights(sp.initial()[1]) == pytest.approx([0.25] * 4)
        w = [0.1, 0.2, 0.3, 0.4]
        assert sp.weights(sp.params_for(w)) == pytest.approx(w)
    neg = SimplexSpace(k=3, min_weight=-0.5)
    assert neg.constraints() == ["w0 + w1 <= 1.5", "w0 + w1 >= -1.0"]
    assert neg.weights(neg.params_for([-0.5, 0.5, 1.0])) == pytest.approx([-0.5, 0.5, 1.0])
    assert neg.params_for([-0.6, 0.6, 1.0]) is None


@pytest.mark.parametrize("par", ["constrained", "normalized"])
def test_simplex_search_with_ax_and_paper(par):
    for name in ("paper", "ax"):
        s = AxSearch(SearchConf(name=name, space="simplex", parameterization=par, trials=8),
                     SimplexSpace(k=3, parameterization=par))
        trials = drive(s, 8)
        assert all(math.fsum(p.weights) == pytest.approx(1.0) and min(p.weights) >= -1e-9 for p, _ in trials)
        assert s.statuses() == {i: "COMPLETED" for i in range(8)}
        s.close()


def test_pairwise_on_a_longer_series_weights_only_the_pair():
    sp = make_space(SearchConf(pair=[-3, -1]), k=4)
    assert sp.weights({"lam": 0.7}) == pytest.approx([0.0, 0.3, 0.0, 0.7])
    assert sp.params_for([0.0, 0.3, 0.0, 0.7]) == pytest.approx({"lam": 0.7})
    assert sp.params_for([0.25] * 4) is None
    assert sp.params_for([0.0, 0.8, 0.0, 0.2]) is None  # lam below alpha


def test_baseline_schedules_by_hand():
    got = dict(schedules(4, lawa_k=2, ema_alpha=0.5))
    assert got["uniform"] == [0.25] * 4
    assert got["LAWA (last 2)"] == [0, 0, 0.5, 0.5]
    assert got["EMA (a=0.5)"] == pytest.approx([0.125, 0.125, 0.25, 0.5])
    assert got["WMA (linear)"] == pytest.approx([0.1, 0.2, 0.3, 0.4])
    assert [n for n, _ in schedules(2, lawa_k=4)] == ["uniform = LAWA (last 2)", "EMA (a=0.2)", "WMA (linear)"]


def test_greedy_soup_adds_only_what_helps():
    singles = [3.0, 2.0, 2.5]  # order: 1, 2, 0
    values = {(0.0, 0.5, 0.5): 1.9, (1 / 3, 1 / 3, 1 / 3): 2.2}
    seen = []

    def f(w):
        seen.append(tuple(w))
        return values[tuple(round(x, 12) for x in w)] if tuple(round(x, 12) for x in w) in values else \
            values[(1 / 3, 1 / 3, 1 / 3)]

    soup, tried = greedy_soup(singles, f)
    assert soup == [0.0, 0.5, 0.5]
    assert len(tried) == 2 and tried[0][1] == 1.9


def test_baselines_attach_as_trials_and_feed_the_gp():
    space = PairwiseSpace(0.3)
    s = AxSearch(SearchConf(name="paper", trials=4), space)
    p = s.attach(space.params_for([0.5, 0.5]), "baseline:uniform")
    s.tell(p.index, bowl(p.weights))
    q = s.ask()
    assert q.index == 1 and q.params == {"lam": 0.3} and q.origin == "init"
    s.tell(q.index, bowl(q.weights))
    s.flush()
    assert s.statuses() == {0: "COMPLETED", 1: "COMPLETED"}
    s.close()


def _ledger_run(tmp_path, conf, space, n, die_after=None):
    """Run n trials writing the ledger as the driver does; optionally leave the last one running."""
    led = Ledger.open(tmp_path / "trials.jsonl")
    s = AxSearch(conf, space)
    for i in range(n):
        p = s.ask()
        led.write({"trial": p.index, "status": "running", "weights": p.weights, "params": p.params,
                   "origin": p.origin})
        if die_after is not None and i == die_after:
            break
        v = bowl(p.weights)
        led.write({"trial": p.index, "status": "completed", "weights": p.weights, "params": p.params,
                   "origin": p.origin, OBJECTIVE: v, "state": p.state})
        s.tell(p.index, v)
        s.save(tmp_path / "ax_snapshot.json")
    s.flush()
    s.close()
    return led


@pytest.mark.parametrize("snapshot", [True, False])
def test_restore_reruns_the_trial_that_died_and_keeps_the_rest(tmp_path, snapshot):
    conf, space = SearchConf(name="paper", trials=8), PairwiseSpace(0.3)
    _ledger_run(tmp_path, conf, space, 5, die_after=4)
    if not snapshot:
        (tmp_path / "ax_snapshot.json").unlink()
    led = Ledger.open(tmp_path / "trials.jsonl")
    died = led.records[4]
    s = AxSearch.restore(conf, space, "merge", led, tmp_path / "ax_snapshot.json")
    assert led.records[4]["status"] == "failed" and led.records[4]["reason"] == DIED
    again = s.ask()
    assert again.index == 5 and again.params == died["params"]
    s.tell(again.index, bowl(again.weights))
    st = s.statuses()
    assert st == {0: "COMPLETED", 1: "COMPLETED", 2: "COMPLETED", 3: "COMPLETED", 4: "FAILED", 5: "COMPLETED"}
    s.close()


def test_restore_completes_in_ax_what_only_the_ledger_saw(tmp_path):
    """Killed after the ledger's completed line but before Ax's snapshot: never re-evaluated."""
    conf, space = SearchConf(name="paper", trials=8), PairwiseSpace(0.3)
    led = _ledger_run(tmp_path, conf, space, 3)
    rec = led.records[2]
    # Rewind the snapshot to before trial 2 was told: restore must complete it from the ledger.
    s0 = AxSearch(conf, space)
    drive(s0, 2)
    s0.save(tmp_path / "ax_snapshot.json")
    s0.close()
    assert AxSearch.restore(conf, space, "merge", Ledger.open(tmp_path / "trials.jsonl"),
                            tmp_path / "ax_snapshot.json").statuses() == {0: "COMPLETED", 1: "COMPLETED",
                                                                          2: "COMPLETED"}
    s = AxSearch.restore(conf, space, "merge", Ledger.open(tmp_path / "trials.jsonl"), tmp_path / "ax_snapshot.json")
    df = s.client.summarize()
    assert float(df.loc[df["trial_index"] == 2, "objective"].iloc[0]) == pytest.approx(rec[OBJECTIVE])
    nxt = s.ask()
    assert nxt.index == 3 and nxt.origin in ("ei", "pi", "ucb") and nxt.params != rec["params"]
    s.close()


def test_restore_of_a_grid_does_not_repeat_points(tmp_path):
    conf, space = SearchConf(name="grid", trials=5), PairwiseSpace(0.3)
    _ledger_run(tmp_path, conf, space, 3)
    led = Ledger.open(tmp_path / "trials.jsonl")
    s = AxSearch.restore(conf, space, "merge", led, tmp_path / "ax_snapshot.json")
    rest = [s.ask().params["lam"] for _ in range(2)]
    assert rest == pytest.approx([0.3 + 0.7 * 3 / 4, 1.0])
    s.close()


def test_a_changed_fingerprint_is_refused_with_its_key(tmp_path):
    fp = {"checkpoints.sources": ["a", "b"], "search.space": {"alpha": 0.3}}
    check_fingerprint(tmp_path, fp, 0)
    check_fingerprint(tmp_path, fp, 3)  # same: fine
    with pytest.raises(ConfigError, match=r"`search.space` changed .* search.restart=true"):
        check_fingerprint(tmp_path, {**fp, "search.space": {"alpha": 0.5}}, 3)
    (tmp_path / "trials.jsonl").write_text("{}\n")
    dest = archive_previous(tmp_path)
    assert (dest / "trials.jsonl").exists() and (dest / "search_state.json").exists()
    assert not (tmp_path / "trials.jsonl").exists()


def test_non_finite_losses_never_reach_ax():
    s = AxSearch(SearchConf(name="paper"), PairwiseSpace(0.3))
    p = s.ask()
    with pytest.raises(ValueError, match="non-finite"):
        s.tell(p.index, float("nan"))
    s.fail(p.index, "non-finite objective nan")
    assert s.statuses() == {0: "FAILED"}
    s.close()


def test_a_pair_outside_the_loaded_checkpoints_names_the_option():
    with pytest.raises(ValueError, match=r"search.pair=\[-5, -1\]: 2 checkpoints are loaded"):
        make_space(SearchConf(pair=[-5, -1]), k=2)
    with pytest.raises(ValueError, match=r"search.pair=\[-1, -2\]: give \[older, newer\]"):
        make_space(SearchConf(pair=[-1, -2]), k=3)


@pytest.mark.parametrize("k,lo", [(3, 0.0), (8, 0.0), (12, 0.0), (4, -0.3)])
def test_simplex_candidates_cover_the_space_for_many_checkpoints(k, lo):
    """Every candidate satisfies the constraints, and they spread over the simplex (even at K=12)."""
    sp = SimplexSpace(k=k, min_weight=lo)
    c = sp.candidates(2048, seed=1)
    assert c.shape == (2048, k - 1)
    w = torch.tensor([sp.weights(sp.from_unit(x.tolist())) for x in c], dtype=torch.float64)
    assert torch.allclose(w.sum(1), torch.ones(2048, dtype=torch.float64))
    assert w.min() >= lo - 1e-12 and w.max() <= sp.hi + 1e-12
    # uniform on the simplex: each weight's mean is 1/K
    assert w.mean(0).tolist() == pytest.approx([1.0 / k] * k, abs=0.02)


def test_a_foreign_ledger_or_state_file_is_refused_with_its_path(tmp_path):
    (tmp_path / "trials.jsonl").write_text('{"trial": 0, "status": "completed", "weights": [0.5, 0.5]}\n')
    with pytest.raises(ConfigError, match=r"trials.jsonl: record 1 lacks \['params'\].*search.restart=true"):
        Ledger.open(tmp_path / "trials.jsonl")
    (tmp_path / "search_state.json").write_text("not json")
    with pytest.raises(ConfigError, match=r"search_state.json is not the JSON"):
        check_fingerprint(tmp_path, {"a": 1}, 3)
