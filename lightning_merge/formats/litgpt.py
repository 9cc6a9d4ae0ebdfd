"""LitGPT checkpoints: ``lit_model.pth`` with ``model_config.yaml`` beside it.

What LitGPT 0.5.13 writes (read in ``litgpt/pretrain.py`` and ``litgpt/utils.py``):

- ``litgpt pretrain`` saves ``out_dir/step-XXXXXXXX/lit_model.pth`` (and
  ``out_dir/final/``) with ``fabric.save(path, state)``, ``state = {"model",
  "optimizer", "train_dataloader", "iter_num", "step_count"}``: Fabric turns the
  model and optimizer into their ``state_dict()``. Then ``save_hyperparameters``
  (``hyperparameters.yaml``), ``copy_config_files`` (``config.json``,
  ``tokenizer.json``, ...) and last ``save_config`` (``model_config.yaml``, a
  ``yaml.dump`` of ``asdict(Config)``): a folder is complete once that is there.
- ``convert_hf_checkpoint`` writes ``lit_model.pth`` as the bare state dict.

Names are those of ``litgpt.model.GPT``: ``transformer.wte``,
``transformer.h.N.{norm_1, attn.qkv, attn.proj, norm_2, mlp.*}``,
``transformer.ln_f``, ``lm_head``. ``attn.qkv`` is ``[Q; K; V]`` (all query
heads, then the key groups, then the value groups); older checkpoints name it
``attn.attn`` and interleave it per query group ``[q.., k, v]`` (``model.py``'s
``CausalSelfAttention._load_from_state_dict`` converts them with ``qkv_reassemble``).

The maps follow ``litgpt/scripts/convert_lit_checkpoint.py``:
``copy_weights_llama`` splits ``attn.qkv`` into q/k/v by rows;
``copy_weights_gpt_neox`` re-interleaves it per head ``[q, k, v]`` for
``query_key_value`` (``qkv_reassemble``). The HF config is derived from
``model_config.yaml`` (reading it needs no LitGPT install).

Pure: nothing here knows about ranks, Lightning or Hydra.
"""

from __future__ import annotations

import logging
import re
import shutil
import zipfile
from pathlib import Path
from typing import Callable, Iterable, Mapping

import torch
import yaml

from ..errors import CheckpointError
from .base import Format, LayoutMap, NativeCheckpoint, NativeTensor, Piece
from .torchfile import TorchFileCheckpoint, load_dict, write_like

__all__ = ["FORMAT", "LitGPTFormat", "hf_config_from_lit", "read_model_config"]

log = logging.getLogger(__name__)

FILE = "lit_model.pth"
CONFIG = "model_config.yaml"
_LAYER = re.compile(r"^transformer\.h\.(\d+)\.")


class _Loader(yaml.SafeLoader):
    """``yaml.dump`` writes tuples as ``!!python/tuple``: read them as lists, nothing else unsafe."""


_Loader.add_constructor("tag:yaml.org,2002:python/tuple", lambda ld, node: ld.construct_sequence(node))


def read_model_config(file: Path) -> dict:
    try:
        cfg = yaml.load(Path(file).read_text(encoding="utf-8"), Loader=_Loader)  # noqa: S506 - safe subclass
    except yaml.YAMLError as e:
        raise CheckpointError(f"{file}: not a readable LitGPT model_config.yaml ({e})") from None
    if not isinstance(cfg, dict) or "n_layer" not in cfg:
        raise CheckpointError(f"{file}: not a LitGPT model_config.yaml (no n_layer)")
    return cfg


def _refuse(file: Path, cfg: dict, what: str, arch: str) -> None:
    raise CheckpointError(f"{file}: LitGPT model {cfg.get('name')!r} has {what}, which {arch} cannot express: set "
                          "checkpoints.config_dir to an HF folder of this model and checkpoints.name_map to a map of "
                          "your own")


