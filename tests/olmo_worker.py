"""Make a tiny OLMo-core run the way OLMo-core's trainer saves it (see test_formats_olmo_core.py).

usage: python -m torch.distributed.run --nproc_per_node=W tests/olmo_worker.py SPEC.json
   (or plain ``python tests/olmo_worker.py SPEC.json`` with RANK/WORLD_SIZE/MASTER_* set for one rank)

Builds a tiny ``TransformerConfig.llama_like`` model (``style``: "olmo2" =
``reordered_norm`` blocks with QK-norm, OLMo 2's block; "llama" = ``default``
pre-norm blocks), its ``TransformerTrainModule`` (AdamW; FSDP over the ranks
when W > 1, so the saved DCP chunks are really sharded), trains one step on
random tokens per checkpoint and saves ``save/step{N}`` with OLMo-core's own
``Checkpointer.save`` (``train/rank*.pt``, ``model_and_optim/``,
``.metadata.json``), then writes ``config.json`` into it as
``ConfigSaverCallback.post_checkpoint_saved`` does (``json.dumps`` of an
experiment-style ``as_config_dict()``).

Rank 0 also writes ``ref/step{N}.pt``: the unsharded OLMo-core state, OLMo-core's
own HF conversion of it (``get_hf_config`` + ``convert_state_to_hf``; for the
Llama style ``convert_state_to_hf`` with a ``LlamaConfig``, as ``get_hf_config``
converts only ``reordered_norm`` blocks), and the model's logits on fixed tokens.

SPEC (json): ``root``, ``style``, ``steps`` (list of step numbers). With ``"load": DIR`` instead, the
trainer's resume path: the model from ``DIR/config.json`` (``TransformerConfig.from_dict``), its train module
(FSDP over the ranks), ``Checkpointer.load(DIR, train_module)``; rank 0 saves the unsharded model state, the
flattened optimizer state and the trainer state to ``root/loaded.pt``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

torch.set_num_threads(1)
dist.init_process_group("gloo")

from olmo_core.nn.transformer import TransformerBlockType, TransformerConfig  # noqa: E402
from olmo_core.optim import AdamWConfig  # noqa: E402
from olmo_core.train.checkpoint import Checkpointer  # noqa: E402
from olmo_core.train.train_module import TransformerTrainModuleConfig  # noqa: E402

VOCAB, SEQ = 384, 16  # room for conftest's 300-token tokenizer


def model_config(style: str) -> TransformerConfig:
    olmo2 = style == "olmo2"
    return TransformerConfig.llama_like(
        d_model=64, vocab_size=VOCAB, n_layers=2, n_heads=4, n_kv_heads=2, hidden_size_multiple_of=16,
        block_name=TransformerBlockType.reordered_norm if olmo2 else TransformerBlockType.default,
        qk_norm=olmo2, rope_theta=500_000 if olmo2 else 10_000, layer_norm_eps=1e-6 if olmo2 else 1e-5)


def train_module_config(world: int) -> TransformerTrainModuleConfig:
    dp = None
    if world > 1:
        from olmo_core.distributed.parallel import DataParallelType
        from olmo_core.train.train_module import TransformerDataParallelConfig

        dp = TransformerDataParallelConfig(name=DataParallelType.fsdp)
    return TransformerTrainModuleConfig(rank_microbatch_size=4 * SEQ, max_sequence_length=SEQ,
                                        optim=AdamWConfig(lr=1e-2), dp_config=dp)


def experiment_config(style: str, world: int) -> dict:
    """What ``ExperimentConfig.as_config_dict()`` holds of interest, as ConfigSaverCallback records it."""
    from olmo_core.data import TokenizerConfig

    tok = TokenizerConfig(vocab_size=VOCAB, eos_token_id=VOCAB - 1, pad_token_id=VOCAB - 2, bos_token_id=None)
    return {"run_name": f"tiny-{style}", "launch": None, "model": model_config(style).as_config_dict(),
            "train_module": train_module_config(world).as_config_dict(),
            "dataset": {"sequence_length": SEQ, "tokenizer": tok.as_config_dict()},
            "trainer": {"save_folder": "save", "max_duration": {"value": 3, "unit": "steps"}}, "init_seed": 0}


def hf_reference(model, style: str, state: dict) -> dict:
    from olmo_core.nn.hf.config import get_hf_config
    from olmo_core.nn.hf.convert import convert_state_to_hf
    from transformers import LlamaConfig

    if style == "olmo2":
        cfg = get_hf_config(model)
    else:
        cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                          num_key_value_heads=2)
    hf = convert_state_to_hf(cfg, {k: v.clone() for k, v in state.items()})
    return {"hf_state": {k: v.contiguous() for k, v in hf.items()}, "hf_config": cfg.to_dict()}


def load(spec: dict) -> None:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_optimizer_state_dict

    src = Path(spec["load"])
    cfg = TransformerConfig.from_dict(json.loads((src / "config.json").read_text())["model"])
    tm = train_module_config(dist.get_world_size()).build(cfg.build(init_device="cpu"), device=torch.device("cpu"))
    state = Checkpointer(work_dir=Path(spec["root"]) / "work_load").load(src, tm)
    opts = StateDictOptions(full_state_dict=True, cpu_offload=True, flatten_optimizer_state_dict=True)
    model = get_model_state_dict(tm.model, options=opts)
    optim = get_optimizer_state_dict(tm.model, tm.optim, options=opts)
    if dist.get_rank() == 0:
        torch.save({"model": model, "optim": optim, "trainer": state}, Path(spec["root"]) / "loaded.pt")
    dist.barrier()
    dist.destroy_process_group()


def main() -> None:
    spec = json.loads(Path(sys.argv[1]).read_text())
    if "load" in spec:
        return load(spec)
    root, style = Path(spec["root"]), spec["style"]
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    model = model_config(style).build(init_device="cpu")
    tm = train_module_config(world).build(model, device=torch.device("cpu"))
    checkpointer = Checkpointer(work_dir=root / "work", save_thread_count=1)
    probe = torch.arange(2 * SEQ).reshape(2, SEQ) % VOCAB
    g = torch.Generator().manual_seed(1234 + rank)
    for step in spec["steps"]:
        x = torch.randint(0, VOCAB, (4, SEQ), generator=g)
        logits = tm.model(x)
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), x[:, 1:].reshape(-1))
        loss.backward()
        tm.optim.step()
        tm.optim.zero_grad(set_to_none=True)
        step_dir = root / "save" / f"step{step}"
        checkpointer.save(step_dir, tm, {"global_step": step, "world_size": world, "epoch": 0})
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        full = get_model_state_dict(tm.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        with torch.no_grad():
            out = tm.model(probe)
        if rank == 0:
            (step_dir / "config.json").write_text(json.dumps(experiment_config(style, world)))
            ref = {"state": {k: v.clone() for k, v in full.items()}, "logits": out.detach().clone(),
                   "probe": probe}
            ref.update(hf_reference(model_config(style).build(init_device="cpu"), style, full))
            (root / "ref").mkdir(exist_ok=True)
            torch.save(ref, root / "ref" / f"step{step}.pt")
        dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
