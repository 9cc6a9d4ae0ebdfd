"""DCP folders: the reader/writer core (``formats/dcp.py``) and torchtitan's format (``formats/torchtitan.py``).

The torchtitan checkpoints are made on the fly by ``dcp_fsdp2_worker.py`` on 2 gloo ranks: a tiny Llama3
sharded with FSDP2 (every weight saved as 2 chunks), trained 3 steps with AdamW and saved every step into
``<dump>/checkpoint/step-N/``: with torchtitan 0.3.0's own ``Llama3Model`` and ``CheckpointManager`` when
torchtitan imports (its 0.3.0 names, model keys at the top level), and torchtitan 0.2.x's names saved the
old way (``{"model": ..., "optimizer": ...}``, keys prefixed ``model.``). Maps are checked bit for bit
against torchtitan's own ``Llama3StateDictAdapter.to_hf`` and by logits against torchtitan's model; the
merged output is loaded back by ``dcp.load`` and by torchtitan's ``CheckpointManager`` (initial_load_path).
"""

from __future__ import annotations

import importlib.util
import io
import json
import logging
import os
import re
import shutil
import socket
import subprocess
import sys
import weakref
from pathlib import Path

import pytest
import torch

from lightning_merge.errors import CheckpointError
from lightning_merge.formats import find, find_series, open_mapped
from lightning_merge.formats.base import NativeCheckpoint, NativeTensor, assemble
from lightning_merge.formats.dcp import DCPCheckpoint, read_metadata, write_dcp
from lightning_merge.formats.torchtitan import FORMAT

WORKER = Path(__file__).with_name("dcp_fsdp2_worker.py")
W = [0.2, 0.3, 0.5]
GENS = ["new", "old"]


def _merge(tensors: list[torch.Tensor], w=W) -> torch.Tensor:
    acc = torch.zeros(tensors[0].shape, dtype=torch.float32)
    for wk, t in zip(w, tensors):
        acc += wk * t.float()
    return acc.to(tensors[0].dtype)


class _Mem(NativeCheckpoint):
    """Native tensors held in memory (the merged native state dict of merge-then-map)."""

    def __init__(self, sd: dict[str, torch.Tensor]) -> None:
        super().__init__(Path("mem"), {k: NativeTensor(k, tuple(v.shape), v.dtype) for k, v in sd.items()})
        self.sd = sd

    def read(self, name: str) -> torch.Tensor:
        return self.sd[name].clone()


def _worker_module():
    spec = importlib.util.spec_from_file_location("dcp_fsdp2_worker", WORKER)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


# ------------------------------------------------------------------------------------------- dcp.py core

def _plain_dcp(path: Path) -> dict:
    import torch.distributed.checkpoint as dcp

    torch.manual_seed(0)
    sd = {"model.a": torch.randn(10, 6), "model.b": torch.randn(7), "optimizer.x": torch.randn(3, 3),
          "train_state": {"step": 3}}
    dcp.save(sd, checkpoint_id=str(path), no_dist=True)
    return sd


def test_dcp_reads_whole_flat_and_bytes(tmp_path):
    sd = _plain_dcp(tmp_path / "c")
    md = read_metadata(tmp_path / "c")
    ck = DCPCheckpoint(tmp_path / "c", md, {"a": "model.a", "b": "model.b"}, {"optimizer.x": "optimizer.x"},
                       other_bytes=["train_state.step"])
    assert ck.bytes_read == 0  # opening reads the metadata only
    assert ck.tensors["a"].shape == (10, 6) and ck.others["optimizer.x"].dtype == torch.float32
    assert torch.equal(ck.read("a"), sd["model.a"])
    rec_a = next(v.length for k, v in md.storage_data.items() if k.fqn == "model.a")
    assert ck.bytes_read == rec_a  # one chunk, its record read once
    assert torch.equal(ck.read_flat("a", 7, 33), sd["model.a"].reshape(-1)[7:33])
    assert torch.equal(ck.read_flat("b", 2, 5), sd["model.b"][2:5])
    assert torch.equal(ck.read("optimizer.x"), sd["optimizer.x"])
    rec = ck.read_bytes("train_state.step")  # the saved record (a torch.save of the value), as it is
    assert torch.load(io.BytesIO(rec), weights_only=True) == 3
    with pytest.raises(CheckpointError, match="holds no tensor"):
        ck.read("nope")


