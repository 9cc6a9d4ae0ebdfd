"""OLMo-core trainer checkpoints: ``<save_folder>/stepN/model_and_optim/`` (DCP) with ``config.json`` beside it.

What OLMo-core 3.0.0 writes (read in ``olmo_core/train/checkpoint.py``,
``olmo_core/distributed/checkpoint/{__init__,filesystem}.py`` and
``olmo_core/train/callbacks/config_saver.py``):

- ``Checkpointer.save(dir, train_module, train_state)`` builds the step folder
  in ``stepN-tmp`` and renames it to ``stepN`` (``CHECKPOINT_DIR = "step{step}"``):
  ``train/rank{R}.pt`` (each rank's trainer state, ``torch.save``),
  ``model_and_optim/`` (``save_state_dict`` of ``train_module.state_dict_to_save()``
  = ``{"model": ..., "optim": ...}``, flattened by DCP into ``model.<fqn>`` tensors
  and ``optim.state.<fqn>.{step,exp_avg,exp_avg_sq}`` tensors plus
  ``optim.param_groups.<fqn>.<field>`` byte entries, the trainer saving with
  ``flatten_optimizer_state_dict=True``), and last ``.metadata.json``
  (``CheckpointMetadata``). ``ConfigSaverCallback.post_checkpoint_saved`` then writes
  the experiment's ``config.json`` (``ExperimentConfig.as_config_dict()``: the
  ``TransformerConfig`` under ``"model"``) into the same folder.
- Completion is ``Checkpointer.dir_is_checkpoint``: ``<dir>/.metadata`` (a bare
  model/optim DCP folder), or ``train/rank0.pt`` + ``model_and_optim/.metadata`` +
  ``.metadata.json``. ``find_checkpoints`` takes the children named ``^step(\\d+)$``.
- Its ``RemoteFileSystemWriter`` pickles OLMo-core's own ``_StorageInfo`` into
  ``.metadata``, so that file unpickles only with OLMo-core installed: this module
  reads through OLMo-core's ``RemoteFileSystemReader`` (the ``reader_factory`` of
  :class:`~lightning_merge.formats.dcp.DCPCheckpoint`; its ``read_data`` needs
  only ``resolve_tensor``/``commit_tensor``/``load_bytes`` of the planner) and,
  without OLMo-core, refuses with what to install (:data:`OlmoCoreFormat.requires`).

Names: ``Transformer``'s own (``embeddings.weight``, ``blocks.N.attention.w_{q,k,v,out}``,
``blocks.N.attention.{q,k}_norm``, ``blocks.N.{attention,feed_forward}_norm``,
``blocks.N.feed_forward.w{1,2,3}``, ``lm_head.norm``, ``lm_head.w_out``), the
``model.`` prefix stripped. The maps are OLMo-core's own ``convert_state_to_hf``
(``olmo_core/nn/hf/convert.py``: ``OLMO_CORE_TO_HF_WEIGHT_MAPPINGS`` and the
``"llama"`` overrides), which for dense models are renames only (OLMo-core's
default RoPE rotates halves, as HF does: no permutation):
``reordered_norm`` blocks with QK-norm (OLMo 2, the block ``get_hf_config``
converts) -> ``Olmo2ForCausalLM`` (``attention_norm`` is the *post*-attention
norm); ``default`` pre-norm blocks without QK-norm -> ``LlamaForCausalLM``.
The HF config is derived from ``config.json`` as ``get_hf_config`` does
(``olmo_core/nn/hf/config.py``), from the config alone (no model is built).

Writing: ``out`` becomes a whole step folder, so the merged output is itself
an OLMo-core checkpoint (``Checkpointer.load(out, ...)``,
``load_model_and_optim_state(out/"model_and_optim", model)``) and is detected
and opened by this format again: ``out/model_and_optim/`` (DCP, keys ``model.*``
and, when asked, ``optim.*`` with the ``optim.param_groups`` byte entries of the
newest), then every other file of the newest's step folder (``train/rank*.pt``,
``config.json``, ``data_paths.txt``, ...) and ``.metadata.json`` last. The DCP
part is written by torch's ``FileSystemWriter``, whose ``.metadata`` pickles
torch's classes only: OLMo-core's reader loads it, and so does ours without
OLMo-core. Reads cost whole saved chunks (see ``dcp.py``): per-rank reads fall
with the world size when the run saved with FSDP.

Pure: nothing here knows about ranks, Lightning or Hydra.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
from pathlib import Path
from typing import Callable, Iterable, Mapping, NoReturn

import torch

from ..errors import CheckpointError
from .base import LayoutMap, NativeCheckpoint, NativeTensor, Piece
from .dcp import METADATA, DCPCheckpoint, DCPFormat, is_dcp_dir, read_metadata

__all__ = ["FORMAT", "OlmoCoreFormat", "OlmoCoreCheckpoint", "hf_config_from_olmo", "MAPS"]

log = logging.getLogger(__name__)

MODEL_AND_OPTIM = "model_and_optim"
METADATA_JSON = ".metadata.json"  # Checkpointer.METADATA_FNAME, written last
CONFIG = "config.json"  # ConfigSaverCallback.fname
TRAIN_STATE = "train/rank0.pt"
STEP = re.compile(r"^step(\d+)$")  # Checkpointer.CHECKPOINT_DIR = "step{step}"
_LAYER = re.compile(r"^blocks\.(\d+)\.")
# cached-path (an OLMo-core dependency) pins huggingface-hub<2, which transformers 5 outgrew: --no-deps.
REQUIRES = ("pip install --no-deps ai2-olmo-core cached-path dataclass-extensions bettermap && "
            "pip install boto3 google-cloud-storage requests")


def _dirs(path: Path) -> tuple[Path, Path]:
    """(the step folder, its DCP folder) for a step folder or its ``model_and_optim`` folder."""
    path = Path(path)
    if path.name == MODEL_AND_OPTIM and not (path / MODEL_AND_OPTIM).is_dir():
        return path.parent, path
    return path, path / MODEL_AND_OPTIM


def _olmo_reader() -> Callable[[str], object] | None:
    """OLMo-core's ``RemoteFileSystemReader`` (one thread), or None when OLMo-core is not installed."""
    try:
        from olmo_core.distributed.checkpoint.filesystem import RemoteFileSystemReader
    except ModuleNotFoundError as e:
        if (e.name or "").split(".")[0] != "olmo_core":
            log.warning("OLMo-core is installed but does not import (missing %s): reading with torch's reader", e.name)
        return None
    return lambda p: RemoteFileSystemReader(p, thread_count=1)