def hf_config_from_lit(cfg: dict, file: Path, extra: dict | None = None) -> dict:
    """The HF config.json for LitGPT config ``cfg`` (LlamaConfig for ``LLaMAMLP`` + RMSNorm,
    GPTNeoXConfig for ``GptNeoxMLP`` + LayerNorm)."""
    from transformers import GPTNeoXConfig, LlamaConfig

    c = dict(cfg)
    head = c.get("head_size") or c["n_embd"] // c["n_head"]
    groups = c.get("n_query_groups") or c["n_head"]
    common = dict(vocab_size=c["padded_vocab_size"], hidden_size=c["n_embd"], num_hidden_layers=c["n_layer"],
                  num_attention_heads=c["n_head"], intermediate_size=c["intermediate_size"],
                  max_position_embeddings=c["block_size"], tie_word_embeddings=False)
    common.update({k: v for k, v in (extra or {}).items() if k in ("bos_token_id", "eos_token_id", "pad_token_id")})
    for flag in ("norm_qk", "post_attention_norm", "post_mlp_norm", "scale_embeddings", "rope_interleave",
                 "lm_head_bias", "latent_attention"):
        if c.get(flag):
            _refuse(file, c, f"{flag}={c[flag]}", "the built-in maps")
    for opt in ("attention_logit_softcapping", "final_logit_softcapping", "sliding_window_size", "rope_indices",
                "attention_scores_scalar"):
        if c.get(opt) is not None:
            _refuse(file, c, f"{opt}={c[opt]}", "the built-in maps")
    if c.get("n_expert") or c.get("rope_condense_ratio", 1) != 1:
        _refuse(file, c, "experts or a condensed RoPE", "the built-in maps")
    mlp, norm = c.get("mlp_class_name"), c.get("norm_class_name")
    if mlp == "LLaMAMLP" and norm == "RMSNorm":
        arch = "LlamaForCausalLM"
        if c.get("parallel_residual") or c.get("rotary_percentage", 1.0) != 1.0:
            _refuse(file, c, "a parallel residual or partial rotary embedding", arch)
        if bool(c.get("bias")) != bool(c.get("bias") or c.get("attn_bias")):
            _refuse(file, c, "biases on q/k/v only (attn_bias without bias)", arch)
        rope = {"rope_type": "default", "rope_theta": float(c.get("rope_base", 10000))}
        adj = c.get("rope_adjustments")
        if adj:
            if not {"factor", "low_freq_factor", "high_freq_factor", "original_max_seq_len"} <= set(adj):
                _refuse(file, c, f"rope_adjustments={adj}", arch)
            rope.update(rope_type="llama3", factor=adj["factor"], low_freq_factor=adj["low_freq_factor"],
                        high_freq_factor=adj["high_freq_factor"],
                        original_max_position_embeddings=adj["original_max_seq_len"])
        out = LlamaConfig(**common, num_key_value_heads=groups, head_dim=head, hidden_act="silu",
                          rms_norm_eps=c.get("norm_eps", 1e-5), rope_parameters=rope,
                          attention_bias=bool(c.get("bias")), mlp_bias=bool(c.get("bias"))).to_dict()
    elif mlp == "GptNeoxMLP" and norm == "LayerNorm":
        arch = "GPTNeoXForCausalLM"
        if groups != c["n_head"] or head * c["n_head"] != c["n_embd"]:
            _refuse(file, c, "grouped queries or head_size*n_head != n_embd", arch)
        if not c.get("bias") or c.get("shared_attention_norm"):
            _refuse(file, c, "no biases or a shared attention norm", arch)
        if c.get("rope_adjustments"):
            _refuse(file, c, f"rope_adjustments={c['rope_adjustments']}", arch)
        act = "gelu" if c.get("gelu_approximate", "none") == "none" else "gelu_pytorch_tanh"
        out = GPTNeoXConfig(**common, hidden_act=act, layer_norm_eps=c.get("norm_eps", 1e-5),
                            use_parallel_residual=bool(c.get("parallel_residual")), attention_bias=True,
                            rope_parameters={"rope_type": "default", "rope_theta": float(c.get("rope_base", 10000)),
                                             "partial_rotary_factor": float(c.get("rotary_percentage", 1.0))}
                            ).to_dict()
    else:
        _refuse(file, c, f"mlp_class_name={mlp!r} with norm_class_name={norm!r}",
                "neither LlamaForCausalLM nor GPTNeoXForCausalLM")
    out["architectures"] = [arch]
    out.pop("transformers_version", None)
    return out


def _layers(native: Mapping[str, NativeTensor]) -> list[int]:
    return sorted({int(m.group(1)) for n in native if (m := _LAYER.match(n))})


def _heads(cfg: dict) -> tuple[int, int, int, int]:
    hidden, nh = cfg["hidden_size"], cfg["num_attention_heads"]
    kv = cfg.get("num_key_value_heads") or nh
    hd = cfg.get("head_dim") or hidden // nh
    return hidden, nh, kv, hd