def test_write_dcp_streams_one_tensor_at_a_time_and_loads(tmp_path):
    import torch.distributed.checkpoint as dcp

    shapes = {f"layers.{i}.w": (64, 32) for i in range(5)}
    manifest = {k: NativeTensor(k, s, torch.float32) for k, s in shapes.items()}
    made, alive = [], []
    values = {k: torch.full(s, float(i)) for i, (k, s) in enumerate(shapes.items())}

    def produce(key: str) -> torch.Tensor:
        live = [r for r in alive if r() is not None]
        assert not live, f"{len(live)} produced tensors still alive when {key} is asked for"
        made.append(key)
        t = values[key].clone()
        alive.append(weakref.ref(t))
        return t

    _plain_dcp(tmp_path / "src")
    src = DCPCheckpoint(tmp_path / "src", read_metadata(tmp_path / "src"), {}, other_bytes=["train_state.step"])
    write_dcp(tmp_path / "o", manifest, produce, {"train_state.step": src.read_bytes("train_state.step")})
    assert sorted(made) == sorted(shapes) and len(made) == len(shapes)  # each produced once
    back = {k: torch.empty(s) for k, s in shapes.items()}
    back["train_state"] = {"step": 0}
    dcp.load(back, checkpoint_id=str(tmp_path / "o"), no_dist=True)
    for k in shapes:
        assert torch.equal(back[k], values[k]), k
    assert back["train_state"]["step"] == 3


def test_folder_without_metadata_is_detected_but_refused(tmp_path):
    step = tmp_path / "checkpoint" / "step-5"
    _plain_dcp(step)
    (step / ".metadata").unlink()
    assert FORMAT.detect(step) and not FORMAT.complete(step)
    with pytest.raises(CheckpointError, match=r"step-5.*still being written"):
        FORMAT.open(step)


def test_hf_named_dcp_reads_through_the_identity_layout(tmp_path, tokenizer):
    import torch.distributed.checkpoint as dcp
    from conftest import make_llama
    from safetensors.torch import load_file

    hf = make_llama(tmp_path / "hf", seed=3, tokenizer=tokenizer)
    sd = load_file(hf / "model.safetensors")
    dcp.save(dict(sd), checkpoint_id=str(tmp_path / "d"), no_dist=True)
    assert find(tmp_path / "d") is FORMAT
    op = open_mapped(tmp_path / "d", FORMAT, config_dir=hf)
    assert op.layout == "hf" and sorted(op.pieces) == sorted(sd)
    assert all(torch.equal(assemble(op.native, p), sd[k]) for k, p in op.pieces.items())
    # saved as {"model": state_dict, "optimizer": ...}: the prefix goes, the names stay HF's
    dcp.save({"model": dict(sd), "optimizer": {"state": {"x": torch.ones(2)}}}, checkpoint_id=str(tmp_path / "p"),
             no_dist=True)
    op = open_mapped(tmp_path / "p", FORMAT, config_dir=hf)
    assert op.layout == "hf" and sorted(op.pieces) == sorted(sd) and list(op.native.others) == ["optimizer.state.x"]
    assert op.native.keys["lm_head.weight"] == "model.lm_head.weight"
    assert all(torch.equal(assemble(op.native, p), sd[k]) for k, p in op.pieces.items())


def test_model_and_training_state_keys_are_told_apart():
    from lightning_merge.formats.torchtitan import split_keys

    state = ["optimizer.state.layers.0.attention.wq.weight.exp_avg", "optimizer.param_groups.norm.weight.lr",
             "lr_scheduler.last_epoch", "dataloader", "train_state.step"]
    new = ["tok_embeddings.weight", "layers.0.attention.qkv_linear.wq.weight", "norm.weight", "lm_head.weight"]
    assert split_keys(dict.fromkeys(new + state)) == ("", new, state)
    old = ["model.tok_embeddings.weight", "model.layers.0.attention.wq.weight", "model.output.weight"]
    assert split_keys(dict.fromkeys(old + state)) == ("model.", old, state)
    hf = ["model.embed_tokens.weight", "model.layers.0.self_attn.q_proj.weight", "lm_head.weight"]
    assert split_keys(dict.fromkeys(hf)) == ("", hf, [])
    assert split_keys(dict.fromkeys(["model." + k for k in hf]))[0] == "model."
    assert split_keys(dict.fromkeys(["model.a", "model.b"]))[0] == ""  # nothing known: names kept as saved


