"""The report's figures, drawn from hand-built trial records and results dicts (no model, no search)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from lightning_merge import plots

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _quad(lam: float) -> float:
    """A held-out loss with its minimum at lam = 0.62, like a real pairwise sweep."""
    return 3.20 + 0.9 * (lam - 0.62) ** 2


def pairwise_trials(alpha: float = 0.3) -> list[dict]:
    """Paper mode: init at alpha and 1, then EI proposals, plus two baselines."""
    lams = [alpha, 1.0, 0.71, 0.55, 0.64, 0.60, 0.83]
    origins = ["init", "init", "ei", "ei", "ei", "ei", "ei"]
    out = [{"trial": i, "status": "completed", "weights": [1 - lam, lam], "params": {"lam": lam},
            "origin": o, "objective": _quad(lam), "heldout_loss": _quad(lam), "seconds": 1.5 + 0.1 * i}
           for i, (lam, o) in enumerate(zip(lams, origins))]
    n = len(out)
    out += [{"trial": n, "status": "completed", "weights": [0.5, 0.5], "params": {"lam": 0.5},
             "origin": "baseline:uniform", "objective": _quad(0.5), "heldout_loss": _quad(0.5), "seconds": 1.4},
            {"trial": n + 1, "status": "completed", "weights": [0.2, 0.8], "params": {"lam": 0.8},
             "origin": "baseline:ema", "objective": _quad(0.8), "heldout_loss": _quad(0.8), "seconds": 1.4}]
    return out


def simplex_trials(k: int, n: int = 12, seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        w = rng.dirichlet(np.ones(k))
        loss = 3.1 + float(np.sum((w - np.linspace(0, 2 / k, k)) ** 2))
        out.append({"trial": i, "status": "completed", "weights": w.tolist(),
                    "params": {f"w{j}": float(x) for j, x in enumerate(w)},
                    "origin": "ax" if i else "baseline:uniform", "objective": loss, "heldout_loss": loss,
                    "seconds": 2.0})
    return out


def results_dict(k: int = 2, ood=("code", "wiki"), nan_ood: bool = False) -> dict:
    """A results.json as the driver writes it: K checkpoints, baselines, the best merge."""
    names = [f"/data/ckpts/step-{(i + 1) * 10000:06d}" for i in range(k)]
    cands = []
    for i, n in enumerate(names):
        loss = 3.50 - 0.08 * i
        cands.append({"name": Path(n).name, "kind": "checkpoint", "weights": [float(i == j) for j in range(k)],
                      "heldout_loss": loss, "heldout_ppl": math.exp(loss),
                      "ood_loss": {o: loss + 0.4 + 0.1 * m - 0.02 * i for m, o in enumerate(ood)}})
    last = cands[-1]

    def cand(name, kind, w, d):
        loss = last["heldout_loss"] + d
        return {"name": name, "kind": kind, "weights": w, "heldout_loss": loss, "heldout_ppl": math.exp(loss),
                "ood_loss": {o: v + 1.3 * d for o, v in last["ood_loss"].items()}}

    cands += [cand("uniform average", "baseline", [1 / k] * k, 0.03),
              cand("LAWA", "baseline", [0.0] * (k - 2) + [0.5, 0.5], -0.004),
              cand("EMA", "baseline", [0.1] * (k - 1) + [1 - 0.1 * (k - 1)], -0.006)]
    best_w = [-0.05] + [1.05 / (k - 1)] * (k - 1) if k > 2 else [0.38, 0.62]
    cands.append(cand("best merge", "search", best_w, -0.012))
    if nan_ood:
        cands[1]["ood_loss"][ood[0]] = float("nan")
        del cands[-2]["ood_loss"][ood[-1]]
    best = {k_: v for k_, v in cands[-1].items() if k_ not in ("name", "kind")}
    best.update(params={"lam": 0.62} if k == 2 else {f"w{i}": w for i, w in enumerate(best_w)},
                search_objective=3.2)
    return {"sources": names, "best": best, "candidates": cands, "trials": 9, "merged_dir": None,
            "seconds": {"search": 12.0}, "gain_vs_last_percent": 100 * 0.012 / last["heldout_loss"],
            "gain_vs_best_single_percent": 100 * 0.012 / last["heldout_loss"]}


def assert_png(path: Path, min_px: int = 200) -> None:
    import matplotlib.image as mpimg

    path = Path(path)
    assert path.is_file(), path
    assert path.read_bytes()[:8] == PNG_MAGIC
    img = mpimg.imread(path)
    assert img.shape[0] >= min_px and img.shape[1] >= min_px, img.shape
    assert float(np.std(img[..., :3])) > 0.01  # not blank
    assert not list(path.parent.glob(f".{path.name}.*"))  # no temp file left behind


def test_gp_curve_follows_a_quadratic():
    trials = pairwise_trials(alpha=0.3)
    lam, mean, std = plots.gp_curve(trials, alpha=0.3, n=101)
    assert lam.shape == mean.shape == std.shape == (101,)
    assert lam[0] == pytest.approx(0.3) and lam[-1] == pytest.approx(1.0)
    assert np.all(std >= 0)
    for t in trials:
        x, y = t["params"]["lam"], t["objective"]
        m = np.interp(x, lam, mean)
        assert abs(m - y) < 0.01, (x, y, m)  # the objective spans ~0.16 over [0.3, 1]
    # and between the points it keeps the true shape: minimum near 0.62
    assert abs(lam[np.argmin(mean)] - 0.62) < 0.05


def test_gp_curve_needs_two_points_in_range():
    t = pairwise_trials(alpha=0.3)
    with pytest.raises(ValueError, match="at least 2"):
        plots.gp_curve(t[:1], alpha=0.3)
    # trials outside [alpha, 1] do not count
    with pytest.raises(ValueError, match="at least 2"):
        plots.gp_curve(t[:2], alpha=0.5)


def test_objective_vs_lam(tmp_path):
    p = plots.plot_objective_vs_lam(tmp_path, pairwise_trials(), 0.3, "held-out loss")
    assert p == tmp_path / "objective_vs_lam.png"
    assert_png(p)


def test_objective_vs_lam_single_trial_and_gp_failure(tmp_path, monkeypatch):
    one = pairwise_trials()[:1]
    assert_png(plots.plot_objective_vs_lam(tmp_path, one, 0.3, "loss"))

    def boom(*a, **k):
        raise RuntimeError("cholesky failed")

    monkeypatch.setattr(plots, "gp_curve", boom)
    assert_png(plots.plot_objective_vs_lam(tmp_path, pairwise_trials(), 0.3, "loss"))


def test_objective_vs_lam_not_pairwise(tmp_path):
    assert plots.plot_objective_vs_lam(tmp_path, simplex_trials(3), 0.0, "loss") is None
    assert not (tmp_path / "objective_vs_lam.png").exists()


def test_best_so_far(tmp_path):
    refs = {"last checkpoint": 3.2, "best baseline (EMA)": 3.21}
    p = plots.plot_best_so_far(tmp_path, pairwise_trials(), "held-out loss", refs)
    assert_png(p)


def test_best_so_far_all_failed_and_raw_ledger(tmp_path):
    raw = [{"trial": 0, "status": "running", "weights": [0.5, 0.5]},
           {"trial": 0, "status": "failed", "weights": [0.5, 0.5], "reason": "nan"}]
    assert plots.completed_trials(raw) == []
    assert_png(plots.plot_best_so_far(tmp_path, raw, "loss", None))
    # last line per trial wins
    raw.append({"trial": 1, "status": "running", "weights": [0.4, 0.6]})
    raw.append({**pairwise_trials()[2], "trial": 1})
    assert [t["trial"] for t in plots.completed_trials(raw)] == [1]


def test_reference_values():
    refs = plots.reference_values(pairwise_trials(alpha=0.3))
    assert refs["last checkpoint"] == pytest.approx(_quad(1.0))
    assert refs["best baseline (uniform)"] == pytest.approx(_quad(0.5))


@pytest.mark.parametrize("k", [2, 5, 8])
def test_weights(tmp_path, k):
    w = [-0.1] + [1.1 / (k - 1)] * (k - 1)
    p = plots.plot_weights(tmp_path, w, [f"/ckpts/run-a/step-{i:07d}" for i in range(k)])
    assert_png(p)


@pytest.mark.parametrize("k,ood,nan", [(2, ("code", "wiki"), False), (8, ("code", "wiki", "arxiv"), True),
                                       (3, (), False)])
def test_candidates(tmp_path, k, ood, nan):
    assert_png(plots.plot_candidates(tmp_path, results_dict(k, ood, nan)))


def test_candidates_without_a_checkpoint_reference(tmp_path):
    r = results_dict(3)
    r["candidates"] = [c for c in r["candidates"] if c["kind"] != "checkpoint"]
    assert_png(plots.plot_candidates(tmp_path, r))


def test_write_plots_pairwise(tmp_path):
    names = plots.write_plots(tmp_path, pairwise_trials(), results_dict(2), 0.3, "held-out loss",
                              ["step-010000", "step-020000"])
    assert names == ["objective_vs_lam.png", "best_so_far.png", "candidates.png"]
    for n in names:
        assert_png(tmp_path / n)


def test_write_plots_simplex_and_empty(tmp_path):
    r = results_dict(4)
    names = plots.write_plots(tmp_path / "a", simplex_trials(4), r, 0.0, "loss", r["sources"])
    assert names == ["best_so_far.png", "weights.png", "candidates.png"]
    # mode=evaluate: no trials, no candidates; only the weights
    r = {"sources": ["a", "b"], "best": {"weights": [0.4, 0.6], "heldout_loss": 3.2}, "candidates": [],
         "trials": 0}
    assert plots.write_plots(tmp_path / "b", [], r, 0.0, "loss", ["a", "b"]) == ["weights.png"]
