"""Source expansion and the header-only manifest checks: every refusal names file and tensor."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from lightning_merge.checkpoints import CheckpointError
from lightning_merge.series import CheckpointSeries
from lightning_merge.sources import Selector, resolve_sources


def test_folder_of_checkpoints_sorts_steps_numerically(tiny_run):
    paths = resolve_sources([tiny_run["ckdir"]])
    assert [p.name for p in paths] == ["step900", "step1000", "step1100"]
    assert [p.name for p in resolve_sources([tiny_run["ckdir"]], Selector(last=2))] == ["step1000", "step1100"]


def test_selectors(tiny_run):
    names = lambda sel: [p.name for p in resolve_sources([tiny_run["ckdir"]], sel)]  # noqa: E731
    assert names(Selector(every=2)) == ["step900", "step1100"]  # counted back from the newest
    assert names(Selector(steps=[950, 1100])) == ["step1000", "step1100"]
    assert names(Selector(names=["step1100", "step900"])) == ["step900", "step1100"]  # training order
    with pytest.raises(CheckpointError, match=r"checkpoints.names: \['step5'\] not found"):
        names(Selector(names=["step5"]))


def test_manifest_from_headers(tiny_run):
    series = CheckpointSeries.from_sources(tiny_run["paths"])
    assert len(series) == 3
    info = series.newest.tensors["model.embed_tokens.weight"]
    assert info.dtype == torch.float32 and info.shape[1] == 32
    assert series.newest.nbytes == sum(t.numel() * 4 for t in load_file(
        tiny_run["paths"][2] / "model.safetensors").values())


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def test_missing_keys_named(tiny_run, tmp_path):
    bad = _copy(tiny_run["paths"][1], tmp_path / "bad")
    t = load_file(bad / "model.safetensors")
    t.pop("model.norm.weight")
    save_file(t, bad / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"bad: tensor names differ.*model\.norm\.weight"):
        CheckpointSeries.from_sources([tiny_run["paths"][0], bad])


def test_shape_mismatch_named(tiny_run, tmp_path):
    bad = _copy(tiny_run["paths"][1], tmp_path / "vocab")
    t = load_file(bad / "model.safetensors")
    t["model.embed_tokens.weight"] = torch.zeros(t["model.embed_tokens.weight"].shape[0] + 8, 32)
    save_file(t, bad / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"vocab: tensor 'model\.embed_tokens\.weight' has shape"):
        CheckpointSeries.from_sources([tiny_run["paths"][0], bad])


def test_truncated_file_named(tiny_run, tmp_path):
    bad = _copy(tiny_run["paths"][1], tmp_path / "trunc")
    f = bad / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"trunc/model\.safetensors: truncated: tensor"):
        CheckpointSeries.from_sources([tiny_run["paths"][0], bad])


def test_corrupt_header_named(tmp_path):
    d = tmp_path / "corrupt"
    d.mkdir()
    (d / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    with pytest.raises(CheckpointError, match=r"corrupt/model\.safetensors: corrupt"):
        CheckpointSeries.from_sources([d])


def test_non_finite_weights_named_when_read(tiny_run, tmp_path):
    bad = _copy(tiny_run["paths"][1], tmp_path / "nan")
    t = load_file(bad / "model.safetensors")
    t["model.norm.weight"][0] = float("nan")
    save_file(t, bad / "model.safetensors", metadata={"format": "pt"})
    series = CheckpointSeries.from_sources([tiny_run["paths"][0], bad])
    with pytest.raises(CheckpointError, match=r"nan/model\.safetensors: tensor 'model\.norm\.weight'.*non-finite"):
        series.load_resident()


def test_missing_source_named(tmp_path):
    with pytest.raises(CheckpointError, match="nowhere does not exist"):
        CheckpointSeries.from_sources([tmp_path / "nowhere"])


def test_checkpoint_series_keeps_its_documented_import_path():
    """DESIGN.md documents ``CheckpointSeries.from_sources`` in ``lightning_merge.checkpoints``; the class
    lives in ``series.py`` (no import circle) and the old path resolves to it."""
    from lightning_merge.checkpoints import CheckpointSeries as documented
    from lightning_merge.series import CheckpointSeries as home

    assert documented is home and callable(documented.from_sources)


def test_derived_config_folder_follows_the_tokenizer_and_is_published_whole(tmp_path, monkeypatch):
    """A framework run's derived HF folder (config.json + the run's tokenizer files) is keyed on both: a
    retrained tokenizer at the same path gets a new folder, never the stale copy; nothing half-built is left."""
    import os

    from lightning_merge.checkpoints import _derived_config_dir

    monkeypatch.setenv("LIGHTNING_MERGE_CACHE", str(tmp_path / "cache"))
    ck = tmp_path / "run" / "step-1"
    ck.mkdir(parents=True)
    (ck / "tokenizer.json").write_text('{"v": 1}')
    cfg = {"architectures": ["LlamaForCausalLM"], "model_type": "llama"}
    a = _derived_config_dir(cfg, ck)
    assert _derived_config_dir(cfg, ck) == a and (a / "tokenizer.json").read_text() == '{"v": 1}'
    (ck / "tokenizer.json").write_text('{"v": 22}')
    os.utime(ck / "tokenizer.json", ns=(1, 1))
    b = _derived_config_dir(cfg, ck)
    assert b != a and (b / "tokenizer.json").read_text() == '{"v": 22}'
    assert json.loads((b / "config.json").read_text()) == cfg
    assert not [p for p in (tmp_path / "cache" / "configs").iterdir() if p.name.endswith(".tmp")]
