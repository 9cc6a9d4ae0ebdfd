"""Megatron-core ``torch_dist`` checkpoints (``lightning_merge/formats/megatron.py``), saved by Megatron-core itself.

``megatron_worker.py`` builds a tiny ``GPTModel`` (RMSNorm, SwiGLU, RoPE, GQA)
with tensor parallelism 2 on 2 gloo CPU ranks and saves three iterations with
``megatron.core.dist_checkpointing.save`` in Megatron-LM's layout (``iter_N``
folders and the tracker), plus each rank's local tensors (the reference: what
the model held, never read back from the checkpoint) and Megatron's own logits
of the last weights. Checked here: the layout is read from metadata alone; the
map to ``LlamaForCausalLM`` equals Megatron-Bridge's conversion of the live TP
shards bit for bit, and the HF model computes Megatron's logits; per-layer keys
map to the same tensors; merge-then-map equals map-then-merge; the merge
written back loads with ``dist_checkpointing.load`` through the tracker, equal
to ``sum_k w_k * theta_k`` with ``_extra_state`` from the newest; the optimizer
averaged; unfinished folders and unknown layouts refused.

Needs megatron-core (``pip install --no-deps megatron-core==0.16.1``).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("megatron.core")

from lightning_merge.errors import CheckpointError  # noqa: E402
from lightning_merge.formats import find, find_series, open_mapped  # noqa: E402
from lightning_merge.formats.base import NativeCheckpoint, assemble  # noqa: E402
from lightning_merge.formats.megatron import FORMAT, TRACKER  # noqa: E402

WORKER = Path(__file__).with_name("megatron_worker.py")
ITERS = [10, 20, 30]
W = [0.2, 0.3, 0.5]
TP = 2
VOCAB = 320  # megatron_worker.CFG: the padded vocabulary, above the test tokenizer's 300
pytestmark = pytest.mark.distributed


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_worker(spec: dict, where: Path) -> None:
    where.mkdir(parents=True, exist_ok=True)
    (where / "spec.json").write_text(json.dumps(spec))
    env = dict(os.environ, OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([str(WORKER.parents[1]), os.environ.get("PYTHONPATH", "")]))
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={TP}", "--nnodes=1",
           f"--master_port={free_port()}", str(WORKER), str(where / "spec.json")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=where)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("megatron")
    spec = {"mode": "save", "dir": str(root / "save"), "iters": ITERS, "out": str(root / "local"),
            "per_layer_dir": str(root / "per_layer"), "bf16_dir": str(root / "bf16")}
    (root / "local").mkdir()
    run_worker(spec, root / "w_save")
    local = {it: [torch.load(root / "local" / f"rank{r}_iter{it}.pt", weights_only=True) for r in range(TP)]
             for it in ITERS}
    bf16 = {it: [torch.load(root / "local" / f"bf16_rank{r}_iter{it}.pt", weights_only=True) for r in range(TP)]
            for it in ITERS[:2]}
    return {"root": root, "save": root / "save", "bf16": [root / "bf16" / f"iter_{it:07d}" for it in ITERS[:2]],
            "bf16_local": bf16, "iters": [root / "save" / f"iter_{it:07d}" for it in ITERS],
            "per_layer": root / "per_layer" / f"iter_{ITERS[-1]:07d}", "local": local,
            "logits": torch.load(root / "local" / "logits.pt", weights_only=True)}


def wsum(ts: list[torch.Tensor], w: list[float]) -> torch.Tensor:
    """The merge: fp32 accumulation in source order, one rounding to the sources' dtype."""
    acc = torch.zeros(ts[0].shape, dtype=torch.float32)
    for wk, t in zip(w, ts):
        acc.add_(t.to(torch.float32), alpha=wk)
    return acc.to(ts[0].dtype)


