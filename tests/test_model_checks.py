"""Issue 10, items 1, 2 (coverage), 4, 7, 9 and 10: the model, its tokenizer and the inputs, checked early.

Each case reproduces what a new user ran into: tied embeddings scored as NaN,
a file of the wrong tensors accepted, the demo's text used for the user's own
checkpoints, blocks past the model's positions, a weight count found wrong
only after loading, and a missing tokenizer. Losses are checked against a
plain ``transformers`` loop over blocks rebuilt by hand.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from lightning_merge.checkpoints import CheckpointError
from lightning_merge.config import (CheckpointsConf, ConfigError, DataConf, DemoConf, MergeConf, RunConfig,
                                    TextSetConf)
from lightning_merge.driver import run


BLOCK = 32


def _gpt2(path: Path, seed: int, tokenizer, n_positions: int = 64) -> Path:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=len(tokenizer), n_embd=32, n_layer=2, n_head=4, n_positions=n_positions,
                     eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id)
    GPT2LMHeadModel(cfg).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def _tied_llama(path: Path, seed: int, tokenizer) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, intermediate_size=64, max_position_embeddings=128,
                      tie_word_embeddings=True, eos_token_id=tokenizer.eos_token_id,
                      bos_token_id=tokenizer.bos_token_id)
    LlamaForCausalLM(cfg).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def _cfg(tmp_path: Path, sources, heldout: Path, **kw) -> RunConfig:
    data = DataConf(heldout=TextSetConf(path=str(heldout), block_size=kw.pop("block_size", BLOCK), num_blocks=None),
                    search_blocks=None, batch_size=4)
    return RunConfig(experiment="t", mode=kw.pop("mode", "evaluate"), output_dir=str(tmp_path / "out"),
                     cache_dir=str(tmp_path / "cache"), demo=DemoConf(enabled=kw.pop("demo", False)),
                     checkpoints=kw.pop("checkpoints", CheckpointsConf(sources=[str(s) for s in sources])),
                     data=data, merge=kw.pop("merge", MergeConf(weights=[0.5, 0.5])), **kw)


def _reference_loss(paths: list[Path], weights: list[float], heldout: Path, tokenizer) -> float:
    """A plain transformers loop: merge the state dicts by hand, score every block, sum NLL / tokens."""
    from transformers import AutoModelForCausalLM

    models = [AutoModelForCausalLM.from_pretrained(p, dtype=torch.float32) for p in paths]
    state = {k: sum(w * m.state_dict()[k].double() for w, m in zip(weights, models)).float()
             for k in models[0].state_dict()}
    model = models[-1]
    model.load_state_dict(state)
    model.eval()
    texts = [json.loads(line)["text"] for line in heldout.read_text().splitlines()]
    ids: list[int] = []
    for t in texts:
        ids += tokenizer(t, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    n = len(ids) // BLOCK
    blocks = torch.tensor(ids[: n * BLOCK]).view(n, BLOCK)
    nll, count = 0.0, 0
    with torch.no_grad():
        for b in blocks:
            logits = model(input_ids=b[None]).logits[0, :-1]
            nll += float(F.cross_entropy(logits.double(), b[1:], reduction="sum"))
            count += BLOCK - 1
    return nll / count


@pytest.mark.parametrize("family", ["gpt2", "tied_llama"])
def test_tied_embeddings_scored_like_transformers(family, tmp_path, tokenizer, tiny_run):
    make = _gpt2 if family == "gpt2" else _tied_llama
    paths = [make(tmp_path / "ck" / f"step{s}", seed=s, tokenizer=tokenizer) for s in (1, 2)]
    res = run(_cfg(tmp_path, paths, tiny_run["heldout"]))
    loss = res["best"]["heldout_loss"]
    assert math.isfinite(loss)
    ref = _reference_loss(paths, [0.5, 0.5], tiny_run["heldout"], tokenizer)
    assert loss == pytest.approx(ref, rel=1e-5, abs=1e-5)


def test_build_model_ties_and_checks(tmp_path, tokenizer):
    from lightning_merge.model import build_model

    path = _gpt2(tmp_path / "g", seed=0, tokenizer=tokenizer)
    for meta in (False, True):
        m = build_model(path, meta=meta)
        assert m.get_output_embeddings().weight is m.get_input_embeddings().weight


def test_wrong_tensors_refused_before_merge(tmp_path, tokenizer, tiny_run):
    """A plain state dict with another architecture's names (nanoGPT's) is refused against the model, naming keys."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    gpt = GPT2LMHeadModel(GPT2Config(vocab_size=len(tokenizer), n_embd=32, n_layer=1, n_head=4, n_positions=64))
    files = []
    for i in range(2):
        f = tmp_path / f"ckpt{i}.pt"
        torch.save(gpt.state_dict(), f)
        files.append(f)
    cfg = _cfg(tmp_path, files, tiny_run["heldout"], mode="merge",
               checkpoints=CheckpointsConf(sources=[str(f) for f in files], config_dir=str(tiny_run["paths"][0])))
    with pytest.raises(CheckpointError) as e:
        run(cfg)
    msg = str(e.value)
    assert "ckpt1.pt" in msg and "LlamaForCausalLM" in msg and "model.embed_tokens.weight" in msg
    assert "transformer.wte.weight" in msg  # what it found
    assert not (tmp_path / "out" / "merged").exists()