def _qkv_runs(native: Mapping[str, NativeTensor], layer: int, nh: int, kv: int, hd: int, row: int):
    """(native name, {"q"|"k"|"v": runs per head group}) for layer ``layer``; runs are rows of length ``row``."""
    cur, old = f"transformer.h.{layer}.attn.qkv", f"transformer.h.{layer}.attn.attn"
    qpk = nh // kv
    if any(n.startswith(cur + ".") for n in native):
        q = [((g * qpk * hd), (g + 1) * qpk * hd) for g in range(kv)]
        k = [(nh * hd + g * hd, nh * hd + (g + 1) * hd) for g in range(kv)]
        v = [((nh + kv) * hd + g * hd, (nh + kv) * hd + (g + 1) * hd) for g in range(kv)]
        return cur, q, k, v
    size = (qpk + 2) * hd  # legacy: per group [q.., k, v]
    q = [(g * size, g * size + qpk * hd) for g in range(kv)]
    k = [(g * size + qpk * hd, g * size + (qpk + 1) * hd) for g in range(kv)]
    v = [(g * size + (qpk + 1) * hd, (g + 1) * size) for g in range(kv)]
    return old, q, k, v


def _merge_runs(runs: Iterable[tuple[int, int]]) -> tuple[tuple[int, int], ...]:
    out: list[list[int]] = []
    for a, b in runs:
        if out and out[-1][1] == a:
            out[-1][1] = b
        else:
            out.append([a, b])
    return tuple((a, b) for a, b in out)


def _add(pieces: dict, native: Mapping[str, NativeTensor], hf: str, name: str) -> None:
    t = native.get(name)
    if t is not None:
        pieces[hf] = Piece(name, t.shape)


def build_llama(native: Mapping[str, NativeTensor], cfg: dict) -> dict[str, Piece]:
    """``copy_weights_llama``: renames, and ``attn.qkv`` split by rows into q/k/v."""
    hidden, nh, kv, hd = _heads(cfg)
    p: dict[str, Piece] = {}
    _add(p, native, "model.embed_tokens.weight", "transformer.wte.weight")
    for i in _layers(native):
        h, m = f"transformer.h.{i}.", f"model.layers.{i}."
        for suf in ("weight", "bias"):
            _add(p, native, f"{m}input_layernorm.{suf}", f"{h}norm_1.{suf}")
            _add(p, native, f"{m}post_attention_layernorm.{suf}", f"{h}norm_2.{suf}")
            _add(p, native, f"{m}self_attn.o_proj.{suf}", f"{h}attn.proj.{suf}")
            _add(p, native, f"{m}mlp.gate_proj.{suf}", f"{h}mlp.fc_1.{suf}")
            _add(p, native, f"{m}mlp.up_proj.{suf}", f"{h}mlp.fc_2.{suf}")
            _add(p, native, f"{m}mlp.down_proj.{suf}", f"{h}mlp.proj.{suf}")
            base, q, k, v = _qkv_runs(native, i, nh, kv, hd, hidden)
            if f"{base}.{suf}" not in native:
                continue
            row = hidden if suf == "weight" else 1
            for proj, runs, n in (("q_proj", q, nh), ("k_proj", k, kv), ("v_proj", v, kv)):
                shape = (n * hd, hidden) if suf == "weight" else (n * hd,)
                p[f"{m}self_attn.{proj}.{suf}"] = Piece(f"{base}.{suf}", shape, row=row, runs=_merge_runs(runs))
    for suf in ("weight", "bias"):
        _add(p, native, f"model.norm.{suf}", f"transformer.ln_f.{suf}")
    _add(p, native, "lm_head.weight", "lm_head.weight")
    return p


def build_gpt_neox(native: Mapping[str, NativeTensor], cfg: dict) -> dict[str, Piece]:
    """``copy_weights_gpt_neox``: renames, and ``attn.qkv`` re-interleaved per head ``[q, k, v]``."""
    hidden, nh, kv, hd = _heads(cfg)
    p: dict[str, Piece] = {}
    _add(p, native, "gpt_neox.embed_in.weight", "transformer.wte.weight")
    for i in _layers(native):
        h, m = f"transformer.h.{i}.", f"gpt_neox.layers.{i}."
        for suf in ("weight", "bias"):
            _add(p, native, f"{m}input_layernorm.{suf}", f"{h}norm_1.{suf}")
            _add(p, native, f"{m}post_attention_layernorm.{suf}", f"{h}norm_2.{suf}")
            _add(p, native, f"{m}attention.dense.{suf}", f"{h}attn.proj.{suf}")
            _add(p, native, f"{m}mlp.dense_h_to_4h.{suf}", f"{h}mlp.fc.{suf}")
            _add(p, native, f"{m}mlp.dense_4h_to_h.{suf}", f"{h}mlp.proj.{suf}")
            base, q, k, v = _qkv_runs(native, i, nh, kv, hd, hidden)
            if f"{base}.{suf}" not in native:
                continue
            runs = _merge_runs(r for g in range(kv) for r in (q[g], k[g], v[g]))
            t = native[f"{base}.{suf}"]
            p[f"{m}attention.query_key_value.{suf}"] = Piece(f"{base}.{suf}", t.shape,
                                                            row=hidden if suf == "weight" else 1, runs=runs)
    for suf in ("weight", "bias"):
        _add(p, native, f"gpt_neox.final_layer_norm.{suf}", f"transformer.ln_f.{suf}")
    _add(p, native, "lm_head.weight", "lm_head.weight")  # convert_lit_checkpoint's embed_out: transformers 5 renames it
    return p