# -- Megatron-Bridge's conversion, re-implemented from its source (megatron-bridge 0.3.1,
#    megatron/bridge/models/llama/llama_bridge.py and models/conversion/param_mapping.py) ---------------
def split_qkv_weights(qkv: torch.Tensor, heads: int, groups: int, head_size: int):
    """``param_mapping.split_qkv_weights`` (no attention output gate)."""
    per_group = heads // groups
    total, tpg = heads + 2 * groups, per_group + 2
    r = qkv.view(total, head_size, qkv.shape[-1])
    q_slice = torch.cat([torch.arange(tpg * i, tpg * i + per_group) for i in range(groups)])
    k_slice = torch.arange(tpg - 2, total, tpg)
    v_slice = torch.arange(tpg - 1, total, tpg)
    return (r[q_slice].reshape(-1, qkv.shape[-1]), r[k_slice].reshape(-1, qkv.shape[-1]),
            r[v_slice].reshape(-1, qkv.shape[-1]))


def bridge_to_hf(shards: list[dict], cfg: dict) -> dict[str, torch.Tensor]:
    """``LlamaBridge.mapping_registry`` applied to the TP ranks' local tensors: AutoMapping gathers
    column-parallel weights on dim 0 and row-parallel ones on dim 1; ``GatedMLPMapping`` splits each
    rank's ``[gate_r; up_r]`` and concatenates the gates, then the ups; ``QKVMapping`` gathers, then
    ``split_qkv_weights``."""
    col = lambda k: torch.cat([s[k] for s in shards], 0)  # noqa: E731
    row = lambda k: torch.cat([s[k] for s in shards], 1)  # noqa: E731
    hd = cfg["head_dim"]
    out = {"model.embed_tokens.weight": col("embedding.word_embeddings.weight"),
           "lm_head.weight": col("output_layer.weight"),
           "model.norm.weight": shards[0]["decoder.final_layernorm.weight"]}
    for i in range(cfg["num_hidden_layers"]):
        d, h = f"decoder.layers.{i}.", f"model.layers.{i}."
        out[h + "input_layernorm.weight"] = shards[0][d + "input_layernorm.weight"]
        out[h + "post_attention_layernorm.weight"] = shards[0][d + "pre_mlp_layernorm.weight"]
        out[h + "self_attn.o_proj.weight"] = row(d + "self_attention.linear_proj.weight")
        out[h + "mlp.down_proj.weight"] = row(d + "mlp.linear_fc2.weight")
        q, k, v = split_qkv_weights(col(d + "self_attention.linear_qkv.weight"), cfg["num_attention_heads"],
                                    cfg["num_key_value_heads"], hd)
        out[h + "self_attn.q_proj.weight"], out[h + "self_attn.k_proj.weight"] = q, k
        out[h + "self_attn.v_proj.weight"] = v
        halves = [torch.chunk(s[d + "mlp.linear_fc1.weight"], 2, dim=0) for s in shards]
        out[h + "mlp.gate_proj.weight"] = torch.cat([g for g, _ in halves])
        out[h + "mlp.up_proj.weight"] = torch.cat([u for _, u in halves])
    return out


class InMemory(NativeCheckpoint):
    """Native tensors held in memory (a merge made in Megatron's names)."""

    def __init__(self, like: NativeCheckpoint, tensors: dict[str, torch.Tensor]) -> None:
        super().__init__(like.path, dict(like.tensors))
        self._t = tensors

    def read(self, name: str) -> torch.Tensor:
        return self._t[name].clone()


