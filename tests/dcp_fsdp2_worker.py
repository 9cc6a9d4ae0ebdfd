"""Worker for ``tests/test_formats_dcp.py``: tiny torchtitan Llama3 runs, sharded with FSDP2 on CPU gloo ranks,
saved as DCP in torchtitan's ``<dump>/checkpoint/step-N/`` layout.

Run as ``python -m torch.distributed.run --nproc_per_node=2 tests/dcp_fsdp2_worker.py ROOT VOCAB``. It writes

- ``ROOT/new/checkpoint/step-{1,2,3}``: torchtitan 0.3.0's own ``Llama3Model`` (its 0.3.0 names,
  ``attention.qkv_linear.wq`` / ``lm_head``; SDPA as the inner attention, since FlexAttention has no
  backward on CPU; ``fuse_qkv=True``, its default: ``wqkv`` is saved split into ``wq``/``wk``/``wv`` by its
  own state dict hook), its ``OptimizersContainer`` (AdamW), ``LRSchedulersContainer`` and its own
  ``CheckpointManager`` saving every step (model keys at the top level). Without torchtitan
  installed: a hand-written module with the same names, saved the way ``CheckpointManager`` saves
  (``_flattened_model_states_sd``: the model at the top level beside ``optimizer``, ``lr_scheduler``
  and ``train_state``).
- ``ROOT/old/checkpoint/step-{1,2,3}``: torchtitan 0.2.x's names (``attention.wq``, ``output``),
  hand-written (0.2.x does not install beside 0.3.0), saved as torchtitan did before it flattened the
  model into the top level: ``dcp.save({"model": ..., "optimizer": ..., "train_state": ...})``, model
  keys prefixed ``model.``, the optimizer by ``get_optimizer_state_dict(flatten_optimizer_state_dict=True)``.
- ``ROOT/<gen>/ref/step-N.pt``: the full (unsharded) model state dict of each step, gathered with
  ``DTensor.full_tensor()``: what the tests compare our reader with.
- ``ROOT/info.json``: which model class made ``new`` (torchtitan's or the stand-in) and the settings.

Every parameter is an FSDP2 ``DTensor`` sharded on dim 0 over the 2 ranks, so each weight is saved
as 2 chunks, one per rank's ``__R_0.distcp`` (but for torchtitan's split ``wqkv``, which its hook gathers
to a replicated tensor first: one chunk).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

DIM, HEADS, KV_HEADS, LAYERS, HIDDEN, THETA, EPS, STEPS = 32, 4, 2, 2, 64, 10000.0, 1e-5, 3


# ---------------------------------------------------------------- a torchtitan-style Llama, either name generation

def _rope(x: torch.Tensor, freqs_cis: torch.Tensor) -> torch.Tensor:
    """torchtitan's complex RoPE: adjacent feature pairs of each head rotated (``apply_rotary_emb``)."""
    xc = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))
    return torch.view_as_real(xc * freqs_cis[None, :, None, :]).flatten(3).type_as(x)


class Attention(nn.Module):
    def __init__(self, fused_names: bool) -> None:
        super().__init__()
        hd = DIM // HEADS
        lin = {"wq": nn.Linear(DIM, HEADS * hd, bias=False), "wk": nn.Linear(DIM, KV_HEADS * hd, bias=False),
               "wv": nn.Linear(DIM, KV_HEADS * hd, bias=False)}
        if fused_names:  # 0.3.0: GQAttention.qkv_linear = QKVLinear(wq, wk, wv)
            self.qkv_linear = nn.Module()
            for k, v in lin.items():
                setattr(self.qkv_linear, k, v)
        else:
            for k, v in lin.items():
                setattr(self, k, v)
        self.wo = nn.Linear(HEADS * hd, DIM, bias=False)

    def forward(self, x: torch.Tensor, freqs_cis: torch.Tensor) -> torch.Tensor:
        b, s, _ = x.shape
        src = getattr(self, "qkv_linear", self)
        q = src.wq(x).view(b, s, HEADS, -1)
        k = src.wk(x).view(b, s, KV_HEADS, -1)
        v = src.wv(x).view(b, s, KV_HEADS, -1)
        q, k = _rope(q, freqs_cis), _rope(k, freqs_cis)
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                             is_causal=True, enable_gqa=True)
        return self.wo(out.transpose(1, 2).reshape(b, s, -1))


