"""Every experiment and every group option composes into a checked RunConfig; the SLURM launcher composes.

The experiments name real hub checkpoints (``org/name@revision``); nothing is
downloaded here, only the composed config is checked: which sources, strategy,
precision, remote code and held-out set each experiment asks for.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

# The shared helper of test_config.py: compose with overrides, then to_run_config.
from test_config import _compose

from lightning_merge.__main__ import CONF_DIR
from lightning_merge.config import register_configs
from lightning_merge.hub import parse_hub_source

register_configs()

CONF = Path(CONF_DIR)
EXPERIMENTS = sorted(p.stem for p in (CONF / "experiment").glob("*.yaml"))
GROUPS = ["checkpoints", "data", "model", "search", "strategy"]
OPTIONS = [(g, p.stem) for g in GROUPS for p in sorted((CONF / g).glob("*.yaml"))]

BAICHUAN = "baichuan-inc/Baichuan2-7B-Intermediate-Checkpoints"
PYTHIA_SIZES = {"pythia": "1.4b", "pythia_160m": "160m", "pythia_410m": "410m", "pythia_2.8b": "2.8b"}
#: Experiments whose checkpoints ship their own modeling code; everything else keeps the default (off).
REMOTE_CODE = {"baichuan7b"}

#: name -> (strategy name, accelerator, devices, precision, model dtype)
STRATEGY = {
    "tiny": ("single", "cpu", 1, "32-true", "float32"),
    "tiny_watch": ("single", "cpu", 1, "32-true", "float32"),
    "tiny_lmeval": ("single", "cpu", 1, "32-true", "float32"),
    "baichuan7b": ("deepspeed_stage_3", "gpu", 8, "bf16-true", "bfloat16"),
    "deepseek": ("deepspeed_stage_3", "gpu", 8, "bf16-true", "bfloat16"),
    "pythia": ("ddp", "gpu", 8, "32-true", "float32"),
    "pythia_160m": ("ddp", "gpu", 8, "32-true", "float32"),
    "pythia_410m": ("ddp", "gpu", 8, "32-true", "float32"),
    "pythia_2.8b": ("ddp", "gpu", 8, "16-true", "float16"),
    "torchtitan_llama3": ("deepspeed_stage_3", "gpu", 8, "bf16-true", "bfloat16"),
    "megatron_gpt": ("deepspeed_stage_3", "gpu", 8, "bf16-true", "bfloat16"),
    "olmo_core": ("deepspeed_stage_3", "gpu", 8, "bf16-true", "bfloat16"),
    "litgpt": ("ddp", "gpu", 8, "bf16-true", "bfloat16"),
    "nanogpt": ("ddp", "gpu", 8, "32-true", "float32"),
}
#: The training frameworks' overlays: name -> (env var of the run's checkpoint folder, the HF folder's env
#: var (config_dir, or tokenizer_dir for nanoGPT) or None when the run carries its own config).
FRAMEWORKS = {
    "torchtitan_llama3": ("TORCHTITAN_CKPT_DIR", "HF_ASSETS"),
    "megatron_gpt": ("MEGATRON_SAVE_DIR", "HF_ASSETS"),
    "olmo_core": ("OLMO_SAVE_FOLDER", "OLMO_HF"),
    "litgpt": ("LITGPT_OUT_DIR", None),
    "nanogpt": ("NANOGPT_CKPTS", "GPT2_TOKENIZER"),
}


def test_the_issue_experiments_exist():
    assert {"tiny", "baichuan7b", "pythia", "deepseek"} <= set(EXPERIMENTS)
    assert set(STRATEGY) == set(EXPERIMENTS), "add the new experiment to STRATEGY (and its checks) here"


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_experiment_composes_into_a_run_config(name):
    cfg = _compose(f"+experiment={name}")
    assert cfg.experiment == name  # the run folder is outputs/<experiment>/<search.name>
    strategy, accelerator, devices, precision, dtype = STRATEGY[name]
    assert (cfg.strategy.name, cfg.strategy.accelerator, cfg.strategy.devices, cfg.strategy.num_nodes,
            cfg.strategy.precision) == (strategy, accelerator, devices, 1, precision)
    assert cfg.model.dtype == dtype
    assert cfg.demo.enabled == name.startswith("tiny")
    if name == "tiny_watch":  # the demo trained in the background and watched: rounds over the newest 4
        assert cfg.mode == "watch" and cfg.search.space == "simplex" and cfg.checkpoints.last == 4
        assert cfg.demo.save_pause_s > 0 and not cfg.checkpoints.sources
        return
    assert cfg.search.name == "paper" and cfg.search.space == "pairwise" and cfg.search.trials >= 2
    assert cfg.checkpoints.last == 2
    if name == "tiny_lmeval":  # the demo merged for an lm-eval objective, with an lm-eval report table
        assert cfg.search.objective == "lmeval" and cfg.lmeval.task == "cloze_local"
        assert cfg.report.lmeval.tasks == ["text_local"] and not cfg.checkpoints.sources
        return
    if name != "tiny":
        assert cfg.checkpoints.sources, f"{name}: no checkpoints.sources"
        held = cfg.data.heldout
        assert bool(held.path) != bool(held.name), f"{name}: data.heldout needs a path or a hub name"


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_trust_remote_code_only_where_needed(name):
    assert _compose(f"+experiment={name}").model.trust_remote_code == (name in REMOTE_CODE)


def test_remote_code_is_off_by_default():
    assert _compose().model.trust_remote_code is False


def _hub(sources: list[str]) -> list[tuple[str, str]]:
    parsed = [parse_hub_source(s) for s in sources]
    assert all(parsed), f"not hub specs: {sources}"
    return parsed


def test_baichuan7b_is_the_late_adjacent_pair_of_the_intermediate_checkpoints():
    cfg = _compose("+experiment=baichuan7b")
    (r1, v1), (r2, v2) = _hub(cfg.checkpoints.sources)
    assert r1 == r2 == BAICHUAN
    tokens = [int(re.fullmatch(r"train_(\d{5})B", v).group(1)) for v in (v1, v2)]
    assert tokens == [2200, 2420]  # adjacent: the published revisions are 220B tokens apart
    assert cfg.data.heldout.name == "EleutherAI/wikitext_document_level" and cfg.data.heldout.text_column == "page"
    assert cfg.data.mc.name is None and not cfg.data.mc.path and cfg.search.objective == "heldout_loss"


def test_baichuan7b_lmeval_objective_as_documented():
    cfg = _compose("+experiment=baichuan7b", "search.objective=lmeval", "lmeval.task=ceval_local",
                   "lmeval.data.ceval_local=/data/ceval-exam", "lmeval.num_fewshot=5",
                   "report.lmeval.tasks=[cmmlu_local,mmlu_local]")
    assert cfg.search.objective == "lmeval" and cfg.lmeval.metric_key == "acc,none" and cfg.lmeval.num_fewshot == 5


@pytest.mark.parametrize("override", ["data.mc.path=/data/ceval-exam", "search.objective=mc_acc",
                                      "data.mc.name=cais/mmlu"])
def test_the_retired_mc_scorer_is_refused_with_its_lmeval_replacement(override):
    with pytest.raises(Exception, match=r"lmeval.task=mmlu_local lmeval.data.mmlu_local=PATH"):
        _compose("+experiment=baichuan7b", override)


@pytest.mark.parametrize("name", sorted(PYTHIA_SIZES))
def test_pythia_sizes_are_adjacent_step_revisions(name):
    cfg = _compose(f"+experiment={name}")
    (r1, v1), (r2, v2) = _hub(cfg.checkpoints.sources)
    assert r1 == r2 == f"EleutherAI/pythia-{PYTHIA_SIZES[name]}"
    steps = [int(re.fullmatch(r"step(\d+)", v).group(1)) for v in (v1, v2)]
    assert steps == [142000, 143000]  # Pythia saves every 1000 steps; step143000 is the final model


def test_deepseek_template_points_at_a_local_folder(monkeypatch, tmp_path):
    monkeypatch.delenv("DEEPSEEK_CKPT_DIR", raising=False)
    cfg = _compose("+experiment=deepseek")
    assert len(cfg.checkpoints.sources) == 1 and Path(cfg.checkpoints.sources[0]).is_absolute()
    assert parse_hub_source(cfg.checkpoints.sources[0]) is None  # a path, not a hub spec
    monkeypatch.setenv("DEEPSEEK_CKPT_DIR", str(tmp_path))
    assert _compose("+experiment=deepseek").checkpoints.sources == [str(tmp_path)]


@pytest.mark.parametrize("name", sorted(FRAMEWORKS))
def test_framework_overlays_read_the_run_folder_and_write_both_formats(name, monkeypatch, tmp_path):
    env, hf = FRAMEWORKS[name]
    monkeypatch.setenv(env, str(tmp_path / "run"))
    monkeypatch.setenv("HELDOUT", str(tmp_path / "heldout.jsonl"))
    if hf:
        monkeypatch.setenv(hf, str(tmp_path / "hf"))
    cfg = _compose(f"+experiment={name}")
    assert cfg.checkpoints.sources == [str(tmp_path / "run")] and cfg.checkpoints.last == 2
    assert cfg.merge.format == "both" and cfg.merge.optimizer == "none"
    assert cfg.data.heldout.path == str(tmp_path / "heldout.jsonl")
    folder = cfg.checkpoints.tokenizer_dir if name == "nanogpt" else cfg.checkpoints.config_dir
    assert folder == (str(tmp_path / "hf") if hf else None)
    if name in ("megatron_gpt", "olmo_core"):  # these runs carry their config: the HF folder is optional
        monkeypatch.delenv(hf)
        assert _compose(f"+experiment={name}").checkpoints.config_dir is None


def test_command_line_wins_over_the_experiment():
    cfg = _compose("+experiment=baichuan7b", "strategy=ddp", "strategy.devices=4", "strategy.num_nodes=2",
                   "search.alpha=0.5")
    assert (cfg.strategy.name, cfg.strategy.devices, cfg.strategy.num_nodes) == ("ddp", 4, 2)
    assert cfg.strategy.precision == "bf16-true" and cfg.search.alpha == 0.5


@pytest.mark.parametrize("name", sorted(PYTHIA_SIZES))
def test_pythia_on_one_gpu_as_documented(name):
    cfg = _compose(f"+experiment={name}", "strategy=single", "strategy.devices=1")
    assert (cfg.strategy.name, cfg.strategy.accelerator, cfg.strategy.devices) == ("single", "gpu", 1)


@pytest.mark.parametrize("group, option", OPTIONS, ids=[f"{g}={o}" for g, o in OPTIONS])
def test_every_group_option_composes(group, option):
    cfg = _compose(f"{group}={option}")
    if group in ("search", "strategy"):
        assert getattr(cfg, group).name == option


# ----------------------------------------------------------------------------- hydra/launcher=slurm

SLURM_LAUNCHER = "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"


def _launcher(*overrides: str):
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher", reason="pip install hydra-submitit-launcher")
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose("config", overrides=["hydra/launcher=slurm", *overrides], return_hydra_config=True)
    return cfg.hydra.launcher


def test_slurm_launcher_composes():
    launcher = _launcher("+experiment=baichuan7b")
    assert launcher._target_ == SLURM_LAUNCHER
    assert launcher.nodes == 1 and launcher.gpus_per_node == 8
    assert launcher.tasks_per_node == launcher.gpus_per_node  # one process per GPU (Lightning's SLURMEnvironment)
    assert launcher.partition is None
    assert 0 < launcher.signal_delay_s < launcher.timeout_min * 60
    assert launcher.max_num_timeout >= 1 and launcher.additional_parameters.requeue is True
    strategy = _compose("+experiment=baichuan7b").strategy
    assert (strategy.devices, strategy.num_nodes) == (launcher.tasks_per_node, launcher.nodes)


def test_slurm_launcher_overrides():
    launcher = _launcher("hydra.launcher.partition=gpu", "hydra.launcher.nodes=2", "hydra.launcher.timeout_min=60")
    assert (launcher.partition, launcher.nodes, launcher.timeout_min) == ("gpu", 2, 60)


def test_slurm_launcher_sbatch_from_submitit(tmp_path, monkeypatch):
    """The sbatch text submitit writes for this config (parameters mapped as the plugin's launch() does)."""
    submitit = pytest.importorskip("submitit")
    from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf
    from omegaconf import OmegaConf

    # SlurmExecutor refuses to start without srun on PATH; a stand-in is enough to render the script.
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "srun").write_text("#!/bin/sh\n")
    (tmp_path / "bin" / "srun").chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}{os.pathsep}{os.environ.get('PATH', '')}")

    params = OmegaConf.to_container(_launcher("hydra.sweep.dir=" + str(tmp_path / "sweep")), resolve=False)
    params.pop("_target_")
    params["name"] = "lightning_merge"  # ${hydra.job.name} resolves only inside a run
    params["submitit_folder"] = str(tmp_path / "submitit")
    executor = submitit.AutoExecutor(cluster="slurm", folder=params.pop("submitit_folder"),
                                     slurm_max_num_timeout=params.pop("max_num_timeout"))
    base = set(OmegaConf.structured(BaseQueueConf).keys())
    executor.update_parameters(**{k if k in base else f"slurm_{k}": v for k, v in params.items()})
    text = executor._executor._make_submission_file_text("python -u -m submitit.core._submit x", "uid")
    for line in ("#SBATCH --nodes=1", "#SBATCH --ntasks-per-node=8", "#SBATCH --gpus-per-node=8",
                 "#SBATCH --signal=USR2@600", "#SBATCH --requeue", "#SBATCH --open-mode=append",
                 "#SBATCH --time=240", "export TORCH_NCCL_ASYNC_ERROR_HANDLING=1"):
        assert line in text.splitlines(), f"{line!r} missing from:\n{text}"
    assert "--partition" not in text