# -- the HF config, from OLMo-core's config.json ------------------------------------------------------------
def _refuse(file: Path, what: str) -> NoReturn:
    raise CheckpointError(f"{file}: the OLMo-core model has {what}, which the built-in maps (OLMo 2 -> "
                          "Olmo2ForCausalLM, Llama-like -> LlamaForCausalLM) cannot express: set "
                          "checkpoints.config_dir to an HF folder of this model and checkpoints.name_map to a map "
                          "of your own")


def _find(d: object, key: str) -> dict | None:
    """The first dict under ``key`` anywhere in ``d`` (depth first)."""
    if isinstance(d, dict):
        if isinstance(d.get(key), dict):
            return d[key]
        for v in d.values():
            got = _find(v, key)
            if got is not None:
                return got
    elif isinstance(d, list):
        for v in d:
            got = _find(v, key)
            if got is not None:
                return got
    return None


def model_section(cfg: dict) -> dict | None:
    """The ``TransformerConfig`` dict of an experiment config (``"model"``) or of a bare model config."""
    for c in (cfg.get("model"), cfg):
        if isinstance(c, dict) and {"d_model", "n_layers", "vocab_size", "block"} <= set(c):
            return c
    return None


def hf_config_from_olmo(cfg: dict, file: Path) -> dict:
    """The HF config.json for OLMo-core experiment (or model) config ``cfg``, as ``get_hf_config``
    derives it from the built model."""
    from transformers import LlamaConfig, Olmo2Config

    m = model_section(cfg)
    if m is None:
        raise CheckpointError(f"{file}: no OLMo-core TransformerConfig in it (a 'model' section with d_model, "
                              "n_layers, vocab_size, block)")
    if m.get("name", "default") != "default":
        _refuse(file, f"a {m['name']!r} transformer")
    block = m["block"]
    if not isinstance(block, dict) or not ({"name", "sequence_mixer", "attention"} & set(block)):
        _refuse(file, "named block configs (block_pattern)")
    for opt in ("block_overrides", "block_pattern", "embedding_norm", "embed_scale"):
        if m.get(opt):
            _refuse(file, f"{opt}={m[opt]}")
    kind = block.get("name", "default")
    att = block.get("sequence_mixer") or block.get("attention") or {}
    if att.get("name", "default") != "default" or att.get("type", "attention") != "attention":
        _refuse(file, f"a {att.get('name')!r} {att.get('type', 'attention')} sequence mixer")
    for opt in ("sliding_window", "gate", "scalable_softmax", "attention_sinks", "use_head_qk_norm"):
        if att.get(opt):
            _refuse(file, f"attention {opt}={att[opt]}")
    rope = att.get("rope")
    if not rope or rope.get("name", "default") != "default" or rope.get("scaling") \
            or float(rope.get("partial_rotary_factor", 1.0)) != 1.0:
        _refuse(file, f"RoPE {rope}")
    ln, head, ff = block.get("layer_norm") or {}, m.get("lm_head") or {}, block.get("feed_forward") or {}
    for where, norm in (("block", ln), ("lm_head", head.get("layer_norm") or {}), ("qk", att.get("qk_norm"))):
        if norm is not None and (norm.get("name", "rms") not in ("rms", "fused_rms") or norm.get("bias")):
            _refuse(file, f"a {norm.get('name')!r} {where} norm{' with bias' if norm.get('bias') else ''}")
    if not ln or not head.get("layer_norm") or head.get("bias") or head.get("name", "default") != "default":
        _refuse(file, "no block or final norm, or an lm_head bias")
    if not ff or block.get("feed_forward_moe") or ff.get("name", "default") != "default" \
            or ff.get("activation", "silu") != "silu":
        _refuse(file, f"feed forward {ff or block.get('feed_forward_moe')}")
    n_heads = att["n_heads"]
    head_dim = att.get("head_dim") or m["d_model"] // n_heads
    tok = _find(cfg, "tokenizer") or {}
    seq = ((cfg.get("train_module") or {}).get("max_sequence_length")
           or (cfg.get("dataset") or {}).get("sequence_length"))
    common = dict(vocab_size=m["vocab_size"], hidden_size=m["d_model"], intermediate_size=ff["hidden_size"],
                  num_hidden_layers=m["n_layers"], num_attention_heads=n_heads,
                  num_key_value_heads=att.get("n_kv_heads") or n_heads, hidden_act="silu",
                  max_position_embeddings=int(seq or 4096), attention_bias=bool(att.get("bias")),
                  rope_parameters={"rope_type": "default", "rope_theta": float(rope.get("theta", 500_000))},
                  rms_norm_eps=float(ln.get("eps", 1e-5)), tie_word_embeddings=bool(m.get("tie_word_embeddings")),
                  **{k: tok.get(k) if isinstance(tok.get(k), int) else None
                     for k in ("bos_token_id", "eos_token_id", "pad_token_id")})
    if kind == "reordered_norm":
        arch = "Olmo2ForCausalLM"
        if not att.get("qk_norm"):
            _refuse(file, "reordered_norm blocks without QK-norm")
        if ff.get("bias") or head_dim * n_heads != m["d_model"]:
            _refuse(file, "a feed-forward bias or head_dim * n_heads != d_model")
        out = Olmo2Config(**common).to_dict()
    elif kind == "default":
        arch = "LlamaForCausalLM"
        if att.get("qk_norm"):
            _refuse(file, "pre-norm blocks with QK-norm")
        out = LlamaConfig(**common, head_dim=head_dim, mlp_bias=bool(ff.get("bias"))).to_dict()
    else:
        _refuse(file, f"{kind!r} blocks")
    if m.get("dtype"):
        out["dtype"] = str(m["dtype"])
    out["architectures"] = [arch]
    out.pop("transformers_version", None)
    return out


