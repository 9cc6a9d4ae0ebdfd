"""Issue 10, items 2 (open time), 5 and 11: what a checkpoint source is read as, and what is refused.

Every file here is real: a nanoGPT-style ``ckpt.pt`` and a generic training
state file with a one-step AdamW state, an HF Trainer output folder written with
``save_pretrained`` and ``TrainerState.save_to_json``, PyTorch DCP folders written
by ``torch.distributed.checkpoint.save`` (read since issue 11, in place), and the
extraction command run as the refusal tells the user to run it.
"""

from __future__ import annotations

import argparse
import logging
import random
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from conftest import make_llama
from lightning_merge.checkpoints import Checkpoint, CheckpointError
from lightning_merge.series import CheckpointSeries
from lightning_merge.sources import Selector, resolve_sources, step_of


# ---------------------------------------------------------------- item 2: training-state torch files

class _Block(nn.Module):
    def __init__(self, n: int):
        super().__init__()
        self.ln_1, self.ln_2 = nn.LayerNorm(n, bias=False), nn.LayerNorm(n, bias=False)
        self.attn = nn.ModuleDict({"c_attn": nn.Linear(n, 3 * n, bias=False), "c_proj": nn.Linear(n, n, bias=False)})
        self.mlp = nn.ModuleDict({"c_fc": nn.Linear(n, 4 * n, bias=False), "c_proj": nn.Linear(4 * n, n, bias=False)})


class _NanoGPT(nn.Module):
    """nanoGPT's GPT module tree (its parameter names), tied like nanoGPT's ``wte``/``lm_head``."""

    def __init__(self, vocab: int = 64, block: int = 32, n: int = 16, layers: int = 2):
        super().__init__()
        self.transformer = nn.ModuleDict({
            "wte": nn.Embedding(vocab, n), "wpe": nn.Embedding(block, n),
            "h": nn.ModuleList(_Block(n) for _ in range(layers)), "ln_f": nn.LayerNorm(n, bias=False)})
        self.lm_head = nn.Linear(n, vocab, bias=False)
        self.transformer.wte.weight = self.lm_head.weight

    def forward(self, idx):
        t = self.transformer
        x = t.wte(idx) + t.wpe(torch.arange(idx.shape[1]))
        for b in t.h:
            x = x + b.mlp.c_proj(torch.relu(b.mlp.c_fc(b.ln_2(b.attn.c_proj(b.ln_1(x))))))
        return self.lm_head(t.ln_f(x))


def _nanogpt_ckpt(path: Path) -> tuple[Path, int]:
    """``out/ckpt.pt`` as nanoGPT's train.py writes it, after one real AdamW step."""
    torch.manual_seed(0)
    model = _NanoGPT()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95), weight_decay=0.1)
    idx = torch.randint(0, 64, (2, 8))
    nn.functional.cross_entropy(model(idx).flatten(0, 1), idx.flatten()).backward()
    opt.step()
    model_args = dict(n_layer=2, n_head=2, n_embd=16, block_size=32, bias=False, vocab_size=64, dropout=0.0)
    config = dict(out_dir="out", eval_interval=2000, init_from="scratch", dataset="shakespeare_char",
                  learning_rate=1e-3, decay_lr=True, compile=False, dtype="float32", batch_size=2)
    checkpoint = {"model": model.state_dict(), "optimizer": opt.state_dict(), "model_args": model_args,
                  "iter_num": 5, "best_val_loss": torch.tensor(3.2), "config": config}
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(checkpoint, path)
    return path, len(model.state_dict())


def test_nanogpt_ckpt_is_read_as_nanogpt_not_refused(tmp_path):
    ckpt, n = _nanogpt_ckpt(tmp_path / "out" / "ckpt.pt")
    loaded = torch.load(ckpt, weights_only=True)  # nanoGPT's own format passes weights_only
    assert isinstance(loaded["model_args"], dict) and loaded["iter_num"] == 5
    ck = Checkpoint.open(ckpt)  # issue 11: nanoGPT's ckpt.pt is a format of its own (formats/nanogpt.py)
    assert ck.opened.fmt.name == "nanogpt" and ck.config_dir is not None
    w = loaded["model"]["transformer.h.0.attn.c_attn.weight"]
    assert torch.equal(ck.read("transformer.h.0.attn.c_attn.weight"), w.t())  # GPT-2's Conv1D is transposed
    series = CheckpointSeries.from_sources([ckpt.parent])  # nanoGPT's out/ folder
    assert [c.path for c in series.checkpoints] == [ckpt.parent]