# -- reading ------------------------------------------------------------------------------------------
def test_layout_is_read_from_metadata_alone(run):
    save, newest = run["save"], run["iters"][-1]
    assert (save / TRACKER).read_text() == str(ITERS[-1])  # what Megatron-LM's save_checkpoint leaves
    assert json.loads((newest / "metadata.json").read_text())["sharded_backend"] == "torch_dist"
    assert find(newest) is FORMAT and find(save) is None
    fmt, kids = find_series(save)
    assert fmt is FORMAT and sorted(kids) == run["iters"] and all(FORMAT.complete(k) for k in kids)

    ck = FORMAT.open(newest)
    assert ck.bytes_read == 0
    L = 2
    assert ck.tensors["decoder.layers.self_attention.linear_qkv.weight"].shape == (L, (4 + 2 * 2) * 16, 64)
    assert ck.tensors["decoder.layers.mlp.linear_fc1.weight"].shape == (L, 2 * 96, 64)
    assert ck.tensors["embedding.word_embeddings.weight"].shape == (VOCAB, 64)
    assert not any(n.startswith("optimizer.") for n in ck.tensors)
    assert "optimizer.state.exp_avg.decoder.layers.self_attention.linear_qkv.weight" in ck.others
    assert len(ck.others) == 2 * len(ck.tensors)  # exp_avg and exp_avg_sq of every parameter
    assert sorted(ck.model_bytes) == sorted(f"decoder.layers.{m}._extra_state/shard_{i}_{L}" for i in range(L)
                                            for m in ("self_attention.linear_qkv", "self_attention.linear_proj",
                                                      "mlp.linear_fc1", "mlp.linear_fc2"))
    assert sorted(ck.other_bytes) == [f"rng_state/shard_0.{r}_1.{TP}" for r in range(TP)]
    # The HF config comes from the run's args in common.pt, unpickled without importing Megatron's classes.
    cfg = ck.hf_config
    assert cfg["architectures"] == ["LlamaForCausalLM"]
    assert {k: cfg[k] for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                                "num_attention_heads", "num_key_value_heads", "head_dim", "rms_norm_eps",
                                "tie_word_embeddings")} == {
        "vocab_size": VOCAB, "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16, "rms_norm_eps": 1e-5,
        "tie_word_embeddings": False}
    assert cfg["rope_parameters"]["rope_theta"] == 10000.0
    # One HF tensor of layer 1 reads only layer 1's saved chunks of the stacked qkv (its 2 TP halves).
    o = open_mapped(newest, FORMAT)
    piece = o.pieces["model.layers.1.self_attn.q_proj.weight"]
    q = assemble(o.native, piece)
    md = o.native.metadata
    layer1 = [info.length for idx, info in md.storage_data.items() if idx.fqn == piece.native and idx.offset[0] == 1]
    assert len(layer1) == TP and o.native.bytes_read == sum(layer1)
    rows = FORMAT.open(newest).read(piece.native).reshape(-1, 64)
    assert torch.equal(q, torch.cat([rows[a:b] for a, b in piece.runs]))


def test_llama_map_equals_megatron_bridge_conversion_bit_for_bit(run):
    for it, path in zip(ITERS, run["iters"]):
        o = open_mapped(path, FORMAT)
        assert o.layout == "megatron-gpt-llama"
        ours = {hf: assemble(o.native, p) for hf, p in o.pieces.items()}
        ref = bridge_to_hf(run["local"][it], o.native.hf_config)
        assert sorted(ours) == sorted(ref)
        for k in ref:
            assert ours[k].dtype == ref[k].dtype and torch.equal(ours[k], ref[k]), (it, k)


def test_mapped_llama_computes_megatron_logits(run):
    from transformers import LlamaConfig, LlamaForCausalLM

    o = open_mapped(run["iters"][-1], FORMAT)
    model = LlamaForCausalLM(LlamaConfig(**o.native.hf_config)).eval()
    missing = model.load_state_dict({hf: assemble(o.native, p) for hf, p in o.pieces.items()}, strict=True)
    assert not missing.missing_keys and not missing.unexpected_keys
    with torch.no_grad():
        hf = model(run["logits"]["input_ids"]).logits
    mg = run["logits"]["logits"]
    assert hf.shape == mg.shape
    torch.testing.assert_close(hf, mg, rtol=1e-5, atol=2e-5)  # Megatron's own forward (TP=2, fp32)


