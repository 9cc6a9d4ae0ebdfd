"""One rank of a tiny Megatron-core GPT on CPU (gloo) that saves or loads ``torch_dist`` checkpoints.

usage: python -m torch.distributed.run --nproc_per_node=W tests/megatron_worker.py SPEC.json

Megatron-core's own code builds the model (``GPTModel`` with
``get_gpt_layer_local_spec``: RMSNorm, SwiGLU, RoPE, GQA, no biases, untied
output layer; tensor parallel over all ``W`` ranks), makes its sharded state
dict (``GPTModel.sharded_state_dict``) and saves it with
``megatron.core.dist_checkpointing.save`` (the ``torch_dist`` strategy), in the
state dict Megatron-LM's ``megatron/training/checkpointing.py`` builds
(``generate_state_dict``: ``args``, ``checkpoint_version``, ``iteration``,
``model``, ``optimizer``, ``opt_param_scheduler``, ``rng_state``), into
``<save>/iter_NNNNNNN/`` and then the tracker ``latest_checkpointed_iteration.txt``
(``save_checkpoint``'s ``iter_finalize_fn``). The optimizer part is what
Megatron-core's ``FP32Optimizer.sharded_state_dict`` makes from a
``torch.optim.Adam`` (``get_param_id_to_sharded_param_map`` +
``optim_state_to_sharding_state``: ``optimizer.state.exp_avg.<key>``, ...):
``FP32Optimizer`` itself allocates on CUDA in ``__init__``.

Two CUDA calls in Megatron-core's save path have no CPU fallback
(``FileSystemWriterAsync.preload_tensors`` calls ``torch.cuda.synchronize()``,
``save_state_dict_async_finalize`` puts a flag tensor on
``torch.cuda.current_device()``): they are replaced by no-op / ``"cpu"`` here;
everything else (planning, the DCP files, ``metadata.json``, ``common.pt``) is
Megatron-core's own.

The local linear layers carry no TransformerEngine fp8 state, so their
``_extra_state`` is made iteration-specific here (what TE's ``get_extra_state``
returns is a serialized blob too); loading records what each layer was handed.

SPEC (json): ``mode`` ("save" | "load"), ``dir`` (the save / load folder),
``iters`` (save: iterations to save), ``out`` (a folder for each rank's
``rank{r}_iter{N}.pt`` local state dicts, or ``rank{r}_loaded.pt``),
``non_homogeneous`` (save per-layer keys instead of the stacked layer axis).
"""

from __future__ import annotations

import io
import json
import os
import sys
from argparse import Namespace
from pathlib import Path

import torch

CFG = dict(num_layers=2, hidden_size=64, num_attention_heads=4, num_query_groups=2, ffn_hidden_size=96,
           kv_channels=16, vocab=320, seq=32, eps=1e-5, rotary_base=10000)
_EXTRA: dict[str, object] = {"iter": 0, "seen": []}


def patch_cuda() -> None:
    torch.cuda.synchronize = lambda *a, **k: None
    torch.cuda.current_device = lambda: "cpu"


def build_model(tp: int, dtype: torch.dtype = torch.float32):
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.models.gpt.gpt_model import GPTModel
    from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear
    from megatron.core.transformer.transformer_config import TransformerConfig

    c = CFG
    cfg = TransformerConfig(num_layers=c["num_layers"], hidden_size=c["hidden_size"],
                            num_attention_heads=c["num_attention_heads"], num_query_groups=c["num_query_groups"],
                            ffn_hidden_size=c["ffn_hidden_size"], kv_channels=c["kv_channels"],
                            normalization="RMSNorm", layernorm_epsilon=c["eps"], gated_linear_unit=True,
                            activation_func=torch.nn.functional.silu, add_bias_linear=False,
                            tensor_model_parallel_size=tp, use_cpu_initialization=True,
                            params_dtype=dtype, bf16=dtype == torch.bfloat16)
    model = GPTModel(cfg, get_gpt_layer_local_spec(normalization="RMSNorm"), vocab_size=c["vocab"],
                     max_sequence_length=c["seq"], position_embedding_type="rope", rotary_base=c["rotary_base"],
                     share_embeddings_and_output_weights=False, parallel_output=False)
    for name, m in model.decoder.named_modules():  # (GPTModel refuses extra state on its output layer)
        if isinstance(m, (ColumnParallelLinear, RowParallelLinear)):
            def get_extra(name=name):  # an fp8-meta-like blob that differs per iteration and per layer
                return io.BytesIO(f"extra iter={_EXTRA['iter']} {name}".encode())

            def set_extra(state, name=name):
                _EXTRA["seen"].append((name, state.getvalue() if isinstance(state, io.BytesIO) else state))

            m.get_extra_state, m.set_extra_state = get_extra, set_extra
    return model


