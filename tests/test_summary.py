"""The sweep summary over hand-built Hydra multirun folders, its command line, and its Hydra callback."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import yaml
from omegaconf import OmegaConf

from lightning_merge import summary
from lightning_merge.summary import NoRunsError, SweepSummary, summarize

REPO = Path(__file__).resolve().parent.parent


def assert_png(path: Path) -> None:
    import matplotlib.image as mpimg

    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    img = mpimg.imread(path)
    assert img.shape[0] >= 200 and img.shape[1] >= 200
    assert float(np.std(img[..., :3])) > 0.01


def make_run(sweep: Path, overrides: list[str], best: float, last: float, lam: float,
             ood_best: float = 3.79, ood_last: float = 3.80, finished: bool = True, trials: int = 12) -> Path:
    """A run folder as Hydra and the driver leave it: .hydra/overrides.yaml and results.json."""
    run = sweep / ",".join(overrides)
    (run / ".hydra").mkdir(parents=True)
    (run / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    if finished:
        res = {"sources": ["/ck/step-010000", "/ck/step-020000"],
               "best": {"weights": [1 - lam, lam], "params": {"lam": lam}, "heldout_loss": best,
                        "ood_loss": {"code": ood_best}, "search_objective": best - 0.01},
               "candidates": [
                   {"name": "step-010000", "kind": "checkpoint", "weights": [1.0, 0.0], "heldout_loss": last + 0.08,
                    "ood_loss": {"code": ood_last + 0.1}},
                   {"name": "step-020000", "kind": "checkpoint", "weights": [0.0, 1.0], "heldout_loss": last,
                    "ood_loss": {"code": ood_last}},
                   {"name": "uniform average", "kind": "baseline", "weights": [0.5, 0.5], "heldout_loss": last + 0.01,
                    "ood_loss": {"code": ood_last}},
                   {"name": "best merge", "kind": "search", "weights": [1 - lam, lam], "heldout_loss": best,
                    "ood_loss": {"code": ood_best}}],
               "trials": trials, "merged_dir": str(run / "merged"), "seconds": {"search": 30.0},
               "gain_vs_last_percent": 100 * (last - best) / last,
               "gain_vs_best_single_percent": 100 * (last - best) / last}
        (run / "results.json").write_text(json.dumps(res))
    return run


@pytest.fixture
def alpha_sweep(tmp_path):
    sweep = tmp_path / "multirun"
    make_run(sweep, ["search.alpha=0.5"], best=3.4105, last=3.4200, lam=0.62)
    make_run(sweep, ["search.alpha=0"], best=3.4032, last=3.4200, lam=0.58, ood_best=3.781)
    make_run(sweep, ["search.alpha=0.3"], best=3.4071, last=3.4200, lam=0.60)
    make_run(sweep, ["search.alpha=0.8"], best=0, last=0, lam=0, finished=False)  # still running
    (sweep / "multirun.yaml").write_text("hydra: {}\n")
    return sweep


def test_summarize_alpha_sweep(alpha_sweep):
    s = summarize(alpha_sweep, print_table=False)
    assert [r["run"] for r in s["runs"]] == ["search.alpha=0", "search.alpha=0.3", "search.alpha=0.5"]
    assert [r["params"]["search.alpha"] for r in s["runs"]] == [0, 0.3, 0.5]
    assert s["varying"] == ["search.alpha"] and s["x_key"] == "search.alpha"
    r0 = s["runs"][0]
    assert r0["best_heldout_loss"] == pytest.approx(3.4032)
    assert r0["last_checkpoint_loss"] == pytest.approx(3.4200)
    assert r0["gain_vs_last_percent"] == pytest.approx(100 * 0.0168 / 3.42)
    assert r0["ood_gain_vs_last_percent"]["code"] == pytest.approx(100 * (3.80 - 3.781) / 3.80)
    assert r0["best_weights"] == pytest.approx([0.42, 0.58]) and r0["trials"] == 12
    assert [k["run"] for k in s["skipped"]] == ["search.alpha=0.8"]
    assert "results.json" in s["skipped"][0]["reason"]

    assert json.loads((alpha_sweep / "summary.json").read_text())["runs"][1]["run"] == "search.alpha=0.3"
    assert_png(alpha_sweep / "summary.png")
    md = (alpha_sweep / "summary.md").read_text()
    rows = [line for line in md.splitlines() if line.startswith("| `")]
    assert len(rows) == 3  # one per finished run; the unfinished one is listed apart
    cells = [c.strip() for c in rows[0].strip("|").split("|")]
    assert cells[0] == "`search.alpha=0`"
    assert cells[2] == "[0.420, 0.580]"
    assert cells[3:7] == ["3.4032", "3.4200", f"{100 * 0.0168 / 3.42:+.2f}", "12"]
    assert cells[7] == f"{100 * 0.019 / 3.80:+.2f}"
    assert "search.alpha=0.8" in md.split("## Skipped")[1]
    assert not list(alpha_sweep.glob(".summary*"))  # no temp files left


def test_two_keys_vary_one_numeric(tmp_path):
    sweep = tmp_path / "sw"
    for name, d in (("paper", 0.0), ("random", 0.004)):
        for a in (0, 0.5):
            make_run(sweep, [f"search.alpha={a}", f"search.name={name}"], best=3.405 + d + 0.01 * a,
                     last=3.42, lam=0.6)
    s = summarize(sweep, print_table=False)
    assert s["x_key"] == "search.alpha" and set(s["varying"]) == {"search.alpha", "search.name"}
    assert [(r["params"]["search.name"], r["params"]["search.alpha"]) for r in s["runs"]] == \
        [("paper", 0), ("paper", 0.5), ("random", 0), ("random", 0.5)]
    assert_png(sweep / "summary.png")


def test_non_numeric_sweep_bar_chart(tmp_path, capsys):
    sweep = tmp_path / "sw"
    for i, name in enumerate(["paper", "random", "grid", "ax"]):
        make_run(sweep, [f"search.name={name}", "+experiment=tiny"], best=3.405 + 0.003 * i,
                 last=3.42 - 0.01 * (i == 3), lam=0.6)
    s = summarize(sweep)  # prints the rich table
    assert s["x_key"] is None and s["varying"] == ["search.name"]
    assert len(s["runs"]) == 4
    assert_png(sweep / "summary.png")
    out = capsys.readouterr().out
    assert "search.name=paper" in out and "3.4050" in out


def test_no_runs(tmp_path):
    with pytest.raises(NoRunsError, match=str(tmp_path)):
        summarize(tmp_path, print_table=False)
    make_run(tmp_path, ["search.alpha=0"], 0, 0, 0, finished=False)
    with pytest.raises(NoRunsError, match="1 unfinished"):
        summarize(tmp_path, print_table=False)
    with pytest.raises(NoRunsError, match="no such folder"):
        summarize(tmp_path / "missing", print_table=False)


def test_cli(tmp_path, alpha_sweep, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert summary.main([str(empty)]) == 2
    assert str(empty) in capsys.readouterr().err
    assert summary.main([str(alpha_sweep), "-q"]) == 0
    assert (alpha_sweep / "summary.md").is_file()


def test_cli_entry_point_exit_code(tmp_path):
    p = subprocess.run([sys.executable, "-m", "lightning_merge.summary", str(tmp_path)],
                       capture_output=True, text=True, timeout=120, check=False)
    assert p.returncode == 2
    assert str(tmp_path) in p.stderr and "no finished runs" in p.stderr


def test_callback(alpha_sweep, tmp_path):
    cfg = OmegaConf.create({"hydra": {"sweep": {"dir": str(alpha_sweep)}}})
    SweepSummary().on_multirun_end(cfg)
    assert (alpha_sweep / "summary.md").is_file() and (alpha_sweep / "summary.json").is_file()
    # relative sweep dir resolved against hydra.runtime.cwd
    (alpha_sweep / "summary.md").unlink()
    cfg = OmegaConf.create({"hydra": {"sweep": {"dir": alpha_sweep.name}, "runtime": {"cwd": str(alpha_sweep.parent)}}})
    SweepSummary().on_multirun_end(cfg)
    assert (alpha_sweep / "summary.md").is_file()
    # never raises: an empty or broken sweep only logs
    SweepSummary().on_multirun_end(OmegaConf.create({"hydra": {"sweep": {"dir": str(tmp_path / "nothing")}}}))
    SweepSummary().on_multirun_end(OmegaConf.create({}))


def test_callback_in_a_real_multirun(tmp_path):
    """conf/config.yaml's hydra.callbacks entry, with a stub task: single run a no-op, -m writes the summary."""
    app = tmp_path / "app.py"
    app.write_text(textwrap.dedent("""
        import json
        from pathlib import Path
        import hydra
        from hydra.core.hydra_config import HydraConfig
        from lightning_merge.__main__ import CONF_DIR

        @hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="config")
        def main(cfg):
            out = Path(HydraConfig.get().runtime.output_dir)
            a = float(cfg.search.alpha)
            res = {"best": {"weights": [1 - a, a], "heldout_loss": 3.42 - 0.02 * a},
                   "candidates": [{"name": "b", "kind": "checkpoint", "weights": [0, 1], "heldout_loss": 3.42}],
                   "trials": 3}
            (out / "results.json").write_text(json.dumps(res))

        main()
    """))
    single = subprocess.run([sys.executable, str(app), f"output_dir={tmp_path / 'single'}"], cwd=tmp_path,
                            capture_output=True, text=True, timeout=120, check=False)
    assert single.returncode == 0, single.stderr
    assert (tmp_path / "single" / "results.json").is_file()
    assert not (tmp_path / "single" / "summary.md").exists()
    sweep = tmp_path / "sweep"
    multi = subprocess.run([sys.executable, str(app), "-m", "search.alpha=0,0.5", f"hydra.sweep.dir={sweep}"],
                           cwd=tmp_path, capture_output=True, text=True, timeout=120, check=False)
    assert multi.returncode == 0, multi.stderr
    s = json.loads((sweep / "summary.json").read_text())
    assert [r["run"] for r in s["runs"]] == ["search.alpha=0", "search.alpha=0.5"]
    assert s["runs"][1]["best_heldout_loss"] == pytest.approx(3.41)