def _training_state(path: Path) -> tuple[Path, int]:
    """A generic training loop's ``torch.save({"model", "optimizer", "epoch"})``, after one AdamW step."""
    torch.manual_seed(0)
    model = _NanoGPT()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    idx = torch.randint(0, 64, (2, 8))
    nn.functional.cross_entropy(model(idx).flatten(0, 1), idx.flatten()).backward()
    opt.step()
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(), "epoch": 3,
                "best_val_loss": torch.tensor(3.2)}, path)
    return path, len(model.state_dict())


def test_training_state_file_is_refused_naming_its_state_dict(tmp_path):
    ckpt, n = _training_state(tmp_path / "out" / "last.pt")
    with pytest.raises(CheckpointError) as e:
        Checkpoint.open(ckpt)
    msg = str(e.value)
    assert str(ckpt) in msg and "not a state dict" in msg
    for key in ("model", "optimizer", "epoch", "best_val_loss"):
        assert repr(key) in msg
    assert f"'model' ({n} tensors)" in msg and "optimizer' (" not in msg
    assert "torch.save(torch.load(" in msg and "['model']" in msg
    # the mode=merge / search path opens sources the same way: stopped before any merge
    with pytest.raises(CheckpointError, match=rf"last\.pt: not a state dict.*'model' \({n} tensors\)"):
        CheckpointSeries.from_sources([ckpt])


def test_extracting_the_named_state_dict_as_told_gives_a_checkpoint(tmp_path):
    ckpt, n = _training_state(tmp_path / "last.pt")
    with pytest.raises(CheckpointError) as e:
        Checkpoint.open(ckpt)
    cmd = re.search(r"python -c \"(.+?)\"", str(e.value)).group(1)
    subprocess.run([sys.executable, "-c", cmd], cwd=tmp_path, check=True, timeout=120)
    ck = Checkpoint.open(tmp_path / "model.pt")
    assert len(ck.tensors) == n and "transformer.h.1.attn.c_attn.weight" in ck.tensors


def test_nested_state_dicts_and_lone_tensors_refused(tmp_path):
    sd = {"w": torch.ones(2, 2), "b": torch.zeros(2)}
    both = tmp_path / "ema.pt"
    torch.save({"model": sd, "ema": {k: v + 1 for k, v in sd.items()}, "step": 7}, both)
    with pytest.raises(CheckpointError, match=r"ema\.pt: not a state dict.*'model' \(2 tensors\), 'ema' \(2 tensors\)"):
        Checkpoint.open(both)
    deep = tmp_path / "deep.pt"
    torch.save({"state": {"model": sd, "step": 3}, "epoch": 1}, deep)
    with pytest.raises(CheckpointError, match=r"'state' > 'model' \(2 tensors\).*\['state'\]\['model'\]"):
        Checkpoint.open(deep)
    lone = tmp_path / "lone.pt"
    torch.save({"loss": torch.tensor(1.0), "step": 3, "lr": 0.1}, lone)
    with pytest.raises(CheckpointError, match=r"lone\.pt: not a state dict.*1 of its 3 values is a tensor"):
        Checkpoint.open(lone)
    lst = tmp_path / "list.pt"
    torch.save([torch.ones(2)], lst)
    with pytest.raises(CheckpointError, match=r"list\.pt: holds a list, not a state dict"):
        Checkpoint.open(lst)


def test_plain_state_dict_and_lightning_ckpt_open_as_before(tmp_path):
    sd = {"layer.weight": torch.randn(4, 3), "layer.bias": torch.randn(4), "norm.weight": torch.ones(4)}
    plain = tmp_path / "plain.pt"
    torch.save(sd, plain)
    assert set(Checkpoint.open(plain).tensors) == set(sd)
    ckpt = tmp_path / "lit.ckpt"  # Lightning: callbacks may hold tensors too; only state_dict counts
    torch.save({"state_dict": {f"model.{k}": v for k, v in sd.items()}, "epoch": 3, "global_step": 70,
                "pytorch-lightning_version": "2.6.6", "optimizer_states": [], "lr_schedulers": [],
                "callbacks": {"ModelCheckpoint{'monitor': 'val'}": {"best_model_score": torch.tensor(0.5)}},
                "loops": {}}, ckpt)
    ck = Checkpoint.open(ckpt)
    assert set(ck.tensors) == set(sd)
    torch.testing.assert_close(ck.read("layer.weight"), sd["layer.weight"])


