"""The watch service's rules, in-process and fast: when a checkpoint is whole, which round comes next,
the warm start, the atomic ``merged`` link, and refusals before any work."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import save

from lightning_merge.completion import incomplete
from lightning_merge.config import ConfigError, RunConfig, CheckpointsConf, SearchConf, WatchConf
from lightning_merge.io import append_jsonl
from lightning_merge.watch import ROUNDS, Watcher, publish_link, round_config


def _weights(folder: Path, cut: int | None = None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text("{}")
    data = save({"w": torch.arange(64, dtype=torch.float32)})
    (folder / "model.safetensors").write_bytes(data if cut is None else data[:cut])
    return folder


def test_safetensors_written_halfway_is_incomplete(tmp_path):
    whole = _weights(tmp_path / "a")
    assert incomplete(whole) is None
    half = _weights(tmp_path / "b", cut=100)
    assert "model.safetensors" in incomplete(half)
    header_only = _weights(tmp_path / "c", cut=5)
    assert incomplete(header_only) is not None


def test_sharded_index_needs_every_shard_whole(tmp_path):
    f = tmp_path / "ck"
    f.mkdir()
    (f / "config.json").write_text("{}")
    for i in (1, 2):
        (f / f"model-0000{i}-of-00002.safetensors").write_bytes(save({f"w{i}": torch.ones(8)}))
    index = {"weight_map": {"w1": "model-00001-of-00002.safetensors", "w2": "model-00002-of-00002.safetensors"}}
    (f / "model.safetensors.index.json").write_text(json.dumps(index))
    assert incomplete(f) is None
    (f / "model-00002-of-00002.safetensors").unlink()
    assert "model-00002-of-00002.safetensors is missing" in incomplete(f)
    (f / "model.safetensors.index.json").write_text('{"weight_map": {"w1": ')  # being written
    assert "index.json" in incomplete(f)


def test_trainer_checkpoint_needs_its_trainer_state(tmp_path):
    f = _weights(tmp_path / "checkpoint-500")
    (f / "optimizer.pt").write_bytes(b"")
    assert "trainer_state.json" in incomplete(f)
    (f / "trainer_state.json").write_text(json.dumps({"global_step": 500}))
    assert incomplete(f) is None


def test_torch_zip_written_halfway_is_incomplete(tmp_path):
    torch.save({"w": torch.ones(1000)}, tmp_path / "whole.bin")
    raw = (tmp_path / "whole.bin").read_bytes()
    (tmp_path / "half.bin").write_bytes(raw[: len(raw) // 2])
    assert incomplete(tmp_path / "whole.bin") is None
    assert "zip" in incomplete(tmp_path / "half.bin")


def test_series_skips_a_newest_being_written(tmp_path, caplog):
    from lightning_merge.sources import resolve_sources

    run = tmp_path / "run"
    for s in (100, 200):
        _weights(run / f"step{s}")
    _weights(run / "step300", cut=200)
    assert [p.name for p in resolve_sources([run])] == ["step100", "step200"]
    assert "step300 is not completely written" in caplog.text
    from lightning_merge.checkpoints import CheckpointError

    with pytest.raises(CheckpointError, match="step300 is not completely written"):
        resolve_sources([run / "step300"])


def _cfg(run: Path, out: Path, **watch) -> RunConfig:
    return RunConfig(mode="watch", output_dir=str(out), checkpoints=CheckpointsConf(sources=[str(run)], last=2),
                     search=SearchConf(space="pairwise", alpha=0.3), watch=WatchConf(poll_s=0.1, **watch))


def _finish(out: Path, d: dict, best=(0.4, 0.6), status="completed") -> None:
    append_jsonl(out / ROUNDS, {k: v for k, v in d.items() if k != "resumed"})
    append_jsonl(out / ROUNDS, {"round": d["round"], "step": d["step"], "sources": d["sources"], "status": status,
                                "best_weights": list(best), "best_baseline": "WMA (linear)",
                                "best_baseline_weights": [1 / 3, 2 / 3]})


def test_rounds_take_the_newest_then_each_new_one(tmp_path):
    run, out = tmp_path / "run", tmp_path / "out"
    out.mkdir()
    for s in (100, 200, 300):
        _weights(run / f"step{s}")
    w = Watcher(_cfg(run, out), out)
    d = w.decide()
    assert d["round"] == "step-300" and [Path(p).name for p in d["sources"]] == ["step200", "step300"]
    assert d["warm_start"] == []
    _finish(out, d)
    w = Watcher(_cfg(run, out), out)
    assert "wait" in w.decide()  # nothing new
    waits = [w.decide()["wait"] for _ in range(4)]
    assert waits == sorted(waits) and waits[-1] > waits[0]  # backing off
    _weights(run / "step400", cut=300)  # being written: not taken
    assert "wait" in w.decide()
    _weights(run / "step400")
    d = w.decide()
    assert d["round"] == "step-400" and [Path(p).name for p in d["sources"]] == ["step300", "step400"]
    # Warm start: the previous best (position by position), and the best schedule so far.
    assert d["warm_start"] == [[0.4, 0.6], [1 / 3, 2 / 3]]
    assert d["warm_origins"] == ["previous best", "best schedule so far: WMA (linear)"]


def test_every_n_and_falling_behind(tmp_path):
    run, out = tmp_path / "run", tmp_path / "out"
    out.mkdir()
    for s in (100, 200):
        _weights(run / f"step{s}")
    w = Watcher(_cfg(run, out, every=2), out)
    d = w.decide()
    _finish(out, d)
    w = Watcher(_cfg(run, out, every=2), out)
    _weights(run / "step300")
    assert "wait" in w.decide()  # one new: every=2 waits for the second
    for s in (400, 500):
        _weights(run / f"step{s}")
    d = w.decide()  # three new during the round: the newest
    assert d["round"] == "step-500"


def test_an_interrupted_round_comes_first_and_stops(tmp_path):
    run, out = tmp_path / "run", tmp_path / "out"
    out.mkdir()
    for s in (100, 200, 300):
        _weights(run / f"step{s}")
    w = Watcher(_cfg(run, out, until_step=300), out)
    d = w.decide()
    append_jsonl(out / ROUNDS, {k: v for k, v in d.items() if k != "resumed"})  # killed mid-round
    d2 = Watcher(_cfg(run, out, until_step=300), out).decide()
    assert d2["resumed"] and d2["round"] == d["round"] and d2["sources"] == d["sources"]
    _finish(out, d)
    assert "until_step=300" in Watcher(_cfg(run, out, until_step=300), out).decide()["stop"]
    (out / "STOP").write_text("")
    assert "stop file" in Watcher(_cfg(run, out), out).decide()["stop"]


def test_round_config_is_a_search_of_its_window(tmp_path):
    cfg = _cfg(tmp_path, tmp_path / "out")
    d = {"round": "step-300", "step": 300, "sources": ["/r/step200", "/r/step300"], "warm_start": [[0.5, 0.5]]}
    rc = round_config(cfg, d, tmp_path / "out")
    assert rc.mode == "search" and rc.checkpoints.sources == d["sources"] and rc.checkpoints.last is None
    assert rc.output_dir == str(tmp_path / "out" / "rounds" / "step-300")
    assert rc.search.warm_start == [[0.5, 0.5]]


def test_merged_link_is_swapped_atomically(tmp_path):
    a, b = tmp_path / "rounds" / "a" / "merged", tmp_path / "rounds" / "b" / "merged"
    a.mkdir(parents=True)
    b.mkdir(parents=True)
    (a / "x").write_text("a")
    (b / "x").write_text("b")
    publish_link(tmp_path / "merged", a)
    assert (tmp_path / "merged" / "x").read_text() == "a"
    publish_link(tmp_path / "merged", b)
    assert (tmp_path / "merged" / "x").read_text() == "b" and os.readlink(tmp_path / "merged") == "rounds/b/merged"


def test_watch_refusals_name_the_option(tmp_path):
    with pytest.raises(ConfigError, match="checkpoints.last"):
        RunConfig(mode="watch", checkpoints=CheckpointsConf(sources=["x"], last=None))
    with pytest.raises(ConfigError, match="checkpoints.names"):
        RunConfig(mode="watch", checkpoints=CheckpointsConf(sources=["x"], names=["a"], last=2))
    with pytest.raises(ConfigError, match="watch.keep_merged"):
        WatchConf(keep_merged="some")
    with pytest.raises(ValueError, match="search.warm_start"):
        from lightning_merge.search import AxSearch
        from lightning_merge.spaces import make_space

        conf = SearchConf(space="pairwise", alpha=0.5, warm_start=[[0.9, 0.1]])  # lam=0.1 < alpha
        AxSearch._warm_points(conf, make_space(conf, 2))
