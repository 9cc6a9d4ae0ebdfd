"""LitGPT ``lit_model.pth`` and nanoGPT ``ckpt.pt``: written by the frameworks' own code, read lazily, mapped
to HF (checked against LitGPT's ``convert_lit_checkpoint`` and nanoGPT's ``from_pretrained`` transposes, and by
logits), merged and written back in their own format, loaded by their own loaders."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from lightning_merge.errors import CheckpointError
from lightning_merge.formats import find, open_mapped
from lightning_merge.formats.base import assemble

W = [0.2, 0.3, 0.5]


def _merge(tensors: list[torch.Tensor], w=W) -> torch.Tensor:
    acc = torch.zeros(tensors[0].shape, dtype=torch.float32)
    for wk, t in zip(w, tensors):
        acc += wk * t.float()
    return acc.to(tensors[0].dtype)


def _hf_model(cfg: dict, sd: dict[str, torch.Tensor]):
    import transformers

    cfg = dict(cfg)
    conf = transformers.AutoConfig.for_model(cfg.pop("model_type"), **cfg)
    model = getattr(transformers, conf.architectures[0])(conf).eval()
    missing, unexpected = model.load_state_dict(sd, strict=False)
    assert not unexpected
    assert set(missing) <= {"lm_head.weight"}, missing
    return model


# ----------------------------------------------------------------------------------------------- LitGPT

def _lit_config(style: str):
    from litgpt import Config

    if style == "llama":
        return Config(name="tiny-llama-test", block_size=32, vocab_size=100, padded_vocab_size=128, n_layer=2,
                      n_head=4, n_query_groups=2, n_embd=64, intermediate_size=96, bias=False,
                      mlp_class_name="LLaMAMLP", norm_class_name="RMSNorm", parallel_residual=False,
                      rotary_percentage=1.0, rope_base=10000, norm_eps=1e-5)
    return Config.from_name("pythia-14m", n_layer=2, n_embd=64, n_head=4, intermediate_size=128, vocab_size=128,
                            padded_vocab_size=128, block_size=32)


def _lit_run(root: Path, style: str, steps: int = 3) -> list[Path]:
    """``out_dir/step-XXXXXXXX/lit_model.pth`` saved as ``litgpt pretrain``'s ``save_checkpoint`` does."""
    from lightning.fabric import Fabric
    from litgpt import GPT
    from litgpt.utils import save_config

    torch.manual_seed(0)
    cfg = _lit_config(style)
    fabric = Fabric(accelerator="cpu", devices=1)
    model = GPT(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model, opt = fabric.setup(model, opt)
    out = []
    for step in range(1, steps + 1):
        x = torch.randint(0, cfg.vocab_size, (2, 9))
        loss = torch.nn.functional.cross_entropy(model(x[:, :-1]).flatten(0, 1), x[:, 1:].flatten())
        fabric.backward(loss)
        opt.step()
        opt.zero_grad()
        f = root / style / f"step-{step:08d}" / "lit_model.pth"
        f.parent.mkdir(parents=True)
        fabric.save(f, {"model": model, "optimizer": opt, "iter_num": step, "step_count": step})
        save_config(cfg, f.parent)
        out.append(f.parent)
    return out


@pytest.fixture(scope="module")
def lit_runs(tmp_path_factory):
    pytest.importorskip("litgpt")
    root = tmp_path_factory.mktemp("litgpt")
    return {s: _lit_run(root, s) for s in ("llama", "neox")}


@pytest.mark.parametrize("style", ["llama", "neox"])
def test_litgpt_manifest_series_and_no_read(lit_runs, style):
    from lightning_merge.formats import find_series

    folders = lit_runs[style]
    fmt, kids = find_series(folders[0].parent)
    assert fmt.name == "litgpt" and sorted(kids) == folders
    assert find(folders[0]).name == "litgpt" and fmt.complete(folders[0])
    ck = fmt.open(folders[-1])
    assert ck.bytes_read == 0
    sd = torch.load(folders[-1] / "lit_model.pth", weights_only=True)["model"]
    assert {n: (tuple(t.shape), t.dtype) for n, t in sd.items()} == \
        {n: (t.shape, t.dtype) for n, t in ck.tensors.items()}
    assert any(n.startswith("optimizer.state.") and n.endswith("exp_avg") for n in ck.others)
    assert ck.hf_config["architectures"] == [{"llama": "LlamaForCausalLM", "neox": "GPTNeoXForCausalLM"}[style]]
    assert ck.bytes_read == 0


@pytest.mark.parametrize("style", ["llama", "neox"])
def test_litgpt_map_equals_convert_lit_checkpoint_and_logits(lit_runs, style, tmp_path):
    from litgpt import GPT, Config
    from litgpt.scripts.convert_lit_checkpoint import convert_lit_checkpoint

    folder = lit_runs[style][-1]
    convert_lit_checkpoint(folder, tmp_path / "hf")
    ref = torch.load(tmp_path / "hf" / "model.pth", weights_only=True)
    if "embed_out.weight" in ref:  # GPT-NeoX's old head name: transformers 5 loads it as lm_head (conversion_mapping)
        ref["lm_head.weight"] = ref.pop("embed_out.weight")
    op = open_mapped(folder, find(folder))
    mine = {k: assemble(op.native, p) for k, p in op.pieces.items()}
    assert sorted(mine) == sorted(ref)
    for k in ref:
        assert mine[k].dtype == ref[k].dtype and torch.equal(mine[k], ref[k]), k
    # the mapped HF model computes what LitGPT's GPT computes
    lit = GPT(Config.from_file(folder / "model_config.yaml")).eval()
    lit.load_state_dict(torch.load(folder / "lit_model.pth", weights_only=True)["model"])
    hf = _hf_model(op.native.hf_config, mine)
    x = torch.randint(0, 100, (2, 12))
    with torch.no_grad():
        torch.testing.assert_close(hf(x).logits, lit(x), atol=1e-5, rtol=0)


@pytest.mark.parametrize("style", ["llama", "neox"])
def test_litgpt_merge_then_map_and_own_format_write(lit_runs, style, tmp_path):
    from litgpt import GPT, Config

    folders = lit_runs[style]
    fmt = find(folders[0])
    ops = [open_mapped(f, fmt) for f in folders]
    natives = [o.native for o in ops]
    # map-then-merge == merge-then-map
    for hf, piece in ops[-1].pieces.items():
        a = _merge([assemble(n, piece) for n in natives])
        merged_native = _merge([n.read(piece.native) for n in natives])
        b = merged_native.reshape(-1).__getitem__(  # the same re-indexing on the merged native tensor
            torch.cat([torch.arange(s, e) for s, e in piece.native_ranges()])).reshape(piece.shape)
        assert torch.equal(a, b), hf
    # write in LitGPT's own layout and load it back with LitGPT's GPT
    tpl = natives[-1]
    names = list(tpl.tensors) + list(tpl.others)
    fmt.write(tmp_path / "out", tpl, lambda n: _merge([k.read(n) for k in natives]), names)
    assert (tmp_path / "out" / "model_config.yaml").is_file()
    back = torch.load(tmp_path / "out" / "lit_model.pth", weights_only=True)
    assert back["iter_num"] == 3 and back["step_count"] == 3
    lit = GPT(Config.from_file(tmp_path / "out" / "model_config.yaml"))
    lit.load_state_dict(back["model"])
    for n, t in lit.state_dict().items():
        want = _merge([torch.load(f / "lit_model.pth", weights_only=True)["model"][n] for f in folders])
        assert torch.equal(t, want), n
    opt = torch.optim.AdamW(lit.parameters())
    opt.load_state_dict(back["optimizer"])
    assert torch.equal(back["optimizer"]["state"][0]["exp_avg"], _merge([n.read("optimizer.state.0.exp_avg")
                                                                         for n in natives]))
    assert find(tmp_path / "out").open(tmp_path / "out").hf_config == tpl.hf_config


def test_litgpt_read_flat_counts_only_the_slice(lit_runs):
    folder = lit_runs["llama"][-1]
    ck = find(folder).open(folder)
    name = "transformer.h.0.attn.qkv.weight"
    full = torch.load(folder / "lit_model.pth", weights_only=True)["model"][name]
    got = ck.read_flat(name, 100, 300)
    assert torch.equal(got, full.reshape(-1)[100:300]) and ck.bytes_read == 200 * full.element_size()
    ck.read(name)
    assert ck.bytes_read == (200 + full.numel()) * full.element_size()


class _Evil:
    pass


def test_litgpt_refusals(lit_runs, tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    torch.save({"model": {"w": torch.zeros(2)}, "thing": _Evil()}, bad / "lit_model.pth")
    with pytest.raises(CheckpointError, match=r"lit_model\.pth.*refused"):
        find(bad).open(bad)
    odd = tmp_path / "odd"
    odd.mkdir()
    torch.save({"encoder.layer.0.weight": torch.zeros(2, 2), "encoder.layer.1.weight": torch.zeros(2, 2)},
               odd / "lit_model.pth")
    (odd / "model_config.yaml").write_text((lit_runs["llama"][0] / "model_config.yaml").read_text())
    with pytest.raises(CheckpointError, match="no built-in map knows.*encoder.layer.0.weight.*litgpt-llama"):
        open_mapped(odd, find(odd))


# ----------------------------------------------------------------------------------------------- nanoGPT

@pytest.fixture(scope="module")
def nano():
    sys.path.insert(0, str(Path(__file__).parent))
    import nanogpt_model

    return nanogpt_model


def _nano_run(nano, root: Path, bias: bool, compiled: bool, steps: int = 3, vocab: int = 64) -> list[Path]:
    """``out_dir/ckpt.pt`` as nanoGPT's train.py saves it, one folder per step."""
    torch.manual_seed(1)
    model_args = dict(n_layer=2, n_head=2, n_embd=32, block_size=16, bias=bias, vocab_size=vocab, dropout=0.0)
    model = nano.GPT(nano.GPTConfig(**model_args))
    opt = model.configure_optimizers(0.1, 1e-2, (0.9, 0.95), "cpu")
    raw = torch.compile(model) if compiled else model  # train.py saves the compiled module: _orig_mod. names
    out = []
    for it in range(1, steps + 1):
        x = torch.randint(0, vocab, (2, 9))
        _, loss = model(x[:, :-1].contiguous(), x[:, 1:].contiguous())
        loss.backward()
        opt.step()
        opt.zero_grad()
        ckpt = {"model": raw.state_dict(), "optimizer": opt.state_dict(), "model_args": model_args,
                "iter_num": it, "best_val_loss": torch.tensor(2.5), "config": {"batch_size": 2, "dataset": "x"}}
        d = root / f"it{it}"
        d.mkdir(parents=True)
        torch.save(ckpt, d / "ckpt.pt")
        out.append(d)
    return out


@pytest.mark.parametrize("bias,compiled", [(True, False), (False, True)])
def test_nanogpt_map_logits_merge_and_write(nano, tmp_path, bias, compiled):
    from transformers import GPT2LMHeadModel

    folders = _nano_run(nano, tmp_path, bias, compiled)
    fmt = find(folders[0])
    assert fmt.name == "nanogpt" and fmt.complete(folders[0])
    ops = [open_mapped(f, fmt) for f in folders]
    natives = [o.native for o in ops]
    assert all(n.bytes_read == 0 for n in natives)
    raw = torch.load(folders[-1] / "ckpt.pt", weights_only=True)["model"]
    assert all(k.startswith("_orig_mod.") for k in raw) == compiled
    sd_nano = {k.removeprefix("_orig_mod."): v for k, v in raw.items()}
    mine = {k: assemble(natives[-1], p) for k, p in ops[-1].pieces.items()}
    # reverse of nanoGPT's from_pretrained: its sd[k] = sd_hf[k].t() for these names, copy for the rest
    transposed = ["attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight"]
    hf_keys = [k for k in GPT2LMHeadModel(_conf(natives[-1].hf_config)).state_dict() if not k.endswith(".attn.bias")
               and k != "lm_head.weight"]
    assert sorted(mine) == sorted(hf_keys)
    for k in hf_keys:
        if k in sd_nano:
            want = sd_nano[k].t() if any(k.endswith(w) for w in transposed) else sd_nano[k]
            assert torch.equal(mine[k], want), k
        else:
            assert not bias and k.endswith(".bias") and not mine[k].any()
    hf = _hf_model(natives[-1].hf_config, mine)
    ref = nano.GPT(nano.GPTConfig(**torch.load(folders[-1] / "ckpt.pt", weights_only=True)["model_args"])).eval()
    ref.load_state_dict(sd_nano)
    x = torch.randint(0, 64, (2, 16))
    with torch.no_grad():
        torch.testing.assert_close(hf(x).logits, ref(x, torch.zeros_like(x))[0], atol=1e-5, rtol=0)
    # map-then-merge == merge-then-map (transposed pieces included)
    for k, p in ops[-1].pieces.items():
        a = _merge([assemble(n, p) for n in natives])
        m = _merge([n.read(p.native) for n in natives])
        b = m.reshape(-1, p.row_len).t().reshape(p.shape) if p.transpose else m.reshape(p.shape)
        assert torch.equal(a, b), k
    # own-format write, loaded back by nanoGPT's GPT
    tpl = natives[-1]
    fmt.write(tmp_path / "out", tpl, lambda n: _merge([k.read(n) for k in natives]),
              list(tpl.tensors) + list(tpl.others))
    back = torch.load(tmp_path / "out" / "ckpt.pt", weights_only=True)
    assert back["model_args"]["bias"] is bias and back["iter_num"] == 3 and back["config"]["dataset"] == "x"
    sd = {k.removeprefix("_orig_mod."): v for k, v in back["model"].items()}
    assert sd["lm_head.weight"].data_ptr() == sd["transformer.wte.weight"].data_ptr()
    model = nano.GPT(nano.GPTConfig(**back["model_args"]))
    model.load_state_dict(sd)
    srcs = [{k.removeprefix("_orig_mod."): v for k, v in torch.load(f / "ckpt.pt", weights_only=True)["model"].items()}
            for f in folders]
    for n, t in model.state_dict().items():
        assert torch.equal(t, _merge([s[n] for s in srcs])), n


@pytest.mark.slow
def test_nanogpt_cli_search_writes_hf_and_ckpt_pt(nano, tmp_path):
    """The user's command on nanoGPT checkpoints: the search's best merge, as an HF GPT-2 folder and as a
    ckpt.pt that nanoGPT's GPT loads, both equal to sum_k w_k theta_k of the sources."""
    import json
    import os
    import subprocess

    from safetensors.torch import load_file

    from conftest import CORPUS, make_tokenizer

    folders = _nano_run(nano, tmp_path / "runs", bias=False, compiled=True, vocab=320)
    make_tokenizer(300).save_pretrained(tmp_path / "gpt2_tok")  # nanoGPT uses GPT-2's: given as tokenizer_dir
    held = tmp_path / "heldout.jsonl"
    held.write_text("".join(json.dumps({"text": CORPUS[i % 5] + f"# doc {i}\n"}) + "\n" for i in range(30)))
    repo = Path(__file__).resolve().parents[1]
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", LIGHTNING_MERGE_CACHE=str(tmp_path / "cache"),
               PYTHONPATH=os.pathsep.join([str(repo), os.environ.get("PYTHONPATH", "")]))
    sources = ",".join(str(f / "ckpt.pt") for f in folders)
    r = subprocess.run([sys.executable, "-m", "lightning_merge", f"checkpoints.sources=[{sources}]",
                        "checkpoints.last=3", f"checkpoints.tokenizer_dir={tmp_path / 'gpt2_tok'}", "search.trials=2",
                        "merge.format=both", f"data.heldout.path={held}", "data.heldout.num_blocks=6",
                        "data.heldout.block_size=16", "data.search_blocks=3", f"output_dir={tmp_path / 'run'}"],
                       cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, (r.stdout[-2000:], r.stderr[-3000:])
    res = json.loads((tmp_path / "run" / "results.json").read_text())
    w = res["best"]["weights"]
    assert len(w) == 3 and Path(res["merged_source_dir"]).name == "merged_nanogpt"
    srcs = [{k.removeprefix("_orig_mod."): v for k, v in torch.load(f / "ckpt.pt", weights_only=True)["model"].items()}
            for f in folders]
    back = torch.load(Path(res["merged_source_dir"]) / "ckpt.pt", weights_only=True)
    sd = {k.removeprefix("_orig_mod."): v for k, v in back["model"].items()}
    model = nano.GPT(nano.GPTConfig(**back["model_args"])).eval()
    model.load_state_dict(sd)  # nanoGPT's own loader takes it
    for n, t in model.state_dict().items():
        torch.testing.assert_close(t, _merge([s[n] for s in srcs], w), rtol=0, atol=1e-6, msg=n)
    hf = _hf_model(json.loads((Path(res["merged_dir"]) / "config.json").read_text()),
                   load_file(Path(res["merged_dir"]) / "model.safetensors"))
    x = torch.randint(0, 320, (2, 16))
    with torch.no_grad():
        torch.testing.assert_close(hf(x).logits, model(x, torch.zeros_like(x))[0], atol=1e-5, rtol=0)


def _conf(cfg: dict):
    from transformers import GPT2Config

    return GPT2Config(**{k: v for k, v in cfg.items() if k != "model_type"})


def test_nanogpt_refuses_non_nanogpt_ckpt(tmp_path):
    torch.save({"model": [torch.zeros(2)], "model_args": {"n_layer": 1}}, tmp_path / "ckpt.pt")
    with pytest.raises(CheckpointError, match=r"ckpt\.pt: not a nanoGPT"):
        find(tmp_path).open(tmp_path)
    torch.save({"model": {"w": torch.zeros(2)}, "model_args": {"n_layer": 1}}, tmp_path / "ckpt.pt")
    with pytest.raises(CheckpointError, match=r"ckpt\.pt: model_args lacks"):
        find(tmp_path).open(tmp_path)
    torch.save({"model": {"w": torch.zeros(2)}, "model_args": {}, "x": _Evil()}, tmp_path / "ckpt.pt")
    with pytest.raises(CheckpointError, match=r"ckpt\.pt: refused to load"):
        find(tmp_path).open(tmp_path)


@pytest.mark.parametrize("style", ["llama", "neox"])
def test_litgpt_legacy_attn_attn_layout(lit_runs, style, tmp_path):
    """Older LitGPT named the fused QKV ``attn.attn`` and interleaved it per query group (what
    ``convert_lit_checkpoint.qkv_reassemble`` makes): the same HF tensors come out."""
    import shutil

    from litgpt import Config
    from litgpt.scripts.convert_lit_checkpoint import qkv_reassemble

    folder = lit_runs[style][-1]
    cfg = Config.from_file(folder / "model_config.yaml")
    sd = torch.load(folder / "lit_model.pth", weights_only=True)["model"]
    old = {k.replace(".attn.qkv.", ".attn.attn."): qkv_reassemble(v, cfg) if ".attn.qkv." in k else v
           for k, v in sd.items()}
    (tmp_path / "old").mkdir()
    torch.save(old, tmp_path / "old" / "lit_model.pth")  # a converted (bare state dict) lit_model.pth
    shutil.copy(folder / "model_config.yaml", tmp_path / "old")
    a, b = open_mapped(folder, find(folder)), open_mapped(tmp_path / "old", find(tmp_path / "old"))
    assert b.native.others == {} and sorted(a.pieces) == sorted(b.pieces)
    for k in a.pieces:
        assert torch.equal(assemble(a.native, a.pieces[k]), assemble(b.native, b.pieces[k])), k


@pytest.mark.slow
@pytest.mark.distributed  # spawns the `litgpt pretrain` CLI
def test_litgpt_pretrain_cli_run(tmp_path):
    """A real ``litgpt pretrain`` run on CPU (TextFiles data, a tiny pythia): its series is found, mapped bit
    for bit like ``convert_lit_checkpoint``, merged, written back and loaded by LitGPT's GPT."""
    import shutil
    import subprocess

    pytest.importorskip("litgpt")
    pytest.importorskip("jsonargparse")
    pytest.importorskip("litdata")
    from litgpt import GPT, Config
    from litgpt.scripts.convert_lit_checkpoint import convert_lit_checkpoint

    from conftest import CORPUS, make_tokenizer
    from lightning_merge.formats import find_series

    cli = shutil.which("litgpt")
    if cli is None:
        pytest.skip("no litgpt CLI")
    make_tokenizer().save_pretrained(tmp_path / "tok")
    for split in ("train", "val"):
        (tmp_path / "data" / split).mkdir(parents=True)
        (tmp_path / "data" / split / "a.txt").write_text("".join(CORPUS) * 50)
    out = tmp_path / "out"
    cmd = [cli, "pretrain", "pythia-14m", "--model_config.n_layer", "2", "--model_config.n_embd", "32",
           "--model_config.n_head", "2", "--model_config.intermediate_size", "64", "--model_config.block_size", "32",
           "--data", "TextFiles", "--data.train_data_path", str(tmp_path / "data" / "train"),
           "--data.val_data_path", str(tmp_path / "data" / "val"), "--data.num_workers", "0",
           "--tokenizer_dir", str(tmp_path / "tok"), "--out_dir", str(out), "--train.max_tokens", "384",
           "--train.save_interval", "2", "--train.micro_batch_size", "2", "--train.global_batch_size", "2",
           "--train.max_seq_length", "32", "--eval.interval", "1000", "--eval.max_iters", "1",
           "--eval.final_validation", "false", "--eval.initial_validation", "false", "--devices", "1",
           "--precision", "32-true", "--logger_name", "csv"]
    env = {**__import__("os").environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    r = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=180)
    assert r.returncode == 0, r.stderr[-3000:]
    fmt, kids = find_series(out)
    kids = sorted(kids)
    assert fmt.name == "litgpt" and [k.name for k in kids] == ["step-00000002", "step-00000004", "step-00000006"]
    ops = [open_mapped(k, fmt) for k in kids]
    convert_lit_checkpoint(kids[-1], tmp_path / "hf")
    ref = torch.load(tmp_path / "hf" / "model.pth", weights_only=True)
    ref["lm_head.weight"] = ref.pop("embed_out.weight")
    assert sorted(ref) == sorted(ops[-1].pieces)
    for k, p in ops[-1].pieces.items():
        assert torch.equal(assemble(ops[-1].native, p), ref[k]), k
    natives = [o.native for o in ops]
    tpl = natives[-1]
    fmt.write(tmp_path / "merged", tpl, lambda n: _merge([k.read(n) for k in natives]), list(tpl.tensors))
    assert (tmp_path / "merged" / "tokenizer.json").is_file() and (tmp_path / "merged" / "hyperparameters.yaml").is_file()
    back = torch.load(tmp_path / "merged" / "lit_model.pth", weights_only=True)
    src = torch.load(kids[-1] / "lit_model.pth", weights_only=True)
    assert back["train_dataloader"] == src["train_dataloader"] and back["step_count"] == src["step_count"]
    lit = GPT(Config.from_file(tmp_path / "merged" / "model_config.yaml"))
    lit.load_state_dict(back["model"])
    for n, t in lit.state_dict().items():
        assert torch.equal(t, _merge([k.read(n) for k in natives])), n
    assert torch.equal(back["optimizer"]["state"][0]["exp_avg"], src["optimizer"]["state"][0]["exp_avg"])
    # the user's command on the run's out_dir: merged HF model and merged lit_model.pth compute the same
    import os
    import sys

    from safetensors.torch import load_file

    repo = Path(__file__).resolve().parents[1]
    env["PYTHONPATH"] = os.pathsep.join([str(repo), env.get("PYTHONPATH", "")])
    env["LIGHTNING_MERGE_CACHE"] = str(tmp_path / "cache")
    r = subprocess.run([sys.executable, "-m", "lightning_merge", f"checkpoints.sources=[{out}]",
                        "checkpoints.last=3", "search.trials=2", "merge.format=both",
                        f"data.heldout.path={tmp_path / 'data' / 'val' / 'a.txt'}", "data.heldout.num_blocks=4",
                        "data.heldout.block_size=32", "data.search_blocks=2", f"output_dir={tmp_path / 'run'}"],
                       cwd=tmp_path, env=env, capture_output=True, text=True, timeout=180)
    assert r.returncode == 0, (r.stdout[-2000:], r.stderr[-3000:])
    import json

    res = json.loads((tmp_path / "run" / "results.json").read_text())
    w = res["best"]["weights"]  # the search's best merge, written in both formats
    assert [Path(p).name for p in res["sources"]] == [k.name for k in kids] and len(w) == 3
    mine = torch.load(tmp_path / "run" / "merged_litgpt" / "lit_model.pth", weights_only=True)["model"]
    lit.load_state_dict(mine)
    for n, t in mine.items():
        torch.testing.assert_close(t, _merge([k.read(n) for k in natives], w), rtol=0, atol=1e-6, msg=n)
    hf_sd = load_file(tmp_path / "run" / "merged" / "model.safetensors")
    hf = _hf_model(json.loads((tmp_path / "run" / "merged" / "config.json").read_text()), hf_sd)
    x = torch.randint(0, 300, (2, 16))
    with torch.no_grad():
        torch.testing.assert_close(hf(x).logits, lit.eval()(x), atol=1e-5, rtol=0)



def test_nanogpt_detect_reads_the_pickle_only(nano, tmp_path):
    """A plain state dict named ckpt.pt stays with the HF-family reader; ckpt_<iter>.pt files make a series."""
    from lightning_merge.formats import find_series

    torch.save({"model.embed_tokens.weight": torch.zeros(2, 2)}, tmp_path / "ckpt.pt")
    assert find(tmp_path) is None and find(tmp_path / "ckpt.pt") is None
    # names that merely contain "model" and "model_args" are not nanoGPT's keys
    torch.save({"model": torch.zeros(2), "x.model_args": torch.zeros(2)}, tmp_path / "plain.pt")
    assert find(tmp_path / "plain.pt") is None
    torch.save({"model": {"w": torch.zeros(2)}, "model_args": {"n_layer": 1}}, tmp_path / "p4.pt", pickle_protocol=4)
    assert find(tmp_path / "p4.pt").name == "nanogpt"  # the keys found in either pickle protocol
    folders = _nano_run(nano, tmp_path / "run", True, False, steps=2)
    series = tmp_path / "series"
    series.mkdir()
    for i, f in enumerate(folders):
        (f / "ckpt.pt").rename(series / f"ckpt_{i}.pt")
    fmt, kids = find_series(series)
    assert fmt.name == "nanogpt" and sorted(k.name for k in kids) == ["ckpt_0.pt", "ckpt_1.pt"]
    assert open_mapped(kids[0], fmt).native.bytes_read == 0


def test_series_mixing_layouts_whose_mapped_names_disagree_is_refused(lit_runs):
    """A Llama-style and a GPT-NeoX-style LitGPT step in one series: refused from the manifests, naming
    both checkpoints and their layouts, before any tensor is read."""
    from lightning_merge.series import CheckpointSeries

    llama, neox = lit_runs["llama"][-1], lit_runs["neox"][-1]
    with pytest.raises(CheckpointError) as e:
        CheckpointSeries.from_paths([llama, neox])
    msg = str(e.value)
    assert str(llama) in msg and str(neox) in msg and "tensor names differ" in msg
    assert "litgpt-llama" in msg and "litgpt-gpt-neox" in msg


def test_torch_file_writer_parks_merged_tensors_in_file_backed_pages(nano, tmp_path, monkeypatch):
    """With every tensor over the spill size, the merged ckpt.pt is still exact, ties stay tied, and the
    scratch mappings are gone afterwards."""
    import lightning_merge.formats.torchfile as tf

    monkeypatch.setattr(tf, "_SPILL_BYTES", 0)
    folders = _nano_run(nano, tmp_path / "runs", bias=True, compiled=False)
    fmt = find(folders[0])
    natives = [open_mapped(f, fmt).native for f in folders]
    tpl = natives[-1]
    out = tmp_path / "out"
    fmt.write(out, tpl, lambda n: _merge([k.read(n) for k in natives]), list(tpl.tensors))
    assert sorted(p.name for p in out.iterdir()) == ["ckpt.pt"]  # no scratch or temp file left
    back = torch.load(out / "ckpt.pt", weights_only=True)["model"]
    assert back["lm_head.weight"].data_ptr() == back["transformer.wte.weight"].data_ptr()
    srcs = [torch.load(f / "ckpt.pt", weights_only=True)["model"] for f in folders]
    for n, t in back.items():
        assert torch.equal(t, _merge([s[n] for s in srcs]) if n in tpl.tensors or n == "lm_head.weight"
                           else srcs[-1][n]), n
