"""The Hydra config composes into the typed schema; bad keys and values fail clearly."""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from lightning_merge.__main__ import CONF_DIR
from lightning_merge.config import ConfigError, RunConfig, to_run_config


def _compose(*overrides: str) -> RunConfig:
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose("config", overrides=["output_dir=/tmp/unused", *overrides])
    return to_run_config(cfg)


def test_default_is_the_tiny_experiment():
    cfg = _compose()
    assert cfg.experiment == "tiny" and cfg.demo.enabled and cfg.mode == "search"
    assert cfg.search.name == "paper" and cfg.search.alpha == 0.3 and cfg.search.trials == 10
    assert cfg.checkpoints.last == 2 and cfg.data.search_blocks == 64 and cfg.data.heldout.num_blocks == 256


def test_experiment_overlay_and_design_names():
    cfg = _compose("+experiment=tiny", "search.alpha=0.1", "search.trials=5", "mode=evaluate",
                   "merge.weights=[0.4,0.6]", "checkpoints.sources=[a,b]")
    assert cfg.search.alpha == 0.1 and cfg.search.trials == 5
    assert cfg.merge.weights == [0.4, 0.6] and cfg.checkpoints.sources == ["a", "b"]


@pytest.mark.parametrize("group", sorted(p.stem for p in (Path(CONF_DIR) / "search").glob("*.yaml")))
def test_every_search_option_composes(group):
    assert _compose(f"search={group}").search.name == group


@pytest.mark.parametrize("group", sorted(p.stem for p in (Path(CONF_DIR) / "strategy").glob("*.yaml")))
def test_every_strategy_option_composes(group):
    assert _compose(f"strategy={group}").strategy.name == group


def test_unknown_key_fails_with_its_name():
    with pytest.raises(Exception, match="search.alpah"):
        _compose("search.alpah=0.2")
    with pytest.raises(ConfigError, match="unknown config key `search.foo`"):
        _compose("+search.foo=1")


def test_out_of_range_value_says_what_is_allowed():
    with pytest.raises(ConfigError, match=r"`search.alpha`: must be in \[0, 1\)"):
        _compose("search.alpha=1.5")
    with pytest.raises(ConfigError, match="`merge.weights`"):
        _compose("mode=merge")