class FeedForward(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w1, self.w2, self.w3 = (nn.Linear(DIM, HIDDEN, bias=False), nn.Linear(HIDDEN, DIM, bias=False),
                                     nn.Linear(DIM, HIDDEN, bias=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class Block(nn.Module):
    def __init__(self, fused_names: bool) -> None:
        super().__init__()
        self.attention = Attention(fused_names)
        self.feed_forward = FeedForward()
        self.attention_norm = nn.RMSNorm(DIM, eps=EPS)
        self.ffn_norm = nn.RMSNorm(DIM, eps=EPS)

    def forward(self, x: torch.Tensor, freqs_cis: torch.Tensor) -> torch.Tensor:
        h = x + self.attention(self.attention_norm(x), freqs_cis)
        return h + self.feed_forward(self.ffn_norm(h))


class TitanLlama(nn.Module):
    """torchtitan's Llama3 ``Transformer`` in miniature: 0.2.x names (``generation="0.2"``: ``attention.wq``,
    ``output``) or 0.3.0 names (``"0.3"``: ``attention.qkv_linear.wq``, ``lm_head``)."""

    def __init__(self, vocab: int, generation: str) -> None:
        super().__init__()
        new = generation == "0.3"
        self.tok_embeddings = nn.Embedding(vocab, DIM)
        self.layers = nn.ModuleDict({str(i): Block(new) for i in range(LAYERS)})
        self.norm = nn.RMSNorm(DIM, eps=EPS)
        setattr(self, "lm_head" if new else "output", nn.Linear(DIM, vocab, bias=False))
        self.head_name = "lm_head" if new else "output"
        hd = DIM // HEADS
        freqs = 1.0 / (THETA ** (torch.arange(0, hd, 2)[: hd // 2].float() / hd))
        t = torch.outer(torch.arange(128).float(), freqs)
        self.register_buffer("freqs_cis", torch.polar(torch.ones_like(t), t), persistent=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = self.tok_embeddings(tokens)
        fc = self.freqs_cis[: tokens.shape[1]]
        for layer in self.layers.values():
            h = layer(h, fc)
        return getattr(self, self.head_name)(self.norm(h))


def torchtitan_llama3(vocab: int):
    """torchtitan 0.3.0's own ``Llama3Model`` at this tiny size (None when torchtitan does not import)."""
    try:
        from torchtitan.models.common.attention import ScaledDotProductAttention
        from torchtitan.models.llama3 import (_EMBEDDING_INIT, _NORM_INIT, ComplexRoPE, Embedding, Linear,
                                              Llama3Model, RMSNorm, _build_llama3_layers, _output_linear_init)
    except ImportError:
        return None
    layers = _build_llama3_layers(fuse_qkv=True, n_layers=LAYERS, dim=DIM, n_heads=HEADS, n_kv_heads=KV_HEADS,
                                  hidden_dim=HIDDEN, attn_backend="flex",
                                  rope=ComplexRoPE.Config(dim=DIM // HEADS, max_seq_len=128, theta=THETA))
    for cfg in layers:  # FlexAttention has no backward on CPU; torchtitan's SDPA module does
        cfg.attention.inner_attention = ScaledDotProductAttention.Config()
    cfg = Llama3Model.Config(
        dim=DIM, vocab_size=vocab, layers=layers,
        tok_embeddings=Embedding.Config(num_embeddings=vocab, embedding_dim=DIM, param_init=_EMBEDDING_INIT),
        norm=RMSNorm.Config(normalized_shape=DIM, param_init=_NORM_INIT),
        lm_head=Linear.Config(in_features=DIM, out_features=vocab, param_init=_output_linear_init(DIM)))
    model = cfg.build()
    model.init_states()
    return model, cfg


# ---------------------------------------------------------------- training and saving

class TrainState:
    """torchtitan's ``Trainer`` as the ``train_state`` Stateful: ``{"step", "ntokens_seen"}``."""

    def __init__(self) -> None:
        self.step, self.ntokens_seen = 0, 0

    def state_dict(self) -> dict:
        return {"step": self.step, "ntokens_seen": self.ntokens_seen}

    def load_state_dict(self, sd: dict) -> None:
        self.step, self.ntokens_seen = sd["step"], sd["ntokens_seen"]


def _shard(model: nn.Module, mesh) -> nn.Module:
    from torch.distributed.fsdp import fully_shard

    for layer in model.layers.values():
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def _train_step(model: nn.Module, opt, vocab: int, step: int, rank: int) -> int:
    g = torch.Generator().manual_seed(1000 * step + rank)
    x = torch.randint(0, vocab, (2, 17), generator=g)
    logits = model(x[:, :-1])
    loss = F.cross_entropy(logits.flatten(0, 1).float(), x[:, 1:].flatten())
    loss.backward()
    opt.step()
    opt.zero_grad()
    return x.numel()


def _save_reference(model: nn.Module, file: Path, rank: int) -> None:
    """The whole model state dict, each DTensor gathered (``full_tensor``, a collective on every rank)."""
    from torch.distributed.tensor import DTensor

    full = {k: (v.full_tensor() if isinstance(v, DTensor) else v).detach().cpu().clone()
            for k, v in model.state_dict().items()}
    if rank == 0:
        file.parent.mkdir(parents=True, exist_ok=True)
        torch.save(full, file)


def run_new(root: Path, vocab: int, mesh, rank: int) -> str:
    """0.3.0 names, model keys at the top level; torchtitan's own CheckpointManager when it imports."""
    import torch.distributed.checkpoint as dcp

    torch.manual_seed(0)
    built = torchtitan_llama3(vocab)
    dump = root / "new"
    if built is not None:
        from torchtitan.components.checkpoint import CheckpointManager
        from torchtitan.components.optimizer import LRSchedulersContainer, default_adamw

        model = _shard(built[0], mesh)
        ocfg = default_adamw(lr=1e-2)
        ocfg.implementation = "for-loop"
        optimizers = ocfg.build(model_parts=[model])
        scheds = LRSchedulersContainer.Config(warmup_steps=1).build(optimizers=optimizers, training_steps=STEPS)
        state = TrainState()
        ckpt = CheckpointManager.Config(enable=True, folder="checkpoint", interval=1, keep_latest_k=0,
                                        last_save_model_only=False).build(
            dataloader=None, model_parts=[model], optimizers=optimizers, lr_schedulers=scheds,
            states={"train_state": state}, sd_adapter=None, base_folder=str(dump))
        for step in range(1, STEPS + 1):
            state.step = step
            state.ntokens_seen += _train_step(model, optimizers, vocab, step, rank)
            scheds.step()
            ckpt.save(step, last_step=step == STEPS)
            _save_reference(model, dump / "ref" / f"step-{step}.pt", rank)
        ckpt.close()
        return "torchtitan.models.llama3.Llama3Model + torchtitan CheckpointManager"
    model = _shard(TitanLlama(vocab, "0.3"), mesh)
    opt = torch.optim.AdamW(list(model.named_parameters()), lr=1e-2)
    state = TrainState()
    for step in range(1, STEPS + 1):
        state.step = step
        state.ntokens_seen += _train_step(model, opt, vocab, step, rank)
        flat = {}
        sd = opt.state_dict()
        for g in sd["param_groups"]:  # torchtitan's get_flat_optim_state_dict
            for pid, fqn in zip(g["params"], g["param_names"]):
                for k, v in sd["state"].get(pid, {}).items():
                    flat[f"state.{fqn}.{k}"] = v
                for k, v in g.items():
                    if k not in ("params", "param_names"):
                        flat[f"param_groups.{fqn}.{k}"] = v
        states = {**model.state_dict(), "optimizer": flat, "lr_scheduler": {"last_epoch": step},
                  "train_state": state.state_dict()}
        dcp.save(states, checkpoint_id=str(dump / "checkpoint" / f"step-{step}"))
        _save_reference(model, dump / "ref" / f"step-{step}.pt", rank)
    return "hand-written stand-in with torchtitan 0.3.0 names (torchtitan not installed)"


def run_old(root: Path, vocab: int, mesh, rank: int) -> None:
    """0.2.x names, saved as ``{"model": ..., "optimizer": ...}``: model keys prefixed ``model.``."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                         get_optimizer_state_dict)

    torch.manual_seed(1)
    model = TitanLlama(vocab, "0.2")
    for m in model.modules():
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.trunc_normal_(m.weight, std=0.02)
    model = _shard(model, mesh)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    dump = root / "old"
    for step in range(1, STEPS + 1):
        _train_step(model, opt, vocab, step, rank)
        states = {"model": get_model_state_dict(model),
                  "optimizer": get_optimizer_state_dict(model, opt,
                                                        options=StateDictOptions(flatten_optimizer_state_dict=True)),
                  "train_state": {"step": step}}
        dcp.save(states, checkpoint_id=str(dump / "checkpoint" / f"step-{step}"))
        _save_reference(model, dump / "ref" / f"step-{step}.pt", rank)


def main() -> None:
    root, vocab = Path(sys.argv[1]), int(sys.argv[2])
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (world,))
    made = run_new(root, vocab, mesh, rank)
    run_old(root, vocab, mesh, rank)
    dist.barrier()
    if rank == 0:
        (root / "info.json").write_text(json.dumps({
            "new": made, "world": world, "vocab": vocab, "dim": DIM, "heads": HEADS, "kv_heads": KV_HEADS,
            "layers": LAYERS, "hidden": HIDDEN, "theta": THETA, "eps": EPS, "steps": STEPS,
            "head_dim": DIM // HEADS}))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
