"""Given weights that do not sum to 1 scale the model: said once, with the factor, unless
``merge.normalize`` is set either way.

The CLI runs are real (``python -m lightning_merge mode=merge`` on the tiny
fixture checkpoints), and the merged tensors are checked against the sums
computed here from the two source files.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file

from lightning_merge.driver import run
from test_config import _compose

WARNING = "merge.weights [0.7, 0.7] sum to 1.4: every merged parameter is scaled by 1.4"


def _cli(tmp_path: Path, sources: list[Path], *overrides: str) -> tuple[subprocess.CompletedProcess, Path]:
    out = tmp_path / "run"
    env = dict(os.environ, LIGHTNING_MERGE_CACHE=str(tmp_path / "cache"), HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "lightning_merge", "mode=merge", "demo.enabled=false",
                           f"checkpoints.sources=[{','.join(repr(str(p)) for p in sources)}]",
                           f"output_dir={out}", *overrides],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc, out / "merged"


def _expect(merged: Path, sources: list[Path], w: list[float]) -> None:
    got = load_file(merged / "model.safetensors")
    a, b = (load_file(p / "model.safetensors") for p in sources)
    assert got.keys() == a.keys()
    for n in a:  # w0*a + w1*b, by hand, in fp32
        torch.testing.assert_close(got[n], w[0] * a[n] + w[1] * b[n], rtol=1e-6, atol=1e-7)


def test_cli_warns_once_with_the_factor_and_scales(tiny_run, tmp_path, caplog):
    src = tiny_run["paths"][:2]
    proc, merged = _cli(tmp_path, src, "merge.weights=[0.7,0.7]")
    text = proc.stdout + proc.stderr  # Hydra's console log goes to stdout by default
    assert text.count(WARNING) == 1, text[-3000:]
    assert "merge.normalize=true" in text and "merge.normalize=false" in text
    _expect(merged, src, [0.7, 0.7])
    # The recipe records the (then unset) option as used, so re-running it is silent and gives the same model.
    recipe = OmegaConf.load(merged / "merge.yaml")
    assert recipe.normalize is False and list(recipe.weights) == [0.7, 0.7]
    with caplog.at_level(logging.INFO, logger="lightning_merge"):
        again = _run(tmp_path / "again", tiny_run, "mode=merge", f"merge.recipe={merged / 'merge.yaml'}")
    assert "sum to" not in caplog.text
    _expect(Path(again["merged_dir"]), src, [0.7, 0.7])


def test_cli_normalize_true_divides_by_the_sum_silently(tiny_run, tmp_path):
    src = tiny_run["paths"][:2]
    proc, merged = _cli(tmp_path, src, "merge.weights=[0.7,0.7]", "merge.normalize=true")
    assert "sum to" not in proc.stdout + proc.stderr
    _expect(merged, src, [0.5, 0.5])


def _run(tmp_path: Path, tiny_run, *overrides: str) -> dict:
    src = ",".join(repr(str(p)) for p in tiny_run["paths"][:2])
    cfg = _compose("demo.enabled=false", f"checkpoints.sources=[{src}]", f"data.heldout.path={tiny_run['heldout']}",
                   "data.heldout.block_size=16", "data.heldout.num_blocks=4", "data.search_blocks=2",
                   f"cache_dir={tmp_path / 'cache'}", *overrides)
    cfg.output_dir = str(tmp_path / "run")
    return run(cfg)


@pytest.mark.parametrize("overrides", [("merge.weights=[0.7,0.7]", "merge.normalize=false"),
                                       ("merge.weights=[0.25,0.75]",)])
def test_explicit_false_or_a_sum_of_one_is_silent(tiny_run, tmp_path, caplog, overrides):
    with caplog.at_level(logging.INFO, logger="lightning_merge"):
        res = _run(tmp_path, tiny_run, "mode=merge", *overrides)
    assert "sum to" not in caplog.text
    w = [float(x) for x in overrides[0].split("=")[1].strip("[]").split(",")]
    _expect(Path(res["merged_dir"]), tiny_run["paths"][:2], w)


def test_evaluate_warns_before_the_heavy_work(tiny_run, tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="lightning_merge"):
        res = _run(tmp_path, tiny_run, "mode=evaluate", "merge.weights=[0.7,0.7]")
    assert caplog.text.count(WARNING) == 1
    assert caplog.text.index(WARNING) < caplog.text.index("stage open checkpoints")
    assert res["best"]["weights"] == [0.7, 0.7]


def test_the_warning_text():
    from lightning_merge.merge import weight_sum_warning

    assert weight_sum_warning([0.1, 0.2, 0.7], None) is None  # sums to 0.9999999999999999: rounding
    assert weight_sum_warning([0.7, 0.7], False) is None and weight_sum_warning([0.7, 0.7], True) is None
    assert "scaled by 0.99;" in weight_sum_warning([0.33, 0.33, 0.33], None)
    zero = weight_sum_warning([-1.0, 1.0], None)
    assert "sum to 0: the merge is a difference" in zero and "merge.normalize=false" in zero
