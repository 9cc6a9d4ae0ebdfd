"""Every real checkpoint format is read, merged and checked against hand-computed values."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import make_llama
from lightning_merge.checkpoints import Checkpoint, CheckpointError
from lightning_merge.series import CheckpointSeries
from lightning_merge.merge import MergeError
from lightning_merge.writer import write_merged

HERE = Path(__file__).parent


def _ref(path: Path) -> dict[str, torch.Tensor]:
    return load_file(path / "model.safetensors")


def _check_merge(series: CheckpointSeries, refs: list[dict], tmp_path: Path, w=(0.3, 0.7)) -> None:
    out = write_merged(series, list(w), tmp_path / "merged")
    got = {}
    for f in out.glob("*.safetensors"):
        got.update(load_file(f))
    assert got.keys() == refs[0].keys()
    for n in refs[0]:
        want = sum(wk * r[n] for wk, r in zip(w, refs))
        torch.testing.assert_close(got[n], want, rtol=1e-6, atol=1e-7)


@pytest.fixture(scope="module")
def formats(tmp_path_factory, tokenizer):
    """Two checkpoints (seeds 1, 2) saved in each format."""
    root = tmp_path_factory.mktemp("formats")
    out = {}
    for seed in (1, 2):
        base = make_llama(root / f"st{seed}", seed, tokenizer)
        out.setdefault("safetensors", []).append(base)
        out.setdefault("sharded", []).append(make_llama(root / f"sh{seed}", seed, tokenizer, max_shard_size="20KB"))
        sd = _ref(base)
        binf = root / f"bin{seed}"  # transformers 5 no longer writes .bin: save it as older runs did
        shutil.copytree(base, binf)
        (binf / "model.safetensors").unlink()
        torch.save(sd, binf / "pytorch_model.bin")
        out.setdefault("bin", []).append(binf)
        binsh = root / f"binsh{seed}"
        shutil.copytree(base, binsh)
        (binsh / "model.safetensors").unlink()
        names = sorted(sd)
        half = len(names) // 2
        wm = {}
        for i, part in enumerate((names[:half], names[half:])):
            fn = f"pytorch_model-0000{i + 1}-of-00002.bin"
            torch.save({n: sd[n] for n in part}, binsh / fn)
            wm.update({n: fn for n in part})
        import json

        (binsh / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": wm}))
        out.setdefault("bin_sharded", []).append(binsh)
        ckpt = root / f"lit{seed}.ckpt"
        torch.save({"state_dict": {f"model.{k}": v for k, v in sd.items()}, "epoch": 3, "global_step": 70,
                    "optimizer_states": [], "lr_schedulers": []}, ckpt)
        out.setdefault("lightning", []).append(ckpt)
        out.setdefault("refs", []).append(sd)
    return out


@pytest.mark.parametrize("fmt", ["safetensors", "sharded", "bin", "bin_sharded"])
def test_hf_folder_formats_merge_to_hand_computed(formats, fmt, tmp_path):
    paths = formats[fmt]
    if fmt == "sharded":
        assert (paths[0] / "model.safetensors.index.json").exists()
    if fmt == "bin":
        assert (paths[0] / "pytorch_model.bin").exists()
    series = CheckpointSeries.from_sources(paths)
    assert set(series.names) == set(formats["refs"][0])
    _check_merge(series, formats["refs"], tmp_path)


def test_lightning_ckpt_with_module_prefix(formats, tmp_path):
    series = CheckpointSeries.from_sources(formats["lightning"], config_dir=formats["safetensors"][0])
    assert "model.embed_tokens.weight" in series.names and "lm_head.weight" in series.names
    _check_merge(series, formats["refs"], tmp_path)
    assert (tmp_path / "merged" / "config.json").exists() and (tmp_path / "merged" / "tokenizer.json").exists()


def test_mixed_formats_in_one_series(formats, tmp_path):
    series = CheckpointSeries.from_sources([formats["bin"][0], formats["sharded"][1]])
    _check_merge(series, formats["refs"], tmp_path, w=(0.5, 0.5))


class _Evil:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_bin_with_arbitrary_object_is_refused_and_never_runs(formats, tmp_path):
    marker = tmp_path / "pwned"
    bad = tmp_path / "evil"
    shutil.copytree(formats["bin"][0], bad)
    sd = torch.load(bad / "pytorch_model.bin", weights_only=True)
    sd["payload"] = _Evil(marker)
    torch.save(sd, bad / "pytorch_model.bin")
    assert not marker.exists()
    with pytest.raises(CheckpointError, match=r"evil/pytorch_model.bin: refused to load.*never unpickles"):
        CheckpointSeries.from_sources([formats["bin"][1], bad])
    assert not marker.exists(), "the pickled object's code ran"


def test_truncated_bin_named(formats, tmp_path):
    bad = tmp_path / "trunc"
    shutil.copytree(formats["bin"][0], bad)
    data = (bad / "pytorch_model.bin").read_bytes()
    (bad / "pytorch_model.bin").write_bytes(data[: len(data) // 3])
    # Named as a source: refused by the completion rule (a save in flight or a crashed one), naming the file.
    with pytest.raises(CheckpointError, match=r"trunc is not completely written \(pytorch_model.bin is not a "
                                              r"whole zip archive"):
        CheckpointSeries.from_sources([bad])
    # Opened directly (past the rule), the reader itself refuses it.
    from lightning_merge.checkpoints import Checkpoint

    with pytest.raises(CheckpointError, match=r"trunc/pytorch_model.bin: corrupt or truncated"):
        Checkpoint.open(bad)


def test_tied_embeddings_follow_the_config(tmp_path, tokenizer):
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    paths = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        cfg = LlamaConfig(vocab_size=len(tokenizer), hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                          intermediate_size=32, tie_word_embeddings=True)
        m = LlamaForCausalLM(cfg)
        m.save_pretrained(tmp_path / f"t{seed}")
        tokenizer.save_pretrained(tmp_path / f"t{seed}")
        paths.append(tmp_path / f"t{seed}")
    series = CheckpointSeries.from_sources(paths)
    assert series.tied and "lm_head.weight" not in series.names
    out = write_merged(series, [0.5, 0.5], tmp_path / "m")
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    a, b = _ref(paths[0]), _ref(paths[1])
    n = "model.embed_tokens.weight"
    torch.testing.assert_close(model.model.embed_tokens.weight.detach(), 0.5 * a[n] + 0.5 * b[n])


def test_nonfloat_policy(tmp_path, formats):
    from safetensors.torch import save_file

    paths = []
    for i in (0, 1):
        d = tmp_path / f"nf{i}"
        shutil.copytree(formats["safetensors"][i], d)
        sd = _ref(d)
        sd["buf.step"] = torch.tensor([10 + i], dtype=torch.int64)
        save_file(sd, d / "model.safetensors", metadata={"format": "pt"})
        paths.append(d)
    series = CheckpointSeries.from_sources(paths)
    with pytest.raises(MergeError, match=r"non-float tensor 'buf.step' differs.*merge.nonfloat=newest"):
        write_merged(series, [0.5, 0.5], tmp_path / "m")
    out = write_merged(series, [0.5, 0.5], tmp_path / "m", nonfloat="newest")
    assert _ref(out)["buf.step"].tolist() == [11]


def test_disk_space_checked_first(formats, tmp_path, monkeypatch):
    import shutil as _sh

    series = CheckpointSeries.from_sources(formats["safetensors"])
    monkeypatch.setattr(_sh, "disk_usage", lambda p: _sh._ntuple_diskusage(10**12, 10**12 - 5, 5))
    need = sum(t.nbytes for t in series.newest.tensors.values())
    with pytest.raises(OSError, match=rf"while writing the merged model \(and a 2% \+ 1 MiB margin\): it needs "
                                      rf"{need:,} bytes, 5 bytes free"):
        write_merged(series, [0.5, 0.5], tmp_path / "m")
    assert not (tmp_path / "m").exists()


@pytest.mark.slow
@pytest.mark.parametrize("stage", [2, 3])
def test_deepspeed_zero_folder_real_save(formats, tmp_path, stage):
    zero = []
    for i, src in enumerate(formats["safetensors"]):
        out = tmp_path / f"zero{i}"
        env = dict(os.environ, MASTER_PORT=str(29540 + stage * 2 + i), OMP_NUM_THREADS="1")
        proc = subprocess.run([sys.executable, str(HERE / "zero_checkpoint.py"), str(src), str(out), str(stage)],
                              capture_output=True, text=True, timeout=600, env=env)
        assert proc.returncode == 0, proc.stderr[-3000:]
        zero.append(out)
    ck = Checkpoint.open(zero[0])
    assert set(ck.tensors) == set(formats["refs"][0])
    series = CheckpointSeries.from_sources(zero, config_dir=formats["safetensors"][0])
    _check_merge(series, formats["refs"], tmp_path)
