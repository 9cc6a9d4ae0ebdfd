"""Megatron-core ``torch_dist`` checkpoints: ``<save>/iter_NNNNNNN/`` DCP folders and the tracker beside them.

What Megatron writes (read in Megatron-LM ``megatron/training/checkpointing.py``
and megatron-core 0.16 ``megatron/core/dist_checkpointing/``):

- ``save_checkpoint`` builds ``generate_state_dict``: ``args`` (the run's
  ``argparse.Namespace``), ``checkpoint_version``, ``iteration``, ``model``
  (``GPTModel.sharded_state_dict()``), ``optimizer``, ``opt_param_scheduler``,
  ``rng_state`` (a ``ShardedObject``), and calls ``dist_checkpointing.save``
  into ``<save>/iter_{iteration:07d}`` (``get_checkpoint_name``).
- ``dist_checkpointing.save`` writes ``common.pt`` first (``torch.save`` of every
  entry that is not sharded: ``args``, ``iteration``, ...), then the DCP files
  (``__R_N.distcp`` and ``.metadata``, through ``TorchDistSaveShardedStrategy``),
  and last ``metadata.json`` (``{"sharded_backend": "torch_dist", ...}``,
  ``metadata_finalize_fn``). Rank 0 then writes the tracker
  ``<save>/latest_checkpointed_iteration.txt`` (``iter_finalize_fn``).
- DCP keys are the ``ShardedTensor`` keys, with no ``model.`` prefix. Homogeneous
  decoder layers share one key with a leading layer axis
  (``TransformerBlock.sharded_state_dict``: ``decoder.layers.self_attention.
  linear_qkv.weight`` of shape ``[num_layers, ...]``); with
  ``non_homogeneous_layers`` (MoE/hybrid, ``singleton_local_shards``) each layer
  has its own ``decoder.layers.N.`` keys. Optimizer tensors are
  ``optimizer.state.<exp_avg|...>.<model key>`` or the distributed optimizer's
  ``optimizer.distributed.*``; ``rng_state/shard_*`` and ``*._extra_state/shard_*``
  are byte records (``ShardedObject``; TransformerEngine keeps its fp8 metadata
  in ``_extra_state``).

So: a folder is a checkpoint of this format when its ``metadata.json`` names the
``torch_dist`` backend, or (still being written) it is an ``iter_N`` folder with
Megatron's files in it. It is complete once ``.metadata`` and ``metadata.json``
both exist: Megatron writes ``metadata.json`` after every rank's data and DCP's
``.metadata``. The tracker is not required: it is written after that and names
only the newest save, so a folder past the tracker is one whose last step (rank
0 rewriting the tracker) had not run yet; its data is whole. A run's save
folder (``--save``) is a series: its ``iter_*`` children.

Model tensors are every saved tensor outside ``optimizer.*``, plus the
optimizer's fp32 master weights (``optimizer.state.fp32_param.<key>`` from
``Float16OptimizerWithFloat16Params``, ``optimizer.state.param.<key>`` from the
distributed optimizer's ``fully_reshardable`` format): they are the weights a
mixed-precision run resumes from (``load_checkpoint`` loads them and the next
step copies them into the bf16 model), so they are merged like the model
whatever ``merge.optimizer`` says; a resume never silently drops the merge. They
are not mapped to HF (the bf16 model tensors are). ``_extra_state`` byte records
belong to the model and are copied from the newest source, never averaged (as
Megatron's ``tools/checkpoint`` weighted merge does); the other optimizer tensors
(moments) and byte records (``rng_state``, ...) are ``others``. The distributed
optimizer's default ``dp_reshardable`` format saves its whole state, master
weights included, as byte records (``optimizer.distributed.dp_group_idx_N.
param_state``, a ``ShardedObject``): no optimizer tensor is listed, so whatever
``merge.optimizer`` says the merge is written model-only (copying the record
would make Megatron resume from the newest source's weights), and Megatron
resumes from it with ``--no-load-optim --no-load-rng``.

Map to ``LlamaForCausalLM`` (a GPT with RMSNorm, SwiGLU, RoPE, no biases), as
Megatron-Bridge's ``LlamaBridge.mapping_registry`` does it: renames; the norms
under their TE-fused names (``linear_qkv.layer_norm_weight``,
``linear_fc1.layer_norm_weight``; the local spec saves them under those too) or
the local ones (``input_layernorm``, ``pre_mlp_layernorm``); ``linear_qkv``
split per query group ``[q x heads_per_group, k, v]`` (``split_qkv_weights``);
``linear_fc1`` split into ``[gate; up]`` halves: in the checkpoint the halves
hold every TP rank's rows (``apply_swiglu_sharded_factory`` saves the gate
shards then the up shards), so the split is the same for any TP size; with
``singleton_local_shards`` they are ``linear_fc1.weight_w`` / ``weight_v``.
A stacked layer is a row run of the native tensor. Megatron pads the vocabulary
(``padded_vocab_size``): an HF config with a smaller ``vocab_size`` takes the
first rows. Megatron's RoPE is the non-interleaved ``rotate_half`` form, like
HF's, so no permutation is undone.

The HF config is derived from ``args`` in ``common.pt`` when they describe that
model (read with an unpickler that builds only plain containers, tensors,
dtypes and ``argparse.Namespace``; any other class becomes an inert stand-in:
nothing of the run's code is imported or run), else ``checkpoints.config_dir``
is needed.

The writer puts Megatron's whole structure inside the output folder:
``out/iter_NNNNNNN/`` (the newest source's iteration: DCP files, its
``common.pt`` and other small files copied, ``metadata.json`` last) and then
``out/latest_checkpointed_iteration.txt``, so ``--load out`` (with
``--no-load-optim --no-load-rng`` for a model-only merge, or ``--finetune``) and
``dist_checkpointing.load`` read it, and this format reads it back as a series.

Pure: nothing here knows about ranks, Lightning or Hydra.
"""