def megatron_args(tp: int, iteration: int, bf16: bool = False) -> Namespace:
    """The part of Megatron-LM's ``args`` a GPT run carries (``megatron/training/arguments.py`` names)."""
    from megatron.core.transformer.enums import AttnBackend

    c = CFG
    return Namespace(num_layers=c["num_layers"], hidden_size=c["hidden_size"], ffn_hidden_size=c["ffn_hidden_size"],
                     num_attention_heads=c["num_attention_heads"], group_query_attention=True,
                     num_query_groups=c["num_query_groups"], kv_channels=c["kv_channels"],
                     padded_vocab_size=c["vocab"], max_position_embeddings=c["seq"], seq_length=c["seq"],
                     normalization="RMSNorm", norm_epsilon=c["eps"], swiglu=True,
                     untie_embeddings_and_output_weights=True, position_embedding_type="rope",
                     rotary_base=c["rotary_base"], rotary_percent=1.0, add_bias_linear=False, add_qkv_bias=False,
                     qk_layernorm=False, params_dtype=torch.bfloat16 if bf16 else torch.float32, bf16=bf16,
                     fp16=False,
                     tensor_model_parallel_size=tp, pipeline_model_parallel_size=1, iteration=iteration,
                     ckpt_format="torch_dist", attention_backend=AttnBackend.auto, save="<save>")


def perturb(model, seed: int, tp_rank: int) -> None:
    """Different weights per iteration; TP-replicated tensors (the norms) equal on every rank."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            split = getattr(p, "tensor_model_parallel", False)
            g = torch.Generator().manual_seed(seed * 1000 + (tp_rank if split else 0) * 100 + len(name))
            p.add_(0.05 * torch.randn(p.shape, generator=g))


def save(spec: dict, rank: int, world: int) -> None:
    from megatron.core import dist_checkpointing, parallel_state
    from megatron.core.dist_checkpointing.mapping import ShardedObject
    from megatron.core.dist_checkpointing.optimizer import (get_param_id_to_sharded_param_map,
                                                             optim_state_to_sharding_state)

    model = build_model(world)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    save_dir, out = Path(spec["dir"]), Path(spec["out"])
    md = {"non_homogeneous_layers": True} if spec.get("non_homogeneous") else None
    for it in spec["iters"]:
        _EXTRA["iter"] = it
        perturb(model, it, tp_rank)
        for p in model.parameters():  # one Adam step, so exp_avg / exp_avg_sq hold real values
            g = torch.Generator().manual_seed(it * 7 + (tp_rank if getattr(p, "tensor_model_parallel", False) else 0))
            p.grad = torch.randn(p.shape, generator=g)
        opt.step()
        model_sd = model.sharded_state_dict(metadata=md)
        osd = opt.state_dict()
        id_map = get_param_id_to_sharded_param_map(model_sd, model.parameters())
        osd["state"] = {i: {k: v for k, v in st.items() if k != "step"} for i, st in osd["state"].items()}
        optim_state_to_sharding_state(osd, id_map, exclude_keys=("step",))
        rng = ShardedObject("rng_state", [{"torch_rng_state": torch.get_rng_state()}], (1, world), (0, tp_rank),
                            replica_id=0)
        state = {"args": megatron_args(world, it), "checkpoint_version": 3.0, "iteration": it, "model": model_sd,
                 "optimizer": osd, "opt_param_scheduler": {"num_steps": it, "max_lr": 1e-3}, "rng_state": rng}
        ckpt = save_dir / f"iter_{it:07d}"
        if rank == 0:
            ckpt.mkdir(parents=True, exist_ok=True)
        torch.distributed.barrier()
        dist_checkpointing.save(state, str(ckpt))
        if rank == 0:
            (save_dir / "latest_checkpointed_iteration.txt").write_text(str(it))
        local = {k: v.detach().clone() for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)}
        exp = {k: v for k, v in opt.state_dict()["state"].items()}
        names = [n for n, _ in model.named_parameters()]
        local.update({f"optimizer.{s}.{names[i]}": t for i, st in exp.items() for s, t in st.items() if s != "step"})
        torch.save(local, out / f"rank{rank}_iter{it}.pt")
        torch.distributed.barrier()
    if spec.get("per_layer_dir"):  # the last weights again, with per-layer keys (non_homogeneous_layers)
        ckpt = Path(spec["per_layer_dir"]) / f"iter_{spec['iters'][-1]:07d}"
        if rank == 0:
            ckpt.mkdir(parents=True, exist_ok=True)
        torch.distributed.barrier()
        dist_checkpointing.save({"model": model.sharded_state_dict(metadata={"non_homogeneous_layers": True})},
                                str(ckpt))
    logits = forward(model)
    if rank == 0:
        torch.save(logits, out / "logits.pt")
    if spec.get("bf16_dir"):
        save_mixed_precision(spec, rank, world)


def save_mixed_precision(spec: dict, rank: int, world: int) -> None:
    """A bf16 model with fp32 master weights, saved as ``Float16OptimizerWithFloat16Params.sharded_state_dict``
    does (``optimizer.state.fp32_param.<key>`` via ``make_sharded_optimizer_tensor``, then the Adam state of
    the masters); its ``__init__`` needs CUDA, its step is what is done here (step the fp32 masters, copy
    them into the bf16 model)."""
    from megatron.core import dist_checkpointing, parallel_state
    from megatron.core.dist_checkpointing.optimizer import (get_param_id_to_sharded_param_map,
                                                             make_sharded_optimizer_tensor,
                                                             optim_state_to_sharding_state)

    model = build_model(world, torch.bfloat16)
    params = list(model.parameters())
    masters = [p.detach().float().clone().requires_grad_(True) for p in params]
    opt = torch.optim.Adam(masters, lr=1e-2)
    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    save_dir, out = Path(spec["bf16_dir"]), Path(spec["out"])
    for it in spec["iters"][:2]:
        for p, m in zip(params, masters):
            split = getattr(p, "tensor_model_parallel", False)
            g = torch.Generator().manual_seed(it * 11 + (tp_rank if split else 0))
            m.grad = torch.randn(m.shape, generator=g)
        opt.step()
        with torch.no_grad():
            for p, m in zip(params, masters):
                p.copy_(m)
        model_sd = model.sharded_state_dict()
        id_map = get_param_id_to_sharded_param_map(model_sd, params)
        osd = opt.state_dict()
        fp32 = [[make_sharded_optimizer_tensor(id_map[i], m.detach(), prefix="optimizer.state.fp32_param")
                 for i, m in zip(osd["param_groups"][0]["params"], masters)]]
        osd["state"] = {i: {k: v for k, v in st.items() if k != "step"} for i, st in osd["state"].items()}
        optim_state_to_sharding_state(osd, id_map, exclude_keys=("step",))
        state = {"args": megatron_args(world, it, bf16=True), "checkpoint_version": 3.0, "iteration": it,
                 "model": model_sd, "optimizer": {"optimizer": osd, "fp32_from_fp16_params": fp32}}
        ckpt = save_dir / f"iter_{it:07d}"
        if rank == 0:
            ckpt.mkdir(parents=True, exist_ok=True)
        torch.distributed.barrier()
        dist_checkpointing.save(state, str(ckpt))
        if rank == 0:
            (save_dir / "latest_checkpointed_iteration.txt").write_text(str(it))
        names = [n for n, _ in model.named_parameters()]
        local = {n: p.detach().clone() for n, p in zip(names, params)}
        local.update({f"master.{n}": m.detach().clone() for n, m in zip(names, masters)})
        torch.save(local, out / f"bf16_rank{rank}_iter{it}.pt")
        torch.distributed.barrier()


def forward(model) -> dict:
    """Megatron's own forward of the last weights on a fixed batch (the vocabulary gathered over TP)."""
    import contextlib

    from megatron.core import tensor_parallel

    # eval mode draws no dropout, but DotProductAttention enters the CUDA RNG tracker regardless
    tensor_parallel.get_cuda_rng_tracker().fork = lambda *a, **k: contextlib.nullcontext()
    model.eval()
    ids = torch.randint(0, CFG["vocab"], (2, 12), generator=torch.Generator().manual_seed(0))
    pos = torch.arange(ids.shape[1]).unsqueeze(0).expand_as(ids)
    mask = torch.triu(torch.ones(ids.shape[1], ids.shape[1]), diagonal=1).bool()[None, None]  # True: masked
    with torch.no_grad():
        return {"input_ids": ids, "logits": model(ids, pos, mask)}


