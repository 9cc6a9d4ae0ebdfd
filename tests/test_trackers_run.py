"""``report.loggers`` wired into a real run: the CLI's search logs every trial and the run's figures to
all four trackers, and what each one holds equals the run's own ledger and results (read back with
the backends' own readers: CSV, TensorBoard's EventAccumulator, MLflow's client)."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys

import pytest

from lightning_merge.io import read_jsonl

pytestmark = pytest.mark.slow


def test_search_logs_trials_and_results_to_every_tracker(tiny_run, tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "lightning_merge", f"checkpoints.sources=[{tiny_run['ckdir']}]",
           "checkpoints.last=2", f"data.heldout.path={tiny_run['heldout']}", "data.heldout.block_size=32",
           "data.heldout.num_blocks=16", "data.search_blocks=8", "data.batch_size=4", "demo.enabled=false",
           "search.trials=3", "search.acquisition=ei", "report.progress=false", "merge.write=false",
           "report.loggers=[csv,tensorboard,wandb,mlflow]", f"output_dir={out}"]
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", WANDB_MODE="offline",
               WANDB_SILENT="true")
    env.pop("MLFLOW_TRACKING_URI", None)
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    ledger = [r for r in read_jsonl(out / "trials.jsonl")]
    done = {r["trial"]: r for r in ledger if r["status"] == "completed"}
    best = results["best"]["heldout_loss"]
    last = [c for c in results["candidates"] if c["kind"] == "checkpoint"][-1]["heldout_loss"]

    # CSV: one row per trial (its objective at step = trial index) and the run's figures.
    (metrics,) = (out / "trackers" / "csv").rglob("metrics.csv")
    rows = list(csv.DictReader(metrics.open()))
    objs = {int(float(r["step"])): float(r["trial/objective"]) for r in rows if r.get("trial/objective")}
    assert objs == {i: r["objective"] for i, r in done.items()}
    (run_row,) = [r for r in rows if r.get("run/best_loss")]
    assert float(run_row["run/best_loss"]) == pytest.approx(best, rel=1e-12)
    assert float(run_row["run/last_checkpoint_loss"]) == pytest.approx(last, rel=1e-12)

    # TensorBoard: the same, through its own reader; the plots as images.
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    (events,) = {p.parent for p in (out / "trackers" / "tensorboard").rglob("events.out.tfevents.*")}
    acc = EventAccumulator(str(events), size_guidance={"scalars": 0, "images": 0})
    acc.Reload()
    tb = {e.step: e.value for e in acc.Scalars("trial/objective")}
    assert tb == pytest.approx({i: r["objective"] for i, r in done.items()}, rel=1e-6)
    assert acc.Scalars("run/best_loss")[-1].value == pytest.approx(best, rel=1e-6)
    assert any("candidates" in tag for tag in acc.Tags()["images"])

    # MLflow's file store, with MLflow's client.
    from mlflow.tracking import MlflowClient

    os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    client = MlflowClient(tracking_uri=f"file:{out / 'trackers' / 'mlruns'}")
    ids = json.loads((out / "trackers" / "run_ids.json").read_text())
    (run_ids,) = ids.values()
    hist = client.get_metric_history(run_ids["mlflow_run_id"], "trial/objective")
    assert {m.step: m.value for m in hist} == pytest.approx({i: r["objective"] for i, r in done.items()}, rel=1e-12)
    assert client.get_run(run_ids["mlflow_run_id"]).data.metrics["run/best_loss"] == pytest.approx(best, rel=1e-12)
    assert client.get_run(run_ids["mlflow_run_id"]).info.status == "FINISHED"

    # W&B: offline, its run folder written.
    assert list((out / "trackers" / "wandb").rglob("*.wandb"))