from __future__ import annotations

import argparse
import collections
import json
import logging
import math
import pickle
import re
from pathlib import Path
from typing import Callable, Iterable, Mapping

import torch

from ..errors import CheckpointError
from .base import LayoutMap, NativeCheckpoint, NativeTensor, Piece
from .dcp import METADATA, DCPCheckpoint, DCPFormat, is_dcp_dir, read_metadata

__all__ = ["FORMAT", "MegatronFormat", "build_llama", "hf_config_from_args", "read_common"]

log = logging.getLogger(__name__)

TRACKER = "latest_checkpointed_iteration.txt"
CONFIG = "metadata.json"
COMMON = "common.pt"
BACKEND = "torch_dist"
OTHER_PREFIXES = ("optimizer.",)
MASTER = re.compile(r"^optimizer\.state\.(fp32_param|param)\.")  # fp32 master weights: merged like the model
_ITER = re.compile(r"^iter_(\d+)$")
_DCP_FILES = (METADATA, CONFIG)


# -- metadata.json, common.pt -------------------------------------------------------------------------
def _backend(path: Path) -> str | None:
    try:
        cfg = json.loads((Path(path) / CONFIG).read_text())
    except (OSError, ValueError):
        return None
    return cfg.get("sharded_backend") if isinstance(cfg, dict) else None


class _Opaque:
    """An object of a class the unpickler does not build: keeps its arguments and state, runs nothing."""

    def __init__(self, *args, **kwargs) -> None:
        self.args = args

    def __setstate__(self, state) -> None:
        self.state = state


_ALLOWED = {("argparse", "Namespace"): argparse.Namespace, ("collections", "OrderedDict"): collections.OrderedDict,
            ("builtins", "set"): set, ("builtins", "frozenset"): frozenset, ("builtins", "slice"): slice,
            ("builtins", "complex"): complex, ("builtins", "bytearray"): bytearray}


