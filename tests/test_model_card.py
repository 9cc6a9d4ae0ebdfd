"""Issue 10, item 13: every merged model has a card that says what it is and the command that made it.

``mode=merge`` writes ``README.md`` (sources, the weights given, that nothing
was evaluated, the exact command); a search whose best merge is a single
checkpoint says that merging did not help, and why when the trajectory shows
it (a decayed learning rate in the HF Trainer's ``trainer_state.json``, or the
last checkpoint beating every average by a wide margin).
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import make_llama

from lightning_merge import report
from lightning_merge.series import CheckpointSeries
from lightning_merge.config import RunConfig


def _cand(name, kind, weights, loss):
    return {"name": name, "kind": kind, "weights": weights, "heldout_loss": loss}


@pytest.fixture(scope="module")
def hf_run(tmp_path_factory, tokenizer):
    """An HF Trainer output folder: run/checkpoint-100, run/checkpoint-200 with trainer_state.json."""
    root = tmp_path_factory.mktemp("hf") / "llama-ft"
    paths = [make_llama(root / f"checkpoint-{s}", seed=i, tokenizer=tokenizer, hidden=16, layers=1)
             for i, s in enumerate((100, 200))]
    return CheckpointSeries.from_paths(paths)


def _trainer_state(ckpt: Path, step: int, lrs: list[tuple[int, float]]) -> None:
    log = [{"step": s, "learning_rate": lr, "loss": 3.0} for s, lr in lrs]
    (ckpt / "trainer_state.json").write_text(json.dumps({"global_step": step, "log_history": log}))


def _search_candidates(best_weights, best_loss):
    return [_cand("checkpoint-100", "checkpoint", [1.0, 0.0], 3.60),
            _cand("checkpoint-200", "checkpoint", [0.0, 1.0], 3.20),
            _cand("uniform", "baseline", [0.5, 0.5], 3.31),
            _cand("best merge", "search", best_weights, best_loss)]


def test_one_hot_best_says_merging_did_not_help_and_why(hf_run):
    cfg = RunConfig(experiment="llama-ft")
    best = {"weights": [0.0, 1.0], "heldout_loss": 3.20}
    card = report.model_card(hf_run, best, _search_candidates([0.0, 1.0], 3.20), cfg, command="lightning-merge x=1")
    assert "merging did not help" in card.lower()
    assert "`checkpoint-200`" in card
    # no trainer_state.json: the candidates show it (3.31 vs 3.20: the uniform average is 3.44% worse)
    assert "beats every average" in card and "3.44%" in card
    assert "lightning-merge x=1" in card


def test_one_hot_best_names_a_decayed_learning_rate(hf_run, tmp_path):
    newest = hf_run.paths[-1]
    _trainer_state(newest, 200, [(10, 1e-4), (50, 3e-4), (100, 2.5e-4), (150, 1e-4), (200, 1.5e-5)])
    try:
        best = {"weights": [0.0, 1.0], "heldout_loss": 3.20}
        card = report.model_card(hf_run, best, _search_candidates([0.0, 1.0], 3.20), RunConfig(), command="c")
        assert "merging did not help" in card.lower()
        assert "learning rate" in card and "1.5e-05" in card and "3.0e-04" in card and "5%" in card
        assert "decayed learning rate leaves little between the checkpoints to average" in card
        assert "stable (constant-LR) phase" in card
        # the terminal says it too
        results = {"sources": [str(p) for p in hf_run.paths], "best": best, "trials": 3, "seconds": {},
                   "candidates": _search_candidates([0.0, 1.0], 3.20), "gain_vs_last_percent": 0.0,
                   "gain_vs_best_single_percent": 0.0}
        from rich.console import Console

        con = Console(record=True, width=200)
        report.print_summary(results, RunConfig(), console=con)
        text = con.export_text()
        assert "merging did not help" in text.lower() and "decayed" in text
    finally:
        (newest / "trainer_state.json").unlink()


def test_verdict_when_the_margin_is_small_or_the_report_set_disagrees():
    from lightning_merge.card import merging_verdict

    paths = ["/r/run/checkpoint-100", "/r/run/checkpoint-200"]  # no trainer_state.json there
    cands = _search_candidates([0.0, 1.0], 3.20)
    cands[2]["heldout_loss"] = 3.2064  # uniform only 0.20% worse: no "wide margin" claimed
    v = merging_verdict(paths, {"weights": [0.0, 1.0]}, cands)
    assert v.startswith("Merging did not help") and "0.20% higher" in v and "wide margin" not in v
    cands[2]["heldout_loss"] = 3.19  # better on the whole set than the search's pick (chosen on its subset)
    v = merging_verdict(paths, {"weights": [0.0, 1.0]}, cands)
    assert "did not help" not in v and "`uniform` beats it" in v and "data.search_blocks" in v
    v = merging_verdict(paths, {"weights": [1.0, 0.0]}, cands)  # an older checkpoint won
    assert "`checkpoint-100`" in v and "newest checkpoint is worse" in v
    assert merging_verdict(paths, {"weights": [0.3, 0.7]}, cands) is None


def test_a_real_merge_says_nothing_of_the_kind(hf_run):
    _trainer_state(hf_run.paths[-1], 200, [(50, 3e-4), (200, 1.5e-5)])
    try:
        best = {"weights": [0.4, 0.6], "heldout_loss": 3.12}
        card = report.model_card(hf_run, best, _search_candidates([0.4, 0.6], 3.12), RunConfig(), command="c")
        assert "did not help" not in card and "decayed" not in card
        assert "+2.50%" in card  # (3.20 - 3.12) / 3.20 against the last checkpoint
    finally:
        (hf_run.paths[-1] / "trainer_state.json").unlink()


def test_a_torn_trainer_state_is_ignored(hf_run):
    (hf_run.paths[-1] / "trainer_state.json").write_text('{"log_history": [')
    try:
        best = {"weights": [0.0, 1.0], "heldout_loss": 3.20}
        card = report.model_card(hf_run, best, _search_candidates([0.0, 1.0], 3.20), RunConfig(), command="c")
        assert "merging did not help" in card.lower() and "learning rate at" not in card
    finally:
        (hf_run.paths[-1] / "trainer_state.json").unlink()


def test_command_line_is_the_one_typed(monkeypatch):
    main = str(Path(report.__file__).with_name("__main__.py"))
    monkeypatch.setattr(sys, "argv", [main, "mode=merge", "merge.weights=[0.4,0.6]", "output_dir=/tmp/my out"])
    assert report.command_line() == "python -m lightning_merge mode=merge 'merge.weights=[0.4,0.6]' " \
                                    "'output_dir=/tmp/my out'"
    monkeypatch.setattr(sys, "argv", ["/venv/bin/lightning-merge", "search.trials=3"])
    assert report.command_line() == "lightning-merge search.trials=3"
    monkeypatch.setattr(sys, "argv", ["/venv/bin/pytest", "-q"])  # the Python API: no command to give
    assert "not run from the command line" in report.command_line()


def test_command_line_of_a_sweep_point_is_that_point(tmp_path):
    """Under -m each run's card gives its own overrides and folder, not the sweep's comma list."""
    import textwrap

    app = tmp_path / "app.py"
    app.write_text(textwrap.dedent("""
        from pathlib import Path
        import hydra
        from hydra.core.hydra_config import HydraConfig
        from lightning_merge.__main__ import CONF_DIR
        from lightning_merge.report import command_line

        @hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="config")
        def main(cfg):
            (Path(HydraConfig.get().runtime.output_dir) / "cmd.txt").write_text(command_line())

        main()
    """))
    sweep = tmp_path / "sw eep"
    proc = subprocess.run([sys.executable, str(app), "-m", "search.alpha=0.1,0.2", "checkpoints.sources=[a b]",
                           f"hydra.sweep.dir={sweep}"], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for point in sorted(p for p in sweep.iterdir() if p.is_dir()):
        args = shlex.split((point / "cmd.txt").read_text())
        alpha = point.name.split("search.alpha=")[1].split(",")[0]
        assert args[:4] == ["python", "-m", "lightning_merge", f"search.alpha={alpha}"], args
        assert args[5:] == [f"output_dir={point}"], args
        # Hydra hands a sweep point its overrides in its own grammar (`[a\\ b]`): the same value
        from hydra.core.override_parser.overrides_parser import OverridesParser

        assert OverridesParser.create().parse_overrides([args[4]])[0].value() == ["a b"]


def test_mode_merge_writes_a_card_with_the_command_that_ran(tiny_run, tmp_path):
    out = tmp_path / "my out"  # a space in an override: the card must quote it
    args = ["mode=merge", f"checkpoints.sources=[{tiny_run['ckdir']}]", "merge.weights=[0.25,0.75]",
            f"output_dir={out}"]
    proc = subprocess.run([sys.executable, "-m", "lightning_merge", *args], cwd=tmp_path, capture_output=True,
                          text=True, timeout=300, env=dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    card = (out / "merged" / "README.md").read_text()
    assert "0.2500" in card and "0.7500" in card
    for p in tiny_run["paths"][1:]:  # checkpoints.last=2: the newest two
        assert str(p.resolve()) in card
    assert str(tiny_run["paths"][0].resolve()) not in card
    assert "no evaluation was run" in card.lower()
    assert f"# Merged checkpoint ({tiny_run['root'].name})" in card
    reproduce = card.split("## Reproduce")[1].split("```")[1].strip()
    assert shlex.split(reproduce) == ["python", "-m", "lightning_merge", *args]
    assert json.loads((out / "results.json").read_text())["merged_dir"] == str((out / "merged").resolve())