def test_stray_non_tensor_entry_of_a_state_dict_is_named(tmp_path, caplog):
    sd = {"layer.weight": torch.randn(4, 3), "layer.bias": torch.randn(4), "norm.weight": torch.ones(4)}
    extra = tmp_path / "extra.pt"  # a state dict with a stray non-tensor entry: read, the entry named
    torch.save({**sd, "_extra_state": None}, extra)
    with caplog.at_level(logging.WARNING, logger="lightning_merge.checkpoints"):
        assert set(Checkpoint.open(extra).tensors) == set(sd)
    assert "_extra_state" in caplog.text


# ---------------------------------------------------------------- item 5: an HF Trainer output folder

def _trainer_state(folder: Path, step: int, best: str | None = None) -> None:
    from transformers import TrainerState

    log = [{"epoch": s / 10, "learning_rate": 1e-3, "loss": 4.0 - s / 10, "step": s} for s in range(1, step + 1)]
    TrainerState(global_step=step, max_steps=step, log_history=log, best_model_checkpoint=best,
                 save_steps=2, logging_steps=1).save_to_json(str(folder / "trainer_state.json"))


def _trainer_files(folder: Path) -> None:
    """What HF Trainer puts beside the weights: optimizer, scheduler, RNG state and pickled arguments."""
    p = nn.Parameter(torch.ones(3))
    opt = torch.optim.AdamW([p])
    p.grad = torch.ones(3)
    opt.step()
    torch.save(opt.state_dict(), folder / "optimizer.pt")
    torch.save(torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0).state_dict(), folder / "scheduler.pt")
    torch.save({"python": random.getstate(), "cpu": torch.get_rng_state()}, folder / "rng_state.pth")
    torch.save(argparse.Namespace(output_dir="run", save_steps=2), folder / "training_args.bin")


def _run(root: Path, tokenizer, final_seed: int | None, final_step: int | None, steps=(2, 4, 6),
         best: int | None = None) -> Path:
    """``run/checkpoint-N`` for each step (seed N) and, when final_seed is given, the final model in run/."""
    run = root / "run"
    for s in steps:
        ck = make_llama(run / f"checkpoint-{s}", seed=s, tokenizer=tokenizer)
        _trainer_files(ck)
        _trainer_state(ck, s, best=str(run / f"checkpoint-{best}") if best else None)
    if final_seed is not None:
        make_llama(run, seed=final_seed, tokenizer=tokenizer)  # trainer.save_model(): the same save_pretrained
        torch.save(argparse.Namespace(output_dir="run"), run / "training_args.bin")
        if final_step is not None:
            _trainer_state(run, final_step, best=str(run / f"checkpoint-{best}") if best else None)
    return run


def _names(paths) -> list[str]:
    return [p.name for p in paths]


def test_trainer_run_with_identical_final_model_reads_the_checkpoints(tmp_path, tokenizer, caplog):
    run = _run(tmp_path, tokenizer, final_seed=6, final_step=6)  # final save == checkpoint-6
    with caplog.at_level(logging.INFO, logger="lightning_merge.sources"):
        assert _names(resolve_sources([run])) == ["checkpoint-2", "checkpoint-4", "checkpoint-6"]
    assert "identical to its newest checkpoint checkpoint-6" in caplog.text
    series = CheckpointSeries.from_sources([run], last=2)  # checkpoints.last=2 gives 2 checkpoints
    assert _names(series.paths) == ["checkpoint-4", "checkpoint-6"]


def test_identity_by_sampled_tensors_for_large_models(tmp_path, tokenizer, monkeypatch):
    import lightning_merge.sources as sources

    monkeypatch.setattr(sources, "_FULL_COMPARE_BYTES", 0)  # what a 7B model takes: a sample of tensors
    run = _run(tmp_path, tokenizer, final_seed=6, final_step=6)
    assert _names(resolve_sources([run])) == ["checkpoint-2", "checkpoint-4", "checkpoint-6"]
    t = load_file(run / "model.safetensors")  # one more optimizer step: every tensor moves a little
    save_file({k: v + 1e-3 for k, v in t.items()}, run / "model.safetensors", metadata={"format": "pt"})
    _trainer_state(run, 7)
    assert _names(resolve_sources([run])) == ["checkpoint-2", "checkpoint-4", "checkpoint-6", "run"]