class _Unpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if (module, name) in _ALLOWED:
            return _ALLOWED[(module, name)]
        if module == "torch._utils" and name.startswith("_rebuild_"):
            return getattr(torch._utils, name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        if module == "torch" and name in ("Size", "device"):
            return getattr(torch, name)
        if module in ("copyreg", "__builtin__"):
            return _Opaque
        return type(name, (_Opaque,), {"__module__": "opaque." + module})


class _SafePickle:
    """A ``pickle_module`` for ``torch.load`` whose unpickler imports none of the run's classes."""

    Unpickler = _Unpickler
    load = staticmethod(lambda f, **kw: _Unpickler(f, **kw).load())
    __name__ = "lightning_merge_safe_pickle"


def read_common(folder: Path) -> dict | None:
    """``common.pt`` of an ``iter_N`` folder (``args``, ``iteration``, ...), built without running any of
    the run's code; None when there is none or it cannot be read."""
    f = Path(folder) / COMMON
    if not f.is_file():
        return None
    try:
        obj = torch.load(f, map_location="cpu", weights_only=False, pickle_module=_SafePickle)
    except Exception as e:  # noqa: BLE001 - an unreadable common.pt only costs the derived config
        log.info("%s: not readable (%s: %s); the HF config must come from checkpoints.config_dir", f,
                 type(e).__name__, e)
        return None
    return obj if isinstance(obj, dict) else None


def hf_config_from_args(args: object) -> dict | None:
    """The HF ``LlamaConfig`` dict for Megatron-LM ``args`` of a GPT with RMSNorm, SwiGLU and RoPE (no
    biases, no qk-norm, no MoE); None when they describe another model (then config_dir is needed)."""
    from transformers import LlamaConfig

    a = vars(args) if isinstance(args, argparse.Namespace) else None
    if not a:
        return None
    need = ("num_layers", "hidden_size", "num_attention_heads")
    if not all(isinstance(a.get(k), int) for k in need):
        return None
    llama = (a.get("normalization") == "RMSNorm" and a.get("swiglu") and a.get("position_embedding_type") == "rope"
             and not a.get("add_bias_linear") and not a.get("add_qkv_bias") and not a.get("qk_layernorm")
             and not a.get("num_experts") and float(a.get("rotary_percent") or 1.0) == 1.0
             and not a.get("apply_layernorm_1p") and not a.get("rotary_interleaved")
             and not a.get("multi_latent_attention"))
    if not llama:
        log.info("Megatron args describe no Llama-style GPT (normalization=%r, swiglu=%r, position embedding %r)",
                 a.get("normalization"), a.get("swiglu"), a.get("position_embedding_type"))
        return None
    nh = a["num_attention_heads"]
    kv = a.get("num_query_groups") if a.get("group_query_attention") else nh
    vocab = a.get("padded_vocab_size") or a.get("vocab_size")
    if not isinstance(vocab, int) or not isinstance(kv, int):
        return None
    rope: dict = {"rope_type": "default", "rope_theta": float(a.get("rotary_base") or 10000)}
    if a.get("use_rope_scaling"):  # Megatron-core's llama3 scaling defaults (Megatron-Bridge LlamaBridge)
        rope.update(rope_type="llama3", factor=float(a.get("rope_scaling_factor") or 8.0), low_freq_factor=1.0,
                    high_freq_factor=4.0, original_max_position_embeddings=8192)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=a["hidden_size"], num_hidden_layers=a["num_layers"],
                      num_attention_heads=nh, num_key_value_heads=kv,
                      head_dim=a.get("kv_channels") or a["hidden_size"] // nh,
                      intermediate_size=a.get("ffn_hidden_size") or 4 * a["hidden_size"],
                      max_position_embeddings=a.get("max_position_embeddings") or a.get("seq_length") or 4096,
                      rms_norm_eps=float(a.get("norm_epsilon") or 1e-5), hidden_act="silu", rope_parameters=rope,
                      tie_word_embeddings=not a.get("untie_embeddings_and_output_weights", False),
                      attention_bias=False, mlp_bias=False, bos_token_id=None, eos_token_id=None,
                      pad_token_id=None).to_dict()  # the token ids are the tokenizer's: args do not hold them
    cfg["architectures"] = ["LlamaForCausalLM"]
    cfg["torch_dtype"] = "bfloat16" if a.get("bf16") else "float16" if a.get("fp16") else "float32"
    cfg.pop("transformers_version", None)
    return cfg


