"""OLMo-core step folders: saved by OLMo-core's own ``Checkpointer.save`` from a ``TransformerTrainModule``
(FSDP over 2 gloo ranks, so the DCP chunks are really sharded; see ``olmo_worker.py``), read through OLMo-core's
``RemoteFileSystemReader``, mapped to HF (checked bit for bit against OLMo-core's ``convert_state_to_hf`` and by
logits), merged, written back as a step folder and loaded by OLMo-core's ``load_model_and_optim_state``."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lightning_merge.errors import CheckpointError
from lightning_merge.formats import find, find_series, open_mapped
from lightning_merge.formats.base import assemble

pytest.importorskip("olmo_core")

REPO = Path(__file__).resolve().parents[1]
W = [0.2, 0.3, 0.5]


def _merge(tensors: list[torch.Tensor], w=W) -> torch.Tensor:
    """sum_k w_k * theta_k in fp32, cast once: w_0 * theta_0, then ``add_(theta_k, alpha=w_k)`` (the same
    rounding as lightning_merge's merge, so the comparisons below can be bitwise)."""
    acc = tensors[0].float() * w[0]
    for wk, t in zip(w[1:], tensors[1:]):
        acc.add_(t.float(), alpha=wk)
    return acc.to(tensors[0].dtype)


def _env() -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    return env


def _spawn(root: Path, spec: dict, world: int) -> None:
    """Run tests/olmo_worker.py on ``world`` gloo ranks."""
    import socket

    root.mkdir(parents=True, exist_ok=True)
    file = root / f"spec{len(list(root.glob('spec*.json')))}.json"
    file.write_text(json.dumps({"root": str(root), **spec}))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    worker = str(REPO / "tests" / "olmo_worker.py")
    if world == 1:
        cmd = [sys.executable, worker, str(file)]
        env = {**_env(), "RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
               "MASTER_PORT": str(port)}
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={world}",
               f"--master_port={port}", worker, str(file)]
        env = _env()
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stderr[-4000:]


def _run(root: Path, style: str, world: int, steps: list[int]) -> dict:
    """A run's save folder made by OLMo-core's own trainer checkpointer (tests/olmo_worker.py)."""
    _spawn(root, {"style": style, "steps": steps}, world)
    save = root / "save"
    return {"save": save, "steps": [save / f"step{s}" for s in steps],
            "ref": {s: torch.load(root / "ref" / f"step{s}.pt", weights_only=False) for s in steps}}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("olmo_core")
    return {"olmo2": _run(root / "olmo2", "olmo2", 2, [1, 2, 3]), "llama": _run(root / "llama", "llama", 1, [1, 2])}


def _olmo_model(step_dir: Path):
    """The model OLMo-core builds from the run's own config.json."""
    from olmo_core.nn.transformer import TransformerConfig

    cfg = json.loads((step_dir / "config.json").read_text())["model"]
    return TransformerConfig.from_dict(cfg).build(init_device="cpu")


@pytest.mark.distributed
def test_detect_series_completion_and_manifest(runs, tmp_path):
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    from olmo_core.train.checkpoint import Checkpointer

    run = runs["olmo2"]
    fmt, kids = find_series(run["save"])
    assert fmt.name == "olmo_core" and sorted(kids) == run["steps"]
    step = run["steps"][-1]
    assert find(step).name == "olmo_core" and find(step / "model_and_optim").name == "olmo_core"
    assert fmt.complete(step) and Checkpointer.dir_is_checkpoint(step)
    # OLMo-core's own completion rule: without .metadata.json (written last) it is no checkpoint yet
    partial = tmp_path / "save" / "step9"
    shutil.copytree(step, partial)
    (partial / ".metadata.json").unlink()
    shutil.copytree(step, tmp_path / "save" / "step9-tmp")  # Checkpointer's temporary name: not a step
    assert not fmt.complete(partial) and not Checkpointer.dir_is_checkpoint(partial)
    assert sorted(fmt.series_children(tmp_path / "save")) == [partial]
    (partial / "model_and_optim" / ".metadata").unlink()
    with pytest.raises(CheckpointError, match=r"step9/model_and_optim: a DCP folder without \.metadata"):
        fmt.open(partial)
    # the manifest: model.* from metadata alone, sharded chunks, optim.* as others, param groups as bytes
    ck = fmt.open(step)
    assert ck.bytes_read == 0
    ref = run["ref"][3]["state"]
    assert {n: (t.shape, t.dtype) for n, t in ck.tensors.items()} == \
        {n: (tuple(t.shape), t.dtype) for n, t in ref.items()}
    md = ck.metadata.state_dict_metadata
    assert len(md["model.embeddings.weight"].chunks) == 2  # FSDP over 2 ranks: dim-0 halves
    assert any(n.endswith(".exp_avg_sq") for n in ck.others) and all(n.startswith("optim.") for n in ck.others)
    assert all(not isinstance(md[k], TensorStorageMetadata) for k in ck.other_bytes) and ck.other_bytes
    assert type(next(iter(ck.metadata.storage_data.values()))).__module__.startswith("olmo_core.")
    for n, t in ref.items():
        assert torch.equal(ck.read(n), t), n
    half = ref["embeddings.weight"].numel() // 2
    before = ck.bytes_read
    ck.close()
    assert torch.equal(ck.read_flat("embeddings.weight", 10, 50), ref["embeddings.weight"].reshape(-1)[10:50])
    assert ck.bytes_read - before < 0.6 * ref["embeddings.weight"].numel() * 4  # one of the two saved chunks
    assert torch.equal(ck.read_flat("embeddings.weight", half - 5, half + 5),
                       ref["embeddings.weight"].reshape(-1)[half - 5:half + 5])