# ------------------------------------------------------------------------------------------- the FSDP2 runs

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tokenizer) -> dict:
    """Both torchtitan runs (``new``, ``old``), 3 steps each, saved by 2 FSDP2 ranks; and an HF config folder."""
    from transformers import LlamaConfig

    root = tmp_path_factory.mktemp("titan")
    vocab = len(tokenizer)
    env = dict(os.environ, OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([str(WORKER.parents[1]), os.environ.get("PYTHONPATH", "")]))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--nnodes=1",
           f"--master_port={_free_port()}", str(WORKER), str(root), str(vocab)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=root)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    info = json.loads((root / "info.json").read_text())
    hf = root / "hf_assets"
    LlamaConfig(vocab_size=vocab, hidden_size=info["dim"], num_hidden_layers=info["layers"],
                num_attention_heads=info["heads"], num_key_value_heads=info["kv_heads"],
                intermediate_size=info["hidden"], max_position_embeddings=128, rms_norm_eps=info["eps"],
                rope_parameters={"rope_type": "default", "rope_theta": info["theta"]}, tie_word_embeddings=False,
                bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                architectures=["LlamaForCausalLM"]).save_pretrained(hf)
    tokenizer.save_pretrained(hf)
    steps = {g: sorted((root / g / "checkpoint").iterdir(), key=lambda p: int(p.name.split("-")[1])) for g in GENS}
    refs = {g: [torch.load(root / g / "ref" / f"{p.name}.pt", weights_only=True) for p in steps[g]] for g in GENS}
    return {"root": root, "info": info, "hf": hf, "steps": steps, "refs": refs, "vocab": vocab}