# -- the map to LlamaForCausalLM ----------------------------------------------------------------------
def _layer_rows(native: Mapping[str, NativeTensor], i: int, sub: str) -> tuple[str, int, tuple[int, ...], int] | None:
    """Where layer ``i``'s ``sub`` lies: (native name, first row, its own shape, row length), the native
    seen as ``[-1, row]``; per-layer keys first, else the stacked layer axis. None: neither is saved."""
    per = native.get(f"decoder.layers.{i}.{sub}")
    if per is not None:
        shape, off = per.shape, 0
    else:
        st = native.get(f"decoder.layers.{sub}")
        if st is None or len(st.shape) < 2 or i >= st.shape[0]:
            return None
        per, shape = st, st.shape[1:]
        off = i * (shape[0] if len(shape) > 1 else 1)
    row = math.prod(shape[1:]) if len(shape) > 1 else shape[0]
    return per.name, off, tuple(shape), row


def _num_layers(native: Mapping[str, NativeTensor]) -> int:
    st = native.get("decoder.layers.self_attention.linear_qkv.weight")
    if st is not None:
        return st.shape[0]
    idx = {int(m.group(1)) for n in native if (m := re.match(r"^decoder\.layers\.(\d+)\.", n))}
    return max(idx) + 1 if idx else 0


def _runs(off: int, spans: Iterable[tuple[int, int]]) -> tuple[tuple[int, int], ...]:
    out: list[list[int]] = []
    for a, b in spans:
        a, b = a + off, b + off
        if out and out[-1][1] == a:
            out[-1][1] = b
        else:
            out.append([a, b])
    return tuple((a, b) for a, b in out)


def build_llama(native: Mapping[str, NativeTensor], cfg: dict) -> dict[str, Piece]:
    """Megatron GPT (RMSNorm, SwiGLU, RoPE) -> ``LlamaForCausalLM`` names, following Megatron-Bridge's
    ``LlamaBridge`` (``QKVMapping`` / ``split_qkv_weights``, ``GatedMLPMapping``)."""
    hidden, nh = cfg["hidden_size"], cfg["num_attention_heads"]
    kv = cfg.get("num_key_value_heads") or nh
    hd = cfg.get("head_dim") or hidden // nh
    ffn = cfg["intermediate_size"]
    if nh % kv:
        raise CheckpointError(f"config: num_attention_heads={nh} is not a multiple of num_key_value_heads={kv}")
    qpg = nh // kv
    p: dict[str, Piece] = {}

    emb = native.get("embedding.word_embeddings.weight")
    if emb is not None:
        vocab = min(int(cfg.get("vocab_size") or emb.shape[0]), emb.shape[0])
        p["model.embed_tokens.weight"] = Piece(emb.name, (vocab, emb.shape[1]), runs=((0, vocab),))
    out = native.get("output_layer.weight")
    if out is not None:
        vocab = min(int(cfg.get("vocab_size") or out.shape[0]), out.shape[0])
        p["lm_head.weight"] = Piece(out.name, (vocab, out.shape[1]), runs=((0, vocab),))
    norm = native.get("decoder.final_layernorm.weight")
    if norm is not None:
        p["model.norm.weight"] = Piece(norm.name, norm.shape)

    def plain(hf: str, i: int, *subs: str) -> None:
        for sub in subs:
            loc = _layer_rows(native, i, sub)
            if loc is not None:
                name, off, shape, row = loc
                rows = shape[0] if len(shape) > 1 else 1
                p[hf] = Piece(name, shape, row=row, runs=((off, off + rows),))
                return

    for i in range(_num_layers(native)):
        m = f"model.layers.{i}."
        plain(f"{m}input_layernorm.weight", i, "self_attention.linear_qkv.layer_norm_weight", "input_layernorm.weight")
        plain(f"{m}post_attention_layernorm.weight", i, "mlp.linear_fc1.layer_norm_weight",
              "pre_mlp_layernorm.weight")
        plain(f"{m}self_attn.o_proj.weight", i, "self_attention.linear_proj.weight")
        plain(f"{m}mlp.down_proj.weight", i, "mlp.linear_fc2.weight")
        loc = _layer_rows(native, i, "self_attention.linear_qkv.weight")
        if loc is not None:
            name, off, shape, row = loc
            if shape[0] != (nh + 2 * kv) * hd:
                raise CheckpointError(f"{name}: {shape[0]} rows per layer, not (heads {nh} + 2 x groups {kv}) x "
                                      f"head_dim {hd}: is checkpoints.config_dir the config of this model?")
            size = (qpg + 2) * hd
            for proj, lo, hi, n in (("q_proj", 0, qpg * hd, nh), ("k_proj", qpg * hd, (qpg + 1) * hd, kv),
                                    ("v_proj", (qpg + 1) * hd, size, kv)):
                runs = _runs(off, ((g * size + lo, g * size + hi) for g in range(kv)))
                p[f"{m}self_attn.{proj}.weight"] = Piece(name, (n * hd, shape[1]), row=row, runs=runs)
        w, v = (_layer_rows(native, i, f"mlp.linear_fc1.weight_{s}") for s in "wv")
        if w is not None and v is not None:  # singleton_local_shards: gate and up under keys of their own
            plain(f"{m}mlp.gate_proj.weight", i, "mlp.linear_fc1.weight_w")
            plain(f"{m}mlp.up_proj.weight", i, "mlp.linear_fc1.weight_v")
            continue
        loc = _layer_rows(native, i, "mlp.linear_fc1.weight")
        if loc is not None:
            name, off, shape, row = loc
            if shape[0] != 2 * ffn:
                raise CheckpointError(f"{name}: {shape[0]} rows per layer, not 2 x intermediate_size {ffn}: not a "
                                      "SwiGLU MLP of this config (is checkpoints.config_dir the config of this model?)")
            p[f"{m}mlp.gate_proj.weight"] = Piece(name, (ffn, shape[1]), row=row, runs=((off, off + ffn),))
            p[f"{m}mlp.up_proj.weight"] = Piece(name, (ffn, shape[1]), row=row, runs=((off + ffn, off + 2 * ffn),))
    return p