@pytest.mark.distributed
@pytest.mark.parametrize("style", ["olmo2", "llama"])
def test_map_equals_olmo_core_converter_and_logits(runs, style):
    import transformers

    run = runs[style]
    step = run["steps"][-1]
    ref = run["ref"][int(step.name[4:])]
    op = open_mapped(step, find(step))
    assert op.layout == f"olmo-core-{style}"
    mine = {k: assemble(op.native, p) for k, p in op.pieces.items()}
    assert sorted(mine) == sorted(ref["hf_state"])
    for k, t in ref["hf_state"].items():
        assert mine[k].dtype == t.dtype and torch.equal(mine[k], t), k
    cfg = op.native.hf_config
    assert cfg["architectures"] == [{"olmo2": "Olmo2ForCausalLM", "llama": "LlamaForCausalLM"}[style]]
    if style == "olmo2":  # what OLMo-core's own get_hf_config derives from the built model
        theirs = ref["hf_config"]
        for key in ("model_type", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                    "num_attention_heads", "num_key_value_heads", "rms_norm_eps", "attention_bias",
                    "tie_word_embeddings", "hidden_act"):
            assert cfg[key] == theirs[key], key
        assert cfg["rope_parameters"]["rope_theta"] == theirs["rope_parameters"]["rope_theta"]
    tok = json.loads((step / "config.json").read_text())["dataset"]["tokenizer"]  # the run's TokenizerConfig
    assert (cfg["eos_token_id"], cfg["pad_token_id"], cfg["bos_token_id"]) == \
        (tok["eos_token_id"], tok["pad_token_id"], tok.get("bos_token_id"))
    c = dict(cfg)
    conf = transformers.AutoConfig.for_model(c.pop("model_type"), **c)
    hf = getattr(transformers, conf.architectures[0])(conf).eval()
    hf.load_state_dict(mine, strict=True)
    with torch.no_grad():
        torch.testing.assert_close(hf(ref["probe"]).logits, ref["logits"], atol=2e-5, rtol=0)


@pytest.mark.distributed
@pytest.mark.parametrize("style", ["olmo2", "llama"])
def test_merge_then_map_equals_map_then_merge(runs, style):
    run = runs[style]
    fmt = find(run["steps"][0])
    ops = [open_mapped(s, fmt) for s in run["steps"]]
    natives = [o.native for o in ops]
    w = W[-len(natives):]
    w = [x / sum(w) for x in w]
    for hf, piece in ops[-1].pieces.items():
        a = _merge([assemble(n, piece) for n in natives], w)

        class _Merged:  # a native checkpoint of the merged native tensors
            tensors = natives[-1].tensors

            @staticmethod
            def read_flat(name, s, e):
                return _merge([n.read(name) for n in natives], w).reshape(-1)[s:e].clone()

            @staticmethod
            def read(name):
                return _merge([n.read(name) for n in natives], w)

        b = assemble(_Merged, piece)
        assert torch.equal(a, b), hf