def _has(native: Mapping[str, NativeTensor], suffixes: tuple[str, ...]) -> bool:
    return any(n.endswith(suffixes) for n in native)


def _qkv(native: Mapping[str, NativeTensor]) -> bool:
    return _has(native, (".attn.qkv.weight", ".attn.attn.weight")) and "transformer.wte.weight" in native


MAPS = (
    LayoutMap("litgpt-llama", "LlamaForCausalLM", lambda n: _qkv(n) and _has(n, (".mlp.fc_1.weight",)), build_llama),
    LayoutMap("litgpt-gpt-neox", "GPTNeoXForCausalLM",
              lambda n: _qkv(n) and _has(n, (".mlp.fc.weight",)) and not _has(n, (".mlp.fc_1.weight",)),
              build_gpt_neox),
)


def _file(path: Path) -> Path:
    return path / FILE if path.is_dir() else path


def _extra_ids(folder: Path) -> dict:
    import json

    out: dict = {}
    for name in ("config.json", "generation_config.json"):
        f = folder / name
        if f.is_file():
            try:
                d = json.loads(f.read_text())
            except (OSError, ValueError):
                continue
            out.update({k: d[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id")
                        if isinstance(d.get(k), int) and k not in out})
    return out


class LitGPTFormat(Format):
    name = "litgpt"
    needs_config_dir = " (or put LitGPT's model_config.yaml beside lit_model.pth)"

    def detect(self, path: Path) -> bool:
        path = Path(path)
        return (path.is_dir() and (path / FILE).is_file()) or (path.is_file() and path.name == FILE)

    def complete(self, path: Path) -> bool:
        f = _file(Path(path))
        return f.is_file() and zipfile.is_zipfile(f) and (f.parent / CONFIG).is_file()

    def series_children(self, folder: Path) -> list[Path] | None:
        folder = Path(folder)
        if not folder.is_dir() or self.detect(folder):
            return None
        kids = [c for c in folder.iterdir() if c.name.startswith("step-") and self.detect(c)]
        if not kids and self.detect(folder / "final"):
            kids = [folder / "final"]  # pretrain's final/ repeats the last step's weights: only alone
        return kids or None

    def open(self, path: Path) -> NativeCheckpoint:
        path = Path(path)
        file = _file(path)
        obj = load_dict(file)
        if isinstance(obj.get("model"), dict):
            key = "model"
        elif obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
            key = None
        else:
            raise CheckpointError(f"{file}: neither LitGPT's pretrain dict (a 'model' state dict) nor a state dict "
                                  f"(top-level keys: {list(obj)[:10]})")
        hf = None
        if (file.parent / CONFIG).is_file():
            hf = hf_config_from_lit(read_model_config(file.parent / CONFIG), file.parent / CONFIG,
                                    _extra_ids(file.parent))
        ck = TorchFileCheckpoint(path, file, obj, key, hf_config=hf)
        ck.format = self.name
        return ck

    def maps(self):
        return MAPS

    def write(self, out: Path, template: NativeCheckpoint, produce: Callable[[str], torch.Tensor],
              names: Iterable[str]) -> None:
        if not isinstance(template, TorchFileCheckpoint):
            raise CheckpointError(f"{template.path}: not a LitGPT checkpoint opened by this format")
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        write_like(out / FILE, template, produce, names)
        for f in template.file.parent.iterdir():
            if f.is_file() and f.suffix not in (".pth", ".pt", ".bin", ".safetensors", ".tmp") \
                    and not f.name.startswith("."):
                shutil.copy2(f, out / f.name)


FORMAT = LitGPTFormat()