def _is_llama(native: Mapping[str, NativeTensor]) -> bool:
    names = list(native)
    has = lambda s: any(n.endswith(s) for n in names)  # noqa: E731
    banned = (".bias", "layer_norm_bias", "q_layernorm.weight", "k_layernorm.weight", "position_embeddings.weight",
              ".router.weight")
    return ("embedding.word_embeddings.weight" in native and has("self_attention.linear_qkv.weight")
            and (has("mlp.linear_fc1.weight") or has("mlp.linear_fc1.weight_w"))
            and not any(n.endswith(banned) or ".experts." in n for n in names))


MAPS = (LayoutMap("megatron-gpt-llama", "LlamaForCausalLM", _is_llama, build_llama),)


# -- the format ---------------------------------------------------------------------------------------
def _iteration(folder: Path, common: dict | None) -> tuple[str, str]:
    """(the iter folder's name to write, the tracker's text) for a source folder."""
    m = _ITER.match(folder.name)
    if m:
        return folder.name, str(int(m.group(1)))
    if folder.name == "release":
        return "release", "release"
    it = (common or {}).get("iteration")
    it = it if isinstance(it, int) and it >= 0 else 0
    return f"iter_{it:07d}", str(it)


class MegatronCheckpoint(DCPCheckpoint):
    format = "megatron"
    common_iteration: int | None = None  # ``iteration`` in common.pt (names the written folder of a non-iter_N)