def test_per_layer_keys_map_to_the_same_tensors(run, tmp_path):
    per = run["per_layer"]
    ck = FORMAT.open(per)
    assert "decoder.layers.1.self_attention.linear_qkv.weight" in ck.tensors
    assert not any(n.startswith("decoder.layers.self_attention") for n in ck.tensors)
    assert ck.hf_config is None  # saved without args: the config must be given
    with pytest.raises(CheckpointError, match="checkpoints.config_dir"):
        open_mapped(per, FORMAT)
    (tmp_path / "config.json").write_text(json.dumps(FORMAT.open(run["iters"][-1]).hf_config))
    a, b = open_mapped(per, FORMAT, config_dir=tmp_path), open_mapped(run["iters"][-1], FORMAT)
    assert sorted(a.pieces) == sorted(b.pieces)
    for k in a.pieces:
        assert torch.equal(assemble(a.native, a.pieces[k]), assemble(b.native, b.pieces[k])), k


def test_merge_then_map_equals_map_then_merge(run):
    opened = [open_mapped(p, FORMAT) for p in run["iters"]]
    natives = [o.native for o in opened]
    merged = InMemory(natives[-1], {n: wsum([nat.read(n) for nat in natives], W) for n in natives[-1].tensors})
    for hf, piece in opened[-1].pieces.items():
        a = assemble(merged, piece)  # (a) merge in Megatron's names, then map
        b = wsum([assemble(o.native, o.pieces[hf]) for o in opened], W)  # (b) map each, then merge
        assert torch.equal(a, b), hf
        by_hand = sum(w * assemble(o.native, o.pieces[hf]).double() for w, o in zip(W, opened))
        torch.testing.assert_close(a.double(), by_hand, rtol=1e-6, atol=1e-7)


# -- writing ------------------------------------------------------------------------------------------
def _write(run, out: Path, with_others: bool) -> list[NativeCheckpoint]:
    natives = [FORMAT.open(p) for p in run["iters"]]
    newest = natives[-1]
    names = list(newest.tensors) + (list(newest.others) if with_others else [])
    FORMAT.write(out, newest, lambda n: wsum([nat.read(n) for nat in natives], W), names)
    return natives


def test_merge_written_back_loads_in_megatron_equal_to_weighted_sum(run, tmp_path):
    out = tmp_path / "merged_megatron"
    natives = _write(run, out, with_others=False)
    newest = run["iters"][-1]
    # Megatron's whole structure inside the output: iter folder, tracker, metadata.json, common.pt.
    it_dir = out / newest.name
    assert (out / TRACKER).read_text() == str(ITERS[-1])
    assert (it_dir / "metadata.json").read_bytes() == (newest / "metadata.json").read_bytes()
    assert (it_dir / "common.pt").read_bytes() == (newest / "common.pt").read_bytes()
    # _extra_state copied from the newest, byte for byte (and it differs from the older sources').
    back = FORMAT.open(it_dir)
    assert sorted(back.model_bytes) == sorted(natives[-1].model_bytes) and back.other_bytes == []
    assert back.others == {}
    for key in natives[-1].model_bytes:
        assert back.read_bytes(key) == natives[-1].read_bytes(key) != natives[0].read_bytes(key)
    # The output is a source again: a Megatron save folder of one checkpoint.
    assert find_series(out) == (FORMAT, [it_dir]) and FORMAT.complete(it_dir)

    # Megatron loads it (the tracker names the iteration) into the TP=2 model.
    run_worker({"mode": "load", "dir": str(out), "out": str(tmp_path)}, tmp_path / "w_load")
    for r in range(TP):
        got = torch.load(tmp_path / f"rank{r}_loaded.pt", weights_only=False)
        assert got["iteration"] == ITERS[-1] == got["common_iteration"]
        srcs = [run["local"][it][r] for it in ITERS]
        for name, t in got["tensors"].items():
            expect = wsum([s[name] for s in srcs], W)
            assert torch.equal(t, expect), (r, name)  # bitwise: the same fp32 merge, shard by shard
            by_hand = sum(w * s[name].double() for w, s in zip(W, srcs))
            torch.testing.assert_close(t.double(), by_hand, rtol=1e-6, atol=1e-7)
        assert len(got["extra"]) == 8  # 4 linear layers x 2 decoder layers handed their _extra_state
        assert all(v.startswith(f"extra iter={ITERS[-1]} ".encode()) for _, v in got["extra"]), got["extra"]