def test_trainer_run_with_later_final_model_takes_it_as_newest(tmp_path, tokenizer, caplog):
    run = _run(tmp_path, tokenizer, final_seed=99, final_step=7)  # max_steps=7, save_steps=2
    with caplog.at_level(logging.INFO, logger="lightning_merge.sources"):
        paths = resolve_sources([run])
    assert _names(paths) == ["checkpoint-2", "checkpoint-4", "checkpoint-6", "run"]
    assert "step 7" in caplog.text
    assert step_of(paths[-1]) == 7 and step_of(paths[0]) == 2
    assert _names(resolve_sources([run], Selector(steps=[5, 7]))) == ["checkpoint-6", "run"]
    series = CheckpointSeries.from_sources([run], last=2)
    assert _names(series.paths) == ["checkpoint-6", "run"] and series.config_dir == run


def test_final_model_without_trainer_state_is_newest_with_a_warning(tmp_path, tokenizer, caplog):
    run = _run(tmp_path, tokenizer, final_seed=99, final_step=None)
    with caplog.at_level(logging.WARNING, logger="lightning_merge.sources"):
        assert _names(resolve_sources([run])) == ["checkpoint-2", "checkpoint-4", "checkpoint-6", "run"]
    assert "no trainer_state.json" in caplog.text and "checkpoints.sources=[" in caplog.text


def test_best_model_reloaded_at_end_is_not_counted_twice(tmp_path, tokenizer, caplog):
    run = _run(tmp_path, tokenizer, final_seed=4, final_step=6, best=4)  # load_best_model_at_end
    with caplog.at_level(logging.INFO, logger="lightning_merge.sources"):
        assert _names(resolve_sources([run])) == ["checkpoint-2", "checkpoint-4", "checkpoint-6"]
    assert "checkpoint-4" in caplog.text and "best" in caplog.text


def test_ambiguous_final_model_is_refused_with_both_readings(tmp_path, tokenizer):
    run = _run(tmp_path, tokenizer, final_seed=99, final_step=6)  # says step 6, but differs from checkpoint-6
    with pytest.raises(CheckpointError) as e:
        resolve_sources([run])
    msg = str(e.value)
    assert "checkpoint-6" in msg and "global_step=6" in msg
    kids = ",".join(str(run / f"checkpoint-{s}") for s in (2, 4, 6))
    assert f"checkpoints.sources=[{kids}]" in msg
    assert f"checkpoints.sources=[{kids},{run / 'model.safetensors'}]" in msg
    # both readings, spelled as the message spells them, are accepted
    both = [str(run / f"checkpoint-{s}") for s in (2, 4, 6)] + [str(run / "model.safetensors")]
    series = CheckpointSeries.from_sources(both, last=2)
    assert _names(series.paths) == ["checkpoint-6", "model.safetensors"]
    assert series.config_dir == run / "checkpoint-6"


def test_checkpoint_folder_with_trainer_files_is_one_checkpoint(tmp_path, tokenizer):
    run = _run(tmp_path, tokenizer, final_seed=None, final_step=None)
    assert _names(resolve_sources([run / "checkpoint-4"])) == ["checkpoint-4"]
    assert _names(resolve_sources([run])) == ["checkpoint-2", "checkpoint-4", "checkpoint-6"]


# ---------------------------------------------------------------- item 11: formats recognised, not read

def _hf_state(tokenizer, tmp_path: Path, seed: int = 0) -> tuple[Path, dict]:
    hf = make_llama(tmp_path / f"hf{seed}", seed=seed, tokenizer=tokenizer)
    return hf, load_file(hf / "model.safetensors")