def test_odd_runs(tmp_path):
    """A mode=merge run (no losses), a torn results.json, and a lone run still give a summary."""
    sweep = tmp_path / "sw"
    make_run(sweep, ["mode=search"], best=3.40, last=3.42, lam=0.6)
    merge = make_run(sweep, ["mode=merge", "merge.weights=[0.4,0.6]"], 0, 0, 0, finished=False)
    (merge / "results.json").write_text(json.dumps({"sources": ["a", "b"], "best": {"weights": [0.4, 0.6]},
                                                    "candidates": [], "trials": 0, "merged_dir": "m"}))
    torn = make_run(sweep, ["mode=evaluate"], 0, 0, 0, finished=False)
    (torn / "results.json").write_text('{"sources": [')
    s = summarize(sweep, print_table=False)
    assert [r["run"] for r in s["runs"]] == ["mode=merge,merge.weights=[0.4,0.6]", "mode=search"]
    m = s["runs"][0]
    assert m["params"]["merge.weights"] == [0.4, 0.6]
    assert m["best_heldout_loss"] is None and m["gain_vs_last_percent"] is None
    assert [k["run"] for k in s["skipped"]] == ["mode=evaluate"]
    assert "not valid JSON" in s["skipped"][0]["reason"]
    assert "| n/a | n/a | n/a | 0 |" in (sweep / "summary.md").read_text()
    assert_png(sweep / "summary.png")
    lone = tmp_path / "lone"
    make_run(lone, ["search.alpha=0.5"], best=3.40, last=3.42, lam=0.6)
    assert len(summarize(lone, print_table=False)["runs"]) == 1
    assert_png(lone / "summary.png")