def _write(fmt, natives, out: Path, optimizer: str) -> None:
    """What write_source's produce does: model (and optim float state) merged in fp32, the rest from the newest."""
    tpl = natives[-1]
    names = list(tpl.tensors) + (list(tpl.others) if optimizer != "none" else [])

    def produce(name):
        info = tpl.tensors.get(name) or tpl.others[name]
        if name in tpl.others and (optimizer == "newest" or not info.dtype.is_floating_point):
            return tpl.read(name)
        return _merge([n.read(name) for n in natives])

    fmt.write(out, tpl, produce, names)


@pytest.mark.distributed
def test_write_round_trip_loaded_by_olmo_core(runs, tmp_path):
    from olmo_core.distributed.checkpoint import load_model_and_optim_state
    from olmo_core.optim import AdamWConfig
    from olmo_core.train.checkpoint import Checkpointer

    run = runs["olmo2"]
    fmt = find(run["steps"][0])
    natives = [fmt.open(s) for s in run["steps"]]
    tpl = natives[-1]
    out = tmp_path / "merged_olmo_core"
    _write(fmt, natives, out, "average")
    # a whole step folder, as OLMo-core's Checkpointer wants it, from the newest's files
    assert Checkpointer.dir_is_checkpoint(out) and fmt.complete(out) and find(out) is fmt
    for rel in ("train/rank0.pt", "train/rank1.pt", "config.json", ".metadata.json"):
        assert (out / rel).read_bytes() == (tpl.step_dir / rel).read_bytes(), rel
    model = _olmo_model(out)
    optim = AdamWConfig(lr=1e-2).build(model)
    load_model_and_optim_state(out / "model_and_optim", model, optim, flatten_optimizer_state=True)
    sd = model.state_dict()
    assert sorted(sd) == sorted(tpl.tensors)
    for n, t in sd.items():
        assert torch.equal(t, _merge([k.read(n) for k in natives])), n
    names = {id(p): n for n, p in model.named_parameters()}
    for p, st in optim.state.items():
        n = names[id(p)]
        for field in ("exp_avg", "exp_avg_sq", "step"):
            want = _merge([k.read(f"optim.state.{n}.{field}") for k in natives])
            assert torch.equal(st[field].reshape(want.shape), want), (n, field)
    assert optim.param_groups[0]["lr"] == 1e-2
    # the merged folder opens again (torch's own storage classes in its .metadata)
    again = fmt.open(out)
    assert torch.equal(again.read("lm_head.w_out.weight"), sd["lm_head.w_out.weight"])
    assert again.hf_config == tpl.hf_config
    # model only (merge.optimizer=none): OLMo-core loads the model and finds no optimizer state
    only = tmp_path / "model_only"
    _write(fmt, natives, only, "none")
    again = fmt.open(only)
    assert again.others == {} and again.other_bytes == []
    model2 = _olmo_model(only)
    load_model_and_optim_state(only / "model_and_optim", model2)
    for n, t in model2.state_dict().items():
        assert torch.equal(t, sd[n]), n