def _dcp_save(state: dict, folder: Path) -> Path:
    import torch.distributed.checkpoint as dcp

    dcp.save(state, checkpoint_id=str(folder))  # no process group: a single-process save
    assert (folder / ".metadata").exists() and list(folder.glob("*.distcp"))
    return folder


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_dcp_folder_is_read_with_a_config_dir_and_its_shard_file_points_to_it(tmp_path, tokenizer):
    hf, sd = _hf_state(tokenizer, tmp_path)
    dcp_dir = _dcp_save(dict(sd), tmp_path / "step-100")
    with pytest.raises(CheckpointError) as e:  # HF-named DCP keys, but the model's config is not in the folder
        CheckpointSeries.from_sources([dcp_dir])
    assert str(dcp_dir) in str(e.value) and "checkpoints.config_dir" in str(e.value)
    series = CheckpointSeries.from_sources([dcp_dir], config_dir=hf)  # issue 11: read in place
    assert set(series.names) == set(sd)
    for name in ("model.norm.weight", "model.layers.0.self_attn.q_proj.weight"):
        assert torch.equal(series.newest.read(name), sd[name])
    with pytest.raises(CheckpointError, match=r"__0_0\.distcp: one shard file of a PyTorch Distributed Checkpoint: "
                                              r"give its folder " + re.escape(str(dcp_dir))):
        CheckpointSeries.from_sources([dcp_dir / "__0_0.distcp"])


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_torchtitan_training_state_dcp_converts_to_a_refused_nested_file(tmp_path):
    sd = {"tok_embeddings.weight": torch.randn(8, 4), "norm.weight": torch.ones(4)}
    opt = {"state": {"norm.weight": {"exp_avg": torch.zeros(4)}}}
    state = {"model": sd, "optimizer": opt, "train_state": {"step": 100}}
    step = _dcp_save(state, tmp_path / "checkpoint" / "step-100")
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save  # what the CLI runs

    dcp_to_torch_save(str(step), str(tmp_path / "step-100.pt"))
    with pytest.raises(CheckpointError, match=r"step-100\.pt: not a state dict.*'model' \(2 tensors\)"):
        Checkpoint.open(tmp_path / "step-100.pt")


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_folder_of_dcp_steps_with_an_unknown_layout_names_its_keys(tmp_path):
    root = tmp_path / "checkpoint"
    for s in (100, 200):
        _dcp_save({"w": torch.full((3,), float(s)), "v": torch.ones(2)}, root / f"step-{s}")
    cfg = tmp_path / "hf"
    cfg.mkdir()
    (cfg / "config.json").write_text('{"architectures": ["LlamaForCausalLM"], "model_type": "llama"}')
    with pytest.raises(CheckpointError) as e:
        CheckpointSeries.from_sources([root], config_dir=cfg)
    msg = str(e.value)
    assert "step-" in msg and "no built-in map knows" in msg and "'v', 'w'" in msg
    assert "known torchtitan layouts" in msg and "checkpoints.name_map=mypkg.maps:to_hf" in msg


def test_legacy_megatron_peft_and_gguf_are_named(tmp_path):
    mega = tmp_path / "megatron"
    (mega / "iter_0000100" / "mp_rank_00").mkdir(parents=True)  # the legacy per-rank save, not torch_dist
    torch.save({"model": {"w": torch.ones(2)}, "iteration": 100}, mega / "iter_0000100" / "mp_rank_00" /
               "model_optim_rng.pt")
    (mega / "latest_checkpointed_iteration.txt").write_text("100")
    with pytest.raises(CheckpointError, match=r"megatron: a Megatron-LM checkpoint folder \(latest iteration 100\)"):
        resolve_sources([mega])
    peft = tmp_path / "adapter"
    peft.mkdir()
    (peft / "adapter_config.json").write_text('{"peft_type": "LORA", "base_model_name_or_path": "org/base"}')
    save_file({"base_model.model.layers.0.q_proj.lora_A.weight": torch.zeros(2, 4)}, peft / "adapter_model.safetensors")
    with pytest.raises(CheckpointError, match=r"adapter: a PEFT adapter \(LORA, base org/base\).*merge_and_unload"):
        CheckpointSeries.from_sources([peft])
    gguf = tmp_path / "model-q4.gguf"
    gguf.write_bytes(b"GGUF\x03\x00\x00\x00" + b"\x00" * 32)
    with pytest.raises(CheckpointError, match=r"model-q4\.gguf: a GGUF file \(llama\.cpp\)"):
        CheckpointSeries.from_sources([gguf])


def test_unknown_folder_still_lists_what_it_found(tmp_path):
    d = tmp_path / "misc"
    d.mkdir()
    (d / "notes.txt").write_text("x")
    with pytest.raises(CheckpointError, match=r"misc is neither a checkpoint nor a folder of checkpoints.*notes\.txt"):
        resolve_sources([d])