@pytest.mark.distributed
@pytest.mark.parametrize("gen", GENS)
def test_series_manifest_and_sharded_chunks(runs, gen):
    folder = runs["root"] / gen / "checkpoint"
    fmt, kids = find_series(folder)
    assert fmt is FORMAT and sorted(kids) == sorted(runs["steps"][gen])
    assert all(find(k) is FORMAT and FORMAT.complete(k) for k in kids)
    ck = FORMAT.open(runs["steps"][gen][-1])
    ref = runs["refs"][gen][-1]
    assert {n: (t.shape, t.dtype) for n, t in ck.tensors.items()} == \
        {n: (tuple(t.shape), t.dtype) for n, t in ref.items()}
    assert ck.bytes_read == 0
    prefix = "model." if gen == "old" else ""
    assert all(ck.keys[n] == prefix + n for n in ck.tensors)
    # FSDP2 shards every parameter on dim 0 over the 2 ranks: 2 saved chunks. torchtitan 0.3.0's fused wqkv
    # (its default) is saved split into wq/wk/wv by its state dict hook, gathered first: 1 chunk each.
    sharded = ["layers.0.attention.wo.weight", "layers.1.feed_forward.w1.weight", "tok_embeddings.weight"]
    if gen == "old":
        sharded.append("layers.0.attention.wq.weight")
    for n in sharded:
        chunks = ck.metadata.state_dict_metadata[ck.keys[n]].chunks
        rows = ck.tensors[n].shape[0]
        assert sorted(c.offsets[0] for c in chunks) == [0, rows // 2], n
    assert any(n.startswith("optimizer.state.") and n.endswith(".exp_avg") for n in ck.others)
    assert "train_state.step" in ck.other_bytes and not ck.model_bytes
    assert not any(n.startswith("optimizer") for n in ck.tensors)


@pytest.mark.distributed
@pytest.mark.parametrize("gen", GENS)
def test_reads_equal_the_gathered_model_and_read_only_their_chunks(runs, gen):
    for step, ref in zip(runs["steps"][gen], runs["refs"][gen]):
        ck = FORMAT.open(step)
        for n, t in ref.items():
            assert torch.equal(ck.read(n), t), (step.name, n)
    ck = FORMAT.open(runs["steps"][gen][-1])
    ref = runs["refs"][gen][-1]
    md = ck.metadata
    w1 = "layers.1.feed_forward.w1.weight"  # [64, 32]: rows 0-31 on rank 0, 32-63 on rank 1
    half = ck.read_flat(w1, 0, 32 * 32)
    assert torch.equal(half, ref[w1][:32].reshape(-1))
    rank0 = [v.length for k, v in md.storage_data.items() if k.fqn == ck.keys[w1] and k.offset[0] == 0]
    assert ck.bytes_read == sum(rank0) and len(rank0) == 1  # the other rank's chunk was not read
    across = ck.read_flat(w1, 30 * 32 + 5, 34 * 32)  # spans both chunks
    assert torch.equal(across, ref[w1].reshape(-1)[30 * 32 + 5:34 * 32])


@pytest.mark.distributed
@pytest.mark.parametrize("gen", GENS)
def test_map_equals_torchtitan_state_dict_adapter(runs, gen):
    pytest.importorskip("torchtitan")
    from torchtitan.models.llama3.state_dict_adapter import Llama3StateDictAdapter

    _, cfg = _worker_module().torchtitan_llama3(runs["vocab"])
    adapter = Llama3StateDictAdapter(cfg, None)
    op = open_mapped(runs["steps"][gen][-1], FORMAT, config_dir=runs["hf"])
    assert op.layout == {"new": "torchtitan-llama3", "old": "torchtitan-llama3-0.2"}[gen]
    ref = runs["refs"][gen][-1]
    if gen == "old":  # 0.3.0's adapter knows 0.3.0's names; 0.2.x's adapter differs only in these names
        ref = {re.sub(r"\.attention\.(w[qkv])\.", r".attention.qkv_linear.\1.", k)
               .replace("output.weight", "lm_head.weight"): v for k, v in ref.items()}
    theirs = adapter.to_hf(ref)
    mine = {k: assemble(op.native, p) for k, p in op.pieces.items()}
    assert sorted(mine) == sorted(theirs)
    for k in theirs:
        assert mine[k].dtype == theirs[k].dtype and torch.equal(mine[k], theirs[k]), k


@pytest.mark.distributed
@pytest.mark.parametrize("gen", GENS)
def test_mapped_hf_model_computes_what_the_torchtitan_model_computes(runs, gen):
    from transformers import AutoConfig, LlamaForCausalLM

    worker = _worker_module()
    ref = runs["refs"][gen][-1]
    built = worker.torchtitan_llama3(runs["vocab"]) if gen == "new" else None  # torchtitan's own Llama3Model
    assert (built is not None) == runs["info"]["new"].startswith("torchtitan") or gen == "old"
    model = built[0] if built else worker.TitanLlama(runs["vocab"], "0.3" if gen == "new" else "0.2")
    model.load_state_dict(ref)
    op = open_mapped(runs["steps"][gen][-1], FORMAT, config_dir=runs["hf"])
    hf = LlamaForCausalLM(AutoConfig.from_pretrained(runs["hf"])).eval()
    missing, unexpected = hf.load_state_dict({k: assemble(op.native, p) for k, p in op.pieces.items()}, strict=False)
    assert not missing and not unexpected
    x = torch.randint(0, runs["vocab"], (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(hf(x).logits, model.eval()(x), atol=2e-5, rtol=0)


@pytest.mark.distributed
@pytest.mark.parametrize("gen", GENS)
def test_merge_then_map_equals_map_then_merge(runs, gen):
    ops = [open_mapped(s, FORMAT, config_dir=runs["hf"]) for s in runs["steps"][gen]]
    natives = [o.native for o in ops]
    merged = _Mem({n: _merge([k.read(n) for k in natives]) for n in natives[-1].tensors})
    for hf, piece in ops[-1].pieces.items():
        a = assemble(merged, piece)  # merge in torchtitan's names, then map
        b = _merge([assemble(k, piece) for k in natives])  # map each, then merge
        assert torch.equal(a, b), hf
        assert not torch.equal(a, assemble(natives[-1], piece)) or "norm" in hf


@pytest.mark.distributed
@pytest.mark.parametrize("gen", GENS)
def test_write_model_only_and_with_training_state(runs, gen, tmp_path):
    import torch.distributed.checkpoint as dcp

    natives = [FORMAT.open(s) for s in runs["steps"][gen]]
    tpl = natives[-1]
    FORMAT.write(tmp_path / "m", tpl, lambda n: _merge([k.read(n) for k in natives]), list(tpl.tensors))
    out = FORMAT.open(tmp_path / "m")
    assert set(out.keys.values()) == set(tpl.keys[n] for n in tpl.tensors)  # model only, the template's keys
    assert not out.others and not out.other_bytes
    back = {tpl.keys[n]: torch.empty(t.shape, dtype=t.dtype) for n, t in tpl.tensors.items()}
    dcp.load(back, checkpoint_id=str(tmp_path / "m"), no_dist=True)
    refs = runs["refs"][gen]
    for n in tpl.tensors:
        assert torch.equal(back[tpl.keys[n]], _merge([r[n] for r in refs])), n
    # with the newest's training state copied (merge.optimizer=newest)
    FORMAT.write(tmp_path / "f", tpl, lambda n: _merge([k.read(n) for k in natives]) if n in tpl.tensors
                 else tpl.read(n), list(tpl.tensors) + list(tpl.others))
    full = FORMAT.open(tmp_path / "f")
    assert sorted(full.others) == sorted(tpl.others) and sorted(full.other_bytes) == sorted(tpl.other_bytes)
    for n in list(tpl.others)[:20]:
        assert torch.equal(full.read(n), tpl.read(n)), n
    assert full.read_bytes("train_state.step") == tpl.read_bytes("train_state.step")


@pytest.mark.distributed
def test_torchtitan_checkpoint_manager_loads_the_merge(runs, tmp_path):
    """The merged model-only folder, given to torchtitan as ``--checkpoint.initial_load_path``."""
    pytest.importorskip("torchtitan")
    from torchtitan.components.checkpoint import CheckpointManager
    from torchtitan.components.optimizer import LRSchedulersContainer, default_adamw

    natives = [FORMAT.open(s) for s in runs["steps"]["new"]]
    tpl = natives[-1]
    FORMAT.write(tmp_path / "merged", tpl, lambda n: _merge([k.read(n) for k in natives]), list(tpl.tensors))
    model = _worker_module().torchtitan_llama3(runs["vocab"])[0]
    ocfg = default_adamw(lr=1e-3)
    ocfg.implementation = "for-loop"
    opt = ocfg.build(model_parts=[model])
    sched = LRSchedulersContainer.Config(warmup_steps=1).build(optimizers=opt, training_steps=2)
    mgr = CheckpointManager.Config(enable=True, folder="checkpoint", keep_latest_k=0,
                                   initial_load_path=str(tmp_path / "merged"), initial_load_model_only=True).build(
        dataloader=None, model_parts=[model], optimizers=opt, lr_schedulers=sched, states={}, sd_adapter=None,
        base_folder=str(tmp_path / "resume"))
    assert mgr.load()
    sd = model.state_dict()
    for n in tpl.tensors:
        assert torch.equal(sd[n], _merge([r[n] for r in runs["refs"]["new"]])), n
    mgr.close()


# ------------------------------------------------------------------------------------------- through lightning_merge

@pytest.mark.distributed
def test_torchtitan_resumes_from_a_merge_with_the_newest_training_state(runs, tmp_path):
    """``merge.optimizer=newest`` through ``write_source``, placed as a step folder of a fresh dump: torchtitan's
    CheckpointManager resumes from it (model, optimizer, lr scheduler, train state), the model being the merge."""
    pytest.importorskip("torchtitan")
    from torchtitan.components.checkpoint import CheckpointManager
    from torchtitan.components.optimizer import LRSchedulersContainer, default_adamw

    from lightning_merge.series import CheckpointSeries
    from lightning_merge.write_source import write_source

    series = CheckpointSeries.from_sources([runs["root"] / "new" / "checkpoint"], last=3, config_dir=runs["hf"])
    assert series.source_format is FORMAT
    write_source(series, W, tmp_path / "dump" / "checkpoint" / "step-3", optimizer="newest")
    worker = _worker_module()
    model = worker.torchtitan_llama3(runs["vocab"])[0]
    ocfg = default_adamw(lr=1e-2)
    ocfg.implementation = "for-loop"
    opt = ocfg.build(model_parts=[model])
    sched = LRSchedulersContainer.Config(warmup_steps=1).build(optimizers=opt, training_steps=worker.STEPS)
    state = worker.TrainState()
    mgr = CheckpointManager.Config(enable=True, folder="checkpoint", keep_latest_k=0).build(
        dataloader=None, model_parts=[model], optimizers=opt, lr_schedulers=sched, states={"train_state": state},
        sd_adapter=None, base_folder=str(tmp_path / "dump"))
    assert mgr.load()  # the fault-tolerance branch: the newest step-N of its own folder, everything
    mgr.close()
    assert state.step == 3 and sched.schedulers[0].last_epoch == 3
    sd = model.state_dict()
    for n in series.newest.opened.native.tensors:  # write_source's fp32 accumulation may round 1 ulp apart
        torch.testing.assert_close(sd[n], _merge([r[n] for r in runs["refs"]["new"]]), rtol=0, atol=1e-6)
        assert not torch.equal(sd[n], runs["refs"]["new"][-1][n]) or "norm" in n
    newest = FORMAT.open(runs["steps"]["new"][-1])
    flat = opt.state_dict()
    for n in [k for k in newest.others if k.endswith(".exp_avg")][:6]:
        assert torch.equal(flat[n[len("optimizer."):]], newest.read(n)), n



@pytest.mark.distributed
def test_no_config_dir_is_refused_with_what_to_do(runs):
    from lightning_merge.checkpoints import Checkpoint

    with pytest.raises(CheckpointError, match=r"step-3.*checkpoints\.config_dir.*hf_assets_path"):
        Checkpoint.open(runs["steps"]["new"][-1])
    ck = Checkpoint.open(runs["steps"]["new"][-1], config_dir=runs["hf"])
    assert "model.layers.1.self_attn.k_proj.weight" in ck.tensors and ck.opened.layout == "torchtitan-llama3"


@pytest.mark.distributed
def test_unfinished_newest_step_skipped_in_a_series_refused_by_name(runs, tmp_path, caplog):
    from lightning_merge.sources import resolve_sources

    folder = tmp_path / "checkpoint"
    shutil.copytree(runs["root"] / "new" / "checkpoint", folder)
    (folder / "step-3" / ".metadata").unlink()
    (folder / "step-4").mkdir()  # a save that has only just made its folder
    (folder / "step-0").mkdir()  # an HF safetensors save (last_save_in_hf) is not silently taken as DCP
    (folder / "step-0" / "model.safetensors.index.json").write_text("{}")
    with caplog.at_level(logging.WARNING):
        got = resolve_sources([folder])
    assert [p.name for p in got] == ["step-1", "step-2"]
    assert "step-3" in caplog.text and "step-4" in caplog.text and "not complete" in caplog.text
    assert "step-0 is torchtitan's last step saved in HF safetensors" in caplog.text
    with pytest.raises(CheckpointError, match=r"step-3 is a torchtitan checkpoint that is not complete"):
        resolve_sources([folder / "step-3"])


@pytest.mark.distributed
@pytest.mark.slow
def test_cli_search_writes_hf_and_torchtitan_merges(runs, tmp_path):
    import torch.distributed.checkpoint as dcp
    from conftest import CORPUS
    from safetensors.torch import load_file

    held = tmp_path / "heldout.jsonl"
    held.write_text("".join(json.dumps({"text": CORPUS[i % 5] + f"# doc {i}\n"}) + "\n" for i in range(40)))
    out = tmp_path / "run"
    args = ["demo.enabled=false", f"checkpoints.sources=[{runs['root'] / 'new' / 'checkpoint'}]",
            f"checkpoints.config_dir={runs['hf']}", "checkpoints.last=3", f"data.heldout.path={held}",
            "data.heldout.block_size=32", "data.heldout.num_blocks=8", "data.search_blocks=4", "search.trials=2",
            "merge.format=both", f"output_dir={out}", f"cache_dir={out / 'cache'}"]
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1",
               PYTHONPATH=os.pathsep.join([str(WORKER.parents[1]), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, "-m", "lightning_merge", *args], capture_output=True, text=True,
                          timeout=600, cwd=tmp_path, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    res = json.loads((out / "results.json").read_text())
    w = res["best"]["weights"]
    assert [Path(s).name for s in res["sources"]] == ["step-1", "step-2", "step-3"] and len(w) == 3
    refs = runs["refs"]["new"]
    own = Path(res["merged_source_dir"])
    assert own.name == "merged_torchtitan" and (own / "merge.yaml").is_file()
    back = {n: torch.empty(t.shape, dtype=t.dtype) for n, t in refs[-1].items()}
    dcp.load(back, checkpoint_id=str(own), no_dist=True)
    for n in back:
        torch.testing.assert_close(back[n], _merge([r[n] for r in refs], w), rtol=0, atol=1e-6)
    # the HF folder is the map of that merge
    hf = load_file(Path(res["merged_dir"]) / "model.safetensors")
    merged = _Mem(back)
    op = open_mapped(runs["steps"]["new"][-1], FORMAT, config_dir=runs["hf"])
    assert sorted(hf) == sorted(op.pieces)
    for k, p in op.pieces.items():
        torch.testing.assert_close(hf[k], assemble(merged, p), rtol=0, atol=1e-6)


# ------------------------------------------------------------------------------------------- refusals and edges

@pytest.mark.distributed
def test_unknown_layout_and_wrong_config_refused_before_reading(tmp_path, runs):
    _plain_dcp(tmp_path / "plain")  # keys model.a, model.b: neither torchtitan's nor HF's names
    with pytest.raises(CheckpointError, match=r"plain.*no built-in map knows.*torchtitan-llama3 -> LlamaForCausalLM"
                                              r".*checkpoints\.name_map"):
        open_mapped(tmp_path / "plain", FORMAT, config_dir=runs["hf"])
    cfg = json.loads((runs["hf"] / "config.json").read_text())
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text(json.dumps({**cfg, "num_hidden_layers": 3}))
    with pytest.raises(CheckpointError, match="num_hidden_layers=3"):
        open_mapped(runs["steps"]["new"][-1], FORMAT, config_dir=bad)
    (bad / "config.json").write_text(json.dumps({**cfg, "num_key_value_heads": 4}))
    with pytest.raises(CheckpointError, match="k_proj.*is checkpoints.config_dir the config of this model"):
        open_mapped(runs["steps"]["new"][-1], FORMAT, config_dir=bad)
    # a config that ties the head to the embeddings, for a run that trained a separate one: the head's
    # values would silently drop out of the evaluated model, so it is refused, naming the tensor
    (bad / "config.json").write_text(json.dumps({**cfg, "tie_word_embeddings": True}))
    with pytest.raises(CheckpointError, match=r"leaves 1 of the checkpoint's model tensors unmapped "
                                              r"\(\['lm_head\.weight'\]\).*tie_word_embeddings"):
        open_mapped(runs["steps"]["new"][-1], FORMAT, config_dir=bad)


@pytest.mark.distributed
def test_tied_config_drops_the_head_and_other_dcp_formats_are_not_claimed(tmp_path, runs):
    from lightning_merge.formats.torchtitan import llama3_to_hf

    ck = FORMAT.open(runs["steps"]["new"][-1])
    cfg = json.loads((runs["hf"] / "config.json").read_text())
    assert "lm_head.weight" in llama3_to_hf(ck.tensors, cfg)
    assert "lm_head.weight" not in llama3_to_hf(ck.tensors, {**cfg, "tie_word_embeddings": True})
    mega = tmp_path / "iter_0000010"
    shutil.copytree(runs["steps"]["new"][-1], mega)
    (mega / "metadata.json").write_text(json.dumps({"sharded_backend": "torch_dist"}))
    olmo = tmp_path / "step10" / "model_and_optim"
    shutil.copytree(runs["steps"]["new"][-1], olmo)
    assert not FORMAT.detect(mega) and not FORMAT.detect(olmo) and not FORMAT.detect(tmp_path / "step10")
    assert FORMAT.series_children(runs["steps"]["new"][-1]) is None  # a checkpoint is not a folder of them
    assert not FORMAT.detect(runs["hf"])
