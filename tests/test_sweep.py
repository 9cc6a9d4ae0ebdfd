"""A sweep through the CLI, typed as users type it: two runs in deterministic folders and one summary."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow


def test_sweep_writes_one_folder_per_point_and_a_summary(tiny_run, tmp_path):
    sweep = tmp_path / "multirun"
    cmd = [sys.executable, "-m", "lightning_merge", "+experiment=tiny", "-m", "search.alpha=0,0.5",
           f"checkpoints.sources=[{tiny_run['ckdir']}]", f"data.heldout.path={tiny_run['heldout']}",
           "data.heldout.block_size=32", "data.heldout.num_blocks=8", "data.search_blocks=4", "demo.enabled=false",
           "search.trials=2", "baselines.enabled=false", "report.progress=false", "merge.write=false",
           f"hydra.sweep.dir={sweep}"]
    proc = subprocess.run(cmd, env=dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1"), cwd=tmp_path,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = sorted(p.name for p in sweep.iterdir() if p.is_dir())
    assert len(runs) == 2  # the sources' path did not nest folders
    summary = json.loads((sweep / "summary.json").read_text())
    assert sorted(r["run"] for r in summary["runs"]) == runs
    assert sorted(r["params"]["search.alpha"] for r in summary["runs"]) == [0, 0.5]
    for r in summary["runs"]:
        res = json.loads((sweep / r["run"] / "results.json").read_text())
        assert r["best_heldout_loss"] == pytest.approx(res["best"]["heldout_loss"])
    assert (sweep / "summary.png").stat().st_size > 10_000 and (sweep / "summary.md").exists()
