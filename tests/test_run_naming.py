"""Issue 10, item 12: a run is named after what it merges, and a refused run leaves the folder's record alone.

The experiment name (``outputs/<experiment>/<search.name>``, the report's and
the model card's title) comes from the sources when no experiment is given;
the layouts below are the ones users have. Hydra's record (``.hydra/``) is
written only once the run is accepted: a resume refused by the fingerprint
check must leave the first run's record byte-identical.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from hydra import compose, initialize_config_dir

from lightning_merge.__main__ import CONF_DIR
from lightning_merge.config import experiment_name, register_configs, to_run_config

register_configs()


@pytest.mark.parametrize("sources, name", [
    (["/runs/exp1/checkpoints"], "exp1"),                                   # a folder of checkpoints
    (["/data/llama-ft/checkpoint-500", "/data/llama-ft/checkpoint-1000"], "llama-ft"),  # HF Trainer
    (["/data/llama-ft"], "llama-ft"),
    (["/home/me/gpt2-small/ckpts/step900", "/home/me/gpt2-small/ckpts/step1000"], "gpt2-small"),
    (["/scratch/llama3_8b/checkpoint/step-100", "/scratch/llama3_8b/checkpoint/step-200"], "llama3_8b"),  # torchtitan
    (["/w/run7/lightning_logs/version_0/checkpoints/epoch=0-step=100.ckpt"], "run7"),
    (["/w/nano/out/ckpt.pt"], "nano"),
    (["EleutherAI/pythia-1.4b@step142000", "EleutherAI/pythia-1.4b@step143000"], "pythia-1.4b"),
    (["/hf/hub/models--EleutherAI--pythia-160m/snapshots/" + "a" * 40], "pythia-160m"),
    (["/runs/exp1/checkpoints", "/runs/exp2/checkpoints"], "exp1+exp2"),    # two runs: both names
    (["/runs/my run (v2)/checkpoints"], "my_run_v2"),                       # one safe path component
    ([], "tiny"),                                                           # the embedded demo
])
def test_experiment_name_from_the_sources(sources, name):
    assert experiment_name(sources) == name


def test_experiment_name_is_one_short_path_component():
    many = [f"/r/experiment-number-{i:03d}-with-a-long-name/ckpts" for i in range(20)]
    name = experiment_name(many)
    assert "/" not in name and len(name) <= 80 and name == experiment_name(many)  # deterministic
    assert name != experiment_name(many[:-1])
    relative = experiment_name(["checkpoints"])  # generic all the way: the folder it sits in
    assert relative == experiment_name([str(Path.cwd() / "checkpoints")]) and "/" not in relative


def test_the_demos_cached_checkpoints_are_tiny(tmp_path):
    """A recipe written by a demo merge names the cached trajectory: still the demo, not its hash folder."""
    root = tmp_path / "demo" / "9ae93905162f"
    (root / "checkpoints" / "step800").mkdir(parents=True)
    (root / "trajectory.json").write_text("{}")
    assert experiment_name([str(root / "checkpoints" / "step800")]) == "tiny"
    (root / "trajectory.json").unlink()  # without the marker it is just a folder
    assert experiment_name([str(root / "checkpoints" / "step800")]) == "9ae93905162f"


def _compose(*overrides: str):
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose("config", overrides=list(overrides), return_hydra_config=True)
    return cfg


def test_composed_run_folder_is_named_after_the_sources():
    cfg = _compose("checkpoints.sources=[/runs/exp1/checkpoints]")
    assert cfg.hydra.sweep.dir == "outputs/exp1/multirun" and cfg.hydra.run.dir == "outputs/exp1/paper"
    run = to_run_config(_task(cfg))
    assert run.experiment == "exp1" and run.output_dir == "outputs/exp1/paper"


def test_explicit_experiment_wins_and_the_demo_stays_tiny():
    assert to_run_config(_task(_compose())).experiment == "tiny"
    assert to_run_config(_task(_compose("+experiment=tiny", "checkpoints.sources=[/r/exp1]"))).experiment == "tiny"
    run = to_run_config(_task(_compose("+experiment=baichuan7b", "checkpoints.sources=[/r/exp1]")))
    assert run.experiment == "baichuan7b" and run.output_dir == "outputs/baichuan7b/paper"


def test_a_recipe_names_the_run_after_its_sources(tmp_path):
    recipe = tmp_path / "merge.yaml"
    recipe.write_text(yaml.safe_dump({"sources": ["/runs/exp9/checkpoint-1", "/runs/exp9/checkpoint-2"],
                                      "weights": [0.5, 0.5]}))
    run = to_run_config(_task(_compose("mode=merge", f"merge.recipe={recipe}")))
    assert run.experiment == "exp9"
    assert to_run_config(_task(_compose("mode=merge", f"merge.recipe={tmp_path}/none.yaml"))).experiment == "tiny"


def _task(cfg):
    from omegaconf import open_dict

    with open_dict(cfg):
        del cfg["hydra"]
    return cfg


# ----------------------------------------------------------------------------------- the real CLI

def _cli(tiny_run, cwd: Path, *extra: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "lightning_merge", f"checkpoints.sources=[{tiny_run['ckdir']}]",
           f"data.heldout.path={tiny_run['heldout']}", "data.heldout.block_size=32", "data.heldout.num_blocks=8",
           "data.search_blocks=4", "demo.enabled=false", "baselines.enabled=false", "report.progress=false",
           *extra]
    return subprocess.run(cmd, cwd=cwd, env=dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1"),
                          capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_own_checkpoints_run_is_named_and_a_refused_resume_keeps_the_record(tiny_run, tmp_path):
    name = tiny_run["root"].name  # tiny_run/checkpoints/step*: `checkpoints` is generic, its parent names the run
    proc = _cli(tiny_run, tmp_path, "search.trials=2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert not (tmp_path / "outputs" / "tiny").exists()
    out = tmp_path / "outputs" / name / "paper"
    res = json.loads((out / "results.json").read_text())
    assert Path(res["merged_dir"]) == (out / "merged").resolve()
    assert f"# lightning_merge report: {name} / paper" in (out / "report.md").read_text()
    assert f"# Merged checkpoint ({name})" in (out / "merged" / "README.md").read_text()
    assert f"lightning_merge: {name} (paper" in proc.stdout  # the terminal table's title
    record = {f: (out / ".hydra" / f).read_bytes() for f in ("config.yaml", "hydra.yaml", "overrides.yaml")}
    assert "search.trials=2" in yaml.safe_load(record["overrides.yaml"])
    assert yaml.safe_load(record["config.yaml"])["search"]["trials"] == 2
    assert yaml.safe_load(record["hydra.yaml"])["hydra"]["runtime"]["output_dir"] == str(out.resolve())

    refused = _cli(tiny_run, tmp_path, "search.trials=2", "search.alpha=0.5")
    assert refused.returncode == 2, refused.stderr[-3000:]
    assert "search.space" in refused.stderr  # the fingerprint check names what changed
    for f in ("config.yaml", "overrides.yaml"):
        assert (out / ".hydra" / f).read_bytes() == record[f], f"a refused run rewrote .hydra/{f}"
    assert not (out / ".hydra" / "attempts").exists()

    # An accepted resume with other overrides (a bigger budget) keeps the earlier record as history.
    more = _cli(tiny_run, tmp_path, "search.trials=3", "merge.write=false")
    assert more.returncode == 0, more.stderr[-3000:]
    assert "search.trials=3" in yaml.safe_load((out / ".hydra" / "overrides.yaml").read_text())
    for f, text in record.items():
        assert (out / ".hydra" / "attempts" / "1" / f).read_bytes() == text