def test_optimizer_average_and_training_state_copied(run, tmp_path):
    import io

    import torch.distributed.checkpoint as dcp

    save = tmp_path / "save"
    shutil.copytree(run["save"], save)
    tok = save / run["iters"][-1].name / "tokenizer"  # what --save-tokenizer-assets adds
    tok.mkdir()
    (tok / "tokenizer.json").write_text('{"version": "1.0"}')
    out = tmp_path / "merged"
    natives = _write({"iters": [save / p.name for p in run["iters"]]}, out, with_others=True)
    newest = natives[-1]
    it_dir = out / run["iters"][-1].name
    assert (it_dir / "tokenizer" / "tokenizer.json").read_bytes() == (tok / "tokenizer.json").read_bytes()
    want = {k: torch.empty(t.shape, dtype=t.dtype) for k, t in newest.others.items()}
    want.update({k: io.BytesIO() for k in newest.other_bytes})
    dcp.load(want, checkpoint_id=str(it_dir), no_dist=True)  # DCP's own loader
    for k in newest.others:
        assert torch.equal(want[k], wsum([nat.read(k) for nat in natives], W)), k
    for k in newest.other_bytes:  # rng_state: the newest's record as it was
        assert FORMAT.open(it_dir).read_bytes(k) == newest.read_bytes(k)
    # Adam moments are local state: check one against the ranks' own optimizer tensors.
    k = "optimizer.state.exp_avg.output_layer.weight"
    local = [torch.cat([run["local"][it][r]["optimizer.exp_avg.output_layer.weight"] for r in range(TP)])
             for it in ITERS]
    assert torch.equal(want[k], wsum(local, W))


def test_mixed_precision_master_weights_are_merged_with_the_model(run, tmp_path):
    """bf16 weights with fp32 masters in the optimizer (``optimizer.state.fp32_param``): Megatron resumes
    from the masters, so they are merged like the model even when the optimizer is not."""
    import torch.distributed.checkpoint as dcp

    natives = [FORMAT.open(p) for p in run["bf16"]]
    newest = natives[-1]
    key = "decoder.layers.self_attention.linear_qkv.weight"
    master = f"optimizer.state.fp32_param.{key}"
    assert newest.tensors[key].dtype == torch.bfloat16 and newest.tensors[master].dtype == torch.float32
    assert master in newest.tensors and master not in newest.others
    assert f"optimizer.state.exp_avg.{key}" in newest.others
    assert newest.hf_config["torch_dtype"] == "bfloat16"
    o = open_mapped(run["bf16"][-1], FORMAT)
    assert not any(p.native.startswith("optimizer.") for p in o.pieces.values())  # HF gets the bf16 weights

    w = [0.4, 0.6]
    out = tmp_path / "merged"
    FORMAT.write(out, newest, lambda n: wsum([k.read(n) for k in natives], w), list(newest.tensors))  # model-only
    it_dir = out / run["bf16"][-1].name
    back = {k: torch.empty(t.shape, dtype=t.dtype) for k, t in newest.tensors.items()}
    dcp.load(back, checkpoint_id=str(it_dir), no_dist=True)
    for name in newest.tensors:
        assert torch.equal(back[name], wsum([k.read(name) for k in natives], w)), name
    # The masters are the ranks' own fp32 copies, merged; rounded, they are the merged bf16 weights.
    loc = run["bf16_local"]
    masters = [torch.cat([loc[it][r]["master.output_layer.weight"] for r in range(TP)]) for it in ITERS[:2]]
    assert torch.equal(back["optimizer.state.fp32_param.output_layer.weight"], wsum(masters, w))
    for name in newest.tensors:
        if not name.startswith("optimizer."):
            torch.testing.assert_close(back[f"optimizer.state.fp32_param.{name}"].to(back[name].dtype), back[name],
                                       rtol=1e-2, atol=1e-2)