def read_hf_config(step_dir: Path) -> dict | None:
    """The derived HF config of the run (``config.json`` in the step folder, else in the save folder),
    or None (with a warning saying why) when there is none or it cannot be derived."""
    for file in (step_dir / CONFIG, step_dir.parent / CONFIG):
        if not file.is_file():
            continue
        try:
            cfg = json.loads(file.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            log.warning("%s: not readable JSON (%s); no HF config derived", file, e)
            return None
        if not isinstance(cfg, dict) or model_section(cfg) is None:
            continue
        try:
            return hf_config_from_olmo(cfg, file)
        except CheckpointError as e:
            log.warning("%s", e)
            return None
    return None


# -- the maps ----------------------------------------------------------------------------------------------
def _layers(native: Mapping[str, NativeTensor]) -> list[int]:
    return sorted({int(m.group(1)) for n in native if (m := _LAYER.match(n))})


def _add(p: dict[str, Piece], native: Mapping[str, NativeTensor], hf: str, name: str) -> None:
    t = native.get(name)
    if t is not None:
        p[hf] = Piece(name, t.shape)


def _check_type(cfg: dict, want: tuple[str, ...], layout: str) -> None:
    mt = cfg.get("model_type")
    if mt is not None and mt not in want:
        raise CheckpointError(f"layout {layout!r} (OLMo-core keys) maps to model_type {want[0]!r}, but the HF config "
                              f"says {mt!r}: is checkpoints.config_dir the config of this model?")


def _build(native: Mapping[str, NativeTensor], norms: dict[str, str]) -> dict[str, Piece]:
    """``OLMO_CORE_TO_HF_WEIGHT_MAPPINGS`` (module mappings carry the biases), with ``norms`` for the two
    block norms."""
    p: dict[str, Piece] = {}
    _add(p, native, "model.embed_tokens.weight", "embeddings.weight")
    for i in _layers(native):
        b, h = f"blocks.{i}.", f"model.layers.{i}."
        for suf in ("weight", "bias"):
            for ours, theirs in (("attention.w_q", "self_attn.q_proj"), ("attention.w_k", "self_attn.k_proj"),
                                 ("attention.w_v", "self_attn.v_proj"), ("attention.w_out", "self_attn.o_proj"),
                                 ("attention.q_norm", "self_attn.q_norm"), ("attention.k_norm", "self_attn.k_norm"),
                                 ("feed_forward.w1", "mlp.gate_proj"), ("feed_forward.w2", "mlp.down_proj"),
                                 ("feed_forward.w3", "mlp.up_proj"), *norms.items()):
                _add(p, native, f"{h}{theirs}.{suf}", f"{b}{ours}.{suf}")
    _add(p, native, "model.norm.weight", "lm_head.norm.weight")
    _add(p, native, "lm_head.weight", "lm_head.w_out.weight")
    return p


def build_olmo2(native: Mapping[str, NativeTensor], cfg: dict) -> dict[str, Piece]:
    """OLMo 2 (``reordered_norm``): ``attention_norm`` -> ``post_attention_layernorm``, ``feed_forward_norm``
    -> ``post_feedforward_layernorm``."""
    _check_type(cfg, ("olmo2", "olmo3"), "olmo-core-olmo2")
    return _build(native, {"attention_norm": "post_attention_layernorm",
                           "feed_forward_norm": "post_feedforward_layernorm"})


def build_llama(native: Mapping[str, NativeTensor], cfg: dict) -> dict[str, Piece]:
    """Llama-like (``default`` pre-norm blocks): the converter's ``"llama"`` overrides, ``attention_norm``
    -> ``input_layernorm``, ``feed_forward_norm`` -> ``post_attention_layernorm``."""
    _check_type(cfg, ("llama",), "olmo-core-llama")
    return _build(native, {"attention_norm": "input_layernorm", "feed_forward_norm": "post_attention_layernorm"})


def _dense(n: Mapping[str, NativeTensor]) -> bool:
    return {"embeddings.weight", "blocks.0.attention.w_q.weight", "blocks.0.feed_forward.w1.weight",
            "blocks.0.attention_norm.weight", "lm_head.norm.weight"} <= set(n)


MAPS = (
    LayoutMap("olmo-core-olmo2", "Olmo2ForCausalLM", lambda n: _dense(n) and "blocks.0.attention.q_norm.weight" in n,
              build_olmo2),
    LayoutMap("olmo-core-llama", "LlamaForCausalLM",
              lambda n: _dense(n) and "blocks.0.attention.q_norm.weight" not in n, build_llama),
)


# -- the format --------------------------------------------------------------------------------------------
class OlmoCoreCheckpoint(DCPCheckpoint):
    """A ``model_and_optim`` DCP folder (``path``) and the step folder around it (``step_dir``)."""

    format = "olmo_core"

    def __init__(self, step_dir: Path, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.step_dir = Path(step_dir)


class OlmoCoreFormat(DCPFormat):
    name = "olmo_core"
    requires = REQUIRES
    needs_config_dir = (" (or keep the trainer's config.json, written by OLMo-core's ConfigSaverCallback, in the "
                        "step folder, with an OLMo 2 or Llama-like TransformerConfig under 'model')")

    def detect(self, path: Path) -> bool:
        path = Path(path)
        if not path.is_dir():
            return False
        if path.name == MODEL_AND_OPTIM:
            return is_dcp_dir(path)
        return is_dcp_dir(path / MODEL_AND_OPTIM)

    def complete(self, path: Path) -> bool:
        """``Checkpointer.dir_is_checkpoint`` (for a ``model_and_optim`` folder named alone: its ``.metadata``)."""
        path = Path(path)
        if (path / METADATA).is_file():
            return True
        return all((path / f).is_file() for f in (TRAIN_STATE, f"{MODEL_AND_OPTIM}/{METADATA}", METADATA_JSON))

    def series_children(self, folder: Path) -> list[Path] | None:
        folder = Path(folder)
        if not folder.is_dir() or self.detect(folder):
            return None
        kids = [c for c in folder.iterdir() if STEP.match(c.name) and self.detect(c)]
        return kids or None

    def open(self, path: Path) -> NativeCheckpoint:
        from torch.distributed.checkpoint.metadata import TensorStorageMetadata

        step_dir, dcp_dir = _dirs(Path(path))
        factory = _olmo_reader()
        try:
            md = read_metadata(dcp_dir, factory)
        except ModuleNotFoundError as e:
            if (e.name or "").split(".")[0] != "olmo_core":
                raise CheckpointError(f"{dcp_dir / METADATA}: unpickling it needs module {e.name!r}, which is not "
                                      f"installed ({REQUIRES} brings OLMo-core's dependencies)") from e
            raise CheckpointError(
                f"{dcp_dir}: an OLMo-core checkpoint whose {METADATA} pickles OLMo-core's own storage classes "
                f"({e.name}), so reading it needs OLMo-core installed: {REQUIRES}") from e
        model, others, model_bytes, other_bytes = {}, {}, [], []
        for key, item in md.state_dict_metadata.items():
            tensor = isinstance(item, TensorStorageMetadata)
            if key.startswith("model."):
                if tensor:
                    model[key[len("model."):]] = key
                else:
                    model_bytes.append(key)
            elif tensor:
                others[key] = key
            else:
                other_bytes.append(key)
        if not model:
            raise CheckpointError(f"{dcp_dir}: an OLMo-core {MODEL_AND_OPTIM} folder without 'model.*' tensors "
                                  f"(keys such as {sorted(md.state_dict_metadata)[:5]})")
        ck = OlmoCoreCheckpoint(step_dir, dcp_dir, md, model, others, hf_config=read_hf_config(step_dir),
                                reader_factory=factory, model_bytes=model_bytes, other_bytes=other_bytes)
        ck.format = self.name
        return ck

    def maps(self):
        return MAPS

    def step_files(self, template: DCPCheckpoint) -> list[tuple[Path, str]]:
        """The files of the newest's step folder that ``Checkpointer.save`` and its callbacks write beside
        ``model_and_optim`` (file, path relative to the step folder): ``train/*`` and the top-level files,
        ``.metadata.json`` last. None when the ``model_and_optim`` folder was named alone and its parent
        is no step folder."""
        step_dir = getattr(template, "step_dir", None)
        if step_dir is None or Path(template.path) == Path(step_dir):
            return []
        step_dir = Path(step_dir)
        if not ((step_dir / METADATA_JSON).is_file() or (step_dir / "train").is_dir()):
            return []
        files = [f for f in sorted(step_dir.iterdir()) if f.is_file() and f.suffix != ".tmp"]
        if (step_dir / "train").is_dir():
            files += [f for f in sorted((step_dir / "train").iterdir()) if f.is_file()]
        files.sort(key=lambda f: f.name == METADATA_JSON)
        return [(f, str(f.relative_to(step_dir))) for f in files]

    def write(self, out: Path, template: NativeCheckpoint, produce: Callable[[str], torch.Tensor],
              names: Iterable[str]) -> None:
        """``out/model_and_optim`` (DCP: the names asked, the ``model.*`` byte entries, the ``optim.*`` ones
        when optimizer state is written), then the newest's other step files: a step folder OLMo-core loads."""
        out = Path(out)
        names = list(names)
        super().write(out / MODEL_AND_OPTIM, template, produce, names)
        for src, rel in self.step_files(template):
            dst = out / rel
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst)
        log.info("wrote OLMo-core step folder %s (%d tensors)", out, len(names))


FORMAT = OlmoCoreFormat()