def test_own_checkpoints_need_heldout_data(tmp_path, tiny_run):
    cfg = _cfg(tmp_path, tiny_run["paths"][:2], tiny_run["heldout"], demo=True)
    cfg.data.heldout.path = ""
    with pytest.raises(ConfigError, match="data.heldout.path"):
        run(cfg)
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").rglob("step*"))  # no demo trained


@pytest.mark.parametrize("family,key,limit", [("gpt2", "n_positions", 64), ("llama", "max_position_embeddings", 128)])
def test_blocks_longer_than_positions_refused(family, key, limit, tmp_path, tokenizer, tiny_run):
    paths = tiny_run["paths"][:2] if family == "llama" else \
        [_gpt2(tmp_path / "ck" / f"step{s}", seed=s, tokenizer=tokenizer) for s in (1, 2)]
    with pytest.raises(CheckpointError) as e:
        run(_cfg(tmp_path, paths, tiny_run["heldout"], block_size=2 * limit))
    assert "data.heldout.block_size" in str(e.value) and f"{key}={limit}" in str(e.value)


def test_weight_count_checked_before_loading(tmp_path, tiny_run):
    ck = tmp_path / "run"
    shutil.copytree(tiny_run["ckdir"], ck)
    from safetensors.torch import save_file

    # Whole, but another model's tensors: opening the series would refuse it; the count must be refused first.
    # (A truncated file no longer serves: a folder's newest that is not completely written is skipped.)
    save_file({"other.weight": torch.zeros(2)}, str(ck / "step1100" / "model.safetensors"))
    cfg = _cfg(tmp_path, [ck], tiny_run["heldout"], mode="merge", merge=MergeConf(weights=[0.2, 0.3, 0.5]))
    with pytest.raises(ConfigError) as e:
        run(cfg)
    msg = str(e.value)
    assert "3 weights for 2 checkpoints" in msg and "checkpoints.last=2 (the default)" in msg
    assert "['step1000', 'step1100']" in msg and "checkpoints.last=3" in msg


def _no_tokenizer_copy(src: Path, dst: Path) -> Path:
    dst.mkdir(parents=True)
    for f in ("config.json", "model.safetensors", "generation_config.json"):
        if (src / f).exists():
            shutil.copy2(src / f, dst / f)
    return dst


def test_missing_tokenizer_named_and_tokenizer_dir(tmp_path, tokenizer, tiny_run):
    paths = [_no_tokenizer_copy(p, tmp_path / "ck" / p.name) for p in tiny_run["paths"][1:]]
    with pytest.raises(CheckpointError) as e:
        run(_cfg(tmp_path, paths, tiny_run["heldout"]))
    assert "no tokenizer found" in str(e.value) and "checkpoints.tokenizer_dir" in str(e.value)
    assert str(paths[-1]) in str(e.value)
    tok = tmp_path / "tok"
    tokenizer.save_pretrained(tok)
    ref = run(_cfg(tmp_path / "a", tiny_run["paths"][1:], tiny_run["heldout"]))["best"]["heldout_loss"]
    for key in ("tokenizer_dir", "config_dir"):  # a tokenizer-only folder, by either option
        cfg = _cfg(tmp_path / key, paths, tiny_run["heldout"],
                   checkpoints=CheckpointsConf(sources=[str(p) for p in paths], **{key: str(tok)}))
        assert run(cfg)["best"]["heldout_loss"] == pytest.approx(ref, abs=1e-9)
    merged = run(_cfg(tmp_path / "m", paths, tiny_run["heldout"], mode="merge",
                      checkpoints=CheckpointsConf(sources=[str(p) for p in paths], tokenizer_dir=str(tok))))
    assert (Path(merged["merged_dir"]) / "tokenizer.json").exists()
    assert (Path(merged["merged_dir"]) / "config.json").exists()


def test_tokenizer_dir_without_tokenizer_refused(tmp_path, tiny_run):
    empty = tmp_path / "empty"
    empty.mkdir()
    cfg = _cfg(tmp_path, tiny_run["paths"][1:], tiny_run["heldout"],
               checkpoints=CheckpointsConf(sources=[str(p) for p in tiny_run["paths"][1:]], tokenizer_dir=str(empty)))
    with pytest.raises(CheckpointError, match="checkpoints.tokenizer_dir: .* holds no tokenizer"):
        run(cfg)


def test_tie_follows_the_resolved_config_not_the_raw_json(tmp_path, tokenizer, tiny_run):
    """An older GPT-2 save: config.json without `tie_word_embeddings` (GPT2Config's default is tied) and an
    explicit lm_head.weight copy in the file. The tie comes from the config as transformers resolves it."""
    from safetensors.torch import load_file, save_file

    paths = []
    for s in (1, 2):
        p = _gpt2(tmp_path / "ck" / f"step{s}", seed=s, tokenizer=tokenizer)
        cfg = json.loads((p / "config.json").read_text())
        cfg.pop("tie_word_embeddings", None)
        (p / "config.json").write_text(json.dumps(cfg))
        state = load_file(p / "model.safetensors")
        state["lm_head.weight"] = state["transformer.wte.weight"].clone()
        save_file(state, p / "model.safetensors", metadata={"format": "pt"})
        paths.append(p)
    loss = run(_cfg(tmp_path, paths, tiny_run["heldout"]))["best"]["heldout_loss"]
    assert loss == pytest.approx(_reference_loss(paths, [0.5, 0.5], tiny_run["heldout"], tokenizer), rel=1e-5)