# -- refusals -----------------------------------------------------------------------------------------
def test_unfinished_iter_folder_skipped_as_newest_and_refused_when_named(run, tmp_path, caplog):
    from lightning_merge.sources import resolve_sources

    save = tmp_path / "save"
    shutil.copytree(run["save"], save)
    late = save / "iter_0000040"  # Megatron writes metadata.json last: a save still in flight lacks it
    shutil.copytree(run["iters"][-1], late)
    (late / "metadata.json").unlink()
    assert FORMAT.detect(late) and not FORMAT.complete(late)
    started = save / "iter_0000050"  # just begun: only common.pt so far
    started.mkdir()
    shutil.copy2(run["iters"][-1] / "common.pt", started / "common.pt")
    assert FORMAT.detect(started) and not FORMAT.complete(started)

    with caplog.at_level(logging.WARNING):
        got = resolve_sources([save])
    assert got == [save / p.name for p in run["iters"]]
    assert "iter_0000050" in caplog.text and "iter_0000040" in caplog.text
    for bad in (late, started):
        with pytest.raises(CheckpointError, match="not complete"):
            resolve_sources([bad])
        with pytest.raises(CheckpointError, match=bad.name):
            FORMAT.open(bad)


def test_unknown_layout_and_mismatched_config_refused(run, tmp_path):
    cfg = dict(FORMAT.open(run["iters"][-1]).hf_config)
    cfg["num_key_value_heads"] = 4  # MHA: the qkv rows no longer fit
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="linear_qkv"):
        open_mapped(run["iters"][-1], FORMAT, config_dir=tmp_path)
    cfg["num_key_value_heads"], cfg["intermediate_size"] = 2, 192  # not SwiGLU's [gate; up] of this size
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="SwiGLU"):
        open_mapped(run["iters"][-1], FORMAT, config_dir=tmp_path)
    # A GPT with biases (GPT-NeoX/Falcon style) is no Llama: refused before any tensor is read.
    import torch.distributed.checkpoint as dcp

    odd = tmp_path / "odd" / "iter_0000001"
    dcp.save({"embedding.word_embeddings.weight": torch.zeros(8, 4),
              "decoder.layers.self_attention.linear_qkv.weight": torch.zeros(1, 12, 4),
              "decoder.layers.self_attention.linear_qkv.bias": torch.zeros(1, 12),
              "decoder.layers.mlp.linear_fc1.weight": torch.zeros(1, 16, 4)}, checkpoint_id=str(odd), no_dist=True)
    (odd / "metadata.json").write_text(json.dumps({"sharded_backend": "torch_dist", "sharded_backend_version": 1,
                                                   "common_backend": "torch", "common_backend_version": 1}))
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="no built-in map knows"):
        open_mapped(odd, FORMAT, config_dir=tmp_path)
    # Another backend (Megatron's legacy zarr) is not read.
    (odd / "metadata.json").write_text(json.dumps({"sharded_backend": "zarr"}))
    assert find(odd) is None