class MegatronFormat(DCPFormat):
    name = "megatron"
    needs_config_dir = (" (a Megatron checkpoint whose common.pt args describe a GPT with RMSNorm, SwiGLU and RoPE "
                        "gets its config from them)")

    def detect(self, path: Path) -> bool:
        path = Path(path)
        if not path.is_dir():
            return False
        if (path / CONFIG).is_file():
            return _backend(path) == BACKEND
        # Being written: an iter_N folder holding what Megatron writes first (common.pt, DCP files).
        return bool(_ITER.match(path.name)) and ((path / COMMON).is_file() or is_dcp_dir(path))

    def complete(self, path: Path) -> bool:
        """``.metadata`` and ``metadata.json`` (written last by ``dist_checkpointing.save``) and, where the
        save folder has Megatron-LM's tracker, the tracker at this iteration or later (rank 0 updates it
        once every rank's save has finished, async saves included)."""
        path = Path(path)
        if not ((path / METADATA).is_file() and (path / CONFIG).is_file() and _backend(path) == BACKEND):
            return False
        m, tracker = _ITER.match(path.name), path.parent / TRACKER
        if m is None or not tracker.is_file():
            return True
        try:
            latest = tracker.read_text().strip()
        except OSError:
            return False
        return not latest.isdigit() or int(latest) >= int(m.group(1))

    def series_children(self, folder: Path) -> list[Path] | None:
        folder = Path(folder)
        if not folder.is_dir() or self.detect(folder):
            return None
        kids = [c for c in folder.iterdir() if _ITER.match(c.name) and self.detect(c)]
        if not kids and self.detect(folder / "release"):
            kids = [folder / "release"]
        return kids or None

    def open(self, path: Path) -> NativeCheckpoint:
        path = Path(path)
        if not self.detect(path):
            raise CheckpointError(f"{path}: not a Megatron torch_dist checkpoint (no {CONFIG} naming the torch_dist "
                                  "backend); give an iter_N folder of a run saved with --ckpt-format torch_dist")
        if not (path / CONFIG).is_file():
            raise CheckpointError(f"{path}: a Megatron checkpoint without {CONFIG}, which Megatron writes last: it "
                                  "is still being written (or its save failed); wait for it, or name a finished one")
        md = read_metadata(path)
        from torch.distributed.checkpoint.metadata import TensorStorageMetadata

        model, others, model_bytes, other_bytes = {}, {}, [], []
        for key, item in md.state_dict_metadata.items():
            other = key.startswith(OTHER_PREFIXES) and not MASTER.match(key)
            if isinstance(item, TensorStorageMetadata):
                (others if other else model)[key] = key
            elif "._extra_state" in key and not other:
                model_bytes.append(key)
            else:
                other_bytes.append(key)
        if not model:
            raise CheckpointError(f"{path}: a Megatron checkpoint with no model tensors (only "
                                  f"{sorted(md.state_dict_metadata)[:5]}): was it saved with the model?")
        common = read_common(path)
        hf = hf_config_from_args(common.get("args")) if common else None
        ck = MegatronCheckpoint(path, md, model, others, hf_config=hf, model_bytes=model_bytes,
                                other_bytes=other_bytes)
        ck.common_iteration = (common or {}).get("iteration")
        ck.merged_only = frozenset(n for n in model if MASTER.match(n))
        return ck

    def maps(self):
        return MAPS

    def extra_files(self, template: DCPCheckpoint) -> list[tuple[Path, str]]:
        """Every plain file of the newest source's folder beside the DCP data (``common.pt``, ...) and its
        ``tokenizer/`` (``save_tokenizer_assets``), ``metadata.json`` last: Megatron's mark of a finished save."""
        files = [f for f in sorted(template.path.iterdir()) if f.is_file() and f.suffix != ".distcp"
                 and f.name not in _DCP_FILES and not f.name.startswith(".")]
        tok = template.path / "tokenizer"
        files += sorted(f for f in tok.iterdir() if f.is_file()) if tok.is_dir() else []
        return [(f, str(f.relative_to(template.path))) for f in files] + [(template.path / CONFIG, CONFIG)]

    def write(self, out: Path, template: NativeCheckpoint, produce: Callable[[str], torch.Tensor],
              names: Iterable[str]) -> None:
        if not isinstance(template, DCPCheckpoint) or not (template.path / CONFIG).is_file():
            raise CheckpointError(f"{template.path}: not a Megatron checkpoint opened by this format")
        out = Path(out)
        folder, tracker = _iteration(template.path, {"iteration": getattr(template, "common_iteration", None)})
        super().write(out / folder, template, produce, names)
        (out / TRACKER).write_text(tracker)
        log.info("wrote Megatron checkpoint %s (tracker: %s)", out / folder, tracker)


FORMAT = MegatronFormat()