def load(spec: dict, rank: int, world: int) -> None:
    """Megatron-LM's ``load_checkpoint`` path: the tracker names the iteration, ``iter_NNNNNNN`` is loaded."""
    from megatron.core import dist_checkpointing

    model = build_model(world)
    load_dir = Path(spec["dir"])
    it = int((load_dir / "latest_checkpointed_iteration.txt").read_text().strip())
    ckpt = load_dir / f"iter_{it:07d}"
    assert dist_checkpointing.check_is_distributed_checkpoint(str(ckpt)), ckpt
    loaded = dist_checkpointing.load({"model": model.sharded_state_dict()}, str(ckpt))
    common = dist_checkpointing.load_common_state_dict(str(ckpt))
    model.load_state_dict(loaded["model"])
    local = {k: v.detach().clone() for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)}
    torch.save({"tensors": local, "iteration": it, "common_iteration": common.get("iteration"),
                "extra": list(_EXTRA["seen"])}, Path(spec["out"]) / f"rank{rank}_loaded.pt")


def main() -> None:
    import warnings

    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    patch_cuda()
    import torch.distributed as dist

    dist.init_process_group("gloo")
    from megatron.core import parallel_state

    rank, world = dist.get_rank(), dist.get_world_size()
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=world)
    spec = json.loads(Path(sys.argv[1]).read_text())
    torch.manual_seed(1234)  # the same initial weights in every run (the CPU init draws the full masters)
    (save if spec["mode"] == "save" else load)(spec, rank, world)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