# -- the user's command ------------------------------------------------------------------------------
@pytest.mark.slow
def test_cli_on_the_save_folder_writes_hf_and_megatron(run, tmp_path):
    """``python -m lightning_merge 'checkpoints.sources=[<save>]' merge.format=both``: the HF config comes
    from the run's args, the tokenizer from the save folder; both outputs hold the search's best merge, and
    Megatron loads the own-format one."""
    from safetensors.torch import load_file
    from transformers import LlamaConfig, LlamaForCausalLM

    from conftest import CORPUS, make_tokenizer

    save = tmp_path / "save"
    shutil.copytree(run["save"], save)
    # Megatron-LM's --save-tokenizer-assets writes iter_N/tokenizer/: the tool finds it there
    make_tokenizer().save_pretrained(save / run["iters"][-1].name / "tokenizer")
    text = tmp_path / "heldout.txt"
    text.write_text("".join(CORPUS))
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", LIGHTNING_MERGE_CACHE=str(tmp_path / "cache"),
               PYTHONPATH=os.pathsep.join([str(WORKER.parents[1]), os.environ.get("PYTHONPATH", "")]))
    r = subprocess.run([sys.executable, "-m", "lightning_merge", f"checkpoints.sources=[{save}]",
                        "checkpoints.last=3", "search.trials=2", "merge.format=both",
                        f"data.heldout.path={text}", "data.heldout.num_blocks=4", "data.heldout.block_size=16",
                        "data.search_blocks=2", f"output_dir={tmp_path / 'out'}"],
                       cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, (r.stdout[-2000:], r.stderr[-4000:])
    res = json.loads((tmp_path / "out" / "results.json").read_text())
    w = res["best"]["weights"]  # the search's best merge, written in both formats
    assert len(w) == 3 and Path(res["merged_source_dir"]).name == "merged_megatron"
    natives = [FORMAT.open(p) for p in run["iters"]]
    mine = FORMAT.open(tmp_path / "out" / "merged_megatron" / run["iters"][-1].name)
    for n in natives[-1].tensors:
        torch.testing.assert_close(mine.read(n), wsum([k.read(n) for k in natives], w), rtol=0, atol=1e-6, msg=n)
    assert (tmp_path / "out" / "merged_megatron" / TRACKER).read_text() == str(ITERS[-1])
    # Megatron's own loader takes it into the TP=2 model: each rank's shards are the merge of its shards
    run_worker({"mode": "load", "dir": str(tmp_path / "out" / "merged_megatron"), "out": str(tmp_path)},
               tmp_path / "w_load")
    for rank in range(TP):
        got = torch.load(tmp_path / f"rank{rank}_loaded.pt", weights_only=False)
        srcs = [run["local"][it][rank] for it in ITERS]
        for name, t in got["tensors"].items():
            torch.testing.assert_close(t, wsum([s_[name] for s_ in srcs], w), rtol=0, atol=1e-6, msg=name)
    hf_dir = tmp_path / "out" / "merged"
    cfg = json.loads((hf_dir / "config.json").read_text())
    hf = LlamaForCausalLM(LlamaConfig(**cfg))
    hf.load_state_dict(load_file(hf_dir / "model.safetensors"), strict=True)
    o = open_mapped(mine.path, FORMAT)
    for name, t in hf.state_dict().items():
        assert torch.equal(t, assemble(o.native, o.pieces[name])), name


def test_common_pt_is_read_without_running_the_runs_code(tmp_path):
    """``common.pt`` pickles the run's ``args`` with Megatron's own classes in it: they become inert
    stand-ins, and a pickle that would call a function calls nothing."""
    import argparse

    from lightning_merge.formats.megatron import hf_config_from_args, read_common

    marker = tmp_path / "ran"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    args = argparse.Namespace(num_layers=2, hidden_size=64, num_attention_heads=4, normalization="LayerNorm",
                              swiglu=False, position_embedding_type="learned_absolute", padded_vocab_size=320,
                              hook=Evil(), params_dtype=torch.bfloat16)
    torch.save({"args": args, "iteration": 7}, tmp_path / "common.pt")
    got = read_common(tmp_path)
    assert not marker.exists()
    assert got["iteration"] == 7 and got["args"].hidden_size == 64 and got["args"].params_dtype == torch.bfloat16
    assert type(got["args"].hook).__module__.startswith("opaque.")
    assert hf_config_from_args(got["args"]) is None  # a LayerNorm + GeLU GPT is no Llama: config_dir needed
    (tmp_path / "common.pt").write_bytes(b"not a torch file")
    assert read_common(tmp_path) is None