@pytest.mark.distributed
def test_refused_without_olmo_core(runs, monkeypatch, tmp_path):
    """The real unpickling of .metadata hits the missing olmo_core module and says what to install; a folder
    written by our writer (torch's storage classes) still opens."""
    run = runs["llama"]
    fmt = find(run["steps"][0])
    natives = [fmt.open(s) for s in run["steps"]]
    _write(fmt, natives, tmp_path / "merged", "none")
    for name in [m for m in sys.modules if m == "olmo_core" or m.startswith("olmo_core.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "olmo_core", None)  # import olmo_core -> ModuleNotFoundError
    step = run["steps"][-1]
    with pytest.raises(CheckpointError) as e:
        fmt.open(step)
    msg = str(e.value)
    assert str(step / "model_and_optim") in msg and "pickles OLMo-core" in msg and "pip install --no-deps ai2-olmo-core" in msg
    assert isinstance(e.value.__cause__, ModuleNotFoundError)
    assert e.value.__cause__.name.startswith("olmo_core")
    ck = fmt.open(tmp_path / "merged")
    assert torch.equal(ck.read("embeddings.weight"), _merge([n.read("embeddings.weight") for n in natives]))


@pytest.mark.distributed
def test_refused_when_an_olmo_core_dependency_is_missing(runs):
    """OLMo-core installed without one of its dependencies (boto3, which ``olmo_core.io`` imports): the
    unpickling fails on that module, and the message names it (in a fresh process, import blocked)."""
    step = runs["llama"]["steps"][-1]
    code = ("import sys\n"
            "class Block:\n"
            "    def find_spec(self, name, path=None, target=None):\n"
            "        if name.split('.')[0] == 'boto3':\n"
            "            raise ModuleNotFoundError(f'No module named {name!r}', name=name)\n"
            "sys.meta_path.insert(0, Block())\n"
            "from lightning_merge.errors import CheckpointError\n"
            "from lightning_merge.formats import find\n"
            f"step = {str(step)!r}\n"
            "try:\n"
            "    find(step).open(step)\n"
            "except CheckpointError as e:\n"
            "    print('REFUSED', e)\n")
    r = subprocess.run([sys.executable, "-c", code], env=_env(), capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "REFUSED" in r.stdout and "'boto3'" in r.stdout and "pip install --no-deps ai2-olmo-core" in r.stdout, r.stdout
    assert str(step / "model_and_optim") in r.stdout


@pytest.mark.distributed
def test_unmappable_config_asks_for_a_config_dir(runs, tmp_path, caplog):
    run = runs["llama"]
    step = tmp_path / "step2"
    shutil.copytree(run["steps"][-1], step)
    cfg = json.loads((step / "config.json").read_text())
    cfg["model"]["block"]["sequence_mixer"]["sliding_window"] = {"pattern": [4096, -1]}
    (step / "config.json").write_text(json.dumps(cfg))
    fmt = find(step)
    assert fmt.open(step).hf_config is None
    assert "sliding_window" in caplog.text and "checkpoints.config_dir" in caplog.text
    with pytest.raises(CheckpointError, match=r"carries no Hugging Face config.*ConfigSaverCallback"):
        open_mapped(step, fmt)
    (step / "config.json").unlink()
    with pytest.raises(CheckpointError, match=r"step2.*checkpoints\.config_dir"):
        open_mapped(step, fmt)


@pytest.mark.slow
@pytest.mark.distributed
def test_cli_merges_the_run_and_olmo_core_resumes_from_it(runs, tmp_path):
    """The user's command on the run's save folder (merge.format=both, merge.optimizer=average): the HF model
    computes what OLMo-core's model of the merged step folder computes, and OLMo-core's trainer resumes from
    that folder (``Checkpointer.load`` under FSDP on 2 ranks) with sum_k w_k theta_k."""
    from safetensors.torch import load_file

    from conftest import CORPUS, make_tokenizer

    run = runs["olmo2"]
    save = tmp_path / "save"
    shutil.copytree(run["save"], save)
    make_tokenizer().save_pretrained(save)  # the run folder's tokenizer, found beside the step folders
    held = tmp_path / "heldout.txt"
    held.write_text("".join(CORPUS) * 4)
    env = {**_env(), "LIGHTNING_MERGE_CACHE": str(tmp_path / "cache")}
    r = subprocess.run([sys.executable, "-m", "lightning_merge", f"checkpoints.sources=[{save}]",
                        "checkpoints.last=3", "search.trials=2", "merge.format=both",
                        "merge.optimizer=average", f"data.heldout.path={held}", "data.heldout.num_blocks=4",
                        "data.heldout.block_size=16", "data.search_blocks=2", f"output_dir={tmp_path / 'run'}"],
                       cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, (r.stdout[-2000:], r.stderr[-3000:])
    out = tmp_path / "run" / "merged_olmo_core"
    assert (out / "merge.yaml").is_file() and (out / "model_and_optim" / ".metadata").is_file()
    res = json.loads((tmp_path / "run" / "results.json").read_text())
    w = res["best"]["weights"]  # the search's best merge, written in both formats
    assert len(w) == 3 and Path(res["merged_source_dir"]) == out
    fmt = find(run["steps"][0])
    natives = [fmt.open(s) for s in run["steps"]]
    _spawn(tmp_path / "load", {"load": str(out)}, 2)
    loaded = torch.load(tmp_path / "load" / "loaded.pt", weights_only=False)
    assert loaded["trainer"]["global_step"] == 3
    assert sorted(loaded["model"]) == sorted(natives[-1].tensors)
    for n, t in loaded["model"].items():
        torch.testing.assert_close(t, _merge([k.read(n) for k in natives], w), rtol=0, atol=1e-6, msg=n)
    for n in natives[-1].tensors:
        want = _merge([k.read(f"optim.state.{n}.exp_avg") for k in natives], w)
        torch.testing.assert_close(loaded["optim"][f"state.{n}.exp_avg"], want, rtol=0, atol=1e-6, msg=n)
        # AdamW's step is a float 0-d tensor: a counter, the newest's, not averaged
        assert torch.equal(loaded["optim"][f"state.{n}.step"], natives[-1].read(f"optim.state.{n}.step")), n
    # the merged HF folder is the map of the merged step folder, and computes what OLMo-core computes
    import transformers

    hf_dir = tmp_path / "run" / "merged"
    hf_sd = load_file(hf_dir / "model.safetensors")
    op = open_mapped(out, fmt)
    assert sorted(hf_sd) == sorted(op.pieces)
    for k, p in op.pieces.items():
        assert torch.equal(hf_sd[k], assemble(op.native, p)), k
    model = _olmo_model(out)
    model.load_state_dict(loaded["model"])
    hf = transformers.AutoModelForCausalLM.from_pretrained(hf_dir).eval()
    x = torch.randint(0, 300, (2, 16))
    with torch.no_grad():
        torch.testing.assert_close(hf(x).logits, model.eval()(x), atol=2e-5, rtol=0)


@pytest.mark.parametrize("factory", ["olmo2_30M", "olmo2_190M", "olmo2_1B", "olmo2_7B", "olmo3_30M"])
def test_hf_config_equals_get_hf_config_for_olmo_core_presets(factory, tmp_path):
    """OLMo-core's named presets (built on the meta device): our config.json-only derivation gives what
    OLMo-core's ``get_hf_config`` derives from the built model; OLMo 3's sliding windows are refused."""
    from olmo_core.nn.hf.config import get_hf_config
    from olmo_core.nn.transformer import TransformerConfig

    from lightning_merge.formats.olmo_core import hf_config_from_olmo

    mc = getattr(TransformerConfig, factory)(vocab_size=100_352)
    cfg = {"model": mc.as_config_dict()}
    if factory.startswith("olmo3"):
        with pytest.raises(CheckpointError, match="sliding_window.*checkpoints.config_dir"):
            hf_config_from_olmo(cfg, tmp_path / "config.json")
        return
    mine = hf_config_from_olmo(cfg, tmp_path / "config.json")
    theirs = get_hf_config(mc.build(init_device="meta")).to_dict()
    assert mine["architectures"] == ["Olmo2ForCausalLM"]
    for key in ("model_type", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                "num_attention_heads", "num_key_value_heads", "rms_norm_eps", "attention_bias",
                "tie_word_embeddings", "hidden_act"):
        assert mine[key] == theirs[key], key
    assert mine["rope_parameters"]["rope_theta"] == theirs["rope_parameters"]["rope_theta"]


@pytest.mark.distributed
def test_save_model_and_optim_state_folder_named_alone(runs, tmp_path):
    """A ``model_and_optim`` folder saved by OLMo-core's ``save_model_and_optim_state`` (unflattened optimizer
    state, no trainer files), named alone: read, merged, written and loaded back by OLMo-core."""
    from olmo_core.distributed.checkpoint import load_model_and_optim_state, save_model_and_optim_state
    from olmo_core.optim import AdamWConfig

    src = runs["llama"]["steps"][-1]
    folders = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        model = _olmo_model(src)
        optim = AdamWConfig(lr=1e-3).build(model)
        model(torch.randint(0, 300, (2, 8))).sum().backward()
        optim.step()
        folders.append(tmp_path / f"m{seed}" / "model_and_optim")
        save_model_and_optim_state(folders[-1], model, optim)
    fmt = find(folders[0])
    assert fmt.name == "olmo_core" and fmt.complete(folders[0])
    natives = [fmt.open(f) for f in folders]
    assert natives[0].hf_config is None and natives[0].others  # no config.json beside: config_dir needed
    assert torch.equal(natives[-1].read("embeddings.weight"), model.state_dict()["embeddings.weight"])
    w = [0.25, 0.75]
    tpl = natives[-1]
    out = tmp_path / "merged"
    fmt.write(out, tpl, lambda n: _merge([k.read(n) for k in natives], w), list(tpl.tensors) + list(tpl.others))
    assert sorted(p.name for p in out.iterdir()) == ["model_and_optim"]  # nothing beside it to copy
    back = _olmo_model(src)
    optim = AdamWConfig(lr=1e-3).build(back)
    load_model_and_optim_state(out / "model_and_optim", back, optim)
    for n, t in back.state_dict().items():
        assert torch.equal(t, _merge([k.read(n) for k in natives], w)), n
    names = {id(p): n for n, p in back.named_parameters()}
    for p, st in optim.state.items():
        want = _merge([k.read(f"optim.state.{names[id(p)]}.exp_avg") for k in natives], w)
        assert torch.equal(st["exp_avg"], want)
